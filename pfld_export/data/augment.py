"""Landmark-consistent augmentation, done as ONE affine applied at crop time.

The geometric part (rotation, scale, shift, horizontal mirror) is a 2x3 matrix in crop pixels
that is composed with the crop matrix `preprocess.crop_box` would use (image -> crop), so the
image is resampled once (`cv2.warpAffine`) and the points go through exactly the same matrix:
image and landmarks cannot drift apart. A mirror also permutes the points with the layout's
mirror table (the subject's right eye becomes the left one); it is disabled for layouts that
have no mirror table (custom N-point layouts). The photometric part (colour jitter, blur,
synthetic occlusion) touches pixels only.

All randomness is drawn up front by `sample_params(rng, ...)` into an `AugmentParams` record, so
an augmentation is a pure function of its parameters: deterministic given a
`np.random.Generator`, invertible for the points (`unaugment_points`), and loggable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ..errors import UsageError
from ..layouts import PointLayout
from ..preprocess import CropTransform


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of each augmentation; `NO_AUGMENT` switches every one off."""

    rotate_deg: float = 30.0  # uniform in +-rotate_deg, about the crop centre
    shift: float = 0.10  # uniform in +-shift x crop side, each axis
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor range (>1 = face larger in the crop)
    mirror_p: float = 0.5  # probability of a horizontal flip (0 for layouts without a mirror table)
    brightness: float = 0.2  # additive, +- fraction of 255
    contrast: float = 0.3  # multiplicative about the crop mean, 1 +- contrast
    saturation: float = 0.4  # blend with grey, 1 +- saturation
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian sigma in crop pixels
    occlusion_p: float = 0.15
    occlusion_size: tuple[float, float] = (0.15, 0.4)  # rectangle side, fraction of the crop side

    def __post_init__(self) -> None:
        for name in ("mirror_p", "blur_p", "occlusion_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"augmentation {name} must be a probability in [0, 1], got {v}")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise UsageError(f"augmentation scale range must be positive and ordered, got {self.scale}")
        if self.rotate_deg < 0 or self.shift < 0:
            raise UsageError(f"rotate_deg and shift are +- ranges and must be >= 0, got {self.rotate_deg}, {self.shift}")


NO_AUGMENT = AugmentConfig(
    rotate_deg=0.0, shift=0.0, scale=(1.0, 1.0), mirror_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
    blur_p=0.0, occlusion_p=0.0,
)


@dataclass(frozen=True)
class AugmentParams:
    """One drawn augmentation. `matrix` maps crop pixels -> augmented crop pixels (2x3)."""

    size: int = 112
    rotation_deg: float = 0.0  # counter-clockwise as displayed (cv2.getRotationMatrix2D's sign)
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # crop pixels
    mirror: bool = False
    brightness: float = 0.0  # added, in 0..255 units
    contrast: float = 1.0
    saturation: float = 1.0
    blur_sigma: float = 0.0
    occlusion: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in augmented crop pixels
    occlusion_color: tuple[int, int, int] = (0, 0, 0)
    matrix: np.ndarray = field(default_factory=lambda: np.array([[1.0, 0, 0], [0, 1.0, 0]]), compare=False)

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.matrix, [[1, 0, 0], [0, 1, 0]])) and not self.mirror


def geometric_matrix(rotation_deg: float, scale: float, shift: tuple[float, float], mirror: bool, size: int) -> np.ndarray:
    """Crop px -> augmented crop px: rotate and scale about the crop centre, shift, then mirror.

    The centre is `size / 2`, where `crop_box` puts the middle of the box. The mirror is
    x -> size - 1 - x, which is exactly `cv2.flip(crop, 1)` for pixel centres at integers.
    """
    c = size / 2.0
    m = np.vstack([cv2.getRotationMatrix2D((c, c), rotation_deg, scale), [0.0, 0.0, 1.0]])
    m[0, 2] += shift[0]
    m[1, 2] += shift[1]
    if mirror:
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m[:2]


def can_mirror(layout: PointLayout) -> bool:
    """A flip needs to know which point becomes which; custom layouts (identity table) do not."""
    return tuple(layout.mirror) != tuple(range(layout.num_points))


def sample_params(rng: np.random.Generator, cfg: AugmentConfig, size: int = 112, mirror_ok: bool = True) -> AugmentParams:
    """Draw one augmentation. Always consumes the same number of draws, so the stream stays
    aligned whatever the configuration (a config change does not reshuffle the other samples)."""
    u = rng.random(15)
    colour_draw = rng.integers(0, 256, 3)
    rot = (2 * u[0] - 1) * cfg.rotate_deg
    lo, hi = cfg.scale
    scale = float(np.exp(np.log(lo) + u[1] * (np.log(hi) - np.log(lo))))  # log-uniform: zoom in/out alike
    shift = ((2 * u[2] - 1) * cfg.shift * size, (2 * u[3] - 1) * cfg.shift * size)
    mirror = bool(mirror_ok and u[4] < cfg.mirror_p)
    brightness = (2 * u[5] - 1) * cfg.brightness * 255.0
    contrast = 1.0 + (2 * u[6] - 1) * cfg.contrast
    saturation = 1.0 + (2 * u[7] - 1) * cfg.saturation
    blur = cfg.blur_sigma[0] + u[9] * (cfg.blur_sigma[1] - cfg.blur_sigma[0]) if u[8] < cfg.blur_p else 0.0
    occ = None
    colour = (0, 0, 0)
    if u[10] < cfg.occlusion_p:
        smin, smax = cfg.occlusion_size
        w = (smin + u[11] * (smax - smin)) * size
        h = (smin + u[12] * (smax - smin)) * size
        # Centre somewhere on the face (the middle 60 % of the crop), so it hides landmarks.
        cx, cy = size * (0.2 + 0.6 * u[13]), size * (0.2 + 0.6 * u[14])
        occ = (int(round(cx - w / 2)), int(round(cy - h / 2)), int(round(cx + w / 2)), int(round(cy + h / 2)))
        colour = (int(colour_draw[0]), int(colour_draw[1]), int(colour_draw[2]))
    return AugmentParams(
        size=size, rotation_deg=float(rot), scale=scale, shift=(float(shift[0]), float(shift[1])), mirror=mirror,
        brightness=float(brightness), contrast=float(contrast), saturation=float(saturation), blur_sigma=float(blur),
        occlusion=occ, occlusion_color=colour,
        matrix=geometric_matrix(float(rot), scale, (float(shift[0]), float(shift[1])), mirror, size),
    )


