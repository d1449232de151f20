"""`pfld-export predict`: faces, landmarks and head pose on images, folders and videos.

    predict(PredictConfig) -> PredictResult

For each image (or video frame): detect faces (`detect.make_detector`), crop each one the way
PFLD is trained (`detect.crop_face` -> `preprocess.crop_from_box`), run the model through the one
`Predictor` interface, map landmarks back to image pixels (`CropTransform.to_image`), estimate
head pose (`pose.euler_from_landmarks` on the crop), and time detection and landmarks
separately. Overlays, the contact sheet, the output video and `predictions.json` are written
atomically (`io.atomic_path`). The JSON layout is `SCHEMA` below, checked by `validate_json`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from .data.records import LoadProblem
from .detect import (DEFAULT_CROP_SCALE, DEFAULT_DETECTOR, IMAGE_SUFFIXES, Box, Detector, crop_face,
                     faces_in_folder, make_detector, read_image)
from .draw import contact_sheet, draw_faces, write_image
from .errors import DataError, PfldError, UsageError
from .io import atomic_path, atomic_write_json
from .layouts import PointLayout, get_layout
from .preprocess import preprocess_overrides
from .runtime import Predictor, open_predictor

SCHEMA_ID = "pfld-export/predict/1"
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
NO_FACE_NOTE = "no face found"

# --------------------------------------------------------------------------- JSON schema
# predictions.json / `--json` ("schema": "pfld-export/predict/1"). All coordinates are pixels of
# the original image (after EXIF rotation), x right, y down, 0-based.
#   model       the model file, backend, point count, layout, and the preprocessing actually used
#   detector    detector name, its score threshold, the crop scale (x the landmark-equivalent box)
#   images[]    one entry per image, or per predicted video frame (`frame` = index, else null):
#     width/height, overlay (written file or null), timing_ms.detect (detector, this image),
#     timing_ms.landmarks (all faces: crop + model + mapping back + pose), faces[], and
#     note = "no face found" when faces is empty
#     faces[]   box [x0, y0, x1, y1] and score from the detector, keypoints [5, 2] (detector's,
#               when it has them), landmarks [P, 2], pose {yaw, pitch, roll} degrees (pose.py
#               conventions, camera = the 112 crop) or null when it cannot be estimated
#   videos[]    source, output video (or null without --out), frames read / predicted, fps
#   grid        the contact sheet (or null); problems[] unreadable inputs {where, reason}
#   summary     images, faces, mean detection ms per image, mean landmark ms per face
# A tiny structural schema (no jsonschema dependency): a dict is an object whose keys are all
# required (a key ending in "?" is optional), a one-element list is "list of", a tuple is "one
# of", and a type is checked with isinstance (int accepted where float is expected).
_NUM = (int, float)
_POINT = [_NUM]
SCHEMA: dict[str, Any] = {
    "schema": str,
    "model": {"path": str, "backend": str, "points": int, "layout": str, "preprocess": dict},
    "detector": {"name": str, "min_score": _NUM, "crop_scale": _NUM},
    "images": [{
        "source": str,
        "frame": (int, None),
        "width": int,
        "height": int,
        "overlay": (str, None),
        "timing_ms": {"detect": _NUM, "landmarks": _NUM},
        "faces": [{
            "box": [_NUM],
            "score": _NUM,
            "keypoints?": [_POINT],
            "landmarks": [_POINT],
            "pose": ({"yaw": _NUM, "pitch": _NUM, "roll": _NUM}, None),
        }],
        "note?": str,
    }],
    "videos": [{"source": str, "output": (str, None), "frames_read": int, "frames_processed": int, "fps": _NUM}],
    "grid": (str, None),
    "problems": [{"where": str, "reason": str}],
    "summary": {"images": int, "faces": int, "detect_ms_mean": _NUM, "landmarks_ms_per_face": _NUM},
}


def validate_json(obj: Any, schema: Any = SCHEMA, where: str = "$") -> list[str]:
    """Structural check of a predict JSON document against `SCHEMA`; returns the mismatches."""
    errs: list[str] = []
    if isinstance(schema, tuple) and any(s is None or isinstance(s, (dict, list)) for s in schema):
        # "one of" alternatives: the first that validates wins.
        alts = [validate_json(obj, s, where) if s is not None else ([] if obj is None else [f"{where}: not null"])
                for s in schema]
        return [] if any(not a for a in alts) else min(alts, key=len)
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            return [f"{where}: expected an object, got {type(obj).__name__}"]
        for key, sub in schema.items():
            optional = key.endswith("?")
            k = key.rstrip("?")
            if k not in obj:
                if not optional:
                    errs.append(f"{where}.{k}: missing")
                continue
            errs += validate_json(obj[k], sub, f"{where}.{k}")
        return errs
    if isinstance(schema, list):
        if not isinstance(obj, list):
            return [f"{where}: expected a list, got {type(obj).__name__}"]
        for i, item in enumerate(obj):
            errs += validate_json(item, schema[0], f"{where}[{i}]")
        return errs
    types = tuple(t for t in (schema if isinstance(schema, tuple) else (schema,)) if t is not None)
    if obj is None and isinstance(schema, tuple) and None in schema:
        return []
    if isinstance(obj, bool) or not isinstance(obj, types):
        return [f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(obj).__name__}"]
    if isinstance(obj, float) and not np.isfinite(obj):
        return [f"{where}: not a finite number"]
    return []


# --------------------------------------------------------------------------- config and results


@dataclass(frozen=True)
class PredictConfig:
    """What `predict` runs on and writes. `color`/`mean`/`std` override fields of the model's own
    preprocessing record (foreign models have none: BGR, x/255, mean 0, std 1)."""

    model: Path
    inputs: tuple[Path, ...]
    out: Path | None = None
    crop_scale: float = DEFAULT_CROP_SCALE
    detector: str = DEFAULT_DETECTOR
    min_score: float | None = None
    color: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grid: bool = False
    frame_step: int = 1
    max_frames: int | None = None
    overlay_max_side: int = 2048  # overlays of huge photos are for looking at, not archiving
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UsageError("no input given; pass image files, folders or a video file")
        if self.crop_scale <= 0:
            raise UsageError(f"--crop-scale must be positive, got {self.crop_scale}")
        if self.frame_step < 1:
            raise UsageError(f"--frame-step must be at least 1, got {self.frame_step}")
        if self.max_frames is not None and self.max_frames < 1:
            raise UsageError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.grid and self.out is None:
            raise UsageError("--grid writes a contact sheet and needs --out DIR")


@dataclass
class FacePrediction:
    """One face: detector box, landmarks [P, 2] and crop transform in image pixels, pose degrees."""

    box: Box
    landmarks: np.ndarray
    pose: tuple[float, float, float] | None

    def to_dict(self) -> dict[str, Any]:
        d = self.box.to_dict()
        d["landmarks"] = np.round(self.landmarks.astype(float), 2).tolist()
        d["pose"] = None if self.pose is None else {k: round(float(v), 2) for k, v in zip(("yaw", "pitch", "roll"), self.pose)}
        return d


@dataclass
class ImagePrediction:
    """Everything found in one image or video frame."""

    source: str
    width: int
    height: int
    faces: list[FacePrediction]
    detect_ms: float
    landmarks_ms: float
    frame: int | None = None
    overlay: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source, "frame": self.frame, "width": self.width, "height": self.height,
            "overlay": self.overlay, "timing_ms": {"detect": round(self.detect_ms, 3), "landmarks": round(self.landmarks_ms, 3)},
            "faces": [f.to_dict() for f in self.faces],
        }
        if not self.faces:
            d["note"] = NO_FACE_NOTE
        return d


@dataclass
class VideoOutput:
    source: str
    output: str | None
    frames_read: int
    frames_processed: int
    fps: float


@dataclass
class PredictResult:
    """All predictions, what was written, and what could not be read."""

    model: dict[str, Any]
    detector: dict[str, Any]
    items: list[ImagePrediction] = field(default_factory=list)
    videos: list[VideoOutput] = field(default_factory=list)
    problems: list[LoadProblem] = field(default_factory=list)
    grid: str | None = None
    json_path: str | None = None

    @property
    def num_faces(self) -> int:
        return sum(len(i.faces) for i in self.items)

    def summary(self) -> dict[str, Any]:
        faces = self.num_faces
        return {
            "images": len(self.items),
            "faces": faces,
            "detect_ms_mean": round(float(np.mean([i.detect_ms for i in self.items])), 3) if self.items else 0.0,
            "landmarks_ms_per_face": round(sum(i.landmarks_ms for i in self.items) / faces, 3) if faces else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID, "model": self.model, "detector": self.detector,
            "images": [i.to_dict() for i in self.items],
            "videos": [dataclasses.asdict(v) for v in self.videos],
            "grid": self.grid,
            "problems": [{"where": p.where, "reason": p.reason} for p in self.problems],
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------- model opening


def open_model(path: str | os.PathLike[str], color: str | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, threads: int | None = None) -> Predictor:
    """Open any model as a Predictor, applying --color/--mean/--std on top of its own metadata.

    `mean`/`std` take one value (used for all channels) or three.
    """
    # The stored record stays the base and flags replace fields; a foreign ONNX's missing fields are measured or refused.
    return open_predictor(path, threads=threads, overrides=preprocess_overrides(color, mean, std))


def model_layout(pred: Predictor) -> PointLayout:
    """The point layout of a model: its preprocess record's, or the one its point count implies."""
    try:
        layout = get_layout(pred.preprocess.layout)
    except UsageError:
        layout = get_layout(pred.num_points)
    return layout if layout.num_points == pred.num_points else get_layout(pred.num_points)


