"""Weight variants written into a converted flatbuffer instead of converted again.

A weight variant of a PFLD (equalised, bias-corrected) differs from the plain network only in
its conv / FC weights and biases: onnx2tf and the TFLite converter make the same graph of it,
with other constants. So the plain network is converted once, and each variant's weights go
straight into a copy of the plain (calibrated, float) flatbuffer:

* every conv / FC layer is folded as the ONNX export folds it (BN scale into the weight, BN
  shift into the bias; `model.fold_bn`), and its weight is looked up among the
  flatbuffer's float constants by value, under each axis permutation that gives the stored
  shape (OIHW -> OHWI for a conv, 1HWO for a depthwise conv, [O, I] for the FC);
* its bias is the third input of the one op that reads that weight, checked by value too;
* the variant's folded values are written into those places in the same layout.

A layer found nowhere or in more than one place, a bias that does not match, or a variant that
changed anything besides those layers is refused with ConversionError, naming the layer: the
caller then converts the variant through ONNX as before. The activation ranges must be
measured again on the written flatbuffer (they follow the new weights).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConversionError
from ..model import fold_bn
from .equalize import conv_bn_pairs
from .graph import flatbuffer_bytes, flatbuffer_object

# Folding in another order than the ONNX export's moves a value by a few float32 ulps; a
# different tensor differs by whole weight steps. 1e-5 of the tensor's largest value sits far
# between the two (measured: the export's folding is reproduced bit for bit).
MATCH_RTOL = 1e-5
_TFLITE_FLOAT32 = 0  # schema TensorType.FLOAT32


@dataclass(frozen=True)
class Slot:
    """Where one folded conv / FC layer lives in a flatbuffer."""

    layer: str
    weight: int  # tensor index of the weight constant
    perm: tuple[int, ...]  # PyTorch axes -> stored axes (numpy transpose)
    bias: int  # tensor index of the bias constant


@dataclass(frozen=True)
class ConstantMap:
    """A flatbuffer and the place of every conv / FC layer of the network it was converted from."""

    blob: bytes
    slots: tuple[Slot, ...]


def folded_layers(net: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(layer, folded weight, folded bias) of a LandmarkModel's convs and FC, in forward order."""
    pfld = getattr(net, "pfld", None)
    if pfld is None:
        raise ConversionError(f"{type(net).__name__} is not a PFLD landmark model; its constants are not mapped")
    return [(name, *(v.detach().numpy().astype(np.float32) for v in fold_bn(conv, bn))) for name, conv, bn in conv_bn_pairs(pfld)]


def map_constants(blob: bytes, plain: nn.Module) -> ConstantMap:
    """Find every conv / FC layer of `plain` (the network `blob` was converted from) in `blob`."""
    model = flatbuffer_object(blob)
    sg = _subgraph(model)
    consts = _float_constants(model, sg)
    slots: list[Slot] = []
    taken: set[int] = set()
    for name, w, b in folded_layers(plain):
        hits = [(i, p) for i, c in consts.items() if (p := _layout(w, c)) is not None]
        if len(hits) != 1:
            raise ConversionError(f"layer {name}'s weight {list(w.shape)} is found {len(hits)} times among the converted "
                                  "model's constants (needs exactly once)")
        i, perm = hits[0]
        readers = [op for op in sg.operators if op.inputs is not None and len(op.inputs) > 1 and int(op.inputs[1]) == i]
        if i in taken or len(readers) != 1 or len(readers[0].inputs) < 3 or int(readers[0].inputs[2]) not in consts:
            raise ConversionError(f"layer {name}'s weight is not read by exactly one op with a float bias in the converted model")
        bias = int(readers[0].inputs[2])
        if consts[bias].shape != b.shape or not _close(b, consts[bias]):
            raise ConversionError(f"layer {name}'s bias does not match the converted model's (shape {list(consts[bias].shape)})")
        taken.add(i)
        slots.append(Slot(name, i, perm, bias))
    return ConstantMap(blob=blob, slots=tuple(slots))


