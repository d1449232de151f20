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
from ..model import PFLD, ConvUnit, LandmarkModel, conv_units, fold_bn, require_standard

# Equalisation must not move float landmarks more than this (px at 112). The rescaled weights are
# stored in float32, so the rewrite is exact only up to their rounding: <= 1.2e-5 px on trained
# models, but 1.4e-4 px was measured on a barely fitted test model whose output is chaotic (7 px
# of int8 shift). A broken rewrite moves landmarks by whole pixels.
FLOAT_TOLERANCE_PX = 1e-3
# Dead or nearly dead channels (range ~0) would get huge scales that only amplify rounding noise.
DEFAULT_MAX_SCALE = 32.0
# Crops the float64 comparison runs on: the rewrites are exact on every input, so a few prove it,
# and a float64 forward of a 1X PFLD costs ~0.17 s of CPU per crop (41 s over 123 crops twice).
CHECK_CROPS = 16


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
    float_max_diff_px: float = 0.0  # landmark change of the float model on the first CHECK_CROPS calibration crops


@dataclass
class BiasCorrection:
    """Per-layer bias shifts applied for int8 weight rounding."""

    model: LandmarkModel
    layers: dict[str, float] = field(default_factory=dict)  # layer -> max |correction|
    float_max_diff_px: float = 0.0  # how far the corrected float model moved (intended; first CHECK_CROPS crops)


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


def _pair_site(unit: ConvUnit, reader: ConvUnit) -> _Site:
    """A ReLU output only the next conv reads: its BN scales it, the reader's input channels
    absorb it (per channel for a depthwise reader, whose weights are per-channel anyway). The
    BN is tapped and the ReLU applied to its output: the stem convs share one ReLU module."""
    conv, bn = reader.conv, unit.bn
    if bn is None:
        raise UsageError(f"equalisation scales {unit.label}'s output through its BN, and it has none")
    depthwise = getattr(conv, "groups", 1) == getattr(conv, "in_channels", 0) > 1
    unscale = (lambda k: _div_depthwise(conv, k)) if depthwise else (lambda k: _div_in(conv, k))
    return _Site(unit.label, bn, lambda k: _scale_bn(bn, k), unscale, "depthwise" if depthwise else "dense", reduce="relu")


def _stream_sites(pfld: PFLD, units: list[ConvUnit]) -> list[_Site]:
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
    projects = [u for u in units if u.part == "project"]
    expands = {u.block: u.conv for u in units if u.part == "expand"}
    i = 0
    while i < len(projects):
        j = i + 1
        while j < len(projects) and projects[j].residual:
            j += 1
        stage = projects[i:j]
        if j - i > 1 and j < len(projects):
            readers = [expands[p.block] for p in stage[1:]] + [expands[projects[j].block]]
            # ADD outputs (the first block's output is its projection's) and the projections added
            taps = tuple(pfld.get_submodule(p.block) for p in stage) + tuple(p.bn for p in stage[1:])

            def scale(k: torch.Tensor, bns: list[nn.Module] = [p.bn for p in stage]) -> None:
                for bn in bns:
                    _scale_bn(bn, k)

            def unscale(k: torch.Tensor, readers: list[nn.Module] = readers) -> None:
                for conv in readers:
                    _div_in(conv, k)

            sites.append(_Site(f"{stage[0].block}..{stage[-1].block}.stream", taps, scale, unscale, "dense"))
        i = j
    return sites


def _sites(pfld: PFLD, cfg: EqualizeConfig) -> list[_Site]:
    """Every activation this module knows how to rescale exactly, in forward order."""
    units = list(conv_units(pfld, "cross-layer equalisation"))
    sites: list[_Site] = []
    if cfg.blocks:
        # Positive scales commute with ReLU; ReLU6's clip at 6 does not (`equalize` refuses it).
        sites.extend(_pair_site(u, reader) for u, reader in zip(units, units[1:])
                     if u.feeds_next and u.activation == "relu")
    if cfg.streams:
        sites.extend(_stream_sites(pfld, units))
    return sites


def _channel_ranges(net: LandmarkModel, taps: dict[str, tuple[nn.Module, str]], x: torch.Tensor,
                    percentile: float) -> dict[str, torch.Tensor]:
    """Per-channel range (max |a| over positions and crops, or a percentile) of each tapped tensor.

    The max is kept as a running max per chunk, so one forward can tap every site of a 1X
    network; a percentile needs every value and keeps them.
    """
    got: dict[str, list[torch.Tensor]] = {k: [] for k in taps}
    running = percentile >= 100
    handles = []
    for key, (mod, reduce) in taps.items():
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: str = key, reduce: str = reduce) -> None:
            a = out.detach()
            if reduce == "relu":
                a = a.clamp_min(0)
            a = a.abs().transpose(0, 1).reshape(a.shape[1], -1)
            got[key].append(a.amax(1, keepdim=True) if running else a)
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
        out[key] = a.amax(1) if running else torch.quantile(a, percentile / 100.0, dim=1)
    return out


