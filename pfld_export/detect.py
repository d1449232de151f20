"""Face detection: a `Detector` protocol, an offline default (YuNet via `yuface`), image reading.

Every detector answers `detect(image: uint8 BGR [H, W, 3]) -> list[Box]` in image pixels. The
registry `DETECTORS` (name -> constructor, package, note) drives `make_detector`, the CLI's
`--detector` choices and `benchmarks/bench_detectors.py`; nothing else branches on a name.

Detectors see a resized copy of the image: huge images are shrunk so the long side is at most
`max_side` (speed; YuNet's anchors are tuned for that range), small images are enlarged to
`min_side` and padded (tiny and frame-filling faces), and boxes are mapped back to the original
pixels. The default, its thresholds and the numbers behind them are in benchmarks/detectors.md.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import cv2
import numpy as np

from .data.records import LoadProblem
from .errors import DataError, UsageError
from .preprocess import CropTransform, crop_from_box

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm",
                                   ".tif", ".tiff", ".webp", ".jp2")


# --------------------------------------------------------------------------- boxes and protocol


@dataclass
class Box:
    """A face box in image pixels (x0, y0) top-left, (x1, y1) bottom-right, score in [0, 1].

    `keypoints` is [5, 2] image pixels when the detector gives them (eye centres, nose tip,
    mouth corners, in the detector's own order), else None.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    keypoints: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def as_tuple(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), the form `preprocess.crop_from_box` takes."""
        return (self.x0, self.y0, self.x1, self.y1)

    def scaled(self, factor: float, dx: float = 0.0, dy: float = 0.0) -> "Box":
        """Coordinates multiplied by `factor` then shifted by (dx, dy) (maps resized -> original)."""
        kp = None if self.keypoints is None else self.keypoints * factor + np.array([dx, dy])
        return Box(self.x0 * factor + dx, self.y0 * factor + dy, self.x1 * factor + dx, self.y1 * factor + dy,
                   self.score, kp)

    def iou(self, other: "Box | tuple[float, float, float, float]") -> float:
        """Intersection over union with another box."""
        return box_iou(self.as_tuple(), other.as_tuple() if isinstance(other, Box) else other)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"box": [round(float(v), 2) for v in self.as_tuple()], "score": round(float(self.score), 4)}
        if self.keypoints is not None:
            d["keypoints"] = np.round(self.keypoints.astype(float), 2).tolist()
        return d


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def square(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Square box with the same centre, side = the longer side."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h = max(box[2] - box[0], box[3] - box[1]) / 2
    return (cx - h, cy - h, cx + h, cy + h)


def match_iou(detection: tuple[float, float, float, float], landmarks: np.ndarray) -> float:
    """How well a detector box matches an annotated face: IoU of the two boxes made square.

    A landmark box (min/max of the points) stops at the brows and is narrow for profile faces,
    while a detector box includes the forehead; squaring both around their centres compares
    position and scale, not aspect ratio. This is the matching rule of the recall numbers in
    benchmarks/detectors.md and of the tests (match when > 0.5).
    """
    p = np.asarray(landmarks, np.float64)
    lm = (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))
    return box_iou(square(detection), square(lm))


@dataclass(frozen=True)
class BoxCalibration:
    """Maps a detector's box to the square landmark box PFLD crops are defined on.

    Detectors disagree on what a face box is (YuNet's reaches the hairline and sits ~12 % of
    its side above the landmarks' centre). PFLD is trained on a square crop of `crop_scale` x
    the landmark box, so the crop taken from a detection must imitate that box: side =
    `scale` x the detector box's longer side, centre moved down by `dy` x that side. The values
    per detector are medians measured on the annotated fixtures (benchmarks/detectors.md).
    """

    scale: float = 1.0
    dy: float = 0.0

    def apply(self, box: "Box | tuple[float, float, float, float]") -> tuple[float, float, float, float]:
        """The landmark-equivalent square box (x0, y0, x1, y1) for a detection."""
        b = box.as_tuple() if isinstance(box, Box) else box
        side = max(b[2] - b[0], b[3] - b[1])
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2 + self.dy * side
        h = self.scale * side / 2
        return (cx - h, cy - h, cx + h, cy + h)


