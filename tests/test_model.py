from __future__ import annotations

import pytest
import torch

from pfld_export.errors import UsageError
from pfld_export.model import WIDTHS, LandmarkModel, ModelConfig, build_model, count_parameters, macs, scaled_channels


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("points", [98, 68, 17])
def test_shapes_for_each_width_and_point_count(width: float, points: int) -> None:
    pfld, aux = build_model(width, points)
    pfld.eval()
    aux.eval()
    tap, lm = pfld(torch.rand(2, 3, 112, 112))
    assert lm.shape == (2, 2 * points)
    assert tap.shape == (2, scaled_channels(64, width), 28, 28)
    assert aux(tap).shape == (2, 3)


def test_parameter_count_matches_pfld_pytorch() -> None:
    pfld, _ = build_model(1.0, 98, "full")
    # PFLD-pytorch's PFLDInference (98 points) has exactly this many parameters.
    assert count_parameters(LandmarkModel(pfld)) == 1_264_804


def test_depthwise_conv2_has_fewer_parameters() -> None:
    full, _ = build_model(1.0, 98, "full")
    dw, _ = build_model(1.0, 98, "depthwise")
    assert count_parameters(full) - count_parameters(dw) == 64 * 64 * 9 - 64 * 9


def test_width_shrinks_macs_monotonically() -> None:
    values = [macs(LandmarkModel(build_model(w, 98)[0])) for w in WIDTHS]
    assert values == sorted(values) and values[0] < values[-1] / 8


def test_wrapper_returns_only_landmarks() -> None:
    pfld, _ = build_model(0.25, 98)
    out = LandmarkModel(pfld).eval()(torch.rand(1, 3, 112, 112))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 196)


def test_mean_head_equals_avgpool_view() -> None:
    # The export-friendly mean((2,3)) must compute exactly what AvgPool2d(14)+view did.
    x = torch.rand(3, 16, 14, 14)
    ref = torch.nn.AvgPool2d(14)(x).view(3, -1)
    assert torch.allclose(x.mean((2, 3)), ref, atol=1e-6)


@pytest.mark.parametrize("bad", [{"width": 0.3}, {"points": 0}, {"conv2": "grouped"}, {"input_size": 120},
                                 {"activation": "gelu"}, {"head": "attention"}, {"channels": (8, 8)}])
def test_bad_config_is_refused(bad: dict) -> None:
    with pytest.raises(UsageError):
        ModelConfig(**bad)


def test_variant_fields_shape_the_network() -> None:
    # Every fork variant changes the module tree or the forward exactly where it says.
    channels = (16, 16, 32, 32, 4, 8, 32)  # the public 0.25X: every layer scaled, head included
    cfg = ModelConfig(width=0.25, points=5, channels=channels, activation="relu6", conv_bias=True, head="flatten", input_size=128)
    pfld, _ = build_model(0.25, 5)
    from pfld_export.model import PFLD

    net = PFLD(cfg).eval()
    assert net.conv1.bias is not None and net.conv7[0].bias is not None and pfld.conv1.bias is None
    assert isinstance(net.relu, torch.nn.ReLU6) and isinstance(net.conv3_1.conv[2], torch.nn.ReLU6)
    assert net.conv8.out_channels == 32 and net.conv7[0].out_channels == 8
    # flatten head at 128: S1 16x16x4, S2 8x8x8, conv8 2x2x32
    assert net.fc.in_features == 4 * 16 * 16 + 8 * 8 * 8 + 32 * 2 * 2
    tap, lm = net(torch.rand(2, 3, 128, 128))
    assert lm.shape == (2, 10) and tap.shape == (2, 16, 32, 32)


def test_relu6_differs_from_relu_only_above_six() -> None:
    from pfld_export.model import PFLD

    torch.manual_seed(0)
    a = PFLD(ModelConfig(width=0.25, points=3)).eval()
    b = PFLD(ModelConfig(width=0.25, points=3, activation="relu6")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 112, 112)
    assert torch.equal(a(x * 0)[1], b(x * 0)[1]) or torch.allclose(a(x * 0)[1], b(x * 0)[1])
    assert not torch.allclose(a(x * 200)[1], b(x * 200)[1])  # large activations clip at 6


def test_standard_anatomy_guards_pfld_specific_rewrites() -> None:
    from pfld_export.model import require_standard

    require_standard(ModelConfig(width=0.5), "equalisation")
    with pytest.raises(UsageError, match="ReLU6.*generic int8 methods"):
        require_standard(ModelConfig(width=0.5, activation="relu6"), "equalisation")
    # Bias correction does not depend on the activation, only on the layout.
    require_standard(ModelConfig(width=0.5, activation="relu6"), "bias correction", relu6_ok=True)
    with pytest.raises(UsageError, match="conv biases"):
        require_standard(ModelConfig(width=0.5, activation="relu6", conv_bias=True), "bias correction", relu6_ok=True)
