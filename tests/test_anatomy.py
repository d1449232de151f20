"""model.conv_units: PFLD's (conv, BN, activation) units in forward order, for every variant, and
the one BN folding (`model.fold_bn`) the int8 tools share; the noise hooks built from the units."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pfld_export.errors import UsageError
from pfld_export.model import ACTIVATIONS, HEAD_INPUTS, PFLD, ModelConfig, conv_units, fc_inputs, fold_bn

VARIANTS = {
    "standard": dict(width=0.25),
    "relu6": dict(width=0.25, activation="relu6"),
    "conv_bias": dict(width=0.25, conv_bias=True),
    "flatten_128": dict(width=0.25, head="flatten", input_size=128),
    "channels_17pt": dict(width=0.25, points=17, channels=(16, 16, 32, 32, 4, 8, 32)),
    "bn8_depthwise_106pt": dict(width=0.5, points=106, conv2="depthwise", head_bn=True),
}
# PyTorch module path of a conv -> the label int8 tools report (state-dict keys stay PFLD-pytorch's)
PART_OF_INDEX = {"conv.0": "expand", "conv.3": "depthwise", "conv.6": "project"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: two threads wait on each other


def _net(seed: int = 0, **kw: object) -> PFLD:
    """A PFLD with non-trivial BN statistics and affines (a fresh one folds to the identity)."""
    torch.manual_seed(seed)
    net = PFLD(ModelConfig(**kw))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.exp(torch.randn(n, generator=g) * 0.5))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return net.eval()


def _label(path: str) -> str:
    if path in ("conv7.0",):
        return "conv7"
    block, _, index = path.partition(".")
    return f"{block}.{PART_OF_INDEX[index]}" if index else block


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=list(VARIANTS))
def test_units_follow_the_state_dict_convs_in_forward_order(kw: dict) -> None:
    net = _net(**kw)
    units = list(conv_units(net))
    conv_keys = [k for k, v in net.state_dict().items() if k.endswith(".weight") and v.dim() >= 2]
    assert [u.path + ".weight" for u in units] == conv_keys
    assert len(units) == 2 + 3 * 13 + 3  # stem, 13 inverted-residual blocks, conv7 / conv8 / fc
    assert [u.label for u in units] == [_label(u.path) for u in units]
    assert all(net.get_submodule(u.path) is u.conv for u in units)
    # sensitivity tables and bias correction name layers by these labels
    from pfld_export.quant.sensitivity import conv_labels

    assert conv_labels(SimpleNamespace(model=net)) == [u.label for u in units]
    act = kw.get("activation", "relu")
    for u in units:
        if u.part in ("project", "fc"):
            assert u.activation == "none" and u.act is None, u.label
        else:
            assert u.activation == act and type(u.act) is ACTIVATIONS[act], u.label
    assert [u.head_input for u in units if u.head_input] == list(HEAD_INPUTS)
    assert [u.label for u in units if u.head_input][1:] == ["conv7", "conv8"]
    pooled = sum(u.conv.out_channels for u in units if u.head_input)
    assert (pooled == net.fc.in_features) == (net.config.head == "pool")
    assert net.fc.in_features == fc_inputs(net.config.channels, net.config.head, net.config.input_size)
    residual = {u.block for u in units if u.residual}
    assert residual == {n for n in net._blocks if net.get_submodule(n).use_res_connect} and len(residual) == 9
    assert units[-2].bn is (net.bn8 if net.config.head_bn else None)  # bn8 only where the forward applies it


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=list(VARIANTS))
def test_folding_equals_the_eval_mode_conv_and_bn(kw: dict) -> None:
    """Each unit's conv, fed what it receives in the network, then its BN, equals the folded op."""
    net = _net(1, **kw)
    units = list(conv_units(net))
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for u in units:
        out_module = u.bn if u.bn is not None else u.conv
        handles.append(u.conv.register_forward_pre_hook(lambda _m, a, u=u: got.__setitem__(u.label, (a[0].clone(),))))
        handles.append(out_module.register_forward_hook(
            lambda _m, _a, o, u=u: got.__setitem__(u.label, got[u.label][:1] + (o.clone(),))))
    size = net.config.input_size
    with torch.no_grad():
        net(torch.rand(2, 3, size, size))
    for h in handles:
        h.remove()
    assert set(got) == {u.label for u in units}
    for u in units:
        x, want = got[u.label]
        w, b = fold_bn(u.conv, u.bn)
        if isinstance(u.conv, torch.nn.Linear):
            y = F.linear(x, w, b)
        else:
            y = F.conv2d(x, w, b, u.conv.stride, u.conv.padding, u.conv.dilation, u.conv.groups)
        assert torch.allclose(y, want, atol=1e-5, rtol=1e-4), u.label
    w, b = fold_bn(units[0].conv, units[0].bn)
    (w.sum() + b.sum()).backward()  # the QAT simulator trains through the folding
    assert units[0].bn.weight.grad is not None and units[0].conv.weight.grad is not None


@pytest.mark.parametrize("kw", [VARIANTS["standard"], VARIANTS["bn8_depthwise_106pt"], VARIANTS["conv_bias"]],
                         ids=["standard", "bn8_depthwise_106pt", "conv_bias"])