def write_variant(cmap: ConstantMap, plain: nn.Module, variant: nn.Module) -> bytes:
    """`cmap.blob` with the folded weights and biases of `variant` (a copy of `plain` with
    rewritten conv / BN / FC parameters) in place of `plain`'s."""
    _check_only_layers_changed(plain, variant)
    model = flatbuffer_object(cmap.blob)
    sg = _subgraph(model)
    refs = Counter(int(t.buffer) for t in sg.tensors)
    layers = {name: (w, b) for name, w, b in folded_layers(variant)}
    for slot in cmap.slots:
        w, b = layers[slot.layer]
        w = np.ascontiguousarray(w.transpose(slot.perm))
        for tensor, value in ((slot.weight, w), (slot.bias, b)):
            stored = tuple(int(v) for v in sg.tensors[tensor].shape)
            if value.shape != stored:
                raise ConversionError(f"layer {slot.layer} of the weight variant has shape {list(value.shape)} where the "
                                      f"converted model has {list(stored)}")
            _put(model, sg, refs, tensor, value)
    return flatbuffer_bytes(model)


def _subgraph(model: Any) -> Any:
    if len(model.subgraphs) != 1:
        raise ConversionError(f"the converted model has {len(model.subgraphs)} subgraphs; constants are mapped in one only")
    return model.subgraphs[0]


def _float_constants(model: Any, sg: Any) -> dict[int, np.ndarray]:
    """Tensor index -> value of every float32 constant with its own data."""
    out = {}
    for i, t in enumerate(sg.tensors):
        data = model.buffers[t.buffer].data
        if t.type == _TFLITE_FLOAT32 and data is not None and len(data) > 0:
            shape = [int(s) for s in t.shape] if t.shape is not None else []
            out[i] = np.frombuffer(bytes(np.asarray(data, np.uint8)), np.float32).reshape(shape)
    return out


def _layout(w: np.ndarray, stored: np.ndarray) -> tuple[int, ...] | None:
    """The axis permutation under which `w` equals `stored` (shapes and values), or None."""
    if stored.size != w.size or stored.ndim != w.ndim:
        return None
    for perm in itertools.permutations(range(w.ndim)):
        t = w.transpose(perm)
        if t.shape == stored.shape and _close(t, stored):
            return tuple(perm)
    return None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = float(np.abs(a).max()) if a.size else 0.0
    return bool(np.allclose(a, b, rtol=0.0, atol=MATCH_RTOL * max(scale, 1e-30)))


def _put(model: Any, sg: Any, refs: Counter[int], tensor: int, value: np.ndarray) -> None:
    """Write `value` (float32) as `tensor`'s data; a buffer other tensors share gets copied first."""
    t = sg.tensors[tensor]
    data = np.frombuffer(np.asarray(value, np.float32).tobytes(), np.uint8).copy()
    if refs[int(t.buffer)] > 1:
        from tensorflow.lite.python import schema_py_generated as schema

        buf = schema.BufferT()
        model.buffers.append(buf)
        refs[int(t.buffer)] -= 1
        t.buffer = len(model.buffers) - 1
        refs[int(t.buffer)] = 1
    model.buffers[t.buffer].data = data


def _check_only_layers_changed(plain: nn.Module, variant: nn.Module) -> None:
    """Refuse a variant that differs from `plain` anywhere but the mapped convs, BNs and FC."""
    pfld = getattr(variant, "pfld", None)
    if pfld is None:
        raise ConversionError(f"{type(variant).__name__} is not a PFLD landmark model; its constants are not mapped")
    mapped = {id(m) for _n, conv, bn in conv_bn_pairs(pfld) for m in (conv, bn) if m is not None}
    owner = {f"{prefix}.{k}" if prefix else k: id(mod) for prefix, mod in variant.named_modules()
             for k, _v in itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False))}
    a, b = plain.state_dict(), variant.state_dict()
    if a.keys() != b.keys():
        raise ConversionError("the weight variant has other parameters than the converted network")
    for key, value in b.items():
        if owner.get(key) not in mapped and not torch.equal(a[key], value):
            raise ConversionError(f"the weight variant changed {key}, which is no conv / BN / FC constant of the converted model")
