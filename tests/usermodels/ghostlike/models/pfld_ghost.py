"""A PFLD head on a GhostNet-style backbone, written the way forks write it: run from the
repository root, siblings imported package-style, constructor arguments, two outputs."""

import torch
from torch import nn

from models.base_module import GhostModule


class PFLD_GhostNet(nn.Module):
    def __init__(self, width_factor: float = 1, input_size: int = 112, landmark_number: int = 98) -> None:
        super().__init__()
        c = int(16 * width_factor)
        self.stem = GhostModule(3, c, 2)  # 56
        self.stage1 = GhostModule(c, 2 * c, 2)  # 28
        self.stage2 = GhostModule(2 * c, 4 * c, 2)  # 14
        self.conv7 = nn.Conv2d(4 * c, 4 * c, 3, 2, 1)  # 7
        self.fc = nn.Linear(4 * c + 4 * c, landmark_number * 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.stage1(self.stem(x))
        x = self.stage2(feat)
        s1 = x.mean((2, 3))
        s2 = torch.relu(self.conv7(x)).mean((2, 3))
        return feat, torch.sigmoid(self.fc(torch.cat([s1, s2], 1)))