@runtime_checkable
class Detector(Protocol):
    """Anything that finds faces in a uint8 BGR image.

    `calibration` says how its boxes relate to landmark boxes (use `BoxCalibration()` if unknown).
    """

    name: str
    calibration: BoxCalibration

    def detect(self, image: np.ndarray) -> list[Box]: ...


def crop_face(image: np.ndarray, box: Box, detector: Detector, crop_scale: float = 1.2,
              size: int = 112) -> tuple[np.ndarray, CropTransform]:
    """Square crop of `crop_scale` x the detection's landmark-equivalent box (PFLD's convention)."""
    return crop_from_box(image, detector.calibration.apply(box), scale=crop_scale, size=size)


# --------------------------------------------------------------------------- image handling


def as_bgr8(image: np.ndarray) -> np.ndarray:
    """Any decoded image (grey, BGRA, 16-bit, float in [0, 1]) -> contiguous uint8 BGR [H, W, 3]."""
    img = np.asarray(image)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # what cv2.IMREAD_COLOR does for 16-bit files
    elif img.dtype.kind == "f":
        img = np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise UsageError(f"unsupported image dtype {img.dtype}; pass uint8, uint16 or float images")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = _flatten_alpha(img)
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise UsageError(f"expected an image shaped [H, W] or [H, W, 1|3|4], got {img.shape}")
    return np.ascontiguousarray(img)