# --------------------------------------------------------------------------- the work


@dataclass
class FaceEngine:
    """Detector + landmark model + layout: `run(image)` -> faces with timings (no I/O)."""

    predictor: Predictor
    detector: Detector
    layout: PointLayout
    crop_scale: float = DEFAULT_CROP_SCALE

    def run(self, image: np.ndarray) -> tuple[list[FacePrediction], float, float]:
        """Faces in a uint8 BGR image, detection ms, landmark ms (all faces: crop, model in one
        batch, mapping back to image pixels, head pose)."""
        t0 = time.perf_counter()
        boxes = self.detector.detect(image)
        t1 = time.perf_counter()
        if not boxes:
            return [], 1000 * (t1 - t0), 0.0
        size = self.predictor.preprocess.input_size
        crops, transforms = zip(*(crop_face(image, b, self.detector, self.crop_scale, size) for b in boxes))
        pts_crop = self.predictor.predict(np.stack(crops))
        faces = [FacePrediction(box=box, landmarks=tr.to_image(pc), pose=self._pose(pc, size))
                 for box, tr, pc in zip(boxes, transforms, pts_crop)]
        t2 = time.perf_counter()
        return faces, 1000 * (t1 - t0), 1000 * (t2 - t1)

    def _pose(self, crop_points: np.ndarray, size: int) -> tuple[float, float, float] | None:
        if len(self.layout.pose_points) == 0:
            return None  # custom layouts have no 3D model to fit
        from .pose import euler_from_landmarks

        try:
            # Pose in the crop's camera (DESIGN: camera from crop size): independent of where the
            # face sits in a wide photo, and the same numbers for a face and its crop.
            y, p, r = euler_from_landmarks(crop_points, self.layout, (size, size))
        except PfldError:
            return None
        return (float(y), float(p), float(r)) if np.all(np.isfinite([y, p, r])) else None


