"""PyTorch -> ONNX (or a foreign ONNX made ready): static 1x3x112x112 `input`, `landmarks` [1, 2P].

Exporter choice: torch 2.13's default (dynamo) exporter needs `onnxscript`, writes weights to a
separate `.onnx.data` unless told otherwise and may raise the opset past what onnx2tf 1.28.8
handles well. PFLD is a plain feed-forward CNN, so the legacy TorchScript exporter
(`dynamo=False`) gives the same graph with a fixed opset in one file; we use it.

Opset 13 is fixed: onnx2tf 1.28.8 converts every op PFLD uses at 13, and it is the first opset
with ReduceMean/Squeeze in their modern form. Foreign ONNX files keep their own opset.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..checkpoint import LoadedModel
from ..errors import ConversionError, ToleranceError, UsageError
from ..io import atomic_write_bytes
from ..layouts import get_layout
from ..preprocess import Preprocess
from ..runtime import ONNX_META_MODEL, ONNX_META_PREPROCESS, Predictor, load_onnx

ONNX_OPSET = 13
ONNX_META_VERSION = "pfld_export.version"
ONNX_META_SOURCE = "pfld_export.source"
INPUT_NAME = "input"
OUTPUT_NAME = "landmarks"
# ORT vs PyTorch, both float32: differences come only from summation order (~1e-6 of the crop).
# 0.01 px at 112 is the fp32 budget and far above that noise, far below anything visible.
PARITY_ATOL_PX = 0.01


@dataclass
class OnnxConfig:
    """Where the ONNX goes and how it is made."""

    path: Path
    opset: int = ONNX_OPSET
    simplify: bool = True
    source: str = ""  # recorded in metadata_props: what this was converted from


@dataclass
class OnnxArtifact:
    """An ONNX file ready for onnx2tf: static shapes, canonical names, preprocessing metadata."""

    path: Path
    preprocess: Preprocess
    num_points: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    opset: int
    simplified: bool
    op_types: dict[str, int]
    bytes: int
    source: str
    model: dict[str, Any] | None = None  # ModelConfig of a checkpoint source
    rewrites: list[str] = field(default_factory=list)  # global AveragePools turned into ReduceMean
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME


@dataclass
class ParityResult:
    """Max / mean landmark difference of a candidate against its reference, with the tolerance."""

    reference: str
    candidate: str
    faces: int
    max_px: float
    mean_px: float
    atol_px: float
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = self.max_px <= self.atol_px


def to_onnx(loaded: LoadedModel, cfg: OnnxConfig) -> OnnxArtifact:
    """Export the landmarks-only wrapper of a checkpoint (auxiliary net dropped) to ONNX."""
    import torch

    net = loaded.inference_model()
    size = loaded.meta.preprocess.input_size
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (module docstring); its deprecation notice is noise.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net, (torch.zeros(1, 3, size, size),), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=cfg.opset, dynamo=False, do_constant_folding=True,
            )
        except Exception as e:  # torch raises a zoo of types from the tracer/exporter
            raise ConversionError(f"ONNX export failed ({type(e).__name__}: {_first_line(e)}); try another --opset") from None
    model = loaded.meta.model.to_dict() if loaded.meta.model is not None else None
    meta = {ONNX_META_MODEL: json.dumps(model, sort_keys=True)} if model is not None else {}
    return _finish(buf.getvalue(), loaded.meta.preprocess, cfg, meta, model=model)


def import_onnx(path: Path, preprocess: Preprocess | None, cfg: OnnxConfig) -> OnnxArtifact:
    """Make a foreign (or our own) ONNX ready: one 4D input with batch 1, one 2D landmark output,
    renamed `input` / `landmarks`, preprocessing written into metadata_props.

    A foreign ONNX carries no preprocessing, so `preprocess` (from --color/--mean/--std) is
    required unless the file has our metadata.
    """
    m = load_onnx(path, load_external_data=True)
    props = {p.key: p.value for p in m.metadata_props}
    if preprocess is None:
        if ONNX_META_PREPROCESS not in props:
            raise UsageError(
                f"{path.name} carries no preprocessing metadata; say how it was trained with "
                "--color RGB|BGR --mean M --std S (e.g. GhostOne PFLD: --color RGB --mean 0.5 --std 0.5)"
            )
        preprocess = Preprocess.from_dict(json.loads(props[ONNX_META_PREPROCESS]))
    g = m.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{path.name} has {len(inputs)} inputs ({[i.name for i in inputs]}); a landmark model takes one image")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    s = preprocess.input_size
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    fits = len(static) == 4 and static[0] in (1, None) and static[1] in (3, None) and all(v in (s, None) for v in static[2:])
    if not fits:
        raise UsageError(f"{path.name}: input {inp.name} has shape {static}; expected [1, 3, {s}, {s}] (NCHW)")
    # Batch 1, static: TFLite on phones runs one face per invoke, and static shapes keep every op a builtin.
    for d, v in zip(dims, (1, 3, s, s)):
        d.ClearField("dim_param")
        d.dim_value = v
    out = _pick_output(g, path)
    del g.output[:]
    g.output.append(out)
    _rename(g, inp.name, INPUT_NAME)
    _rename(g, out.name, OUTPUT_NAME)
    rewrites = global_pools_to_mean(m)
    extra = {k: v for k, v in props.items() if k == ONNX_META_MODEL}
    art = _finish(m.SerializeToString(), preprocess, cfg, extra, model=json.loads(props[ONNX_META_MODEL]) if extra else None)
    art.rewrites = rewrites
    return art


def global_pools_to_mean(m: Any) -> list[str]:
    """Replace AveragePool nodes whose window is the whole feature map by ReduceMean (same math).

    Why: TFLite's int8 AVERAGE_POOL_2D must keep its input's scale, so in PFLD's multi-scale
    head (pool -> reshape -> concat) the concat's wide range is forced back onto the pooled
    feature maps and clips them: 6-30 px landmark error on a 112 crop (measured on the GhostOne
    fixture, benchmarks/conversion.md). MEAN may rescale, which removes the error. Returns the
    rewritten node names.
    """
    import onnx
    from onnx import helper, shape_inference

    shapes = {v.name: _shape(v) for v in shape_inference.infer_shapes(m).graph.value_info}
    shapes.update({v.name: _shape(v) for v in m.graph.input})
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    done = []
    for i, n in enumerate(list(m.graph.node)):
        if n.op_type != "AveragePool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        shape = shapes.get(n.input[0], ())
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(shape) != 4 or list(attrs.get("kernel_shape", [])) != list(shape[2:]) or any(pads) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            continue
        if opset >= 18:  # axes became an input in opset 18
            axes = helper.make_tensor(f"{n.output[0]}__axes", onnx.TensorProto.INT64, [2], [2, 3])
            m.graph.initializer.append(axes)
            new = helper.make_node("ReduceMean", [n.input[0], axes.name], list(n.output), name=n.name or f"mean_{i}", keepdims=1)
        else:
            new = helper.make_node("ReduceMean", [n.input[0]], list(n.output), name=n.name or f"mean_{i}", axes=[2, 3], keepdims=1)
        m.graph.node.remove(n)
        m.graph.node.insert(i, new)
        done.append(n.name or n.output[0])
    return done


def _pick_output(g: Any, path: Path) -> Any:
    """The landmark output: named `landmarks`, else the only 2D output with an even size.

    PFLD-pytorch's own exports put the 28x28 feature first, so 'the first output' is wrong.
    """
    outs = list(g.output)
    named = [o for o in outs if o.name == OUTPUT_NAME]
    if named:
        return named[0]
    flat = [o for o in outs if len(o.type.tensor_type.shape.dim) == 2]
    if len(flat) != 1:
        raise UsageError(
            f"{path.name}: cannot tell which output holds the landmarks among {[o.name for o in outs]}; "
            "name it 'landmarks' or keep exactly one [1, 2P] output"
        )
    return flat[0]


def _rename(g: Any, old: str, new: str) -> None:
    if old == new:
        return
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            if v.name == old:
                v.name = new
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new


def _finish(raw: bytes, pre: Preprocess, cfg: OnnxConfig, meta: dict[str, str], model: dict[str, Any] | None) -> OnnxArtifact:
    """Simplify, check names/shapes, write metadata, onnx.checker, write atomically."""
    import onnx

    m = onnx.load_from_string(raw)
    simplified = False
    if cfg.simplify:
        import onnxsim

        try:
            m2, ok = onnxsim.simplify(m)
        except Exception as e:  # onnxsim raises RuntimeError/ValueError/its own types
            raise ConversionError(f"onnxsim failed ({_first_line(e)}); the graph may use unsupported ops") from None
        if ok:
            m, simplified = m2, True
    meta = {**meta, ONNX_META_PREPROCESS: pre.to_json(), ONNX_META_VERSION: __version__, ONNX_META_SOURCE: cfg.source}
    kept = [p for p in m.metadata_props if p.key not in meta]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    for k, v in sorted(meta.items()):
        m.metadata_props.add(key=k, value=v)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as e:
        raise ConversionError(f"onnx.checker rejected the exported model ({_first_line(e)})") from None
    in_shape = _shape(m.graph.input[0])
    out_shape = _shape(m.graph.output[0])
    s = pre.input_size
    if [v.name for v in m.graph.input] != [INPUT_NAME] or [v.name for v in m.graph.output] != [OUTPUT_NAME]:
        raise ConversionError(f"ONNX names are {[v.name for v in m.graph.input]} -> {[v.name for v in m.graph.output]}, expected ['input'] -> ['landmarks']")
    if in_shape != (1, 3, s, s) or len(out_shape) != 2 or out_shape[0] != 1 or out_shape[1] % 2:
        raise ConversionError(f"ONNX shapes are {in_shape} -> {out_shape}, expected (1, 3, {s}, {s}) -> (1, 2P)")
    points = out_shape[1] // 2
    layout = get_layout(pre.layout)
    if layout.num_points != points:
        raise UsageError(f"the model predicts {points} points but its layout {pre.layout} has {layout.num_points}; fix the preprocessing layout")
    data = m.SerializeToString()
    atomic_write_bytes(cfg.path, data)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxArtifact(
        path=Path(cfg.path), preprocess=pre, num_points=points, input_shape=in_shape, output_shape=out_shape,
        opset=int(opset), simplified=simplified, op_types=dict(Counter(n.op_type for n in m.graph.node)),
        bytes=len(data), source=cfg.source, model=model,
    )


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)


def check_parity(
    reference: Predictor, candidate: Predictor, crops: np.ndarray, atol_px: float = PARITY_ATOL_PX,
    reference_points: np.ndarray | None = None,
) -> ParityResult:
    """Compare candidate to reference on real crops; ToleranceError if any point moves > atol_px.

    Names, then shapes, then values (Optimum-style): a point-count mismatch is reported as such,
    not as a huge difference.
    """
    ref = reference.predict(crops) if reference_points is None else reference_points
    got = candidate.predict(crops)
    if got.shape != ref.shape:
        raise ConversionError(f"{candidate.name} predicts shape {got.shape} but {reference.name} predicts {ref.shape}")
    d = np.linalg.norm(got.astype(np.float64) - ref, axis=-1)
    res = ParityResult(reference=reference.name, candidate=candidate.name, faces=len(crops),
                       max_px=float(d.max()), mean_px=float(d.mean()), atol_px=atol_px)
    if not res.passed:
        raise ToleranceError(
            f"{candidate.backend} vs {reference.backend} landmarks ({candidate.name} vs {reference.name}, px at 112)",
            res.max_px, atol_px, f"mean {res.mean_px:.3g} px over {len(crops)} real crops; the export changed the model's math",
        )
    return res


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__
