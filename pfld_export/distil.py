"""Label-free distillation: `distil(DistilConfig) -> DistilResult`.

A student PFLD (any supported width, the teacher's point count) learns to reproduce a teacher's
landmarks on faces nobody annotated. The teacher is anything `eval` accepts (our checkpoint, a
PFLD-pytorch checkpoint, an .onnx or a .tflite) with its preprocessing (metadata, or the
`color`/`mean`/`std` overrides for foreign models); the student gets our own preprocessing.

The design keeps the teacher out of the training loop:

1. Label once. Every face is shown to the teacher once: photos through the face detector and
   PFLD's crop convention (`detect.crop_face`: `crop_scale` x the detector's landmark-equivalent
   box), dataset faces (e.g. `synthetic`) through the 1.2x box of their own points (which only
   place the crop: their labels are never used). With `refine` (default) the teacher then looks a
   second time at the 1.2x box of its own first answer, the crop it was trained on and the crop
   the student will train on. Its points are mapped back to IMAGE pixels (`CropTransform`).
2. Turn them into ordinary `FaceRecord`s (pose None: the dataset derives it from the teacher's
   points with `pose.py`, for the PFLD loss's pose weighting) and hand them to `train.train`,
   which trains on them unchanged: the same crops, the same jitter (rotation, shift, scale,
   mirror where the layout says which point becomes which), the same loss, resume, progress and
   history. Augmentations move the teacher's points exactly as they move annotations, so the
   teacher never runs again; the labels are cached in `<out>/teacher_labels.npz`, keyed by the
   teacher file's SHA-256, its preprocessing and the data options, so `--resume` and reruns reuse
   them.

Mixing: each `--data` source is `SPEC[@WEIGHT]` (a folder of photos, or a dataset spec such as
`synthetic:2000`); weights are shares of the training samples of an epoch. An epoch has as
many samples as all training faces together; a source's share is filled by cycling through its
faces in a seeded order (a small photo folder repeats, each repeat with its own jitter; a large
set is subsampled). Validation holds out `val_fraction` of each source's IMAGES before mixing,
so its NME is the student's agreement with the teacher on faces it never trained on.

Point layouts: 98 (WFLW) and 68 (iBUG) teachers get mirroring and pose weighting; any other
count N trains as `customN` without flips and without the pose term (which needs a known 3D
face). A teacher with fewer than `MIN_POINTS` points is refused: the student's crop is the box
around the teacher's points and needs them to span the face.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .data.records import FaceRecord
from .errors import DataError, UsageError
from .io import atomic_write_bytes, file_sha256
from .layouts import PointLayout
from .model import WIDTHS
from .preprocess import CropTransform, crop_from_landmarks
from .predict import model_layout
from .runtime import Predictor
from .train import PreparedData, TrainConfig, TrainEvent, TrainResult, train

MIN_POINTS = 3
LABELS_FILE = "teacher_labels.npz"
LABELS_VERSION = 1
# The run-defining defaults of a fresh run: the synthetic regime of `train` (a few thousand
# faces on 2 CPU cores, benchmarks/training.md), which distillation data resembles in size.
DEFAULTS: dict[str, Any] = {"width": 0.25, "batch": 32, "lr": 2e-3, "val_fraction": 0.1}
DEFAULT_DATA = ("synthetic:2000",)
DATASET_SCHEMES = ("synthetic", "wflw", "300w")

LabelProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DataSource:
    """One `--data` entry: a photo folder or a dataset spec, and its share weight."""

    spec: str
    weight: float = 1.0

    @property
    def is_photos(self) -> bool:
        return self.spec.split(":", 1)[0].strip().lower() not in DATASET_SCHEMES

    def __str__(self) -> str:
        return self.spec if self.weight == 1.0 else f"{self.spec}@{self.weight:g}"


def parse_source(text: str) -> DataSource:
    """"photos/" -> photos, weight 1; "photos/@3" -> weight 3; "synthetic:2000@1" -> a dataset spec."""
    raw = str(text).strip()
    spec, weight = raw, 1.0
    head, sep, tail = raw.rpartition("@")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            raise UsageError(f"--data {raw!r}: the part after @ must be a weight like 3 or 0.5 (SPEC@WEIGHT)") from None
        spec = head.strip()
    if not spec:
        raise UsageError(f"--data {raw!r} names no data; pass a photo folder or a dataset spec like synthetic:2000")
    if not (math.isfinite(weight) and weight > 0):
        raise UsageError(f"--data {raw!r}: weight must be a positive number, got {tail!r}")
    return DataSource(spec=spec, weight=weight)


@dataclass
class DistilConfig:
    """Everything `pfld-export distil` can set. None = default (`DEFAULTS`; with `resume`, the saved run's)."""

    teacher: Path
    data: Sequence[str] = DEFAULT_DATA  # SPEC[@WEIGHT]: photo folders and/or dataset specs
    out: Path = Path("out/distil")
    width: float | None = None
    color: str | None = None  # teacher preprocessing overrides (foreign models carry none)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    epochs: int = 3
    batch: int | None = None
    lr: float | None = None
    loss: str | None = None  # pfld (teacher-derived pose weighting) | l2 | wing; None: pfld
    schedule: str | None = None
    seed: int | None = None
    val_fraction: float | None = None
    detector: str = "yunet"
    crop_scale: float = 1.2  # teacher crop side / the detector's landmark-equivalent box
    refine: bool = True  # second teacher look at the 1.2x box of its own first answer
    augment: bool | None = None
    resume: Path | None = None
    device: str = "auto"
    workers: int = 0
    threads: int | None = None
    cache_dir: Path | None = None  # where generated synthetic sets are kept
    sources: list[DataSource] = field(init=False, default_factory=list)  # `data`, parsed

    def __post_init__(self) -> None:
        self.teacher, self.out = Path(self.teacher), Path(self.out)
        if self.width is not None and self.width not in WIDTHS:
            raise UsageError(f"--width {self.width} is not supported; choose one of {', '.join(map(str, WIDTHS))}")
        if not self.data:
            raise UsageError("distil needs at least one --data (a photo folder or a dataset spec such as synthetic:2000)")
        self.sources = [parse_source(d) for d in self.data]
        if self.crop_scale <= 0:
            raise UsageError(f"--crop-scale must be positive, got {self.crop_scale}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class SourceLabels:
    """What the teacher labelled in one source."""

    source: str
    faces: int
    images: int
    train_faces: int = 0
    val_faces: int = 0
    samples_per_epoch: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable files, images without a face


@dataclass
class DistilResult:
    """The student's training run, the teacher, and what was labelled."""

    train: TrainResult
    teacher: dict[str, Any]
    sources: list[SourceLabels]
    labels_file: Path
    labels_reused: bool


# --------------------------------------------------------------------------------------------
# The teacher


def open_teacher(cfg: DistilConfig) -> Predictor:
    """The teacher as a Predictor with its preprocessing (CLI overrides win); refuses what a
    student cannot learn from (see the module docstring)."""
    from .preprocess import preprocess_overrides
    from .runtime import open_predictor

    # Flags win; a foreign teacher without preprocessing metadata has the rest measured, or is
    # refused naming the flags, like every other command that opens a model.
    pred = open_predictor(cfg.teacher, overrides=preprocess_overrides(cfg.color, cfg.mean, cfg.std))
    if pred.num_points < MIN_POINTS:
        raise UsageError(
            f"teacher {cfg.teacher} predicts {pred.num_points} point(s); a student needs at least {MIN_POINTS} "
            "(its crop is the box around the teacher's points): use a landmark model"
        )
    return pred


def _ask(teacher: Predictor, crops: list[np.ndarray], tfs: list[CropTransform]) -> np.ndarray:
    """Teacher points for crops, in image pixels [N, P, 2]."""
    pts = np.asarray(teacher.predict(np.stack(crops)), np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (teacher.num_points, 2):
        raise UsageError(f"teacher returned points shaped {pts.shape}, expected [N, {teacher.num_points}, 2]")
    return np.stack([tf.to_image(p) for p, tf in zip(pts, tfs)])


def _label_image(teacher: Predictor, image: np.ndarray, first: list[tuple[np.ndarray, CropTransform]], refine: bool) -> np.ndarray:
    """Teacher points [F, P, 2] in image pixels for the faces of one image, given their first crops."""
    pts = _ask(teacher, [c for c, _ in first], [t for _, t in first])
    if refine:
        size = teacher.preprocess.input_size
        second = [crop_from_landmarks(image, p, 1.2, size) for p in pts if _usable(p)]
        if len(second) == len(pts):
            pts = _ask(teacher, [c for c, _ in second], [t for _, t in second])
    return pts


def _usable(points: np.ndarray) -> bool:
    """Finite points spanning more than a pixel in both directions (a box can be cut around them)."""
    if not np.all(np.isfinite(points)):
        return False
    span = points.max(0) - points.min(0)
    return bool(span.min() > 1.0)


def label_photos(teacher: Predictor, folder: Path, layout: PointLayout, detector_name: str, crop_scale: float,
                 refine: bool, progress: LabelProgress | None = None) -> tuple[list[FaceRecord], SourceLabels]:
    """Faces the detector finds in `folder`, labelled by the teacher (image-pixel points)."""
    from .detect import crop_face, iter_images, list_images, make_detector

    if not folder.is_dir():
        raise DataError(f"--data {folder}: not a folder of photos nor a dataset spec ({', '.join(DATASET_SCHEMES)}:...); check the path")
    files = list_images([folder])
    if not files:
        raise DataError(f"--data {folder} holds no image files; add face photos or drop this --data")
    detector = make_detector(detector_name)
    size = teacher.preprocess.input_size
    records: list[FaceRecord] = []
    info = SourceLabels(source=str(folder), faces=0, images=len(files))
    for i, (path, img, problem) in enumerate(iter_images(files)):
        if problem is not None or img is None:
            info.skipped.append(str(problem))
        else:
            boxes = detector.detect(img)
            if not boxes:
                info.skipped.append(f"{path}: no face found")
            else:
                first = [crop_face(img, b, detector, crop_scale=crop_scale, size=size) for b in boxes]
                for k, p in enumerate(_label_image(teacher, img, first, refine)):
                    if _usable(p):
                        records.append(FaceRecord(image_path=path, points=p.astype(np.float32), layout=layout.name,
                                                  source=f"{path}#face{k}"))
        if progress is not None:
            progress(str(folder), i + 1, len(files))
    if not records:
        raise DataError(f"no faces found in --data {folder} ({len(files)} images); pass photos with visible faces "
                        "(or another --detector)")
    info.faces = len(records)
    return records, info


def label_dataset(teacher: Predictor, spec: str, layout: PointLayout, refine: bool, cache_dir: Path | None,
                  progress: LabelProgress | None = None) -> tuple[list[FaceRecord], SourceLabels]:
    """Faces of a dataset spec, labelled by the teacher; their own points only place the crop."""
    from .data.records import read_image
    from .data.specs import load_spec

    data = load_spec(spec, cache_dir=cache_dir)
    size = teacher.preprocess.input_size
    records: list[FaceRecord] = []
    by_image: dict[Path, list[FaceRecord]] = {}
    for r in data.records:
        by_image.setdefault(r.image_path, []).append(r)
    for i, (path, faces) in enumerate(by_image.items()):
        img = read_image(path)
        first = [crop_from_landmarks(img, r.points, 1.2, size) for r in faces]
        for r, p in zip(faces, _label_image(teacher, img, first, refine)):
            if _usable(p):
                records.append(FaceRecord(image_path=path, points=p.astype(np.float32), layout=layout.name,
                                          attributes=r.attributes, source=r.source or str(path)))
        if progress is not None:
            progress(spec, i + 1, len(by_image))
    if not records:
        raise DataError(f"the teacher found no usable face in --data {spec}; check the teacher's preprocessing")
    return records, SourceLabels(source=spec, faces=len(records), images=len(by_image),
                                 skipped=[str(p) for p in data.problems])


# --------------------------------------------------------------------------------------------
# The label cache


def _cache_key(cfg: DistilConfig, teacher: Predictor, teacher_sha: str) -> str:
    key = {"version": LABELS_VERSION, "teacher_sha256": teacher_sha, "preprocess": teacher.preprocess.to_dict(),
           "data": [s.spec for s in cfg.sources], "detector": cfg.detector, "crop_scale": cfg.crop_scale,
           "refine": cfg.refine}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _save_labels(path: Path, key: str, groups: list[list[FaceRecord]], infos: list[SourceLabels]) -> None:
    flat = [r for g in groups for r in g]
    buf = io.BytesIO()
    np.savez_compressed(
        buf, key=np.array(key), points=np.stack([r.points for r in flat]).astype(np.float32),
        group=np.array([i for i, g in enumerate(groups) for _ in g], np.int32),
        image=np.array([str(r.image_path) for r in flat]), source=np.array([r.source for r in flat]),
        attributes=np.array([tuple(r.attributes)[:6] + (0,) * (6 - len(tuple(r.attributes)[:6])) for r in flat], np.int32),
        infos=np.array(json.dumps([vars(i) for i in infos])),
    )
    atomic_write_bytes(path, buf.getvalue())


def _load_labels(path: Path, key: str, layout: PointLayout) -> tuple[list[list[FaceRecord]], list[SourceLabels]] | None:
    """The cached labels if `path` holds them for `key` (and their images still exist), else None."""
    if not path.is_file():
        return None
    try:
        z = np.load(path, allow_pickle=False)
        if str(z["key"]) != key:
            return None
        infos = [SourceLabels(**d) for d in json.loads(str(z["infos"]))]
        groups: list[list[FaceRecord]] = [[] for _ in infos]
        for pts, g, img, src, attrs in zip(z["points"], z["group"], z["image"], z["source"], z["attributes"]):
            groups[int(g)].append(FaceRecord(image_path=Path(str(img)), points=np.asarray(pts, np.float32),
                                             attributes=tuple(int(a) for a in attrs), layout=layout.name, source=str(src)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: label again
    if not all(Path(r.image_path).is_file() for g in groups for r in g[:1]):
        return None
    return groups, infos


# --------------------------------------------------------------------------------------------
# Mixing


def mix(groups: Sequence[Sequence[FaceRecord]], weights: Sequence[float], seed: int) -> tuple[list[FaceRecord], list[int]]:
    """One epoch's records: as many as all groups together, each group's share = its weight's
    share, filled by cycling through the group in a seeded order. Returns (records, count per group)."""
    total = sum(len(g) for g in groups)
    wsum = float(sum(weights))
    out: list[FaceRecord] = []
    counts: list[int] = []
    for i, (g, w) in enumerate(zip(groups, weights)):
        n = max(1, int(round(total * w / wsum))) if g else 0
        order = np.random.default_rng([seed, i, 0xD15]).permutation(len(g)) if g else np.zeros(0, int)
        out.extend(g[int(order[j % len(g)])] for j in range(n))
        counts.append(n)
    return out, counts


# --------------------------------------------------------------------------------------------
# The run


def _resolved(cfg: DistilConfig) -> dict[str, Any]:
    """Run options: given values, else (fresh run) `DEFAULTS`; a resumed run keeps its own (its
    validation split too, so that the same images stay held out)."""
    out = {k: getattr(cfg, k) for k in ("width", "batch", "lr", "val_fraction")}
    if cfg.resume is None:
        return {k: (DEFAULTS[k] if v is None else v) for k, v in out.items()}
    from .checkpoint import load_checkpoint

    saved = load_checkpoint(cfg.resume).meta.training.get("config", {})
    if out["val_fraction"] is not None and saved.get("val_fraction") not in (None, out["val_fraction"]):
        raise UsageError(f"--resume continues a run with --val-fraction {saved['val_fraction']}; drop --val-fraction")
    out["split_fraction"] = saved.get("val_fraction", DEFAULTS["val_fraction"])
    out["split_seed"] = saved.get("seed", 0)
    return out


def distil(cfg: DistilConfig, progress: Callable[[TrainEvent], None] | None = None,
           label_progress: LabelProgress | None = None) -> DistilResult:
    """Label the data with the teacher (or reuse the cached labels), then train the student with
    `train.train`. Writes `<out>/teacher_labels.npz`, `best.pth`, `last.pth`, `history.json`.
    Nothing is written before the teacher, the data and every option have been checked."""
    from .data.specs import split

    teacher = open_teacher(cfg)
    layout = model_layout(teacher)
    teacher_sha = file_sha256(cfg.teacher)
    key = _cache_key(cfg, teacher, teacher_sha)
    run = _resolved(cfg)
    seed = int(run.get("split_seed", 0 if cfg.seed is None else cfg.seed))
    # Check every training option before labelling (minutes on a large folder) and before any write.
    TrainConfig(out=cfg.out, width=run["width"], epochs=cfg.epochs, batch=run["batch"], lr=run["lr"], loss=cfg.loss,
                schedule=cfg.schedule, device=cfg.device, workers=cfg.workers, threads=cfg.threads)  # type: ignore[arg-type]

    labels_path = cfg.out / LABELS_FILE
    cached = _load_labels(labels_path, key, layout)
    if cached is not None:
        groups, infos = cached
    else:
        groups, infos = [], []
        for s in cfg.sources:
            if s.is_photos:
                recs, info = label_photos(teacher, Path(s.spec), layout, cfg.detector, cfg.crop_scale, cfg.refine,
                                          label_progress)
            else:
                recs, info = label_dataset(teacher, s.spec, layout, cfg.refine, cfg.cache_dir, label_progress)
            groups.append(recs)
            infos.append(info)

    val_fraction = float(run.get("split_fraction", run["val_fraction"]))
    train_groups, val = [], []
    for g, info in zip(groups, infos):
        tr, va = split(g, val_fraction, seed)
        train_groups.append(tr)
        val.extend(va)
        info.train_faces, info.val_faces = len(tr), len(va)
    records, counts = mix(train_groups, [s.weight for s in cfg.sources], seed)
    for info, n in zip(infos, counts):
        info.samples_per_epoch = n
    if len(records) < 2:
        raise DataError(f"the --data sources left {len(records)} training faces; distillation needs at least 2")
    if cached is None:
        _save_labels(labels_path, key, groups, infos)

    teacher_info = {"path": str(cfg.teacher), "sha256": teacher_sha, "backend": teacher.backend,
                    "points": teacher.num_points, "layout": layout.name, "preprocess": teacher.preprocess.to_dict()}
    description = "teacher-labelled faces: " + ", ".join(
        f"{s} ({i.train_faces} faces, {i.samples_per_epoch} samples/epoch)" for s, i in zip(cfg.sources, infos))
    prepared = PreparedData(train=records, val=val, layout=layout, description=description,
                            provenance={"trained_by": "pfld-export distil", "teacher": teacher_info})
    tcfg = TrainConfig(
        out=cfg.out, data="distil:" + "+".join(str(s) for s in cfg.sources) + f"|teacher={teacher_sha[:16]}",
        val_fraction=None if cfg.resume is not None else val_fraction, width=run["width"], epochs=cfg.epochs,
        batch=run["batch"], lr=run["lr"], loss=cfg.loss, schedule=cfg.schedule, seed=cfg.seed,
        resume=cfg.resume, device=cfg.device, workers=cfg.workers, threads=cfg.threads,  # type: ignore[arg-type]
        augment=cfg.augment, cache_dir=cfg.cache_dir,
    )
    result = train(tcfg, progress, prepared=prepared)
    return DistilResult(train=result, teacher=teacher_info, sources=infos, labels_file=labels_path,
                        labels_reused=cached is not None)


__all__ = ["DistilConfig", "DistilResult", "DataSource", "SourceLabels", "distil", "parse_source", "mix",
           "open_teacher", "label_photos", "label_dataset", "MIN_POINTS", "DEFAULTS"]
