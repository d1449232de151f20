"""Dataset specs: one string names a dataset everywhere (eval --data, train, calibration).

    wflw:DIR            DIR holds images/ and one list_*.txt (WFLW format, 98 points)
    wflw:FILE.txt       that annotation list; images/ beside it (else its folder)
    300w:DIR            .pts files beside their images (recursively)
    300w:FILE.txt       a PFLD fork's 68-point list (147 fields); images/ beside it
    synthetic           200 procedural faces, seed 0
    synthetic:N         N faces, seed 0
    synthetic:N:SEED    N faces from SEED

Synthetic faces are generated once into a cache folder
`<cache>/synthetic/v<generator version>-<N>-<SEED>` (cache = `cache_dir`, else the environment
variable PFLD_EXPORT_CACHE, else ~/.cache/pfld-export) and then read back through the WFLW
loader like any downloaded dataset; their exact head poses come from the folder's manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..layouts import PointLayout, get_layout
from .ibug import load_300w, load_pfld_list
from .records import FaceRecord, LoadProblem
from .synthetic import ANNOTATION_NAME, SYNTHETIC_VERSION, SyntheticConfig, generate, read_manifest
from .wflw import load_wflw

CACHE_ENV = "PFLD_EXPORT_CACHE"
DEFAULT_SYNTHETIC_COUNT = SyntheticConfig().count
ACCEPTED = ("wflw:DIR (or wflw:LIST.txt), 300w:DIR (or 300w:LIST.txt for a PFLD fork's 68-point list), "
            "synthetic, synthetic:N, synthetic:N:SEED")


@dataclass
class DatasetResult:
    """Loaded faces, the lines/files that were skipped, their point layout, and a one-line description."""

    records: list[FaceRecord]
    problems: list[LoadProblem]
    layout: PointLayout
    description: str


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $PFLD_EXPORT_CACHE, else ~/.cache/pfld-export."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "pfld-export"


def synthetic_dir(count: int, seed: int, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `synthetic:count:seed` lives in the cache."""
    return cache_root(cache_dir) / "synthetic" / f"v{SYNTHETIC_VERSION}-{count}-{seed}"


def ensure_synthetic(
    count: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate `synthetic:count:seed` into the cache unless it is already there; return the folder.

    Generation happens in a temporary sibling folder renamed into place at the end, so a crash or
    a concurrent process never leaves (or sees) a half-written dataset.
    """
    final = synthetic_dir(count, seed, cache_dir)
    if _complete(final, count):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise DataError(f"cannot create the synthetic-data cache under {final.parent} ({e.strerror}); "
                        f"set {CACHE_ENV} to a writable folder") from None
    try:
        generate(SyntheticConfig(count=count, seed=seed), tmp, progress=progress)
        if final.exists() and not _complete(final, count):
            shutil.rmtree(final)  # a stale or foreign folder under our versioned name
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, count):  # lost a race to another process that finished first: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(folder: Path, count: int) -> bool:
    m = read_manifest(folder)
    if not m or m.get("version") != SYNTHETIC_VERSION or not (folder / ANNOTATION_NAME).is_file():
        return False
    cfg = m.get("config")
    return isinstance(cfg, dict) and cfg.get("count") == count


def _parse_synthetic(rest: str, spec: str) -> tuple[int, int]:
    parts = [p for p in rest.split(":")] if rest else []
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise DataError(f"bad synthetic spec {spec!r}: write synthetic, synthetic:N or synthetic:N:SEED with whole numbers")
    count = int(parts[0]) if parts else DEFAULT_SYNTHETIC_COUNT
    seed = int(parts[1]) if len(parts) > 1 else 0
    if count < 1:
        raise DataError(f"bad synthetic spec {spec!r}: N must be at least 1")
    return count, seed


def _find_list(directory: Path, scheme: str) -> Path:
    lists = sorted(directory.glob("list_*.txt"))
    if not lists:
        raise DataError(f"{scheme}:{directory} has no list_*.txt annotation file; point at the file with {scheme}:PATH/list_....txt")
    if len(lists) > 1:
        names = ", ".join(p.name for p in lists)
        raise DataError(f"{scheme}:{directory} has several annotation lists ({names}); pick one with {scheme}:{lists[0]}")
    return lists[0]


def _describe(what: str, records: Sequence[FaceRecord], problems: Sequence[LoadProblem]) -> str:
    n_img = len({r.image_path for r in records})
    skipped = f", {len(problems)} skipped" if problems else ""
    return f"{what}: {len(records)} faces in {n_img} images{skipped}"


def load_spec(spec: str, *, strict: bool = False, cache_dir: Path | None = None) -> DatasetResult:
    """Load the dataset a spec names (forms in the module docstring). Unusable lines become
    `problems` (or a DataError when `strict`); an unknown form or a missing path is a DataError."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec; use one of {ACCEPTED}")
    scheme, _, rest = spec.strip().partition(":")
    scheme = scheme.lower()
    if scheme == "synthetic":
        count, seed = _parse_synthetic(rest, spec)
        folder = ensure_synthetic(count, seed, cache_dir)
        records, problems = load_wflw(folder / ANNOTATION_NAME, folder / "images", strict)
        poses = (read_manifest(folder) or {}).get("poses", {})
        if isinstance(poses, dict):
            for r in records:
                pose = poses.get(r.image_path.name)
                if pose is not None:
                    r.pose = (float(pose[0]), float(pose[1]), float(pose[2]))
        what = f"synthetic faces (count {count}, seed {seed}, generator v{SYNTHETIC_VERSION}) in {folder}"
        return _result(records, problems, what, spec)
    if scheme in ("wflw", "300w"):
        if not rest:
            raise DataError(f"dataset spec {spec!r} names no path; use one of {ACCEPTED}")
        path = Path(rest).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist (from dataset spec {spec!r}); check the path. Accepted forms: {ACCEPTED}")
        if scheme == "wflw":
            ann = _find_list(path, scheme) if path.is_dir() else path
            records, problems = load_wflw(ann, None, strict)
            return _result(records, problems, f"WFLW list {ann}", spec)
        if path.is_dir():
            records, problems = load_300w(path, strict)
            return _result(records, problems, f"300-W .pts files under {path}", spec)
        records, problems = load_pfld_list(path, None, strict)
        return _result(records, problems, f"68-point list {path}", spec)
    raise DataError(f"unknown dataset spec {spec!r}; use one of {ACCEPTED}")


def _result(records: list[FaceRecord], problems: list[LoadProblem], what: str, spec: str) -> DatasetResult:
    if not records:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise DataError(f"no usable faces in {spec!r}{first}; check the annotation format and the image paths")
    layout = get_layout(records[0].layout)
    return DatasetResult(records=records, problems=problems, layout=layout, description=_describe(what, records, problems))


def split(records: Sequence[FaceRecord], val_fraction: float, seed: int) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """(train, val) with about `val_fraction` of the faces in val, split by IMAGE so that faces of
    one photo never straddle the two sides. Deterministic for a seed; order within each side kept."""
    if not (0.0 <= val_fraction < 1.0):
        raise UsageError(f"validation fraction must be in [0, 1), got {val_fraction}")
    images = list(dict.fromkeys(r.image_path for r in records))
    if val_fraction == 0 or len(images) < 2:
        return list(records), []
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = min(len(images) - 1, max(1, int(round(val_fraction * len(images)))))
    val_images = {images[i] for i in order[:n_val]}
    train = [r for r in records if r.image_path not in val_images]
    val = [r for r in records if r.image_path in val_images]
    return train, val