def _flatten_alpha(bgra: np.ndarray) -> np.ndarray:
    # Transparent pixels keep whatever colour the encoder left (often black); composite onto
    # white like an image viewer does, so cut-out portraits look like they do on screen.
    a = bgra[..., 3:4].astype(np.float32) / 255.0
    out = bgra[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as uint8 BGR [H, W, 3], or raise `DataError` naming the file.

    Greyscale is replicated to 3 channels, 16-bit is scaled to 8-bit, alpha is composited onto
    white, and the EXIF orientation of JPEGs is applied (cv2.IMREAD_COLOR does that; the tests
    check it). Bytes are read by Python so non-ASCII paths work on every platform.
    """
    p = Path(path)
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {p}: {e.strerror}; check the path and permissions") from None
    if data.size == 0:
        raise DataError(f"cannot read image {p}: the file is empty; remove it or replace it with a real image")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cannot read image {p}: OpenCV cannot decode it (corrupt or not an image); "
                        f"remove it or convert it to PNG/JPEG")
    # JPEG has no alpha: skip the second decode. Others: if the file has an alpha channel and
    # no orientation change, composite it (IMREAD_COLOR would just drop alpha).
    if data[:2].tobytes() != b"\xff\xd8":
        raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if raw is not None and raw.ndim == 3 and raw.shape[2] == 4 and raw.shape[:2] == img.shape[:2]:
            img = as_bgr8(raw)
    return np.ascontiguousarray(img)


def list_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files and folders -> image files (folders: their image files, sorted, not recursive)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input {p} does not exist; check the path")
    return out


# --------------------------------------------------------------------------- resizing wrapper


@dataclass(frozen=True)
class Resize:
    """How a detector's input is resized: shrink to `max_side`, enlarge small ones to `min_side`.

    `pad` (fraction of the side) adds a replicated border to enlarged images, because face
    detectors miss faces that fill the whole frame (112x112 crops, passport photos).
    """

    max_side: int = 1280
    min_side: int = 320
    pad: float = 0.15
    # YuNet's boxes come out too small for faces above ~300 px (measured on synthetic faces of
    # known size: calibrated IoU 0.85 at 270 px, 0.3-0.5 at 680 px). Such faces, or an image
    # where nothing was found, get a refining look at a copy where the face is `refine_to` px.
    refine_above: int = 300
    refine_to: int = 200

    def __post_init__(self) -> None:
        if self.max_side < 64 or self.min_side < 0 or self.min_side > self.max_side:
            raise UsageError(f"need 64 <= max_side and 0 <= min_side <= max_side, got "
                             f"max_side={self.max_side} min_side={self.min_side}")
        if not 0 <= self.pad <= 1:
            raise UsageError(f"pad must be a fraction in [0, 1], got {self.pad}")


def detect_resized(image: np.ndarray, resize: Resize, raw: Callable[[np.ndarray], list[Box]]) -> list[Box]:
    """Run `raw` on a resized (and for small images, padded) copy; boxes come back in `image` pixels."""
    img = as_bgr8(image)
    h, w = img.shape[:2]
    long_side = max(h, w)
    if long_side > resize.max_side:
        s = resize.max_side / long_side
        work = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        pad = 0
    elif long_side < resize.min_side:
        s = resize.min_side / long_side
        work = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR)
        pad = int(round(resize.pad * resize.min_side))
        if pad:
            work = cv2.copyMakeBorder(work, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    else:
        s, work, pad = 1.0, img, 0
    boxes = _refine_large(work, raw(work), resize, raw)
    inv = 1.0 / s
    out = [b.scaled(inv, -pad * inv, -pad * inv) for b in boxes]
    return sorted(out, key=lambda b: -b.score)


def _refine_large(work: np.ndarray, boxes: list[Box], resize: Resize, raw: Callable[[np.ndarray], list[Box]]) -> list[Box]:
    """Re-detect faces larger than `refine_above` px (or anything, when nothing was found) on a
    smaller copy, and keep those boxes in place of the oversized originals."""
    long_side = max(work.shape[:2])
    big = [b for b in boxes if max(b.width, b.height) > resize.refine_above]
    if big:
        f = resize.refine_to / max(max(b.width, b.height) for b in big)
    elif not boxes and long_side > 2 * resize.refine_to:
        f = 2 * resize.refine_to / long_side  # a face filling the frame becomes ~2 * refine_to
    else:
        return boxes
    small = cv2.resize(work, (max(1, round(work.shape[1] * f)), max(1, round(work.shape[0] * f))),
                       interpolation=cv2.INTER_AREA)
    coarse = [b.scaled(1.0 / f) for b in raw(small)]
    if not boxes:
        return coarse
    out = []
    for b in boxes:
        if b in big:
            best = max(coarse, key=lambda c: c.iou(b), default=None)
            out.append(best if best is not None and best.iou(b) > 0.3 else b)
        else:
            out.append(b)
    return out


# --------------------------------------------------------------------------- detectors

# Detector box -> landmark box, medians over the 15 annotated fixture faces (wflw98 + ibug68),
# measured by benchmarks/bench_detectors.py; see benchmarks/detectors.md.
YUNET_CALIBRATION = BoxCalibration(scale=0.80, dy=0.126)
MTCNN_CALIBRATION = BoxCalibration(scale=0.84, dy=0.132)
HAAR_CALIBRATION = BoxCalibration(scale=0.90, dy=0.133)
# With a calibrated box, 1.2 reproduces PFLD-pytorch's training crop (1.2 x the landmark box).
DEFAULT_CROP_SCALE = 1.2


@dataclass
class YuNetDetector:
    """YuNet (libfacedetection) through the `yuface` wheel: weights compiled in, numpy only.

    Scores are the network's confidence / 100. Boxes are as YuNet draws them (forehead to chin).
    """

    min_score: float = 0.5
    resize: Resize = field(default_factory=Resize)
    calibration: BoxCalibration = field(default_factory=lambda: YUNET_CALIBRATION)
    threads: int | None = 1
    name: str = "yunet"
    _omp: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import yuface.yuface  # fail here, at construction, if the wheel is missing

        # The wheel bundles its own OpenMP runtime. On a busy 2-core machine its spinning worker
        # threads made detection 6x slower (370 ms vs 56 ms median per image, measured), so the
        # default is 1 thread; None leaves OpenMP's own default (OMP_NUM_THREADS or all cores).
        if self.threads is not None:
            libs = sorted((Path(yuface.yuface.__file__).parent.parent / "yuface.libs").glob("libgomp*.so*"))
            if libs:
                self._omp = ctypes.CDLL(str(libs[0]))

    def _raw(self, img: np.ndarray) -> list[Box]:
        from yuface.yuface import detect as c_detect

        if self._omp is not None:
            # Per calling thread in OpenMP, so set it on every call (cheap) rather than once.
            self._omp.omp_set_num_threads(int(self.threads or 1))

        # int16 rows: conf(0-100), x, y, w, h, 5 keypoints (x, y), unused. The wheel's Python
        # wrapper warns above 960 px; `detect_resized` already bounds the size, so call C directly.
        rows = np.asarray(c_detect(np.ascontiguousarray(img)), np.float64).reshape(-1, 16)
        out = []
        for r in rows:
            score = r[0] / 100.0
            if score < self.min_score or r[3] <= 0 or r[4] <= 0:
                continue
            out.append(Box(r[1], r[2], r[1] + r[3], r[2] + r[4], score, r[5:15].reshape(5, 2).copy()))
        return out

    def detect(self, image: np.ndarray) -> list[Box]:
        return detect_resized(image, self.resize, self._raw)


@dataclass
class MtcnnDetector:
    """MTCNN (`mtcnn` PyPI package on TensorFlow; weights ship in its wheel). Optional: not a
    dependency of this project (benchmarks/detectors.md says why); `pip install mtcnn` to use."""

    min_score: float = 0.9
    resize: Resize = field(default_factory=Resize)
    min_face_size: int = 20
    calibration: BoxCalibration = field(default_factory=lambda: MTCNN_CALIBRATION)
    name: str = "mtcnn"
    _net: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            from mtcnn import MTCNN
        except ImportError:
            raise UsageError("detector 'mtcnn' needs the optional package: pip install mtcnn==1.0.0 joblib lz4 "
                             "(or use the default --detector yunet)") from None
        self._net = MTCNN(stages="face_and_landmarks_detection", device="CPU:0")

    def _raw(self, img: np.ndarray) -> list[Box]:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        faces = self._net.detect_faces(rgb, min_face_size=self.min_face_size, threshold_onet=self.min_score)
        out = []
        for f in faces:
            x, y, w, h = (float(v) for v in f["box"])
            if float(f["confidence"]) < self.min_score or w <= 0 or h <= 0:
                continue
            kp = f.get("keypoints") or {}
            order = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
            pts = np.array([kp[k] for k in order], np.float64) if all(k in kp for k in order) else None
            out.append(Box(x, y, x + w, y + h, float(f["confidence"]), pts))
        return out

    def detect(self, image: np.ndarray) -> list[Box]:
        return detect_resized(image, self.resize, self._raw)


@dataclass
class HaarDetector:
    """OpenCV's frontal-face Haar cascade (ships with opencv-python): a zero-extra-dependency
    baseline. Scores are a squashed cascade weight, not a probability."""

    min_score: float = 0.5
    resize: Resize = field(default_factory=Resize)
    calibration: BoxCalibration = field(default_factory=lambda: HAAR_CALIBRATION)
    name: str = "haar"
    _cascade: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise UsageError(f"OpenCV's Haar cascade {path} is missing; reinstall opencv-python-headless")

    def _raw(self, img: np.ndarray) -> list[Box]:
        grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        rects, _, weights = self._cascade.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=5,
                                                            minSize=(20, 20), outputRejectLevels=True)
        out = []
        for (x, y, w, h), wt in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            score = float(1.0 / (1.0 + np.exp(-float(wt))))
            if score >= self.min_score:
                out.append(Box(float(x), float(y), float(x + w), float(y + h), score, None))
        return out

    def detect(self, image: np.ndarray) -> list[Box]:
        return detect_resized(image, self.resize, self._raw)


@dataclass(frozen=True)
class DetectorSpec:
    """One registry row: how to build a detector and what it needs."""

    name: str
    build: Callable[..., Detector]
    package: str  # the PyPI distribution that ships its weights
    default_min_score: float
    note: str


DETECTORS: dict[str, DetectorSpec] = {
    s.name: s
    for s in (
        DetectorSpec("yunet", YuNetDetector, "yuface", 0.5, "YuNet / libfacedetection, weights compiled into the wheel"),
        DetectorSpec("mtcnn", MtcnnDetector, "mtcnn (optional)", 0.9, "MTCNN on TensorFlow; install mtcnn to use"),
        DetectorSpec("haar", HaarDetector, "opencv-python-headless", 0.5, "OpenCV frontal Haar cascade; weak baseline"),
    )
}
DEFAULT_DETECTOR = "yunet"


def make_detector(name: str = DEFAULT_DETECTOR, min_score: float | None = None, max_side: int = 1280,
                  min_side: int = 320, pad: float = 0.15) -> Detector:
    """Build a detector from the registry by name. `min_score` defaults to the row's value;
    `max_side`, `min_side`, `pad` set the `Resize` of its input."""
    spec = DETECTORS.get(name)
    if spec is None:
        raise UsageError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    score = spec.default_min_score if min_score is None else float(min_score)
    if not 0.0 <= score <= 1.0:
        raise UsageError(f"min_score must be in [0, 1], got {min_score}")
    return spec.build(min_score=score, resize=Resize(max_side=max_side, min_side=min_side, pad=pad))


# --------------------------------------------------------------------------- folder -> crops


@dataclass
class FolderFaces:
    """Face crops found in a folder, in file order then detector score order.

    `sources[i]` is the file of `crops[i]`, `boxes[i]` its detector box in that file's pixels.
    `problems` lists unreadable files; `no_face` lists readable files where nothing was found.
    """

    crops: np.ndarray  # uint8 [N, size, size, 3] BGR
    sources: list[str]
    boxes: list[Box]
    problems: list[LoadProblem] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    images: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def iter_images(paths: Iterable[Path]) -> Iterator[tuple[Path, np.ndarray | None, LoadProblem | None]]:
    """Read each file, yielding (path, image, None) or (path, None, problem) for unreadable ones."""
    for p in paths:
        try:
            yield p, read_image(p), None
        except DataError as e:
            yield p, None, LoadProblem(where=str(p), reason=str(e))


def faces_in_folder(folder: str | os.PathLike[str], detector: Detector, crop_scale: float = 1.2, size: int = 112,
                    limit: int | None = None, progress: Callable[[int, int], None] | None = None) -> FolderFaces:
    """Detect faces in every image of `folder` and crop each (square, `crop_scale` x the box).

    Used by int8 calibration and `fidelity`. `limit` caps the number of faces (files are read
    in sorted order, so the result is deterministic). `progress(done, total)` is called per file.
    """
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"image folder {d} does not exist or is not a folder; pass a folder of face images")
    if crop_scale <= 0:
        raise UsageError(f"crop_scale must be positive, got {crop_scale}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1 face, got {limit}")
    files = list_images([d])
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {d}; pass a folder of face images")
    crops: list[np.ndarray] = []
    sources: list[str] = []
    boxes: list[Box] = []
    result = FolderFaces(crops=np.zeros((0, size, size, 3), np.uint8), sources=sources, boxes=boxes)
    for i, (path, img, problem) in enumerate(iter_images(files)):
        result.images += 1
        if problem is not None or img is None:
            result.problems.append(problem or LoadProblem(str(path), "unreadable"))
        else:
            found = detector.detect(img)
            if not found:
                result.no_face.append(str(path))
            for box in found:
                crop, _ = crop_face(img, box, detector, crop_scale=crop_scale, size=size)
                crops.append(crop)
                sources.append(str(path))
                boxes.append(box)
                if limit is not None and len(crops) >= limit:
                    break
        if progress is not None:
            progress(i + 1, len(files))
        if limit is not None and len(crops) >= limit:
            break
    if crops:
        result.crops = np.stack(crops).astype(np.uint8)
    return result
