"""A GhostNet-style module, as forks keep it in a sibling file of their network."""

import torch
from torch import nn


class GhostModule(nn.Module):
    """Half the channels from a 1x1 conv, the other half from a cheap depthwise conv on them."""

    def __init__(self, inp: int, oup: int, stride: int = 1) -> None:
        super().__init__()
        half = oup // 2
        self.primary = nn.Sequential(nn.Conv2d(inp, half, 3, stride, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)
