"""Float-weight rewrites that make PFLD quantize better without changing what it computes.

Every rewrite here scales one channel of an intermediate activation by a positive factor k and
divides the weights that read that channel by k. Positive scales commute with ReLU (PFLD uses
plain ReLU, not ReLU6, so there is no clipping point to move), and a channel of a
depthwise conv only ever meets itself, so the float network computes the same function up to
float32 rounding (`EqualizeResult.float_max_diff_px`, checked against `FLOAT_TOLERANCE_PX`).

Why it helps int8: TFLite quantizes every activation tensor with *one* scale (per tensor), but
weights per output channel. A tensor whose channels span very different ranges spends most of
its 256 levels on its widest channel; narrow channels are left with a handful of levels. Scaling
narrow channels up (and the reading weights down) gives every channel a similar range:

* inverted-residual blocks: the expand output (read by the depthwise conv, whose weights are
  per-channel, so scaling them costs nothing: full equalisation) and the depthwise output (read
  by the 1x1 projection, a dense layer: balanced with `alpha`, SmoothQuant-style, because
  shrinking an input column of a per-output-channel weight costs that column resolution);
  `conv1 -> conv2` and `conv2 -> conv3_1` likewise;
* the head: TFLite's CONCATENATION forces S1 (mean of the 14x14x16 bottleneck), S2 (mean of
  the 7x7x32 conv7 output) and S3 (ReLU(conv8), 128) onto one int8 scale. Each of the 176
  channels is scaled towards a common range where it is produced (bottleneck projection BN,
  conv7 BN, conv8/bn8) and the FC's input columns absorb the inverse.

Bias correction (`bias_correct`) is the other half of data-free quantization (Nagel et al.
2019): int8 rounding of a layer's weights shifts its output by E[(Q(W) - W) x] per channel,
a systematic error the next layers amplify. With BN folded as TFLite folds it and TFLite's
per-channel symmetric rounding, that expected shift is computed from calibration crops and
subtracted from the bias. This one *does* change the float model (by design: the int8 model
is what gets corrected); it is applied to the copy that becomes the int8 variants only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import ToleranceError, UsageError
from ..model import PFLD, InvertedResidual, LandmarkModel, require_standard

# Equalisation must not move float landmarks more than this (px at 112). The rescaled weights are
# stored in float32, so the rewrite is exact only up to their rounding: <= 1.2e-5 px on trained
# models, but 1.4e-4 px was measured on a barely fitted test model whose output is chaotic (7 px
# of int8 shift). A broken rewrite moves landmarks by whole pixels.
FLOAT_TOLERANCE_PX = 1e-3
# Dead or nearly dead channels (range ~0) would get huge scales that only amplify rounding noise.
DEFAULT_MAX_SCALE = 32.0


@dataclass
class EqualizeConfig:
    """Which activations to equalise and how hard.

    alpha: exponent of the range ratio for channels read by a dense (1x1 or full) conv or the
    FC: 1.0 equalises activation ranges fully, 0 leaves them; 0.5 splits the range disparity
    between the activation and the reading weight's columns. Depthwise readers always get 1.0.
    """

    blocks: bool = True
    head: bool = True
    streams: bool = False  # the residual streams of stages 3 and 5 (one factor per channel for a whole stage)
    alpha: float = 0.5
    max_scale: float = DEFAULT_MAX_SCALE
    percentile: float = 100.0  # per-channel range statistic over calibration activations
    tolerance_px: float = FLOAT_TOLERANCE_PX

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"equalisation alpha {self.alpha} must be in [0, 1]")
        if self.max_scale < 1.0:
            raise UsageError(f"equalisation max_scale {self.max_scale} must be >= 1")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"equalisation percentile {self.percentile} must be in (50, 100]")


@dataclass
class ScaledTensor:
    """One equalised activation: where it is, how many channels, the spread before and after."""

    name: str
    channels: int
    reader: str  # depthwise | dense | fc
    spread_before: float  # widest / median channel range
    spread_after: float
    scale_min: float
    scale_max: float


@dataclass
class EqualizeResult:
    """The rewritten copy (the input network is never modified) and what changed."""

    model: LandmarkModel
    tensors: list[ScaledTensor] = field(default_factory=list)
    float_max_diff_px: float = 0.0  # landmark change of the float model on the calibration crops


@dataclass
class BiasCorrection:
    """Per-layer bias shifts applied for int8 weight rounding."""

    model: LandmarkModel
    layers: dict[str, float] = field(default_factory=dict)  # layer -> max |correction|
    float_max_diff_px: float = 0.0  # how far the corrected float model moved (intended)


# A scaling site: which tensor (hooked module), how to scale its channels, how readers absorb it.
@dataclass
class _Site:
    name: str
    tap: nn.Module | tuple[nn.Module, ...]  # forward output(s) = the activation(s) (after ReLU / BN); a range is the max over all
    scale_producer: Callable[[torch.Tensor], None]  # multiply channel c of the activation by k[c]
    unscale_readers: Callable[[torch.Tensor], None]  # divide the readers' input channel c by k[c]
    reader: str  # depthwise | dense | fc
    reduce: str = "spatial"  # how the tapped tensor is reduced to a per-channel range


def _scale_bn(bn: nn.BatchNorm2d, k: torch.Tensor) -> None:
    # BN output = gamma * xhat + beta: scaling gamma and beta scales the output exactly.
    bn.weight.mul_(k)
    bn.bias.mul_(k)


def _div_in(conv: nn.Module, k: torch.Tensor, offset: int = 0) -> None:
    """Divide input channels [offset, offset+len(k)) of a dense conv / linear by k."""
    w = conv.weight
    shape = (1, -1) + (1,) * (w.dim() - 2)
    w[:, offset : offset + len(k)].div_(k.view(shape))


def _div_depthwise(conv: nn.Conv2d, k: torch.Tensor) -> None:
    conv.weight.div_(k.view(-1, 1, 1, 1))


def _block_sites(name: str, block: InvertedResidual) -> list[_Site]:
    seq = block.conv
    expand_bn, dw, dw_bn, project = seq[1], seq[3], seq[4], seq[6]
    return [
        _Site(f"{name}.expand", seq[2], lambda k, b=expand_bn: _scale_bn(b, k), lambda k, c=dw: _div_depthwise(c, k), "depthwise"),
        _Site(f"{name}.depthwise", seq[5], lambda k, b=dw_bn: _scale_bn(b, k), lambda k, c=project: _div_in(c, k), "dense"),
    ]


def _stream_sites(pfld: PFLD) -> list[_Site]:
    """The residual stream of each stage with identity blocks, as one site per stage.

    conv3_1's output and every block3_i's output (x + f(x)) are one stream: the identities tie
    their channels together, so channel c takes one factor k[c] for the whole stage. Every
    writer (the first block's and each residual block's projection BN) scales channel c by k[c];
    the identities then carry scaled values; every reader (each residual block's expand conv and
    the next stage's first expand conv) divides input channel c by k[c]. The 17-point fixture's
    streams reach +-336 on a few channels (benchmarks/int8_fidelity.md), and TFLite gives every
    ADD output one scale, so the other channels were left with a few int8 steps.

    Stage 3's stream ends in the 28x28 feature the auxiliary net taps: that feature comes out
    scaled too, so this is for the inference model (landmarks only), not for a checkpoint that
    keeps training with its auxiliary net. Off by default: measured, it gains 0-2 % on the
    best variant and loses 11 % on 0.25X's equalise+mse (benchmarks/int8_fidelity.md).
    """
    sites: list[_Site] = []
    names = pfld._blocks
    i = 0
    while i < len(names):
        j = i + 1
        while j < len(names) and getattr(getattr(pfld, names[j]), "use_res_connect", False):
            j += 1
        stage = [getattr(pfld, n) for n in names[i:j]]
        if j - i > 1 and j < len(names) and all(isinstance(b, InvertedResidual) for b in stage) \
                and isinstance(getattr(pfld, names[j]), InvertedResidual):
            reader = getattr(pfld, names[j])
            taps = tuple(stage) + tuple(b.conv[7] for b in stage[1:])  # ADD outputs and the projections added

            def scale(k: torch.Tensor, stage: list[InvertedResidual] = stage) -> None:
                for b in stage:
                    _scale_bn(b.conv[7], k)

            def unscale(k: torch.Tensor, stage: list[InvertedResidual] = stage, reader: InvertedResidual = reader) -> None:
                for b in stage[1:] + [reader]:
                    _div_in(b.conv[0], k)

            sites.append(_Site(f"{names[i]}..{names[j - 1]}.stream", taps, scale, unscale, "dense"))
        i = j
    return sites


def _sites(pfld: PFLD, cfg: EqualizeConfig) -> list[_Site]:
    """Every activation this module knows how to rescale exactly, in forward order."""
    sites: list[_Site] = []
    if cfg.blocks:
        depthwise2 = pfld.conv2.groups == pfld.conv2.in_channels and pfld.conv2.groups > 1
        # conv1's output goes through a module-level ReLU shared with conv2, so tap the BNs and
        # take the ReLU into account (max(0, x) only sees the positive part of the range).
        sites.append(_Site(
            "conv1", pfld.bn1, lambda k: _scale_bn(pfld.bn1, k),
            (lambda k: _div_depthwise(pfld.conv2, k)) if depthwise2 else (lambda k: _div_in(pfld.conv2, k)),
            "depthwise" if depthwise2 else "dense", reduce="relu",
        ))
        first = getattr(pfld, pfld._blocks[0])
        sites.append(_Site("conv2", pfld.bn2, lambda k: _scale_bn(pfld.bn2, k), lambda k: _div_in(first.conv[0], k), "dense", reduce="relu"))
        for name in pfld._blocks:
            blk = getattr(pfld, name)
            if isinstance(blk, InvertedResidual):
                sites.extend(_block_sites(name, blk))
    if cfg.streams:
        sites.extend(_stream_sites(pfld))
    return sites


def _channel_ranges(net: LandmarkModel, taps: dict[str, tuple[nn.Module, str]], x: torch.Tensor, percentile: float,
                    extra: Callable[[], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Per-channel range (max |a| over positions and crops, or a percentile) of each tapped tensor."""
    got: dict[str, list[torch.Tensor]] = {k: [] for k in taps}
    handles = []
    for key, (mod, reduce) in taps.items():
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: str = key, reduce: str = reduce) -> None:
            a = out.detach()
            if reduce == "relu":
                a = a.clamp_min(0)
            got[key].append(a.abs().transpose(0, 1).reshape(a.shape[1], -1))
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for chunk in torch.split(x, 32):
                net(chunk)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, parts in got.items():
        a = torch.cat(parts, 1).double()
        out[key] = a.amax(1) if percentile >= 100 else torch.quantile(a, percentile / 100.0, dim=1)
    return out