def identity_params(size: int = 112) -> AugmentParams:
    """No augmentation at all (validation, tests)."""
    return AugmentParams(size=size, matrix=geometric_matrix(0.0, 1.0, (0.0, 0.0), False, size))


def _mirror_perm(layout: PointLayout | None, n: int) -> np.ndarray:
    if layout is None or not can_mirror(layout):
        raise UsageError("cannot mirror points without a layout mirror table; set mirror_p=0 for custom layouts")
    if layout.num_points != n:
        raise UsageError(f"layout {layout.name} has {layout.num_points} points but {n} were given")
    return np.asarray(layout.mirror)


def augment_points(points: np.ndarray, params: AugmentParams, layout: PointLayout | None = None) -> np.ndarray:
    """Crop-pixel points [P, 2] -> augmented crop pixels, re-indexed after a mirror."""
    p = np.asarray(points, np.float64) @ params.matrix[:, :2].T + params.matrix[:, 2]
    if params.mirror:
        perm = _mirror_perm(layout, len(p))
        out = np.empty_like(p)
        out[perm] = p  # point i becomes index mirror[i]
        p = out
    return p


def unaugment_points(points: np.ndarray, params: AugmentParams, layout: PointLayout | None = None) -> np.ndarray:
    """Inverse of `augment_points` (undo the re-indexing, then the affine)."""
    p = np.asarray(points, np.float64)
    if params.mirror:
        perm = _mirror_perm(layout, len(p))
        p = p[perm]
    inv = cv2.invertAffineTransform(params.matrix)
    return p @ inv[:, :2].T + inv[:, 2]


def photometric(crop: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Colour jitter, blur and occlusion on a uint8 BGR crop (points are unaffected)."""
    if params.brightness == 0 and params.contrast == 1 and params.saturation == 1:
        out = crop
    else:
        x = crop.astype(np.float32)
        grey = x @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR luma
        x = grey[..., None] + params.saturation * (x - grey[..., None])
        x = (x - grey.mean()) * params.contrast + grey.mean() + params.brightness
        out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    if params.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), params.blur_sigma)
    if params.occlusion is not None:
        out = out.copy() if out is crop else out
        x0, y0, x1, y1 = params.occlusion
        cv2.rectangle(out, (x0, y0), (x1, y1), tuple(int(c) for c in params.occlusion_color), thickness=-1)
    return out


@dataclass
class AugmentedCrop:
    """An augmented crop, its points (crop pixels, layout order) and the full image -> crop map."""

    crop: np.ndarray  # uint8 BGR [size, size, 3]
    points: np.ndarray  # float64 [P, 2]
    transform: CropTransform  # image -> augmented crop (one affine); `to_image` undoes the geometry
    params: AugmentParams


def augmented_crop(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    points: np.ndarray,
    params: AugmentParams,
    layout: PointLayout | None = None,
) -> AugmentedCrop:
    """Crop the square `box` of `image` (as `preprocess.crop_box` does) with the augmentation
    composed in: one warp for the image, the same matrix for the `points` (image pixels)."""
    size = params.size
    x0, y0, x1, y1 = box
    if not x1 > x0:
        raise UsageError(f"cannot crop an empty box {box}")
    s = size / (x1 - x0)
    base = np.array([[s, 0.0, -x0 * s], [0.0, s, -y0 * s], [0.0, 0.0, 1.0]])
    m = np.vstack([params.matrix, [0.0, 0.0, 1.0]]) @ base
    # Downscaling by more than ~2x with bilinear sampling aliases; callers that crop big faces
    # (dataset.py) first cut a patch at about the final resolution, so one warp is fine here.
    crop = cv2.warpAffine(image, m[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if crop.ndim == 2:
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    pts = np.asarray(points, np.float64) @ base[:2, :2].T + base[:2, 2]
    pts = augment_points(pts, params, layout)
    return AugmentedCrop(crop=photometric(crop, params), points=pts, transform=CropTransform(matrix=m[:2], size=size, box=box), params=params)


def with_geometry_only(params: AugmentParams) -> AugmentParams:
    """The same draw without the photometric part (for tests and visual checks)."""
    return replace(params, brightness=0.0, contrast=1.0, saturation=1.0, blur_sigma=0.0, occlusion=None)