def _classify(inputs: Sequence[Path]) -> Iterator[tuple[str, Path]]:
    """('image' | 'video' | 'missing' | 'empty', path) for every input; folders expand to their
    image and video files (sorted, not recursive); a folder with none is 'empty'."""
    for p in inputs:
        if p.is_dir():
            found = False
            for f in sorted(p.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
                    found = True
                    yield ("video" if f.suffix.lower() in VIDEO_SUFFIXES else "image"), f
            if not found:
                yield "empty", p
        elif not p.exists():
            yield "missing", p
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            yield "video", p
        else:
            yield "image", p  # unknown suffixes are tried: read_image reports what it cannot decode


def _unique_name(stem: str, suffix: str, used: set[str]) -> str:
    name, k = f"{stem}{suffix}", 1
    while name in used:
        name, k = f"{stem}_{k}{suffix}", k + 1
    used.add(name)
    return name


def _fit(image: np.ndarray, max_side: int) -> np.ndarray:
    s = max_side / max(image.shape[:2])
    if s >= 1:
        return image
    return cv2.resize(image, (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s))), interpolation=cv2.INTER_AREA)


def predict(cfg: PredictConfig, progress: Callable[[str], None] | None = None) -> PredictResult:
    """Run detection + landmarks + pose over `cfg.inputs`; write overlays/JSON/video under `cfg.out`.

    Unreadable files become `problems` (named, skipped); images without faces get an entry with
    no faces and the note "no face found". `progress(source)` is called per image or video.
    """
    pred = open_model(cfg.model, cfg.color, cfg.mean, cfg.std, threads=cfg.threads)
    det = make_detector(cfg.detector, min_score=cfg.min_score)
    layout = model_layout(pred)
    engine = FaceEngine(predictor=pred, detector=det, layout=layout, crop_scale=cfg.crop_scale)
    desc = pred.describe()
    result = PredictResult(
        model={"path": str(cfg.model), "backend": str(desc.get("backend", pred.backend)), "points": int(pred.num_points),
               "layout": layout.name, "preprocess": pred.preprocess.to_dict()},
        detector={"name": det.name, "min_score": float(getattr(det, "min_score", cfg.min_score or 0.0)),
                  "crop_scale": float(cfg.crop_scale)},
    )
    used: set[str] = set()
    sheet: list[tuple[np.ndarray, str]] = []
    for kind, path in _classify(cfg.inputs):
        if progress is not None:
            progress(str(path))
        if kind == "missing":
            result.problems.append(LoadProblem(str(path), f"input {path} does not exist; check the path"))
        elif kind == "empty":
            result.problems.append(LoadProblem(str(path), f"folder {path} holds no image or video files "
                                               f"({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}); check the path"))
        elif kind == "video":
            try:
                result.videos.append(_predict_video(engine, path, cfg, result, used))
            except DataError as e:
                result.problems.append(LoadProblem(str(path), str(e)))
        else:
            try:
                img = read_image(path)
            except DataError as e:
                result.problems.append(LoadProblem(str(path), str(e)))
                continue
            faces, det_ms, lm_ms = engine.run(img)
            item = ImagePrediction(source=str(path), width=img.shape[1], height=img.shape[0], faces=faces,
                                   detect_ms=det_ms, landmarks_ms=lm_ms)
            if cfg.out is not None:
                overlay = _fit(_draw(img, faces, layout), cfg.overlay_max_side)
                suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
                dest = cfg.out / _unique_name(path.stem, suffix, used)
                write_image(dest, overlay)
                item.overlay = str(dest)
                if cfg.grid:
                    sheet.append((_fit(overlay, 512), f"{path.name}: {len(faces)}"))
            result.items.append(item)
    if not result.items:
        # Nothing was read: success (exit 0, an empty predictions.json) would hide that.
        first = result.problems[0] if result.problems else None
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise DataError(f"no input could be processed: {first.reason}{more}" if first else "no input could be processed; pass image files, folders or a video file")
    if cfg.out is not None:
        if cfg.grid and sheet:
            grid_path = cfg.out / _unique_name("grid", ".jpg", used)
            write_image(grid_path, contact_sheet([s[0] for s in sheet], [s[1] for s in sheet], cell=320))
            result.grid = str(grid_path)
        json_path = cfg.out / "predictions.json"
        result.json_path = str(json_path)
        atomic_write_json(json_path, result.to_dict())
    return result