def test_feeds_next_is_exactly_where_a_channel_scale_can_move_into_the_next_unit(kw: dict) -> None:
    """Scaling a unit's output channels (through its BN) and dividing the next unit's input
    channels leaves the landmarks as they were exactly where `feeds_next` says; a projection the
    identity or the head also reads is moved by it."""
    net = _net(2, **kw).double()
    units = list(conv_units(net))
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)[1]
    checked = 0
    for u, reader in zip(units, units[1:]):
        if u.bn is None or isinstance(reader.conv, torch.nn.Linear):
            continue
        m = copy.deepcopy(net)
        mu = {v.label: v for v in conv_units(m)}[u.label]
        mr = {v.label: v for v in conv_units(m)}[reader.label]
        k = torch.rand(mu.conv.out_channels, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3 + 0.5
        with torch.no_grad():
            mu.bn.weight.mul_(k)
            mu.bn.bias.mul_(k)
            if mr.conv.groups > 1:
                mr.conv.weight.div_(k.view(-1, 1, 1, 1))
            else:
                mr.conv.weight.div_(k.view(1, -1, 1, 1))
            moved = float((m(x)[1] - ref).abs().max() / ref.abs().max())
        assert (moved < 1e-9) == u.feeds_next, (u.label, moved)
        checked += 1
    assert checked == len(units) - 2  # all but conv8 (no BN, or bn8 read by the FC) and the FC
    assert {u.label for u in units if u.feeds_next and u.activation == "none"} == {"conv4_1.project"}


def test_a_block_that_is_not_an_inverted_residual_is_named() -> None:
    net = _net()
    last = net._blocks[-1]
    setattr(net, last, torch.nn.Sequential(getattr(net, last)))
    with pytest.raises(UsageError, match=rf"bias correction knows PFLD's inverted-residual blocks; {last} is a Sequential"):
        list(conv_units(net, "bias correction"))


def test_equalisation_keeps_off_relu6() -> None:
    """Channel scales do not commute with ReLU6's clip at 6: equalisation refuses it, naming a clipping unit."""
    from pfld_export.quant.equalize import equalize

    with pytest.raises(UsageError, match=r"ReLU6's clip at 6 .*\(conv1 and 29 more clip\)"):
        equalize(_net(activation="relu6"), torch.rand(2, 3, 112, 112))


def test_int8_noise_follows_relu6_and_a_relu6_network_trains_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a ReLU6 network the noise goes where the simulator requantizes (one draw per site but
    the exact input, plus S3's activation), each fused ReLU6 output is clipped back into [0, 6],
    and one training step with it moves the weights."""
    from pfld_export.quant.noise import add_int8_noise
    from pfld_export.quant.qat import FakeQuantPFLD

    net = _net(4, points=5, width=0.25, activation="relu6")
    x = torch.rand(4, 3, 112, 112) * 40  # large enough that ReLU6 clips
    sim = FakeQuantPFLD(copy.deepcopy(net))
    sim.observe_ranges(x)
    student = copy.deepcopy(net).train()
    plain = copy.deepcopy(net).train()
    handles = add_int8_noise(student, 8.0)
    relu6 = [m for m in student.modules() if isinstance(m, torch.nn.ReLU6)]
    seen: list[tuple[float, float]] = []
    for m in relu6:  # runs after the noise hook: sees what the next layer reads
        m.register_forward_hook(lambda _m, _i, o: seen.append((float(o.detach().min()), float(o.detach().max()))))
    draws: list[torch.Size] = []
    real_rand_like = torch.rand_like
    monkeypatch.setattr(torch, "rand_like", lambda t: draws.append(t.shape) or real_rand_like(t))
    torch.manual_seed(0)
    out = student(x)[1]
    assert len(draws) == len(sim.ranges)
    assert min(lo for lo, _ in seen) >= 0.0 and max(hi for _, hi in seen) == 6.0
    with torch.no_grad():
        assert not torch.equal(out, plain(x)[1])
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    out.pow(2).mean().backward()
    opt.step()
    after = student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point())
    for h in handles:
        h.remove()
    student.eval()
    plain.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(student(x)[1], plain.eval()(x)[1])  # the hooks are gone with their handles


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=list(VARIANTS))
def test_int8_noise_draws_once_per_requantized_tensor_on_every_variant(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fused conv output (the stem's and conv8's shared activation once per call), every
    residual ADD, the concatenated head and the landmarks: one draw each, in training only."""
    from pfld_export.quant.noise import add_int8_noise

    net = _net(5, **kw)
    units = list(conv_units(net))
    expected = len(units) - 1 + sum(u.residual for u in units) + 2  # all but the FC, ADDs, concat, landmarks
    size = net.config.input_size
    x = torch.rand(2, 3, size, size)
    noisy = copy.deepcopy(net)
    add_int8_noise(noisy, 8.0)
    draws: list[torch.Size] = []
    real_rand_like = torch.rand_like
    monkeypatch.setattr(torch, "rand_like", lambda t: draws.append(t.shape) or real_rand_like(t))
    with torch.no_grad():
        assert torch.equal(noisy.eval()(x)[1], net(x)[1]) and not draws
        assert not torch.equal(noisy.train()(x)[1], copy.deepcopy(net).train()(x)[1])
    assert len(draws) == expected == 54
