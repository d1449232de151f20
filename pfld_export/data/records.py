"""The one record every loader produces and every consumer (eval, train, calibration) reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# WFLW's six attribute flags, in file order.
ATTRIBUTES: tuple[str, ...] = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")


@dataclass
class FaceRecord:
    """One annotated face: image file, points in image pixels [P, 2], optional box and attributes.

    `pose` is (yaw, pitch, roll) in degrees when known exactly (synthetic faces); otherwise None
    and consumers estimate it with `pose.euler_from_landmarks`.
    """

    image_path: Path
    points: np.ndarray  # float32 [P, 2], image pixels, 0-based
    rect: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    attributes: tuple[int, ...] = field(default=(0, 0, 0, 0, 0, 0))
    layout: str = "wflw98"
    pose: tuple[float, float, float] | None = None
    source: str = ""  # "file:line" for messages

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


@dataclass
class LoadProblem:
    """A line or file a loader could not use, with where it is."""

    where: str  # file:line
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"