def _draw(img: np.ndarray, faces: Sequence[FacePrediction], layout: PointLayout) -> np.ndarray:
    return draw_faces(img, [f.box for f in faces], [f.landmarks for f in faces], layout, [f.pose for f in faces])


def _predict_video(engine: FaceEngine, path: Path, cfg: PredictConfig, result: PredictResult, used: set[str]) -> VideoOutput:
    """Every `frame_step`-th frame is predicted; every frame read is written to the output video
    with the latest overlay, so it keeps the source's frame count and frame rate."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError(_unreadable_video(path))
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
    try:
        if cfg.out is None:
            read, processed = _video_loop(engine, cap, path, cfg, result, None, fps)
            dest = None
        else:
            dest = cfg.out / _unique_name(f"{path.stem}_landmarks", ".mp4", used)
            with atomic_path(dest) as tmp:
                read, processed = _video_loop(engine, cap, path, cfg, result, tmp, fps)
    finally:
        cap.release()
    return VideoOutput(source=str(path), output=str(dest) if dest else None, frames_read=read,
                       frames_processed=processed, fps=fps)


def _unreadable_video(path: Path) -> str:
    """Why a video did not open, with advice that fits: re-encoding helps a rare codec, not a
    damaged file (an .mp4 that does not open is usually truncated or not a video at all)."""
    if path.suffix.lower() in (".mp4", ".m4v"):
        return (f"cannot read video {path}: OpenCV cannot open it (a damaged or truncated file, or a codec it lacks); "
                "check that it plays, and re-encode it as H.264 if it does")
    return f"cannot open video {path}: OpenCV has no decoder for it; convert it to .mp4 (H.264)"


def _video_loop(engine: FaceEngine, cap: Any, path: Path, cfg: PredictConfig, result: PredictResult,
                out: Path | None, fps: float) -> tuple[int, int]:
    read = processed = 0
    writer = None
    faces: list[FacePrediction] = []
    try:
        while cfg.max_frames is None or processed < cfg.max_frames or read % cfg.frame_step:
            ok, frame = cap.read()
            if not ok:
                break
            h, w = frame.shape[:2]
            if read % cfg.frame_step == 0:
                faces, det_ms, lm_ms = engine.run(frame)
                result.items.append(ImagePrediction(source=str(path), frame=read, width=w, height=h,
                                                    faces=faces, detect_ms=det_ms, landmarks_ms=lm_ms))
                processed += 1
            if out is not None:
                overlay = _fit(_draw(frame, faces, engine.layout), cfg.overlay_max_side)
                if writer is None:
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (overlay.shape[1], overlay.shape[0]))
                    if not writer.isOpened():
                        raise UsageError(f"OpenCV cannot write an mp4v video to {out.parent}; check the folder is writable")
                writer.write(overlay)
            read += 1
    finally:
        if writer is not None:
            writer.release()
    if read == 0:
        raise DataError(f"video {path} has no readable frames; check the file")
    return read, processed


# --------------------------------------------------------------------------- fidelity stage


@dataclass(frozen=True)
class FidelityConfig:
    """Compare two models on the same real face crops (no ground truth needed)."""

    model_a: Path
    model_b: Path
    images: Path
    color: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    override: str = "both"  # which model(s) --color/--mean/--std apply to: a, b or both
    limit: int | None = None
    detector: str = DEFAULT_DETECTOR
    crop_scale: float = DEFAULT_CROP_SCALE
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.override not in ("a", "b", "both"):
            raise UsageError(f"--override-for must be a, b or both, got {self.override!r}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1 face, got {self.limit}")


@dataclass
class FidelityReport:
    """Landmark shift of B relative to A on `faces` crops found in `images` image files."""

    model_a: dict[str, Any]
    model_b: dict[str, Any]
    images_dir: str
    images: int
    faces: int
    layout: str
    detector: str
    result: Any  # evaluate.FidelityResult(mean_px, p99_px, max_px, mean_pct_iod, p99_pct_iod, count)
    no_face: list[str] = field(default_factory=list)
    problems: list[LoadProblem] = field(default_factory=list)


def fidelity_on_folder(cfg: FidelityConfig, progress: Callable[[int, int], None] | None = None) -> FidelityReport:
    """Detect faces in `cfg.images`, run both models on the same crops, measure the shift.

    Raises DataError when no face is found (a fidelity of nothing would read as perfect).
    """
    from .evaluate import fidelity

    def flags(which: str) -> dict[str, Any]:
        on = cfg.override in (which, "both")
        return {"color": cfg.color, "mean": cfg.mean, "std": cfg.std} if on else {}

    a = open_model(cfg.model_a, threads=cfg.threads, **flags("a"))
    b = open_model(cfg.model_b, threads=cfg.threads, **flags("b"))
    if a.num_points != b.num_points:
        raise UsageError(f"{cfg.model_a} predicts {a.num_points} points but {cfg.model_b} predicts {b.num_points}; "
                         "compare two versions of the same model")
    if a.preprocess.input_size != b.preprocess.input_size:
        raise UsageError(f"input sizes differ ({a.preprocess.input_size} vs {b.preprocess.input_size}); "
                         "compare two versions of the same model")
    det = make_detector(cfg.detector)
    found = faces_in_folder(cfg.images, det, crop_scale=cfg.crop_scale, size=a.preprocess.input_size,
                            limit=cfg.limit, progress=progress)
    if len(found) == 0:
        raise DataError(f"no faces found in {cfg.images} ({found.images} files, {len(found.problems)} unreadable) "
                        f"by detector {det.name}; pass a folder of real face photos with --images")
    layout = model_layout(a)
    res = fidelity(a, b, found.crops, layout)
    return FidelityReport(model_a={**a.describe(), "preprocess": a.preprocess.to_dict()},
                          model_b={**b.describe(), "preprocess": b.preprocess.to_dict()},
                          images_dir=str(cfg.images), images=found.images, faces=len(found), layout=layout.name,
                          detector=det.name, result=res, no_face=found.no_face, problems=found.problems)
