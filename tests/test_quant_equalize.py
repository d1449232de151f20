"""equalize.py: exact float rewrites (landmarks move < 1e-4 px) that even out activation ranges,
and bias correction for TFLite's int8 weight rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pfld_export.errors import UsageError
from pfld_export.quant.equalize import (
    FLOAT_TOLERANCE_PX, EqualizeConfig, bias_correct, equalize, folded_weight, head_features, tflite_weight_rounding,
    conv_bn_pairs,
)
from pfld_export.model import LandmarkModel, ModelConfig, PFLD


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: two threads wait on each other


def _uneven_net(seed: int, **kw: object) -> LandmarkModel:
    """A PFLD whose channels have deliberately different ranges (as trained nets have), with
    BN statistics measured on the test inputs so activations stay O(1), as in a trained net."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PFLD(ModelConfig(**kw))  # type: ignore[arg-type]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over one pass
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(torch.exp(torch.randn(n, generator=g) * 0.8))  # channel ranges spread ~e^(+-1.6)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        net.train()
        net(_inputs(8, seed + 100))
        net.eval()
        net.fc.weight.mul_(0.1)  # landmarks O(1) of the crop, like a trained head
    return LandmarkModel(net).eval()


def _inputs(n: int, seed: int) -> torch.Tensor:
    # Smooth random images: closer to faces than white noise, so ranges behave like real ones.
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 14, 14, generator=g)
    return torch.nn.functional.interpolate(x, size=112, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("streams", [False, True])
@pytest.mark.parametrize("kw", [dict(width=0.25), dict(width=0.5, points=17, conv2="depthwise", head_bn=True)])
def test_equalize_preserves_float_outputs(kw: dict, streams: bool) -> None:
    net = _uneven_net(0, **kw)
    x = _inputs(8, 1)
    res = equalize(net, x, EqualizeConfig(alpha=0.5, streams=streams))
    names = [t.name for t in res.tensors]
    assert ("conv5_1..block5_6.stream" in names) == streams and ("conv3_1..block3_5.stream" in names) == streams
    held_out = _inputs(6, 2).double()  # other inputs than the ones the scales were chosen on
    with torch.no_grad():  # float64: the rewrite itself, not float32 summation noise (~1e-4 px)
        a, b = copy.deepcopy(net).double()(held_out), copy.deepcopy(res.model).double()(held_out)
    diff_px = float((a - b).abs().max()) * 112
    assert diff_px <= FLOAT_TOLERANCE_PX, diff_px
    with torch.no_grad():  # and in float32, as shipped: within float32 noise of the original
        assert float((net(held_out.float()) - res.model(held_out.float())).abs().max()) * 112 < 2e-3
    assert res.float_max_diff_px <= FLOAT_TOLERANCE_PX
    # the weights really changed (not a no-op) and the input network was left alone
    changed = [n for (n, p), (_, q) in zip(net.state_dict().items(), res.model.state_dict().items()) if not torch.equal(p, q)]
    assert len(changed) > 10
    assert res.model is not net


def test_equalize_evens_out_channel_ranges() -> None:
    net = _uneven_net(3, width=0.25)
    x = _inputs(6, 4)
    res = equalize(net, x, EqualizeConfig(alpha=1.0))
    by_name = {t.name: t for t in res.tensors}
    # depthwise-read tensors are equalised fully: every live channel ends at the widest range
    exp = by_name["conv3_1.expand"]
    assert exp.spread_before > 2.0
    assert exp.spread_after == pytest.approx(1.0, abs=1e-3)
    head = by_name["head.concat"]
    assert head.channels == 176
    # measured again on the rewritten network, the FC input really is flatter
    f0 = head_features(net, x).abs().amax(0)
    f1 = head_features(res.model, x).abs().amax(0)
    spread = lambda r: float(r.max() / r[r > 0].median())  # noqa: E731
    assert spread(f1) < spread(f0) / 2


def test_stream_equalisation_scales_every_residual_add_of_a_stage_alike() -> None:
    """One factor per channel for the whole stage: the widest channel of the stage-5 stream
    (conv5_1's output and every ADD after it) is brought towards the rest."""
    net = _uneven_net(3, width=0.25)
    x = _inputs(6, 4)
    res = equalize(net, x, EqualizeConfig(alpha=1.0, blocks=False, head=False, streams=True))
    st = {t.name: t for t in res.tensors}["conv5_1..block5_6.stream"]
    assert st.spread_before > 1.5 and st.spread_after < st.spread_before
    outs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    hooks = [getattr(m.pfld, n).register_forward_hook(lambda _m, _i, o, k=k: outs[k].append(o.detach().abs().amax((0, 2, 3))))
             for k, m in (("a", net), ("b", res.model)) for n in ("conv5_1", "block5_4", "block5_6")]
    with torch.no_grad():
        net(x), res.model(x)
    for h in hooks:
        h.remove()
    ratios = [b / a.clamp_min(1e-9) for a, b in zip(outs["a"], outs["b"])]
    assert torch.allclose(ratios[0], ratios[1], rtol=1e-3) and torch.allclose(ratios[0], ratios[2], rtol=1e-3)
    assert float(ratios[0].max()) > 1.01  # some channel really was scaled


def test_alpha_zero_changes_nothing_that_is_read_densely() -> None:
    net = _uneven_net(5, width=0.25)
    res = equalize(net, _inputs(6, 6), EqualizeConfig(alpha=0.0, blocks=False))
    assert res.tensors[-1].scale_min == pytest.approx(1.0) and res.tensors[-1].scale_max == pytest.approx(1.0)
    for p, q in zip(net.parameters(), res.model.parameters()):
        assert torch.equal(p, q)


def test_equalize_rejects_bad_input() -> None:
    net = _uneven_net(0, width=0.25)
    with pytest.raises(UsageError, match="NCHW"):
        equalize(net, np.zeros((2, 112, 112, 3), np.float32))
    with pytest.raises(UsageError, match="alpha"):
        EqualizeConfig(alpha=1.5)


def test_tflite_weight_rounding_is_per_channel_symmetric() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [0.01, 0.02, -0.03]])
    q = tflite_weight_rounding(w)
    # each row's largest magnitude maps to exactly +-127 steps, so it is reproduced exactly
    assert float(q[0, 1]) == pytest.approx(-1.0)
    assert float(q[1, 2]) == pytest.approx(-0.03)
    steps = q / (w.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "relu6"])  # it moves biases only: any activation
