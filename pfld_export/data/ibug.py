"""300-W / iBUG `.pts` files and the PFLD forks' 68-point lists -> FaceRecords.

`.pts` (300-W, 300-VW, Menpo, 300W-LP exports)::

    version: 1
    n_points: 68
    {
    x y
    ...
    }

Coordinates are taken as written. The 300-W convention is 1-based (Matlab) pixels, many
re-exports (and the fixtures' 300-W / 300W-LP files) are 0-based: the loader cannot tell, so
`load_300w(offset=-1.0)` converts 1-based files when you know that is what you have (half a
pixel of bias changes NME by well under 1% of the inter-ocular distance on typical faces).

The PFLD forks' `list_68pt_rect_attr_*.txt` (147 fields: 136 coordinates, 4 rect, 6 flags,
path) are read by `load_pfld_list`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..layouts import get_layout
from .records import FaceRecord, LoadProblem
from .wflw import ImageSizes, Problems, check_points, landmark_rect, parse_rect_attr_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class _PtsError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _parse_pts(p: Path) -> np.ndarray:
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise _PtsError(1, f"cannot read the file ({e.strerror}); check the path") from None
    n_declared: int | None = None
    start = None
    for i, raw in enumerate(lines):
        s = raw.strip()
        if s.lower().startswith("n_points"):
            value = s.split(":", 1)[-1].strip()
            if not value.isdigit():
                raise _PtsError(i + 1, f"n_points must be a whole number, got {value!r}; fix the header")
            n_declared = int(value)
        elif s.startswith("{"):
            start = i + 1
            break
    if start is None:
        raise _PtsError(1, "no '{' opening the point list; is this a .pts file?")
    pts: list[tuple[float, float]] = []
    closed = False
    for i in range(start, len(lines)):
        s = lines[i].strip()
        if not s:
            continue
        if s.startswith("}"):
            closed = True
            break
        fields = s.split()
        if len(fields) != 2:
            raise _PtsError(i + 1, f"expected 'x y', got {s!r}")
        try:
            x, y = float(fields[0]), float(fields[1])
        except ValueError:
            raise _PtsError(i + 1, f"non-numeric point {s!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise _PtsError(i + 1, f"non-finite point {s!r}")
        pts.append((x, y))
    if not closed:
        raise _PtsError(len(lines), "point list not closed with '}' (file truncated?)")
    if n_declared is not None and n_declared != len(pts):
        raise _PtsError(1, f"header says n_points {n_declared} but the file lists {len(pts)} points; fix the header or the list")
    if not pts:
        raise _PtsError(start, "no points")
    return np.array(pts, np.float64)


def read_pts(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a `.pts` file into float64 [N, 2]. Raises DataError saying what is wrong and where."""
    p = Path(path)
    try:
        return _parse_pts(p)
    except _PtsError as e:
        raise DataError(f"{p}:{e.line}: {e.reason}") from None


def _image_for(pts_path: Path) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        for cand in (pts_path.with_suffix(suf), pts_path.with_suffix(suf.upper())):
            if cand.is_file():
                return cand
    return None


def load_300w(
    directory: str | os.PathLike[str], strict: bool = False, offset: float = 0.0
) -> tuple[list[FaceRecord], list[LoadProblem]]:
    """Every `.pts` under `directory` (recursively, sorted) with its same-stem image beside it.

    `offset` is added to every coordinate (-1.0 turns 1-based 300-W files into 0-based pixels).
    Faces whose point count differs from the majority are reported, not mixed in.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"300-W folder {root} does not exist; pass a folder holding .pts files beside their images")
    problems = Problems(strict)
    sizes = ImageSizes()
    found: list[tuple[Path, Path, np.ndarray]] = []
    for pts_path in sorted(root.rglob("*.pts")):
        where = f"{pts_path}:1"
        try:
            pts = _parse_pts(pts_path) + offset
        except _PtsError as e:
            problems.add(f"{pts_path}:{e.line}", e.reason)
            continue
        img = _image_for(pts_path)
        if img is None:
            problems.add(where, f"no image with the same name ({', '.join(IMAGE_SUFFIXES)}) beside it")
            continue
        size = sizes.get(img)
        if isinstance(size, str):
            problems.add(where, size)
            continue
        why = check_points(pts, size)
        if why:
            problems.add(where, why)
            continue
        found.append((pts_path, img, pts))
    if not found:
        return [], problems.items
    counts: dict[int, int] = {}
    for _, _, pts in found:
        counts[len(pts)] = counts.get(len(pts), 0) + 1
    n = max(counts, key=lambda k: (counts[k], k))
    layout = get_layout(n)
    records: list[FaceRecord] = []
    for pts_path, img, pts in found:
        if len(pts) != n:
            problems.add(f"{pts_path}:1", f"{len(pts)} points where the rest of the folder has {n}; move it to its own folder")
            continue
        records.append(FaceRecord(image_path=img.resolve(), points=pts.astype(np.float32), rect=landmark_rect(pts),
                                  layout=layout.name, source=f"{pts_path}:1"))
    return records, problems.items


def load_pfld_list(
    annotation_file: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    strict: bool = False,
    num_points: int = 68,
) -> tuple[list[FaceRecord], list[LoadProblem]]:
    """A PFLD fork's `list_68pt_rect_attr_*.txt` (147 fields); image paths relative to `root`
    (default: `images/` beside the list, else the list's folder)."""
    from .wflw import default_images_root

    r = Path(root) if root is not None else default_images_root(annotation_file)
    return parse_rect_attr_list(annotation_file, r, num_points, strict)
