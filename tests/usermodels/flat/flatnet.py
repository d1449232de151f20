"""A small landmark network with a flattened head that predicts pixels of the crop."""

import torch
from torch import nn


class FlatHeadNet(nn.Module):
    def __init__(self, points: int = 5, input_size: int = 112) -> None:
        super().__init__()
        self.input_size = input_size
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 4, 1), nn.ReLU())  # /16
        side = input_size // 16
        self.fc = nn.Linear(8 * side * side, 2 * points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))  # pixels, not [0, 1]
