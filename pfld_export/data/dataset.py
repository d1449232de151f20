"""Torch Dataset over FaceRecords: 1.2x landmark-box crops, augmentation, targets, pose labels.

Each face is first cut once from its image as a "patch": the same square crop centred on the
landmark box, but `margin` (1.5) times larger and at the same pixel density as the final
112 crop (168x168). Big faces are shrunk with INTER_AREA here, once, so the per-sample warp
never aliases; the margin holds what rotation, shift and zoom-out bring into view. When the set
is small (synthetic: a few thousand faces, ~85 KB each) all patches are decoded up front into
one array that DataLoader workers share copy-on-write; otherwise they are read per sample.

Every sample is a pure function of (seed, epoch, index): its augmentation comes from
`np.random.default_rng([seed, epoch, index])`, so results do not depend on worker count or
order, and a resumed run sees exactly the samples the uninterrupted one would have.

A sample (`__getitem__`) is a dict of tensors:
  image       float32 [3, 112, 112]  the crop through the model's `Preprocess`
  target      float32 [P, 2]         landmarks / 112 (0..1 inside the crop)
  pose        float32 [3]            yaw, pitch, roll in degrees (see `pose_label`)
  pose_valid  float32 []             0 where no pose could be had (layouts without pose points)
  attributes  float32 [6]            WFLW flags (`records.ATTRIBUTES`), occlusion set by augmentation
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, UsageError
from ..layouts import PointLayout
from ..preprocess import Preprocess, square_box
from .augment import AugmentConfig, AugmentParams, augmented_crop, can_mirror, identity_params, sample_params
from .records import ATTRIBUTES, FaceRecord
from .records import read_image as _read_image

_OCCLUSION = ATTRIBUTES.index("occlusion")


@dataclass(frozen=True)
class DatasetConfig:
    """How faces become training samples."""

    crop_scale: float = 1.2  # square crop side = crop_scale x landmark box (PFLD-pytorch's convention)
    size: int = 112
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: plain crops
    seed: int = 0
    margin: float = 1.5  # patch side / crop side (context kept for rotation, shift and zoom-out)
    cache: bool | None = None  # None: cache when all patches fit in cache_limit_mb
    cache_limit_mb: float = 1024.0

    def __post_init__(self) -> None:
        if self.crop_scale <= 0:
            raise UsageError(f"crop_scale must be positive, got {self.crop_scale}")
        if self.margin < 1:
            raise UsageError(f"patch margin must be >= 1, got {self.margin}")


@dataclass
class Sample:
    """One sample before tensor conversion (what tests and visual checks look at)."""

    crop: np.ndarray  # uint8 BGR [size, size, 3]
    points: np.ndarray  # float64 [P, 2] crop pixels
    pose: np.ndarray  # float64 [3] degrees
    pose_valid: bool
    attributes: np.ndarray  # float32 [len(ATTRIBUTES)]
    params: AugmentParams


def read_image(record: FaceRecord) -> np.ndarray:
    """BGR uint8 image of a record (`records.read_image`: DataError naming the file if unusable)."""
    return _read_image(record.image_path)


def cut_patch(image: np.ndarray, points: np.ndarray, crop_scale: float, margin: float, size: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Cut the `margin`-enlarged crop region at the final pixel density.

    Returns (patch uint8 [S, S, 3] with S = round(size * margin), points in patch pixels, the
    1.2x crop box in patch pixels). Borders are replicated, as `preprocess.crop_box` does.
    """
    p = np.asarray(points, np.float64)
    bx = square_box(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max(), crop_scale * margin)
    side_px = int(math.ceil(bx[2] - bx[0]))
    xi, yi = int(math.floor(bx[0])), int(math.floor(bx[1]))
    h, w = image.shape[:2]
    # Pad only as much as the region sticks out (replicated edge), then slice.
    pad = (max(0, -yi), max(0, yi + side_px - h), max(0, -xi), max(0, xi + side_px - w))
    src = cv2.copyMakeBorder(image, *pad, cv2.BORDER_REPLICATE) if any(pad) else image
    region = src[yi + pad[0] : yi + pad[0] + side_px, xi + pad[2] : xi + pad[2] + side_px]
    s_out = int(round(size * margin))
    k = s_out / side_px
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    patch = cv2.resize(region, (s_out, s_out), interpolation=interp)
    if patch.ndim == 2:
        patch = cv2.cvtColor(patch, cv2.COLOR_GRAY2BGR)
    # cv2.resize maps pixel centres: dst = (src + 0.5) * k - 0.5.
    def to_patch(q: np.ndarray) -> np.ndarray:
        return (q - np.array([xi, yi], np.float64) + 0.5) * k - 0.5

    crop_box = square_box(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max(), crop_scale)
    c0 = to_patch(np.array(crop_box[:2]))
    c1 = to_patch(np.array(crop_box[2:]))
    return patch, to_patch(p), (float(c0[0]), float(c0[1]), float(c1[0]), float(c1[1]))