def _factors(r: torch.Tensor, target: float, alpha: float, max_scale: float) -> torch.Tensor:
    """k = (target / r) ** alpha, clamped to [1/max_scale, max_scale]; dead channels keep 1."""
    alive = r > target * 1e-6
    k = torch.ones_like(r)
    k[alive] = (target / r[alive]).pow(alpha).clamp(1.0 / max_scale, max_scale)
    return k.float()


def _spread(r: torch.Tensor) -> float:
    alive = r[r > 0]
    return float(alive.max() / alive.median()) if alive.numel() else 1.0


def equalize(model: LandmarkModel | PFLD, inputs: np.ndarray | torch.Tensor, cfg: EqualizeConfig | None = None) -> EqualizeResult:
    """Equalise a copy of `model` on calibration inputs (float32 NCHW, already preprocessed).

    Raises ToleranceError if the float landmarks moved more than `cfg.tolerance_px` (a bug,
    never expected: the rewrites are exact up to float rounding).
    """
    cfg = cfg or EqualizeConfig()
    net = _wrapped(model)
    require_standard(net.pfld.config, "cross-layer equalisation")
    x = torch.as_tensor(np.asarray(inputs, np.float32))
    if x.dim() != 4 or x.shape[1] != 3:
        raise UsageError(f"equalize needs float NCHW inputs [N, 3, H, W], got shape {tuple(x.shape)}")
    before_net = copy.deepcopy(net)
    pfld = net.pfld
    result = EqualizeResult(model=net)
    # One site at a time, re-measuring after each: scaling a tensor changes the ranges of
    # nothing else (readers absorb it exactly), but measuring fresh keeps that an invariant
    # rather than an assumption.
    for site in _sites(pfld, cfg):
        taps = site.tap if isinstance(site.tap, tuple) else (site.tap,)
        got = _channel_ranges(net, {f"{site.name}#{i}": (m, site.reduce) for i, m in enumerate(taps)}, x, cfg.percentile)
        r = torch.stack(list(got.values())).amax(0)
        alpha = 1.0 if site.reader == "depthwise" else cfg.alpha
        k = _factors(r, float(r.max()), alpha, cfg.max_scale)
        with torch.no_grad():
            site.scale_producer(k)
            site.unscale_readers(k)
        result.tensors.append(ScaledTensor(site.name, len(k), site.reader, _spread(r), _spread(r * k.double()),
                                           float(k.min()), float(k.max())))
    if cfg.head:
        result.tensors.append(_equalize_head(net, x, cfg))
    result.float_max_diff_px = _max_diff_px(before_net, net, x)
    if result.float_max_diff_px > cfg.tolerance_px:
        raise ToleranceError("equalised vs original float landmarks (px at 112)", result.float_max_diff_px, cfg.tolerance_px,
                             "the rewrite is meant to be exact; report this model")
    return result


