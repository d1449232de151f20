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


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file (.jpg/.png/.ppm/.bmp, grey, 16-bit or with alpha) as uint8 BGR [H, W, 3].

    Raises DataError naming the file when it is missing or not an image.
    """
    import cv2

    from ..errors import DataError

    p = Path(path)
    try:
        # imdecode(fromfile) rather than imread: same decoders, but also non-ASCII paths.
        buf = np.fromfile(str(p), np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {p} ({e.strerror}); check the path and the annotation's image root") from None
    # Annotations index the stored pixel grid (Matlab / PIL never apply EXIF rotation): ignore it.
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if img is None:
        raise DataError(f"{p} is not a readable image; replace the file or drop it from the annotations")
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file's stored pixel grid, from its header when possible."""
    try:
        from PIL import Image  # matplotlib's dependency; reads only the header

        with Image.open(path) as im:
            w, h = im.size
        return int(w), int(h)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - PIL rejects some files OpenCV reads; fall back to decoding
        pass
    img = read_image(path)
    return int(img.shape[1]), int(img.shape[0])
