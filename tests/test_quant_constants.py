"""quant/constants.py: a weight variant written into the plain converted flatbuffer predicts what
the variant converted on its own (ONNX export + onnx2tf) predicts, float and int8; a layer that
cannot be placed is refused. equalize.bias_correct's one forward equals correcting layer by layer."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pfld_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pfld_export.errors import ConversionError
from pfld_export.quant.equalize import (
    EqualizeConfig, bias_correct, conv_bn_pairs, equalize, folded_weight, tflite_weight_rounding,
)
from pfld_export.quant.graph import calibrate_all, calibrate_blob, keras_function, predict_blob
from pfld_export.export.onnx import OnnxConfig, to_onnx
from pfld_export.model import LandmarkModel, ModelConfig, PFLD
from pfld_export.preprocess import Preprocess
from pfld_export.quant.constants import map_constants, write_variant

from .conftest import synthetic_crops

METHODS = ("minmax", "mse")
# The swapped flatbuffer carries the same float32 constants as the variant's own conversion (the
# export's BN folding is reproduced bit for bit), so both run the same arithmetic; the bounds only
# leave room for float32 summation order (float) and one int8 step on an odd value (int8).
FLOAT_TOL_PX, INT8_TOL_PX = 1e-3, 0.05


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: two threads wait on each other


def _net(config: ModelConfig, x: torch.Tensor, seed: int = 0) -> PFLD:
    """A PFLD with spread channel ranges and BN statistics measured on `x` (O(1) activations,
    as in a trained net), and a head scaled to landmarks of O(1) of the crop."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PFLD(config)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.weight.copy_(torch.exp(torch.randn(m.num_features, generator=g) * 0.8))
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        net.train()
        net(x)
        net.eval()
        net.fc.weight.mul_(0.1)
    return net