def test_bias_correction_removes_the_mean_output_shift_of_rounded_weights(activation: str) -> None:
    net = _uneven_net(7, width=0.25, activation=activation)
    x = _inputs(8, 8)
    bc = bias_correct(net, x)
    assert set(bc.layers) == {n for n, _c, _b in conv_bn_pairs(net.pfld)}

    def rounded(model: LandmarkModel) -> LandmarkModel:
        """The model with every fused weight rounded as TFLite rounds it (BN folded back out)."""
        import copy

        m = copy.deepcopy(model)
        for _n, conv, bn in conv_bn_pairs(m.pfld):
            w = folded_weight(conv, bn)
            q = tflite_weight_rounding(w)
            scale = (w / conv.weight).nan_to_num(1.0) if bn is not None else 1.0
            with torch.no_grad():
                conv.weight.copy_(torch.where(conv.weight != 0, q / scale, conv.weight) if bn is not None else q)
        return m

    with torch.no_grad():
        float_out = net(x)
        plain_err = (rounded(net)(x) - float_out).mean(0).abs().mean()
        corrected_err = (rounded(bc.model)(x) - float_out).mean(0).abs().mean()
    # the systematic (mean) part of the error shrinks; the float model moved on purpose
    assert corrected_err < plain_err * 0.7, (float(plain_err), float(corrected_err))
    assert bc.float_max_diff_px > 0


def test_a_rewrite_that_is_not_exact_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float check is what stands between a bug in a rewrite and a silently different model:
    readers that forget to absorb the scale must raise, naming the difference and the tolerance."""
    import pfld_export.quant.equalize as eqm
    from pfld_export.errors import ToleranceError

    monkeypatch.setattr(eqm, "_div_depthwise", lambda conv, k: None)  # the expand output is scaled, nobody compensates
    with pytest.raises(ToleranceError, match="tolerance"):
        equalize(_uneven_net(0, width=0.25), _inputs(8, 1), EqualizeConfig(head=False))