def _site_ranges(net: LandmarkModel, sites: list[_Site], x: torch.Tensor, percentile: float) -> dict[str, torch.Tensor]:
    """Each site's per-channel range: the max over its tapped tensors."""
    taps = {site.name: site.tap if isinstance(site.tap, tuple) else (site.tap,) for site in sites}
    reduce = {site.name: site.reduce for site in sites}
    got = _channel_ranges(net, {f"{name}#{i}": (m, reduce[name]) for name, ms in taps.items() for i, m in enumerate(ms)},
                          x, percentile)
    return {name: torch.stack([got[f"{name}#{i}"] for i in range(len(ms))]).amax(0) for name, ms in taps.items()}


def _factors(r: torch.Tensor, target: float, alpha: float, max_scale: float) -> torch.Tensor:
    """k = (target / r) ** alpha, clamped to [1/max_scale, max_scale]; dead channels keep 1."""
    alive = r > target * 1e-6
    k = torch.ones_like(r)
    k[alive] = (target / r[alive]).pow(alpha).clamp(1.0 / max_scale, max_scale)
    return k.float()


def _spread(r: torch.Tensor) -> float:
    alive = r[r > 0]
    return float(alive.max() / alive.median()) if alive.numel() else 1.0


def _scale_site(site: _Site, r: torch.Tensor, cfg: EqualizeConfig) -> ScaledTensor:
    """Scale one site's channels towards its widest range; the readers absorb the factors."""
    alpha = 1.0 if site.reader == "depthwise" else cfg.alpha
    k = _factors(r, float(r.max()), alpha, cfg.max_scale)
    with torch.no_grad():
        site.scale_producer(k)
        site.unscale_readers(k)
    return ScaledTensor(site.name, len(k), site.reader, _spread(r), _spread(r * k.double()), float(k.min()), float(k.max()))


def equalize(model: LandmarkModel | PFLD, inputs: np.ndarray | torch.Tensor, cfg: EqualizeConfig | None = None) -> EqualizeResult:
    """Equalise a copy of `model` on calibration inputs (float32 NCHW, already preprocessed).

    Raises ToleranceError if the float landmarks moved more than `cfg.tolerance_px` (a bug,
    never expected: the rewrites are exact up to float rounding).
    """
    cfg = cfg or EqualizeConfig()
    net = _wrapped(model)
    # The layout first (conv biases, head, input size), then the activations it scales through.
    require_standard(net.pfld.config, "cross-layer equalisation", relu6_ok=True)
    clipped = [u.label for u in conv_units(net.pfld, "cross-layer equalisation") if u.activation == "relu6"]
    if clipped:
        raise UsageError(f"cross-layer equalisation moves channel scales through each activation, and ReLU6's clip at 6 "
                         f"does not commute with them ({clipped[0]} and {len(clipped) - 1} more clip); "
                         "use the generic int8 methods (--int8-method plain,mixed); equalize+bias corrects biases alone here")
    x = torch.as_tensor(np.asarray(inputs, np.float32))
    if x.dim() != 4 or x.shape[1] != 3:
        raise UsageError(f"equalize needs float NCHW inputs [N, 3, H, W], got shape {tuple(x.shape)}")
    before_net = copy.deepcopy(net)
    pfld = net.pfld
    result = EqualizeResult(model=net)
    # Scaling one site's tensor changes no other site's tensor (its readers absorb the scale
    # exactly), so with the max statistic one forward measures every site; the float check below
    # holds that to the tolerance. A percentile keeps every value, so it measures a site at a time.
    sites = _sites(pfld, cfg)
    groups = [sites] if cfg.percentile >= 100 else [[site] for site in sites]
    for group in groups:
        ranges = _site_ranges(net, group, x, cfg.percentile)
        for site in group:
            result.tensors.append(_scale_site(site, ranges[site.name], cfg))
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
    same order as the tolerance. The first CHECK_CROPS crops are compared.
    """
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        c = x[:CHECK_CROPS].double()
        d = float((a64(c) - b64(c)).abs().max())
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
    units = list(conv_units(pfld, "cross-layer equalisation"))
    fc = units[-1].conv
    with torch.no_grad():
        # Each head input is scaled where it is produced: S1 by the bottleneck's projection BN,
        # S2 by conv7's BN (before its ReLU), S3 (ReLU(conv8 [+ bn8])) by bn8's affine when applied,
        # else by conv8's own; the next conv (conv7, conv8) and the FC's columns absorb it.
        offset = 0
        for unit, reader in zip(units, units[1:]):
            if unit.head_input is None:
                continue
            ki = k[offset : offset + unit.conv.out_channels]
            offset += len(ki)
            if unit.bn is not None:
                _scale_bn(unit.bn, ki)
            else:
                unit.conv.weight.mul_(ki.view(-1, 1, 1, 1))
                unit.conv.bias.mul_(ki)
            if reader.conv is not fc:
                _div_in(reader.conv, ki)
        _div_in(fc, k)
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
    for unit in conv_units(pfld):
        yield unit.label, unit.conv, unit.bn


def folded_weight(conv: nn.Module, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The weight TFLite quantizes: BN's per-channel scale gamma / sqrt(var + eps) folded in."""
    return fold_bn(conv, bn)[0].detach().clone()


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
