"""Preprocessing that travels with the model, and crops between image and 112x112 crop space.

`Preprocess` is stored in our checkpoints, in ONNX `metadata_props`, and in the sidecar
`model.json` next to every `.tflite`, so any artifact knows how to feed itself. Foreign models
get it from CLI flags (`--color --mean --std`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from .errors import UsageError
from .options import per_channel

ColorOrder = Literal["BGR", "RGB"]


@dataclass(frozen=True)
class Preprocess:
    """How a uint8 BGR crop becomes the model's float input: (x * scale - mean) / std.

    PFLD-pytorch: BGR, x/255, mean 0, std 1 (the defaults). The GhostOne ONNX fixture: RGB,
    mean 0.5, std 0.5.
    """

    color: ColorOrder = "BGR"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_size: int = 112
    layout: str = "wflw98"

    def __post_init__(self) -> None:
        if self.color not in ("BGR", "RGB"):
            raise UsageError(f"colour order must be BGR or RGB, got {self.color!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError(f"mean and std need 3 values each, got mean={self.mean} std={self.std}")
        if any(s == 0 for s in self.std):
            raise UsageError(f"std must be non-zero, got {self.std}")

    def apply(self, crops: np.ndarray) -> np.ndarray:
        """uint8 BGR [N, H, W, 3] -> float32 NHWC model input."""
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise UsageError(f"expected crops shaped [N, H, W, 3], got {crops.shape}")
        x = crops.astype(np.float32)
        if self.color == "RGB":
            x = x[..., ::-1]
        x = x * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def apply_nchw(self, crops: np.ndarray) -> np.ndarray:
        """uint8 BGR [N, H, W, 3] -> float32 NCHW model input."""
        return np.ascontiguousarray(self.apply(crops).transpose(0, 3, 1, 2))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {k: d[k] for k in ("color", "scale", "mean", "std", "input_size", "layout") if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(v) for v in known[k])
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def preprocess_overrides(color: str | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None) -> dict[str, Any]:
    """The --color/--mean/--std flags as the `Preprocess` fields they replace, only those given:
    colour upper-cased, a single mean or std value used for all three channels.

    Every command applies them the same way, over the model's own record (or over what stage 0
    measures for the fields they leave open): `open_predictor(path, overrides=fields)`, or
    `dataclasses.replace(base, **fields)` where the record is already at hand."""
    fields: dict[str, Any] = {"color": color.upper() if color else None, "mean": per_channel(mean, "--mean"),
                              "std": per_channel(std, "--std")}
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class CropTransform:
    """An affine map image -> crop (2x3), with its inverse; points map both ways exactly."""

    matrix: np.ndarray  # 2x3, image -> crop
    size: int = 112
    box: tuple[float, float, float, float] = field(default=(0.0, 0.0, 0.0, 0.0))  # square box in image px

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Image-pixel points [..., 2] -> crop-pixel points."""
        p = np.asarray(points, np.float64)
        return p @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Crop-pixel points [..., 2] -> image-pixel points."""
        inv = cv2.invertAffineTransform(self.matrix)
        p = np.asarray(points, np.float64)
        return p @ inv[:, :2].T + inv[:, 2]


def square_box(x0: float, y0: float, x1: float, y1: float, scale: float = 1.0) -> tuple[float, float, float, float]:
    """Square box around the centre of (x0, y0, x1, y1), side = scale * max(w, h)."""
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    side = max(x1 - x0, y1 - y0) * scale
    if not np.isfinite(side) or side <= 0:
        raise UsageError(f"cannot crop an empty box ({x0}, {y0}, {x1}, {y1})")
    return cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0


def crop_box(image: np.ndarray, box: tuple[float, float, float, float], size: int = 112) -> tuple[np.ndarray, CropTransform]:
    """Crop a square box (may extend past the border: replicated padding) and resize to `size`."""
    x0, y0, x1, y1 = box
    s = size / (x1 - x0)
    m = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s]], np.float64)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    crop = cv2.warpAffine(image, m, (size, size), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    if crop.ndim == 2:
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    return crop, CropTransform(matrix=m, size=size, box=(x0, y0, x1, y1))


def crop_from_landmarks(image: np.ndarray, points: np.ndarray, scale: float = 1.2, size: int = 112) -> tuple[np.ndarray, CropTransform]:
    """PFLD-pytorch's training/test convention: square crop at `scale` x the landmark box."""
    p = np.asarray(points, np.float64)
    box = square_box(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max(), scale)
    return crop_box(image, box, size)


def crop_from_box(image: np.ndarray, box: tuple[float, float, float, float], scale: float = 1.2, size: int = 112) -> tuple[np.ndarray, CropTransform]:
    """Inference convention: square crop at `scale` x a detector box (x0, y0, x1, y1)."""
    return crop_box(image, square_box(*box, scale=scale), size)
