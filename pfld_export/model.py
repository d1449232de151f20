"""The PFLD network (Guo et al. 2019) as PFLD-pytorch defines it, with a width multiplier.

Module names match PFLD-pytorch's `PFLDInference` / `AuxiliaryNet` exactly, so their state
dicts load without renaming. Two deliberate differences in `forward`, both the same math with
the same weights:
  * global average pooling is `x.mean((2, 3))` rather than `AvgPool2d(14|7)` + `view`: the
    AvgPool form breaks full-int8 conversion (the quantizer forces the concat's scale onto the
    14x14 bottleneck and clips it; 6-27 px error on a 112 crop), the mean form does not;
  * `bn8` exists in every checkpoint; current PFLD-pytorch never applies it, older versions and
    forks apply it after conv8 (`head_bn=True`). `checkpoint.infer_config` tells which from its
    running statistics: a BN that was never run still holds mean 0 / var 1 / 0 batches.

Forks vary the rest, and `ModelConfig` carries each variant: per-layer channel counts (some scale
the head too), ReLU or ReLU6, conv biases, depthwise conv2, a flattened instead of pooled head,
any point count and the input size the head was built for. What the tensors show is read from
them (`checkpoint.infer_config`); what they cannot show is measured (`stage0`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from .errors import UsageError

Conv2Kind = Literal["full", "depthwise"]
Activation = Literal["relu", "relu6"]
UnitActivation = Literal["none", "relu", "relu6"]  # what follows a conv (+ BN) in `ConvUnit`
HeadKind = Literal["pool", "flatten"]
WIDTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
INPUT_SIZE = 112
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}
CONV2_KINDS: tuple[str, ...] = ("full", "depthwise")  # conv2: a full 3x3 conv or a depthwise one
HEADS: tuple[str, ...] = ("pool", "flatten")

# The layers whose output channels `ModelConfig.channels` lists, in this order: name, channels
# at width 1.0, and whether our width multiplier scales it. PFLD-pytorch keeps the head (stage 6 =
# S1, conv7 = S2, conv8 = S3) at 16 / 32 / 128 for every width; other forks scale every layer (the
# public 0.25X has 4 / 8 / 32), which is why a loaded network keeps the counts its tensors show.
CHANNEL_LAYERS: tuple[tuple[str, int, bool], ...] = (
    ("conv1", 64, True),
    ("stage3", 64, True),
    ("stage4", 128, True),
    ("stage5", 128, True),
    ("stage6", 16, False),
    ("conv7", 32, False),
    ("conv8", 128, False),
)
_C1, _S3, _S4, _S5, _S6, _C7, _C8 = range(len(CHANNEL_LAYERS))

# Inverted-residual stages. t: expansion, c: index into the channel table, n: blocks, s: stride of
# the first block, stage: name number (the first block is `conv{stage}_1`, the rest
# `block{stage}_{i}`, as in PFLD-pytorch).
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    # t, c,   n, s, stage
    (2, _S3, 5, 2, 3),  # 56 -> 28; its output is the 28x28 feature the auxiliary net taps
    (2, _S4, 1, 2, 4),  # 28 -> 14
    (4, _S5, 6, 1, 5),
    (2, _S6, 1, 1, 6),  # 14x14 bottleneck = S1
)
_TAP_STAGE = 3


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` without going more than 10 % below `v`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scaled_channels(channels: int, width: float) -> int:
    """The one place the width multiplier turns into channel counts."""
    return _make_divisible(channels * width)


def width_channels(width: float) -> tuple[int, ...]:
    """Per-layer channel counts our width multiplier gives (PFLD-pytorch's: head never scaled)."""
    return tuple(scaled_channels(c, width) if scaled else c for _, c, scaled in CHANNEL_LAYERS)


def head_sizes(input_size: int) -> tuple[int, int, int]:
    """Spatial side of S1, S2 and the conv8 output for a square input (strides 8, 16; conv8 7x7)."""
    return input_size // 8, input_size // 16, input_size // 16 - 6


def fc_inputs(channels: tuple[int, ...], head: str, input_size: int) -> int:
    """Input features of `fc`: what the multi-scale head concatenates."""
    a, b, k = head_sizes(input_size)
    c6, c7, c8 = channels[_S6], channels[_C7], channels[_C8]
    if head == "pool":
        return c6 + c7 + c8 * k * k
    return c6 * a * a + c7 * b * b + c8 * k * k


@dataclass(frozen=True)
class ModelConfig:
    """What defines a PFLD network: channels, landmark count, and the variant choices forks make.

    `channels` (one count per `CHANNEL_LAYERS` entry) defaults to what `width` gives; a loaded
    checkpoint keeps the counts its tensors have, and `width` is then conv1's share of 64.
    """

    width: float = 1.0
    points: int = 98
    conv2: Conv2Kind = "full"
    head_bn: bool = False  # apply bn8 after conv8 (older PFLD-pytorch and its forks)
    input_size: int = INPUT_SIZE
    channels: tuple[int, ...] | None = None
    activation: Activation = "relu"  # ReLU6 in forks that follow MobileNetV2 to the letter
    conv_bias: bool = False  # biases on the BN-followed convs (conv8 always has one)
    head: HeadKind = "pool"  # S1/S2 globally averaged (PFLD-pytorch) or flattened (some forks)

    def __post_init__(self) -> None:
        if self.channels is None:
            if self.width not in WIDTHS:
                raise UsageError(f"width {self.width} is not supported; choose one of {', '.join(map(str, WIDTHS))}")
            object.__setattr__(self, "channels", width_channels(self.width))
        else:
            ch = tuple(int(c) for c in self.channels)
            if len(ch) != len(CHANNEL_LAYERS) or min(ch) < 1:
                raise UsageError(f"channels must be {len(CHANNEL_LAYERS)} positive counts "
                                 f"({', '.join(n for n, _, _ in CHANNEL_LAYERS)}), got {self.channels}")
            object.__setattr__(self, "channels", ch)
        if not self.width > 0:
            raise UsageError(f"width must be positive, got {self.width}")
        if self.points < 1:
            raise UsageError(f"points must be a positive count, got {self.points}")
        if self.conv2 not in CONV2_KINDS:
            raise UsageError(f"conv2 must be one of {', '.join(CONV2_KINDS)}, got {self.conv2!r}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.head not in HEADS:
            raise UsageError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.input_size % 16 or self.input_size < INPUT_SIZE:
            raise UsageError(f"PFLD's head needs a square input that is a multiple of 16 and at least {INPUT_SIZE}, got {self.input_size}")

    @property
    def standard(self) -> bool:
        """PFLD-pytorch's own anatomy (ReLU, no conv biases, pooled head at 112): what the
        PFLD-specific int8 rewrites (equalisation, bias correction, QAT simulator) are written for."""
        return self.activation == "relu" and not self.conv_bias and self.head == "pool" and self.input_size == INPUT_SIZE

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels or ())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "ModelConfig":
        """Inverse of `to_dict`; older metadata without the variant fields means PFLD-pytorch's defaults."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if known.get("channels") is not None:
            known["channels"] = tuple(known["channels"])  # type: ignore[arg-type]
        return cls(**known)  # type: ignore[arg-type]


def bias_correctable(config: ModelConfig) -> bool:
    """Whether bias correction applies: it measures each fused conv's input and moves the bias
    (BN beta, conv8 / FC bias), so the activation does not matter (ReLU6 included), the layout does."""
    return not config.conv_bias and config.head == "pool" and config.input_size == INPUT_SIZE


def require_standard(config: ModelConfig, what: str, relu6_ok: bool = False) -> None:
    """Refuse a PFLD-specific rewrite on a variant it was not written for, naming the difference.
    `relu6_ok`: the rewrite does not depend on the activation (bias correction)."""
    if config.standard or (relu6_ok and bias_correctable(config)):
        return
    diff = [f for f, bad in (("ReLU6", config.activation != "relu" and not relu6_ok), ("conv biases", config.conv_bias),
                             ("a flattened head", config.head != "pool"),
                             (f"{config.input_size}-px input", config.input_size != INPUT_SIZE)) if bad]
    raise UsageError(f"{what} is written for PFLD-pytorch's anatomy; this network has {', '.join(diff)}; "
                     "use the generic int8 methods (--int8-method plain,mixed)")


def _act(config: ModelConfig) -> nn.Module:
    return ACTIVATIONS[config.activation](inplace=True)


def conv_bn(inp: int, oup: int, kernel: int, stride: int, padding: int = 1, act: str = "relu", bias: bool = False) -> nn.Sequential:
    """Conv + BN + activation, keys `.0 / .1` as in PFLD-pytorch."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, padding, bias=bias), nn.BatchNorm2d(oup), ACTIVATIONS[act](inplace=True)
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ identity)."""

    # The named parts of `conv` (its keys stay `conv.N`, as in PFLD-pytorch): indices of the
    # conv, its BN and its activation, in forward order; the projection is linear.
    PARTS: tuple[tuple[str, int, int, int | None], ...] = (
        ("expand", 0, 1, 2),
        ("depthwise", 3, 4, 5),
        ("project", 6, 7, None),
    )

    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int,
                 act: str = "relu", bias: bool = False) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=bias),
            nn.BatchNorm2d(hidden),
            ACTIVATIONS[act](inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=bias),
            nn.BatchNorm2d(hidden),
            ACTIVATIONS[act](inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=bias),
            nn.BatchNorm2d(oup),
        )

    def parts(self) -> Iterator[tuple[str, nn.Conv2d, nn.BatchNorm2d, nn.Module | None]]:
        """(part name, conv, BN, activation module or None) in forward order."""
        for part, c, b, a in self.PARTS:
            yield part, self.conv[c], self.conv[b], None if a is None else self.conv[a]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


Block = Callable[..., nn.Module]


class PFLD(nn.Module):
    """PFLD backbone + multi-scale head. `forward` returns (28x28 feature, landmarks [N, 2P])."""

    def __init__(self, config: ModelConfig = ModelConfig(), block: Block = InvertedResidual) -> None:
        super().__init__()
        self.config = config
        ch = config.channels or width_channels(config.width)
        act, bias = config.activation, config.conv_bias
        c1 = ch[_C1]
        self.conv1 = nn.Conv2d(3, c1, 3, 2, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1)
        groups = c1 if config.conv2 == "depthwise" else 1
        self.conv2 = nn.Conv2d(c1, c1, 3, 1, 1, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(c1)
        self.relu = _act(config)

        self._blocks: list[str] = []
        inp = c1
        for t, c, n, s, stage in _STAGES:
            oup = ch[c]
            for i in range(n):
                name = f"conv{stage}_1" if i == 0 else f"block{stage}_{i + 1}"
                # PFLD-pytorch keeps the identity off the first block of each stage, even where
                # shapes would allow it (conv5_1); matching it keeps their checkpoints exact.
                if block is InvertedResidual:
                    setattr(self, name, block(inp, oup, s if i == 0 else 1, i > 0, t, act, bias))
                else:
                    setattr(self, name, block(inp, oup, s if i == 0 else 1, i > 0, t))
                self._blocks.append(name)
                inp = oup
            if stage == _TAP_STAGE:
                self._tap = name
        self.conv7 = conv_bn(ch[_S6], ch[_C7], 3, 2, act=act, bias=bias)  # 14 -> 7
        self.conv8 = nn.Conv2d(ch[_C7], ch[_C8], 7, 1, 0)  # 7 -> 1
        self.bn8 = nn.BatchNorm2d(ch[_C8])  # in every PFLD-pytorch checkpoint; applied only if head_bn
        self.fc = nn.Linear(fc_inputs(ch, config.head, config.input_size), 2 * config.points)

    @property
    def tap_channels(self) -> int:
        return (self.config.channels or width_channels(self.config.width))[_S3]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if self.config.head == "pool" else x.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        tap = x
        for name in self._blocks:
            x = getattr(self, name)(x)
            if name == self._tap:
                tap = x
        s1 = self._pool(x)
        x = self.conv7(x)
        s2 = self._pool(x)
        x = self.conv8(x)
        if self.config.head_bn:
            x = self.bn8(x)
        s3 = self.relu(x).flatten(1)
        return tap, self.fc(torch.cat([s1, s2, s3], 1))


HEAD_INPUTS: tuple[str, ...] = ("s1", "s2", "s3")  # the FC's concatenated input, in order


@dataclass(frozen=True)
class ConvUnit:
    """One conv (or the FC) with the BN and activation that follow it: one fused op in the
    converted model, and the unit every int8 tool (equalisation, bias correction, the QAT
    simulator, the noise hooks, sensitivity labels) walks PFLD by."""

    label: str  # the name int8 reports, QAT sites and sensitivity tables use: conv1, conv3_1.expand, conv7, fc
    path: str  # the conv's PyTorch module path; its state-dict keys start with it: conv3_1.conv.0
    conv: nn.Module  # nn.Conv2d, or nn.Linear for the FC
    bn: nn.BatchNorm2d | None  # applied right after the conv; None for the FC and for conv8 unless head_bn
    activation: UnitActivation
    act: nn.Module | None  # the module applying `activation` (the stem convs and conv8 share PFLD's one `relu`)
    block: str  # "stem", the inverted-residual block's attribute name, or "head"
    part: str  # conv1, conv2 | expand, depthwise, project (`InvertedResidual.PARTS`) | conv7, conv8, fc
    residual: bool = False  # a projection whose block adds the block's input to it (the residual ADD)
    # The next unit is the only reader of this unit's output, so a positive per-channel scale on
    # that output can be undone in the next unit's input channels.
    feeds_next: bool = False
    # Which part of the FC's concatenated input (`HEAD_INPUTS`) this output becomes, pooled (s1,
    # s2: the next conv reads the tensor too) or flattened as it is (s3: only the FC reads it).
    head_input: str | None = None


def conv_units(pfld: PFLD, what: str = "PFLD's int8 tooling") -> Iterator[ConvUnit]:
    """Every (conv, BN, activation) unit of `pfld` in forward order, for every variant
    `ModelConfig` describes. A block that is not an `InvertedResidual` is refused (naming `what`
    needs it) before anything is yielded."""
    blocks = [(name, getattr(pfld, name)) for name in pfld._blocks]
    for name, block in blocks:
        if not isinstance(block, InvertedResidual):
            raise UsageError(f"{what} knows PFLD's inverted-residual blocks; {name} is a {type(block).__name__}")
    paths = {id(m): n for n, m in pfld.named_modules()}
    act = pfld.config.activation

    def unit(label: str, conv: nn.Module, bn: nn.BatchNorm2d | None, activation: UnitActivation,
             act_module: nn.Module | None, block: str, part: str, **kw: object) -> ConvUnit:
        return ConvUnit(label, paths[id(conv)], conv, bn, activation, act_module, block, part, **kw)  # type: ignore[arg-type]

    # Whether a block's output has a second reader: an identity block reads its input twice (its
    # expand conv and its ADD), and the last block's output is also pooled into S1.
    output_shared = [b.use_res_connect for _, b in blocks[1:]] + [True]
    yield unit("conv1", pfld.conv1, pfld.bn1, act, pfld.relu, "stem", "conv1", feeds_next=True)
    yield unit("conv2", pfld.conv2, pfld.bn2, act, pfld.relu, "stem", "conv2",
               feeds_next=not (blocks and blocks[0][1].use_res_connect))
    for (name, block), shared in zip(blocks, output_shared):
        for part, conv, bn, act_module in block.parts():
            if act_module is not None:  # expand, depthwise: each read by the next part alone
                yield unit(f"{name}.{part}", conv, bn, act, act_module, name, part, feeds_next=True)
            else:
                yield unit(f"{name}.{part}", conv, bn, "none", None, name, part, residual=block.use_res_connect,
                           feeds_next=not block.use_res_connect and not shared,
                           head_input="s1" if name == pfld._blocks[-1] else None)
    c7 = pfld.conv7
    yield unit("conv7", c7[0], c7[1], act, c7[2], "head", "conv7", head_input="s2")
    yield unit("conv8", pfld.conv8, pfld.bn8 if pfld.config.head_bn else None, act, pfld.relu, "head", "conv8",
               head_input="s3")
    yield unit("fc", pfld.fc, None, "none", None, "head", "fc")


def fold_bn(conv: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv (or linear) + BN as one op, as the converter folds them (BN's
    frozen running statistics); differentiable in the conv and BN parameters."""
    w = conv.weight
    b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if bn is None:
        return w, b
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return w * s.view(-1, *([1] * (w.dim() - 1))), (b - bn.running_mean) * s + bn.bias


