"""Overlays for people: face boxes, landmarks coloured by facial part, head-pose axes, grids.

Pure functions on uint8 BGR arrays (they return a new image and never touch the input);
`write_image` is the only writer and goes through `io.atomic_path`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .detect import Box, as_bgr8
from .errors import UsageError
from .io import atomic_path
from .layouts import PointLayout
from .pose import rotation_matrix

# BGR colour per facial part name (layouts.PointLayout.parts); unknown parts cycle PALETTE.
PART_COLORS: dict[str, tuple[int, int, int]] = {
    "contour": (255, 200, 0),
    "brows": (0, 165, 255),
    "nose": (0, 255, 255),
    "eyes": (0, 255, 0),
    "mouth": (180, 105, 255),
    "points": (0, 255, 0),
}
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 255, 0), (255, 0, 255), (255, 255, 0), (0, 128, 255))
BOX_COLOR = (0, 0, 255)
# Pose axes: x (to the subject's left) red, y (down) green, facing direction blue.
AXIS_COLORS = ((0, 0, 255), (0, 255, 0), (255, 0, 0))


def _thickness(img: np.ndarray) -> int:
    # Lines must stay visible on 4000 px photos and not swamp 112 px crops.
    return max(1, round(max(img.shape[:2]) / 500))


def pose_axes(yaw: float, pitch: float, roll: float, size: float) -> np.ndarray:
    """End points [3, 2] (relative to the face centre, image pixels) of the head's x axis (to the
    subject's left), y axis (down) and facing direction (out of the face), orthographically
    projected. Degrees, in `pose.py`'s conventions: yaw > 0 swings the facing axis to the image
    right, pitch > 0 (looking up) swings it up, roll > 0 turns the x axis clockwise."""
    r = rotation_matrix(yaw, pitch, roll)
    # Object +Z points into the head, so the facing direction is -Z.
    return size * np.stack([r[:2, 0], r[:2, 1], -r[:2, 2]])


def draw_faces(
    image: np.ndarray,
    boxes: Sequence[Box],
    landmarks: Sequence[np.ndarray | None] | None = None,
    layout: PointLayout | None = None,
    poses: Sequence[tuple[float, float, float] | None] | None = None,
    labels: bool = True,
) -> np.ndarray:
    """A copy of `image` with boxes (+ score), landmarks [P, 2] in image pixels coloured by
    `layout.parts`, and pose axes from (yaw, pitch, roll) degrees at the landmarks' centre."""
    out = as_bgr8(image).copy()
    t = _thickness(out)
    n = len(boxes)
    lms = list(landmarks) if landmarks is not None else [None] * n
    pss = list(poses) if poses is not None else [None] * n
    if len(lms) != n or len(pss) != n:
        raise UsageError(f"draw_faces needs one landmark set and pose per box: {n} boxes, {len(lms)} landmarks, {len(pss)} poses")
    for box, pts, pose in zip(boxes, lms, pss):
        side = max(box.width, box.height, 1.0)
        # Per-face strokes: a 30 px face in a 4000 px photo must not vanish under its own marks.
        ft = max(1, min(t, round(side / 40)))
        p0 = (int(round(box.x0)), int(round(box.y0)))
        cv2.rectangle(out, p0, (int(round(box.x1)), int(round(box.y1))), BOX_COLOR, ft, cv2.LINE_AA)
        if labels:
            cv2.putText(out, f"{box.score:.2f}", (p0[0], max(0, p0[1] - 3 * ft)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * ft, BOX_COLOR, ft, cv2.LINE_AA)
        if pts is not None:
            _draw_points(out, np.asarray(pts, np.float64), layout, radius=max(1, round(side / 120)))
        if pose is not None:
            centre = np.asarray(pts, np.float64).mean(0) if pts is not None else np.array(
                [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
            for end, colour in zip(pose_axes(*pose, size=side / 2) + centre, AXIS_COLORS):
                cv2.line(out, _pt(centre), _pt(end), colour, ft, cv2.LINE_AA)
    return out


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def _draw_points(img: np.ndarray, pts: np.ndarray, layout: PointLayout | None, radius: int) -> None:
    parts = layout.parts if layout is not None and layout.num_points == len(pts) else (("points", tuple(range(len(pts)))),)
    for i, (part, idx) in enumerate(parts):
        colour = PART_COLORS.get(part, PALETTE[i % len(PALETTE)])
        for k in idx:
            if np.all(np.isfinite(pts[k])):
                cv2.circle(img, _pt(pts[k]), radius, colour, -1, cv2.LINE_AA)


def contact_sheet(images: Sequence[np.ndarray], labels: Sequence[str] | None = None, cell: int = 256,
                  cols: int | None = None) -> np.ndarray:
    """Tile images (each fitted into a `cell` square, letterboxed) into one grid image."""
    if not images:
        raise UsageError("contact sheet needs at least one image")
    if cell < 16:
        raise UsageError(f"cell size must be at least 16 px, got {cell}")
    cols = cols or int(math.ceil(math.sqrt(len(images))))
    rows = int(math.ceil(len(images) / cols))
    sheet = np.full((rows * cell, cols * cell, 3), 32, np.uint8)
    for i, im in enumerate(images):
        im = as_bgr8(im)
        s = cell / max(im.shape[:2])
        w, h = max(1, round(im.shape[1] * s)), max(1, round(im.shape[0] * s))
        small = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        r, c = divmod(i, cols)
        y, x = r * cell + (cell - h) // 2, c * cell + (cell - w) // 2
        sheet[y : y + h, x : x + w] = small
        if labels is not None and i < len(labels):
            cv2.putText(sheet, labels[i][:32], (c * cell + 3, r * cell + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (255, 255, 255), 1, cv2.LINE_AA)
    return sheet


def write_image(path: str | os.PathLike[str], image: np.ndarray, jpeg_quality: int = 92) -> Path:
    """Write PNG/JPEG (by suffix) atomically; raises UsageError for unknown suffixes or failures."""
    dest = Path(path)
    if dest.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"overlay {dest} must end in .png, .jpg or .jpeg")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if dest.suffix.lower() in (".jpg", ".jpeg") else []
    with atomic_path(dest) as tmp:
        if not cv2.imwrite(str(tmp), as_bgr8(image), params):
            raise UsageError(f"OpenCV could not write {dest}; check the folder is writable and has space")
    return dest
