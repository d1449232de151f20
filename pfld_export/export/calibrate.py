"""Real face crops for int8 calibration, and a disjoint held-out set for validation.

A calibration spec is either a folder of real images (faces found by the detector and cropped
exactly as `predict` crops them) or an annotated dataset spec (`wflw:DIR`, `300w:DIR`,
`synthetic[:N[:SEED]]`) cropped at 1.2x the landmark box, PFLD-pytorch's convention.

Validation never sees calibration crops: a separate --val-images spec, a different synthetic
seed, or whole source images held out of a real folder (faces of one photo share lighting and
camera, so splitting by face would leak).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..preprocess import Preprocess, crop_from_landmarks

MIN_CALIBRATION_FACES = 20  # below this the int8 ranges are guesses; refuse rather than quantize badly
DEFAULT_COUNT = 200
DEFAULT_VAL_COUNT = 60
HOLDOUT_FRACTION = 0.3  # of the faces, when no --val-images is given (capped at val_count)
LANDMARK_CROP_SCALE = 1.2
_ALL = 1 << 30  # "every face found": a count no folder reaches
_SYNTHETIC = re.compile(r"synthetic(?::(\d+))?(?::(\d+))?")


@dataclass
class CalibrationSet:
    """uint8 BGR crops [N, S, S, 3] with where each came from, and a one-line description."""

    crops: np.ndarray
    sources: list[str]
    description: str

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    def inputs(self, preprocess: Preprocess) -> np.ndarray:
        """float32 NHWC model inputs, exactly what the converted model will be fed."""
        return preprocess.apply(self.crops)

    def subset(self, index: np.ndarray | list[int], description: str) -> "CalibrationSet":
        idx = np.asarray(index, dtype=np.int64)
        return CalibrationSet(self.crops[idx], [self.sources[i] for i in idx], description)


def is_synthetic(spec: str) -> bool:
    return _SYNTHETIC.fullmatch(spec.strip()) is not None


def calibration_crops(
    spec: str, preprocess: Preprocess, count: int = DEFAULT_COUNT, seed: int = 0, detector: Any | None = None,
    minimum: int = MIN_CALIBRATION_FACES, cache_dir: Path | None = None,
) -> CalibrationSet:
    """Up to `count` crops from a folder of real images or an annotated dataset spec.

    More faces than `count` are subsampled with `seed`; fewer than `minimum` raise DataError.
    """
    if count < minimum:
        raise DataError(f"--calib-count {count} is below the minimum of {minimum} faces; raise it")
    path = Path(spec)
    if path.is_dir():
        crops, sources, what = _from_folder(path, preprocess, detector)
    elif is_synthetic(spec) or ":" in spec:
        crops, sources, what = _from_dataset(_sized_synthetic(spec, count, seed), preprocess, cache_dir)
    else:
        raise DataError(
            f"calibration spec {spec!r} is neither an existing folder of images nor a dataset spec; "
            "pass a folder of face photos, wflw:DIR, 300w:DIR or synthetic"
        )
    if len(crops) < minimum:
        raise DataError(
            f"{spec}: found {len(crops)} usable faces, need at least {minimum} for int8 calibration; "
            "add face images or point --calib at a bigger folder (or use --calib synthetic)"
        )
    rng = np.random.default_rng(seed)
    idx = np.arange(len(crops))
    if len(crops) > count:
        idx = np.sort(rng.choice(len(crops), size=count, replace=False))
    return CalibrationSet(np.ascontiguousarray(crops[idx]), [sources[i] for i in idx], f"{len(idx)} crops: {what}")


def calibration_and_validation(
    calib_spec: str, val_spec: str | None, preprocess: Preprocess, count: int = DEFAULT_COUNT,
    val_count: int = DEFAULT_VAL_COUNT, seed: int = 0, detector: Any | None = None, cache_dir: Path | None = None,
) -> tuple[CalibrationSet, CalibrationSet]:
    """Calibration crops and a disjoint validation set.

    With `val_spec` the two come from different specs; a synthetic calibration spec validates on
    the next seed; a real folder or dataset holds out whole source images.
    """
    if val_spec is not None:
        calib = calibration_crops(calib_spec, preprocess, count, seed, detector, cache_dir=cache_dir)
        val = calibration_crops(val_spec, preprocess, val_count, seed, detector, minimum=1, cache_dir=cache_dir)
        overlap = set(calib.sources) & set(val.sources)
        if overlap:
            raise DataError(f"--val-images shares {len(overlap)} images with --calib (e.g. {sorted(overlap)[0]}); use disjoint folders")
        val.description = f"held-out {val.description}"
        return calib, val
    if is_synthetic(calib_spec):
        n, s = _synthetic_parts(calib_spec, count, seed)
        calib = calibration_crops(f"synthetic:{n}:{s}", preprocess, count, seed, cache_dir=cache_dir)
        val = calibration_crops(f"synthetic:{val_count}:{s + 1}", preprocess, val_count, seed, minimum=1, cache_dir=cache_dir)
        val.description = f"held-out {val.description} (seed {s + 1}, calibration used seed {s})"
        return calib, val
    # Split everything found first, then cap each side: subsampling first would starve calibration.
    everything = calibration_crops(calib_spec, preprocess, _ALL, seed, detector, cache_dir=cache_dir)
    return split_holdout(everything, min(val_count, int(round(HOLDOUT_FRACTION * len(everything)))), seed, count, val_count)


def split_holdout(cs: CalibrationSet, val_faces: int, seed: int = 0, count: int | None = None,
                  val_count: int | None = None, minimum: int = MIN_CALIBRATION_FACES) -> tuple[CalibrationSet, CalibrationSet]:
    """Hold out whole source images (in random order) until they hold >= `val_faces` faces.

    The rest calibrates, subsampled to `count` faces; the held-out faces are capped at
    `val_count` (one crowd photo can hold 60 faces). Grouping by image keeps faces of one photo
    (same light, camera, often the same person) on one side.
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(cs.sources):
        groups.setdefault(_image_of(s), []).append(i)
    if len(groups) < 2:
        raise DataError(f"all {len(cs)} calibration faces come from one image; validation needs faces from other images (pass --val-images DIR)")
    rng = np.random.default_rng(seed)
    order = [sorted(groups)[k] for k in rng.permutation(len(groups))]
    val_idx: list[int] = []
    held = 0
    for img in order[:-1]:  # always leave at least one image to calibrate on
        if len(val_idx) >= max(1, val_faces):
            break
        val_idx.extend(groups[img])
        held += 1
    cal_idx = sorted(set(range(len(cs))) - set(val_idx))
    if len(cal_idx) < minimum:
        raise DataError(
            f"after holding out {len(val_idx)} faces for validation only {len(cal_idx)} calibration faces remain "
            f"(need {minimum}); add images or pass a separate --val-images DIR"
        )
    if count is not None and len(cal_idx) > count:
        cal_idx = sorted(rng.choice(cal_idx, size=count, replace=False).tolist())
    if val_count is not None and len(val_idx) > val_count:
        val_idx = rng.choice(val_idx, size=val_count, replace=False).tolist()
    what = cs.description.split(": ", 1)[-1]
    n_cal_img = len({_image_of(cs.sources[i]) for i in cal_idx})
    return (cs.subset(cal_idx, f"{len(cal_idx)} crops from {n_cal_img} images: {what}"),
            cs.subset(sorted(val_idx), f"held-out {len(val_idx)} crops from {held} other images: {what}"))


