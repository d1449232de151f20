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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .errors import UsageError

Conv2Kind = Literal["full", "depthwise"]
WIDTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
INPUT_SIZE = 112
HEAD_CHANNELS = (16, 32, 128)  # S1, S2, S3 of the multi-scale head; never width-scaled

# Inverted-residual stages. t: expansion, c: output channels at width 1.0, n: blocks,
# s: stride of the first block, scaled: c follows the width multiplier, stage: name number
# (the first block is `conv{stage}_1`, the rest `block{stage}_{i}`, as in PFLD-pytorch).
_STAGES: tuple[tuple[int, int, int, int, bool, int], ...] = (
    # t,   c, n, s, scaled, stage
    (2, 64, 5, 2, True, 3),  # 56 -> 28; its output is the 28x28 feature the auxiliary net taps
    (2, 128, 1, 2, True, 4),  # 28 -> 14
    (4, 128, 6, 1, True, 5),
    (2, 16, 1, 1, False, 6),  # 14x14x16 bottleneck = S1
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


@dataclass(frozen=True)
class ModelConfig:
    """What defines a PFLD network's shapes: width multiplier, landmark count, conv2 kind."""

    width: float = 1.0
    points: int = 98
    conv2: Conv2Kind = "full"
    head_bn: bool = False  # apply bn8 after conv8 (older PFLD-pytorch and its forks)
    input_size: int = INPUT_SIZE

    def __post_init__(self) -> None:
        if self.width not in WIDTHS:
            raise UsageError(f"width {self.width} is not supported; choose one of {', '.join(map(str, WIDTHS))}")
        if self.points < 1:
            raise UsageError(f"points must be a positive count, got {self.points}")
        if self.conv2 not in ("full", "depthwise"):
            raise UsageError(f"conv2 must be 'full' or 'depthwise', got {self.conv2!r}")
        if self.input_size != INPUT_SIZE:
            raise UsageError(f"PFLD's head is built for {INPUT_SIZE}x{INPUT_SIZE} input, got {self.input_size}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def conv_bn(inp: int, oup: int, kernel: int, stride: int, padding: int = 1) -> nn.Sequential:
    """Conv + BN + ReLU, keys `.0 / .1` as in PFLD-pytorch."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, padding, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ identity)."""

    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


Block = Callable[[int, int, int, bool, int], nn.Module]


class PFLD(nn.Module):
    """PFLD backbone + multi-scale head. `forward` returns (28x28 feature, landmarks [N, 2P])."""

    def __init__(self, config: ModelConfig = ModelConfig(), block: Block = InvertedResidual) -> None:
        super().__init__()
        self.config = config
        c1 = scaled_channels(64, config.width)
        self.conv1 = nn.Conv2d(3, c1, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        groups = c1 if config.conv2 == "depthwise" else 1
        self.conv2 = nn.Conv2d(c1, c1, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)

        self._blocks: list[str] = []
        inp = c1
        for t, c, n, s, scaled, stage in _STAGES:
            oup = scaled_channels(c, config.width) if scaled else c
            for i in range(n):
                name = f"conv{stage}_1" if i == 0 else f"block{stage}_{i + 1}"
                # PFLD-pytorch keeps the identity off the first block of each stage, even where
                # shapes would allow it (conv5_1); matching it keeps their checkpoints exact.
                setattr(self, name, block(inp, oup, s if i == 0 else 1, i > 0, t))
                self._blocks.append(name)
                inp = oup
            if stage == _TAP_STAGE:
                self._tap = name
        s1, s2, s3 = HEAD_CHANNELS
        self.conv7 = conv_bn(s1, s2, 3, 2)  # 14 -> 7
        self.conv8 = nn.Conv2d(s2, s3, 7, 1, 0)  # 7 -> 1
        self.bn8 = nn.BatchNorm2d(s3)  # in every PFLD-pytorch checkpoint; applied only if head_bn
        self.fc = nn.Linear(s1 + s2 + s3, 2 * config.points)

    @property
    def tap_channels(self) -> int:
        return scaled_channels(64, self.config.width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        tap = x
        for name in self._blocks:
            x = getattr(self, name)(x)
            if name == self._tap:
                tap = x
        s1 = x.mean((2, 3))
        x = self.conv7(x)
        s2 = x.mean((2, 3))
        x = self.conv8(x)
        if self.config.head_bn:
            x = self.bn8(x)
        s3 = self.relu(x).flatten(1)
        return tap, self.fc(torch.cat([s1, s2, s3], 1))


class AuxiliaryNet(nn.Module):
    """Pose branch: 28x28 feature -> (yaw, pitch, roll). Used only by the training loss."""

    def __init__(self, in_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, 128, 3, 2)
        self.conv2 = conv_bn(128, 128, 3, 1)
        self.conv3 = conv_bn(128, 32, 3, 2)
        self.conv4 = conv_bn(32, 128, 7, 1)
        self.max_pool1 = nn.MaxPool2d(3)
        self.fc1 = nn.Linear(128, 32)
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
    width: float = 1.0, points: int = 98, conv2: Conv2Kind = "full", head_bn: bool = False
) -> tuple[PFLD, AuxiliaryNet]:
    """Build a PFLD network and its auxiliary pose net for the given configuration."""
    cfg = ModelConfig(width=width, points=points, conv2=conv2, head_bn=head_bn)
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
