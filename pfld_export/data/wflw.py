"""WFLW-format annotation lists -> FaceRecords (+ the lines that could not be used, with file:line).

A WFLW line has 207 whitespace-separated fields: 196 coordinates (98 x, y pairs in 0-based image
pixels), the face rectangle (x_min y_min x_max y_max), six attribute flags (pose, expression,
illumination, make-up, occlusion, blur) and the image path relative to the images folder. The
PFLD forks' 68-point lists (`list_68pt_rect_attr_*.txt`, 147 fields) are the same format with
68 points; `parse_rect_attr_list` reads both.

Bad lines never crash the loader: each becomes a `LoadProblem("file:line", reason)` and is
skipped, or a `DataError` when `strict`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..layouts import get_layout
from .records import ATTRIBUTES, FaceRecord, LoadProblem, image_size

WFLW_POINTS = 98
# A point may sit outside the image (faces cut by the border are annotated with guessed points),
# but not by more than this fraction of the face's landmark-box size: that is a broken line.
OUTSIDE_TOLERANCE = 0.5


class Problems:
    """Collects problems; raises on the first one in strict mode."""

    def __init__(self, strict: bool, hint: str = "") -> None:
        self.strict = strict
        self.hint = hint
        self.items: list[LoadProblem] = []

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}{self.hint}")
        self.items.append(LoadProblem(where, reason))


class ImageSizes:
    """Image (width, height) by path, read once per image (many faces share one image)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def get(self, path: Path) -> tuple[int, int] | str:
        """The size, or a reason string when the image is missing or unreadable."""
        if path not in self._cache:
            if not path.is_file():
                self._cache[path] = f"image {path} does not exist"
            else:
                try:
                    self._cache[path] = image_size(path)
                except DataError as e:
                    self._cache[path] = str(e)
        return self._cache[path]


def check_points(points: np.ndarray, size: tuple[int, int]) -> str | None:
    """Why these points cannot be a face in an image of `size` = (width, height), or None."""
    if not np.all(np.isfinite(points)):
        return "coordinates contain NaN or infinity"
    lo, hi = points.min(0), points.max(0)
    extent = float(max(hi - lo))
    if extent <= 0:
        return "all points coincide (zero-size face)"
    tol = OUTSIDE_TOLERANCE * extent + 2.0
    w, h = size
    if lo[0] < -tol or lo[1] < -tol or hi[0] > w - 1 + tol or hi[1] > h - 1 + tol:
        return (f"points far outside the {w}x{h} image (x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}); "
                "wrong image, wrong point order or a scaled annotation")
    return None


def _floats(tokens: list[str]) -> np.ndarray | None:
    try:
        return np.array([float(t) for t in tokens], np.float64)
    except ValueError:
        return None


def parse_rect_attr_list(
    annotation_file: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    num_points: int,
    strict: bool = False,
) -> tuple[list[FaceRecord], list[LoadProblem]]:
    """Read a `2N coords, 4 rect, 6 attributes, path` list (WFLW: N = 98; PFLD forks: N = 68)."""
    ann = Path(annotation_file)
    root = Path(images_root).resolve()  # records outlive the working directory they were loaded from
    layout = get_layout(num_points)
    n_fields = 2 * num_points + 4 + len(ATTRIBUTES) + 1
    problems = Problems(strict)
    try:
        text = ann.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read annotation file {ann} ({e.strerror}); check the path") from None
    sizes = ImageSizes()
    records: list[FaceRecord] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{ann}:{lineno}"
        # The path is the last field; split a fixed number of times so a path with spaces survives.
        parts = s.split(None, n_fields - 1)
        if len(parts) != n_fields:
            problems.add(where, f"expected {n_fields} fields ({2 * num_points} coordinates, 4 rect values, "
                                f"{len(ATTRIBUTES)} attribute flags, image path), found {len(parts)}")
            continue
        nums = _floats(parts[: n_fields - 1])
        if nums is None:
            bad = next(t for t in parts[: n_fields - 1] if _floats([t]) is None)
            problems.add(where, f"non-numeric value {bad!r} among coordinates/rect/attributes")
            continue
        pts = nums[: 2 * num_points].reshape(num_points, 2)
        rect = nums[2 * num_points : 2 * num_points + 4]
        attrs = nums[2 * num_points + 4 :]
        if not np.all(np.isfinite(nums)):
            problems.add(where, "coordinates contain NaN or infinity")
            continue
        if not np.all((attrs == 0) | (attrs == 1)):
            problems.add(where, f"attribute flags must be 0 or 1, got {[int(a) if a == int(a) else a for a in attrs]}")
            continue
        rel = parts[-1]
        img_path = root / rel
        size = sizes.get(img_path)
        if isinstance(size, str):
            problems.add(where, f"{size}; check the images folder ({root})")
            continue
        why = check_points(pts, size)
        if why:
            problems.add(where, why)
            continue
        records.append(FaceRecord(
            image_path=img_path,
            points=pts.astype(np.float32),
            rect=(float(rect[0]), float(rect[1]), float(rect[2]), float(rect[3])),
            attributes=tuple(int(a) for a in attrs),
            layout=layout.name,
            source=where,
        ))
    return records, problems.items


def default_images_root(annotation_file: str | os.PathLike[str]) -> Path:
    """`images/` beside the list file when it exists (our layout and the fixtures'), else its folder."""
    parent = Path(annotation_file).parent
    return parent / "images" if (parent / "images").is_dir() else parent


def load_wflw(
    annotation_file: str | os.PathLike[str],
    images_root: str | os.PathLike[str] | None = None,
    strict: bool = False,
) -> tuple[list[FaceRecord], list[LoadProblem]]:
    """Read a WFLW annotation list (207 fields a line). Images are looked up under `images_root`
    (default: `images/` beside the list, else the list's folder)."""
    root = Path(images_root) if images_root is not None else default_images_root(annotation_file)
    return parse_rect_attr_list(annotation_file, root, WFLW_POINTS, strict)


def landmark_rect(points: np.ndarray) -> tuple[float, float, float, float]:
    """The landmark bounding box (x0, y0, x1, y1), used where a format has no face rectangle."""
    p = np.asarray(points, np.float64)
    x0, y0 = p.min(0)
    x1, y1 = p.max(0)
    return (float(math.floor(x0)), float(math.floor(y0)), float(math.ceil(x1)), float(math.ceil(y1)))