def _max_diff_px(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest landmark difference (px) of two networks, both evaluated in float64.

    float64 isolates what a rewrite changed from float32 summation noise: two float32 runs of
    mathematically equal networks already differ by ~1e-4 px at 112 (1e-6 of the crop), the
    same order as the tolerance.
    """
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        d = max(float((a64(c) - b64(c)).abs().max()) for c in torch.split(x.double(), 32))
    return d * float(x.shape[-1])


def head_features(net: LandmarkModel, x: torch.Tensor) -> torch.Tensor:
    """The FC's input (concat of S1, S2, S3) for inputs `x`: [N, 176]."""
    feats: list[torch.Tensor] = []
    h = net.pfld.fc.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for chunk in torch.split(x, 32):
                net(chunk)
    finally:
        h.remove()
    return torch.cat(feats)


def _equalize_head(net: LandmarkModel, x: torch.Tensor, cfg: EqualizeConfig) -> ScaledTensor:
    pfld = net.pfld
    f = head_features(net, x).abs().double()
    r = f.amax(0) if cfg.percentile >= 100 else torch.quantile(f, cfg.percentile / 100.0, dim=0)
    k = _factors(r, float(r.max()), cfg.alpha, cfg.max_scale)
    c1, c2 = pfld.config.channels[-3:-1]  # type: ignore[index]  # S1 (stage 6) and S2 (conv7)
    k1, k2, k3 = k[:c1], k[c1 : c1 + c2], k[c1 + c2 :]
    last = getattr(pfld, pfld._blocks[-1])
    with torch.no_grad():
        # S1: the bottleneck's projection BN produces it; conv7 and the FC read it.
        _scale_bn(last.conv[7], k1)
        _div_in(pfld.conv7[0], k1)
        # S2: conv7's BN (before its ReLU) produces it; conv8 and the FC read it.
        _scale_bn(pfld.conv7[1], k2)
        _div_in(pfld.conv8, k2)
        # S3: ReLU(conv8 [+ bn8]); with bn8 applied its affine carries the scale, else conv8's own.
        if pfld.config.head_bn:
            _scale_bn(pfld.bn8, k3)
        else:
            pfld.conv8.weight.mul_(k3.view(-1, 1, 1, 1))
            pfld.conv8.bias.mul_(k3)
        _div_in(pfld.fc, k)
    return ScaledTensor("head.concat", len(k), "fc", _spread(r), _spread(r * k.double()), float(k.min()), float(k.max()))


def _wrapped(model: LandmarkModel | PFLD) -> LandmarkModel:
    if isinstance(model, LandmarkModel):
        net = copy.deepcopy(model)
    elif isinstance(model, PFLD):
        net = LandmarkModel(copy.deepcopy(model))
    else:
        raise UsageError(f"equalize takes a PFLD or LandmarkModel, got {type(model).__name__}")
    return net.eval()


# --- bias correction -------------------------------------------------------------------------

def conv_bn_pairs(pfld: PFLD) -> Iterator[tuple[str, nn.Module, nn.BatchNorm2d | None]]:
    """(name, conv/linear, BN after it or None) in forward order: what TFLite fuses into one op."""
    yield "conv1", pfld.conv1, pfld.bn1
    yield "conv2", pfld.conv2, pfld.bn2
    for name in pfld._blocks:
        seq = getattr(pfld, name).conv
        yield f"{name}.expand", seq[0], seq[1]
        yield f"{name}.depthwise", seq[3], seq[4]
        yield f"{name}.project", seq[6], seq[7]
    yield "conv7", pfld.conv7[0], pfld.conv7[1]
    yield "conv8", pfld.conv8, pfld.bn8 if pfld.config.head_bn else None
    yield "fc", pfld.fc, None


def folded_weight(conv: nn.Module, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The weight TFLite quantizes: BN's per-channel scale gamma / sqrt(var + eps) folded in."""
    w = conv.weight.detach()
    if bn is None:
        return w.clone()
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * s.view(-1, *([1] * (w.dim() - 1)))


def tflite_weight_rounding(w: torch.Tensor) -> torch.Tensor:
    """TFLite's int8 per-channel symmetric weights: scale = max|w| / 127 per output channel,
    round half away from zero, range [-127, 127]."""
    dims = tuple(range(1, w.dim()))
    s = w.abs().amax(dim=dims, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.sign(w / s) * torch.floor((w / s).abs() + 0.5)
    return q.clamp(-127, 127) * s


def bias_correct(model: LandmarkModel, inputs: np.ndarray | torch.Tensor) -> BiasCorrection:
    """Empirical bias correction for int8 weight rounding, layer by layer in forward order.

    For each fused conv(+BN) and the FC, the output shift E[conv_Q(x) - conv(x)] is measured on
    the calibration inputs *as they arrive at that layer in the already-corrected network*
    (so corrections do not double count), and subtracted from the bias (BN beta, conv8 or FC
    bias). One forward over all inputs does every layer: a hook in front of each layer measures
    its shift on the batch as it arrives and moves the bias before the layer runs, so the next
    layer already sees corrected activations. Works on a copy; returns it.
    """
    require_standard(model.pfld.config, "bias correction", relu6_ok=True)
    net = copy.deepcopy(model).eval()
    before_net = copy.deepcopy(net)
    x = torch.as_tensor(np.asarray(inputs, np.float32))
    res = BiasCorrection(model=net)
    handles = [conv.register_forward_pre_hook(_bias_shift_hook(name, conv, bn, res.layers))
               for name, conv, bn in conv_bn_pairs(net.pfld)]
    try:
        with torch.no_grad():
            net(x)  # the whole set at once: each shift is a mean over every crop, as measured layer by layer
    finally:
        for h in handles:
            h.remove()
    res.float_max_diff_px = _max_diff_px(before_net, net, x)
    return res


def _bias_shift_hook(name: str, conv: nn.Module, bn: nn.BatchNorm2d | None,
                     layers: dict[str, float]) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    """Forward pre-hook: subtract the layer's int8 weight-rounding shift, measured on the
    input it is about to see, from its fused bias (BN beta, or the conv / FC bias)."""

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        w = folded_weight(conv, bn)
        dw = tflite_weight_rounding(w) - w
        shift = _rounding_shift(conv, dw, inp[0].detach())
        # The fused op is y = W_f x + b_f with b_f = beta - mean * s (BN) or the conv/FC bias.
        target = bn.bias if bn is not None else conv.bias
        target.sub_(shift)
        layers[name] = float(shift.abs().max())

    return hook


def _rounding_shift(conv: nn.Module, dw: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Mean output change per channel that the weight change `dw` makes on inputs `a`."""
    if a.shape[0] == 0:
        raise UsageError("bias correction needs at least one input crop")
    if isinstance(conv, nn.Linear):
        return (a @ dw.T).mean(0)
    return nn.functional.conv2d(a, dw, None, conv.stride, conv.padding, conv.dilation, conv.groups).mean((0, 2, 3))