def adjust_pose(pose_deg: Sequence[float], params: AugmentParams) -> np.ndarray:
    """A known (yaw, pitch, roll) after the augmentation's geometry.

    An in-plane rotation about the crop centre is a rotation about the camera axis: it changes
    roll by the same angle. `pose.euler_from_landmarks` reports roll positive for a face turned
    clockwise as displayed, and `rotation_deg` is counter-clockwise, hence the minus. A mirror
    negates yaw and roll. Scale and shift leave the angles alone (weak perspective).
    """
    yaw, pitch, roll = (float(v) for v in pose_deg)
    roll = roll - params.rotation_deg
    if params.mirror:
        yaw, roll = -yaw, -roll
    roll = (roll + 180.0) % 360.0 - 180.0
    return np.array([yaw, pitch, roll], np.float64)


class FaceDataset(Dataset[dict[str, torch.Tensor]]):
    """Training/validation samples over FaceRecords (see the module docstring for the format)."""

    def __init__(
        self,
        records: Sequence[FaceRecord],
        layout: PointLayout,
        preprocess: Preprocess,
        cfg: DatasetConfig = DatasetConfig(),
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if not records:
            raise DataError("no faces to train on; check the --data spec (it matched 0 faces)")
        bad = [r for r in records if r.num_points != layout.num_points]
        if bad:
            raise DataError(
                f"{bad[0].source or bad[0].image_path}: face has {bad[0].num_points} points but the layout "
                f"{layout.name} has {layout.num_points}; train on one layout at a time"
            )
        if preprocess.input_size != cfg.size:
            raise UsageError(f"preprocess input size {preprocess.input_size} != crop size {cfg.size}")
        self.records = list(records)
        self.layout = layout
        self.preprocess = preprocess
        self.cfg = cfg
        self.epoch = 0
        self._mirror_ok = can_mirror(layout)
        self._patches: np.ndarray | None = None
        self._points: np.ndarray | None = None
        self._boxes: np.ndarray | None = None
        side = int(round(cfg.size * cfg.margin))
        need_mb = len(self.records) * side * side * 3 / 2**20
        if cfg.cache or (cfg.cache is None and need_mb <= cfg.cache_limit_mb):
            self.preload(progress)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def cached(self) -> bool:
        return self._patches is not None

    def set_epoch(self, epoch: int) -> None:
        """Pick the augmentation stream; call before creating the epoch's DataLoader iterator."""
        self.epoch = int(epoch)

    def preload(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Decode every face's patch into memory (one shared array)."""
        side = int(round(self.cfg.size * self.cfg.margin))
        n = len(self.records)
        patches = np.empty((n, side, side, 3), np.uint8)
        points = np.empty((n, self.layout.num_points, 2), np.float64)
        boxes = np.empty((n, 4), np.float64)
        last_path, img = None, None
        for i, r in enumerate(self.records):
            if r.image_path != last_path:  # WFLW lists faces of one image together: decode once
                img, last_path = read_image(r), r.image_path
            patches[i], points[i], boxes[i] = cut_patch(img, r.points, self.cfg.crop_scale, self.cfg.margin, self.cfg.size)  # type: ignore[arg-type]
            if progress is not None:
                progress(i + 1, n)
        self._patches, self._points, self._boxes = patches, points, boxes

    def _patch(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
        if self._patches is not None:
            b = self._boxes[index]  # type: ignore[index]
            return self._patches[index], self._points[index], (float(b[0]), float(b[1]), float(b[2]), float(b[3]))  # type: ignore[index]
        r = self.records[index]
        return cut_patch(read_image(r), r.points, self.cfg.crop_scale, self.cfg.margin, self.cfg.size)

    def params_for(self, index: int, epoch: int | None = None) -> AugmentParams:
        """The augmentation sample `index` gets in `epoch` (default: the current one)."""
        if self.cfg.augment is None:
            return identity_params(self.cfg.size)
        rng = np.random.default_rng([self.cfg.seed, self.epoch if epoch is None else epoch, index])
        return sample_params(rng, self.cfg.augment, self.cfg.size, self._mirror_ok)

    def pose_label(self, record: FaceRecord, points: np.ndarray, params: AugmentParams) -> tuple[np.ndarray, bool]:
        """(yaw, pitch, roll) degrees for the augmented sample, and whether it is usable.

        The record's exact pose (synthetic faces) adjusted for the augmentation if known;
        otherwise `pose.euler_from_landmarks` on the augmented crop's points with the crop's own
        112-px camera (PFLD-pytorch used a 256-px camera on 112 crops).
        """
        if record.pose is not None:
            return adjust_pose(record.pose, params), True
        if not self.layout.pose_points:
            return np.zeros(3), False
        from ..pose import euler_from_landmarks

        try:
            angles = np.asarray(euler_from_landmarks(points, self.layout, (self.cfg.size, self.cfg.size)), np.float64)
        except Exception:  # noqa: BLE001 - a degenerate face must not stop training; it just gets no pose term
            return np.zeros(3), False
        if angles.shape != (3,) or not np.all(np.isfinite(angles)):
            return np.zeros(3), False
        return angles, True

    def sample(self, index: int, epoch: int | None = None) -> Sample:
        """Sample `index` as numpy arrays (crop, points in crop pixels, pose, attributes)."""
        patch, pts, box = self._patch(index)
        params = self.params_for(index, epoch)
        out = augmented_crop(patch, box, pts, params, self.layout)
        record = self.records[index]
        pose, valid = self.pose_label(record, out.points, params)
        attrs = np.zeros(len(ATTRIBUTES), np.float32)
        given = np.asarray(record.attributes, np.float32)[: len(ATTRIBUTES)]
        attrs[: len(given)] = given
        if params.occlusion is not None:
            attrs[_OCCLUSION] = 1.0  # the augmentation hid part of the face: weigh it as occluded
        return Sample(crop=out.crop, points=out.points, pose=pose, pose_valid=valid, attributes=attrs, params=params)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """`ds[i]` (current epoch) or `ds[(epoch, i)]`: samplers that name the epoch keep worker
        processes, which hold their own copy of the dataset, in step with the main process."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        s = self.sample(int(index), epoch)
        return {
            "image": torch.from_numpy(self.preprocess.apply_nchw(s.crop[None])[0]),
            "target": torch.from_numpy((s.points / self.cfg.size).astype(np.float32)),
            "pose": torch.from_numpy(s.pose.astype(np.float32)),
            "pose_valid": torch.tensor(1.0 if s.pose_valid else 0.0),
            "attributes": torch.from_numpy(s.attributes),
        }

    def attribute_matrix(self) -> np.ndarray:
        """[N, 6] attribute flags of the records as given (for dataset-level class frequencies)."""
        out = np.zeros((len(self.records), len(ATTRIBUTES)), np.float32)
        for i, r in enumerate(self.records):
            a = np.asarray(r.attributes, np.float32)[: len(ATTRIBUTES)]
            out[i, : len(a)] = a
        return out


class EpochBatches:
    """Batch sampler yielding `(epoch, index)` keys for `FaceDataset`; set `.epoch` between epochs.

    `batches(epoch)` gives the list of index lists of that epoch (see `train.epoch_batches`).
    """

    def __init__(self, batches: Callable[[int], list[list[int]]], epoch: int = 0) -> None:
        self.batches = batches
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws (DistributedSampler's name for it)."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        e = self.epoch
        return iter([[(e, i) for i in b] for b in self.batches(e)])

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def worker_init(_worker_id: int) -> None:
    """DataLoader worker setup: one thread each for OpenCV and torch (2-core machines).

    Workers are started with the "spawn" method (see `train.py`): a forked child inherits
    OpenCV's thread pool in a locked state once the parent has used it, and hangs.
    """
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def describe(ds: FaceDataset) -> dict[str, Any]:
    """Plain facts for logs and checkpoint metadata."""
    return {"faces": len(ds), "layout": ds.layout.name, "cached": ds.cached, "augment": ds.cfg.augment is not None}