def _image_of(source: str) -> str:
    # Sources name a face inside an image as "path#k" (folder faces) or "path:line" (annotations).
    return re.sub(r"(#\d+|:\d+)$", "", source)


def _synthetic_parts(spec: str, count: int, seed: int) -> tuple[int, int]:
    m = _SYNTHETIC.fullmatch(spec.strip())
    if m is None:
        raise DataError(f"{spec!r} is not a synthetic spec; write synthetic[:N[:SEED]]")
    return int(m.group(1) or count), int(m.group(2) if m.group(2) is not None else seed)


def _sized_synthetic(spec: str, count: int, seed: int) -> str:
    # A bare `synthetic` means "as many faces as calibration asks for", with our seed.
    if not is_synthetic(spec):
        return spec
    n, s = _synthetic_parts(spec, count, seed)
    return f"synthetic:{n}:{s}"


def _from_folder(path: Path, pre: Preprocess, detector: Any | None) -> tuple[np.ndarray, list[str], str]:
    from .. import detect

    det = detector if detector is not None else detect.make_detector()
    scale = detect.DEFAULT_CROP_SCALE  # the crop `predict` takes, so calibration sees what inference sees
    found = detect.faces_in_folder(path, det, crop_scale=scale, size=pre.input_size)
    crops = np.asarray(found.crops, dtype=np.uint8).reshape(-1, pre.input_size, pre.input_size, 3)
    sources = [str(s) for s in found.sources]
    # Several faces in one image share a source path; number them so the hold-out can group them.
    seen: dict[str, int] = {}
    named = []
    for s in sources:
        k = seen.get(s, 0)
        seen[s] = k + 1
        named.append(f"{s}#{k}")
    n_img = len(seen)
    name = getattr(det, "name", type(det).__name__)
    return crops, named, f"real faces found by {name} in {n_img} images of {path} (crop {scale}x the detector box)"


def _from_dataset(spec: str, pre: Preprocess, cache_dir: Path | None) -> tuple[np.ndarray, list[str], str]:
    import cv2

    from ..data.specs import load_spec

    ds = load_spec(spec, strict=False, cache_dir=cache_dir)
    crops, sources = [], []
    cache: dict[Path, np.ndarray | None] = {}
    for i, r in enumerate(ds.records):
        p = Path(r.image_path)
        if p not in cache:
            cache = {p: cv2.imread(str(p), cv2.IMREAD_COLOR)}  # records of one image are consecutive
        img = cache[p]
        if img is None:
            continue
        crop, _ = crop_from_landmarks(img, r.points, scale=LANDMARK_CROP_SCALE, size=pre.input_size)
        crops.append(crop)
        sources.append(f"{p}:{i}")  # record index: unique per face, and `_image_of` strips it back to the image
    arr = np.stack(crops) if crops else np.zeros((0, pre.input_size, pre.input_size, 3), np.uint8)
    desc = getattr(ds, "description", spec) or spec
    return arr, sources, f"{desc} ({LANDMARK_CROP_SCALE}x landmark-box crops)"