class AuxiliaryNet(nn.Module):
    """Pose branch: 28x28 feature -> (yaw, pitch, roll). Used only by the training loss."""

    def __init__(self, in_channels: int = 64, channels: tuple[int, int, int, int] = (128, 128, 32, 128),
                 act: str = "relu") -> None:
        super().__init__()
        a, b, c, d = channels  # forks that scale every layer scale these too
        self.conv1 = conv_bn(in_channels, a, 3, 2, act=act)
        self.conv2 = conv_bn(a, b, 3, 1, act=act)
        self.conv3 = conv_bn(b, c, 3, 2, act=act)
        self.conv4 = conv_bn(c, d, 7, 1, act=act)
        self.max_pool1 = nn.MaxPool2d(3)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        x = self.max_pool1(x).flatten(1)
        return self.fc2(self.fc1(x))


class LandmarkModel(nn.Module):
    """Inference wrapper: the auxiliary branch is gone and only landmarks [N, 2P] come out.

    This is what gets exported. PFLD-pytorch's own export returns the 28x28 feature as its first
    output, which tools then pick up as "the" output.
    """

    def __init__(self, pfld: PFLD) -> None:
        super().__init__()
        self.pfld = pfld

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pfld(x)[1]


def build_model(
    width: float = 1.0, points: int = 98, conv2: Conv2Kind = "full", head_bn: bool = False, activation: str = "relu"
) -> tuple[PFLD, AuxiliaryNet]:
    """Build a PFLD network and its auxiliary pose net for the given configuration."""
    cfg = ModelConfig(width=width, points=points, conv2=conv2, head_bn=head_bn, activation=activation)
    pfld = PFLD(cfg)
    return pfld, AuxiliaryNet(pfld.tap_channels)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs(module: nn.Module, input_size: int = INPUT_SIZE) -> int:
    """Multiply-accumulates of one forward pass at `input_size`, counted from conv/linear layers."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return total