@pytest.fixture(scope="module", params=["relu", "relu6"])
def swapped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Plain converted once; the variant (equalize+bias for ReLU, bias correction for ReLU6)
    written into it, and converted on its own through ONNX for comparison."""
    root = tmp_path_factory.mktemp(f"constants-{request.param}")
    crops, _pts = synthetic_crops(16, seed=5, folder=root / "faces")
    pre = Preprocess()
    inputs = pre.apply(crops)
    x = torch.from_numpy(pre.apply_nchw(crops))
    config = ModelConfig(width=0.25, activation=request.param)
    pfld = _net(config, x)
    loaded = load_checkpoint(save_checkpoint(root / "m.pth", pfld, CheckpointMeta(model=config, preprocess=pre)))
    plain_net = loaded.inference_model()
    base = equalize(plain_net, x, EqualizeConfig()).model if request.param == "relu" else plain_net
    variant = bias_correct(base, x).model
    art = to_onnx(loaded, OnnxConfig(path=root / "plain.onnx", source="test"))
    plain = calibrate_all(*keras_function(art, inputs), inputs, METHODS)["minmax"]
    cmap = map_constants(plain.blob, plain_net)
    new = calibrate_blob(write_variant(cmap, plain_net, variant), inputs, METHODS, plain.ops)
    vloaded = dataclasses.replace(loaded, model=variant.pfld)
    vart = to_onnx(vloaded, OnnxConfig(path=root / "variant.onnx", source="test"))
    old = calibrate_all(*keras_function(vart, inputs), inputs, METHODS)
    return {"new": new, "old": old, "plain": plain, "crops": crops, "pre": pre, "cmap": cmap, "plain_net": plain_net,
            "variant": variant, "x": x, "config": config}


def _shift_px(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) * 112.0


def test_every_layer_is_placed_once(swapped: dict[str, Any]) -> None:
    slots = swapped["cmap"].slots
    assert [s.layer for s in slots] == [name for name, _c, _b in conv_bn_pairs(swapped["plain_net"].pfld)]
    assert len({s.weight for s in slots}) == len(slots) and len({s.bias for s in slots}) == len(slots)


def test_swapped_variant_predicts_as_its_own_conversion(swapped: dict[str, Any]) -> None:
    crops, pre = swapped["crops"], swapped["pre"]
    for method in METHODS:
        new, old = swapped["new"][method], swapped["old"][method]
        f_new, f_old = predict_blob(new.blob, pre, crops), predict_blob(old.blob, pre, crops)
        assert _shift_px(f_new, f_old) < FLOAT_TOL_PX
        # and it really is the variant: the plain float model predicts elsewhere
        assert _shift_px(f_new, predict_blob(swapped["plain"].blob, pre, crops)) > 10 * FLOAT_TOL_PX
        q_new, q_old = predict_blob(new.quantize(), pre, crops), predict_blob(old.quantize(), pre, crops)
        assert _shift_px(q_new, q_old) < INT8_TOL_PX, method


def test_ranges_follow_the_variant(swapped: dict[str, Any]) -> None:
    new, old = swapped["new"]["minmax"], swapped["old"]["minmax"]
    out_new, out_old = new.ops[-1].tensor, old.ops[-1].tensor
    np.testing.assert_allclose(new.ranges[out_new], old.ranges[out_old], rtol=1e-4, atol=1e-6)


def test_a_layer_not_in_the_model_is_refused(swapped: dict[str, Any]) -> None:
    other = copy.deepcopy(swapped["plain_net"])
    with torch.no_grad():
        other.pfld.conv7[0].weight.mul_(1.5)  # no constant of the converted model holds this weight
    with pytest.raises(ConversionError, match="conv7"):
        map_constants(swapped["plain"].blob, other)


def test_a_variant_of_another_graph_is_refused(swapped: dict[str, Any]) -> None:
    other = copy.deepcopy(swapped["variant"])
    with torch.no_grad():
        other.pfld.bn1.running_var.mul_(2.0)  # folded into conv1's constants: written, not refused
        assert write_variant(swapped["cmap"], swapped["plain_net"], other) != swapped["plain"].blob
        other.pfld.conv1.weight.data = other.pfld.conv1.weight.data[:, :, :2]  # another shape: another graph
    with pytest.raises(ConversionError, match="conv1"):
        write_variant(swapped["cmap"], swapped["plain_net"], other)
    extra = copy.deepcopy(swapped["variant"])
    extra.pfld.register_buffer("offset", torch.ones(1))  # a constant the converted model has no place for
    with pytest.raises(ConversionError):
        write_variant(swapped["cmap"], swapped["plain_net"], extra)


def _bias_correct_layer_by_layer(model: LandmarkModel, x: torch.Tensor) -> LandmarkModel:
    """Bias correction with one full forward per layer: each layer's input is measured in the
    network corrected up to it, its rounding shift subtracted from its bias."""
    net = copy.deepcopy(model).eval()
    for _name, conv, bn in conv_bn_pairs(net.pfld):
        w = folded_weight(conv, bn)
        dw = tflite_weight_rounding(w) - w
        got: list[torch.Tensor] = []
        h = conv.register_forward_hook(lambda _m, inp, _o: got.append(inp[0].detach()))
        with torch.no_grad():
            net(x)
        h.remove()
        a = got[0]
        with torch.no_grad():
            if isinstance(conv, nn.Linear):
                shift = (a @ dw.T).mean(0)
            else:
                shift = nn.functional.conv2d(a, dw, None, conv.stride, conv.padding, conv.dilation, conv.groups).mean((0, 2, 3))
            (bn.bias if bn is not None else conv.bias).sub_(shift)
    return net


@pytest.mark.parametrize("kw", [dict(width=0.25), dict(width=0.25, points=17, conv2="depthwise", head_bn=True, activation="relu6")])
def test_one_forward_bias_correction_equals_layer_by_layer(kw: dict[str, Any], tmp_path: Path) -> None:
    crops, _pts = synthetic_crops(12, seed=9, folder=tmp_path)
    x = torch.from_numpy(Preprocess().apply_nchw(crops))
    net = LandmarkModel(_net(ModelConfig(**kw), x, seed=3)).eval()
    got = bias_correct(net, x)
    want = _bias_correct_layer_by_layer(net, x)
    moved = 0
    for (name, conv, bn), (_n, conv0, bn0), (_m, conv_w, bn_w) in zip(
            conv_bn_pairs(got.model.pfld), conv_bn_pairs(net.pfld), conv_bn_pairs(want.pfld)):
        b, b0, bw = [(m.bias if m is not None else c.bias).detach() for c, m in ((conv, bn), (conv0, bn0), (conv_w, bn_w))]
        torch.testing.assert_close(b, bw, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(b, b0))
    assert moved == len(got.layers) == len(list(conv_bn_pairs(net.pfld)))
