"""Accuracy on annotated faces (`evaluate`) and agreement between two models (`fidelity`).

Both use only the `Predictor` interface, so a checkpoint, an ONNX file and every TFLite
variant are measured the same way:

* `evaluate`: crop each face at `crop_scale` x its ground-truth landmark box (PFLD-pytorch's
  test convention), predict, map the points back to the image with the crop's exact inverse,
  and compute NME in image pixels; AUC / failure rate at the threshold, a breakdown per WFLW
  attribute, and the outliers named by their annotation line.
* `fidelity`: how far model b's points move from model a's on the same crops, in crop pixels
  and in % of the inter-ocular distance (of a's prediction). A model against itself is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DataError, UsageError
from .layouts import PointLayout, get_layout
from .metrics import auc, failure_rate, nme, resolve_norm
from .preprocess import CropTransform, crop_from_landmarks, preprocess_overrides
from .runtime import Predictor
from .data.records import ATTRIBUTES, FaceRecord, LoadProblem, read_image

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: crop convention, NME normalisation, failure threshold, batching."""

    crop_scale: float = 1.2
    norm: str = "inter-ocular"
    threshold: float = 0.1
    batch_size: int = 32
    # Outliers: faces above the failure threshold or above `outlier_factor` x the median NME.
    outlier_factor: float = 3.0
    max_outliers: int = 20

    def __post_init__(self) -> None:
        if not (self.crop_scale > 0):
            raise UsageError(f"crop scale must be positive, got {self.crop_scale}")
        if not (self.threshold > 0):
            raise UsageError(f"failure threshold must be positive, got {self.threshold}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class EvalResult:
    """Accuracy of one model on one set of faces (NME in units of the normaliser `norm`)."""

    nme_mean: float
    nme_per_face: np.ndarray  # float64 [N], same order as the records
    auc: float  # AUC of the CED up to `threshold`
    failure_rate: float  # fraction of faces with NME > `threshold`
    per_attribute: dict[str, dict[str, float]]  # attribute -> {count, nme, auc, failure_rate}
    outliers: list[tuple[str, float]]  # ("file:line (image)", NME), worst first
    count: int
    norm: str  # the normalisation really used, with any fallback explained
    threshold: float = 0.1
    layout: str = ""
    sources: list[str] = field(default_factory=list)
    predictions: np.ndarray | None = field(default=None, repr=False)  # [N, P, 2] image pixels


@dataclass
class FidelityResult:
    """Shift of model b's landmarks from model a's, per point, over `count` crops."""

    mean_px: float  # 112-crop pixels
    p99_px: float
    max_px: float
    mean_pct_iod: float  # % of the inter-ocular distance on a's prediction
    p99_pct_iod: float
    count: int


def _check_points(predictor: Predictor, layout: PointLayout) -> None:
    if int(predictor.num_points) != layout.num_points:
        raise DataError(
            f"model {getattr(predictor, 'name', '')} predicts {predictor.num_points} points but the data has "
            f"{layout.num_points} ({layout.name}); evaluate it on data with the same point layout"
        )


def evaluate(
    predictor: Predictor, records: Sequence[FaceRecord], cfg: EvalConfig = EvalConfig(), progress: Progress | None = None
) -> EvalResult:
    """NME / AUC / failure rate of `predictor` on `records` (see the module docstring).

    `progress(done, total)` is called after each batch (e.g. a lambda updating a tqdm bar).
    """
    if not records:
        raise DataError("no faces to evaluate; check the dataset spec")
    n_pts = {r.num_points for r in records}
    if len(n_pts) != 1:
        raise DataError(f"records mix point counts {sorted(n_pts)}; evaluate one layout at a time")
    layout = get_layout(records[0].layout) if records[0].layout else get_layout(records[0].num_points)
    if layout.num_points != records[0].num_points:
        layout = get_layout(records[0].num_points)
    _check_points(predictor, layout)
    size = int(predictor.preprocess.input_size)

    total = len(records)
    preds = np.zeros((total, layout.num_points, 2), np.float64)
    gts = np.stack([np.asarray(r.points, np.float64) for r in records])
    last: tuple[Path | None, np.ndarray | None] = (None, None)  # records of one image are usually consecutive
    for start in range(0, total, cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        crops: list[np.ndarray] = []
        tfs: list[CropTransform] = []
        for r in chunk:
            if last[0] != r.image_path:
                last = (r.image_path, read_image(r.image_path))
            crop, tf = crop_from_landmarks(last[1], r.points, scale=cfg.crop_scale, size=size)  # type: ignore[arg-type]
            crops.append(crop)
            tfs.append(tf)
        out = np.asarray(predictor.predict(np.stack(crops)), np.float64)
        for j, tf in enumerate(tfs):
            preds[start + j] = tf.to_image(out[j])
        if progress is not None:
            progress(min(start + cfg.batch_size, total), total)

    errs = nme(preds, gts, layout, cfg.norm)
    _, norm_desc = resolve_norm(layout, cfg.norm)
    sources = [r.source or str(r.image_path) for r in records]

    per_attr: dict[str, dict[str, float]] = {}
    attrs = np.array([tuple(r.attributes) + (0,) * (len(ATTRIBUTES) - len(r.attributes)) for r in records], np.int64)
    for k, name in enumerate(ATTRIBUTES):
        sel = attrs[:, k] == 1
        if sel.any():
            e = errs[sel]
            per_attr[name] = {"count": int(sel.sum()), "nme": float(e.mean()), "auc": auc(e, cfg.threshold),
                              "failure_rate": failure_rate(e, cfg.threshold)}

    med = float(np.median(errs))
    flagged = np.flatnonzero((errs > cfg.threshold) | (errs > cfg.outlier_factor * med))
    flagged = flagged[np.argsort(-errs[flagged], kind="stable")][: cfg.max_outliers]
    outliers = [(_label(records[i]), float(errs[i])) for i in flagged]

    return EvalResult(
        nme_mean=float(errs.mean()), nme_per_face=errs, auc=auc(errs, cfg.threshold),
        failure_rate=failure_rate(errs, cfg.threshold), per_attribute=per_attr, outliers=outliers,
        count=total, norm=norm_desc, threshold=cfg.threshold, layout=layout.name, sources=sources, predictions=preds,
    )


def _label(r: FaceRecord) -> str:
    """`file:line`, plus the image name when the source does not already say it."""
    src = r.source or str(r.image_path)
    return src if r.image_path.stem in src else f"{src} ({r.image_path.name})"


def _iod(points: np.ndarray, layout: PointLayout) -> np.ndarray:
    if layout.eye_corners is not None:
        a, b = layout.eye_corners
        return np.linalg.norm(points[:, a] - points[:, b], axis=-1)
    # No eye semantics (custom layouts): the landmark-box diagonal stands in, as in metrics.nme.
    return np.linalg.norm(points.max(1) - points.min(1), axis=-1)


def fidelity(
    a: Predictor, b: Predictor, crops: np.ndarray, layout: PointLayout, batch_size: int = 64,
    progress: Progress | None = None,
) -> FidelityResult:
    """How far `b`'s landmarks are from `a`'s on the same uint8 BGR crops [N, S, S, 3].

    Per-point Euclidean shift in crop pixels (mean, 99th percentile, max) and in % of the
    inter-ocular distance measured on `a`'s prediction (box diagonal for layouts without eye
    corners). No ground truth needed: use it for float vs quantized, torch vs ONNX vs TFLite.
    """
    x = np.asarray(crops)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise DataError(f"fidelity needs uint8 crops shaped [N, S, S, 3] with N >= 1, got {x.shape}")
    _check_points(a, layout)
    _check_points(b, layout)
    pa_parts, pb_parts = [], []
    for i in range(0, len(x), batch_size):
        pa_parts.append(np.asarray(a.predict(x[i : i + batch_size]), np.float64))
        pb_parts.append(np.asarray(b.predict(x[i : i + batch_size]), np.float64))
        if progress is not None:
            progress(min(i + batch_size, len(x)), len(x))
    pa, pb = np.concatenate(pa_parts), np.concatenate(pb_parts)
    d = np.linalg.norm(pb - pa, axis=-1)  # [N, P]
    iod = _iod(pa, layout)
    pct = 100.0 * d / np.maximum(iod, 1e-6)[:, None]
    return FidelityResult(
        mean_px=float(d.mean()), p99_px=float(np.percentile(d, 99)), max_px=float(d.max()),
        mean_pct_iod=float(pct.mean()), p99_pct_iod=float(np.percentile(pct, 99)), count=int(len(x)),
    )


# ----------------------------------------------------------------------------------------------
# `pfld-export eval`: open a model, load a dataset spec, evaluate, write eval.json + ced.png
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRunConfig:
    """`pfld-export eval`: which model, which faces, where the report goes."""

    model: Path
    data: str
    out_dir: Path = Path("eval_out")
    color: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    eval: EvalConfig = EvalConfig()
    strict: bool = False
    threads: int | None = None
    cache_dir: Path | None = None


@dataclass
class EvalReport:
    """What `run_eval` measured and wrote."""

    result: EvalResult
    model: dict[str, Any]
    preprocess: dict[str, Any]
    data: str
    problems: list[LoadProblem]
    json_path: Path
    ced_path: Path


def eval_json(report: EvalReport) -> dict[str, Any]:
    """The machine-readable eval.json content (per-face NME keyed by annotation line; no raw points)."""
    r = report.result
    return {
        "model": report.model,
        "preprocess": report.preprocess,
        "data": report.data,
        "skipped": [str(p) for p in report.problems],
        "count": r.count,
        "layout": r.layout,
        "norm": r.norm,
        "threshold": r.threshold,
        "nme_mean": r.nme_mean,
        "auc": r.auc,
        "failure_rate": r.failure_rate,
        "per_attribute": r.per_attribute,
        "outliers": [{"source": s, "nme": e} for s, e in r.outliers],
        "per_face": [{"source": s, "nme": float(e)} for s, e in zip(r.sources, r.nme_per_face)],
    }


def run_eval(cfg: EvalRunConfig, progress: Progress | None = None) -> EvalReport:
    """Open `cfg.model` (preprocessing from its metadata, CLI overrides win), load `cfg.data`,
    evaluate, and write `eval.json` and `ced.png` to `cfg.out_dir` (atomically)."""
    from .data.specs import load_spec
    from .io import file_set
    from .metrics import plot_ced
    from .runtime import open_predictor

    model = Path(cfg.model)
    predictor = open_predictor(model, threads=cfg.threads, overrides=preprocess_overrides(cfg.color, cfg.mean, cfg.std))
    data = load_spec(cfg.data, strict=cfg.strict, cache_dir=cfg.cache_dir)
    result = evaluate(predictor, data.records, cfg.eval, progress)
    out = Path(cfg.out_dir)
    report = EvalReport(result=result, model=predictor.describe(), preprocess=predictor.preprocess.to_dict(),
                        data=data.description, problems=list(data.problems), json_path=out / "eval.json",
                        ced_path=out / "ced.png")
    # One result set: a full disk must not leave eval.json without its ced.png (or the reverse).
    with file_set() as files:
        files.write_json(report.json_path, eval_json(report))
        plot_ced({model.name: result.nme_per_face}, report.ced_path, threshold=cfg.eval.threshold,
                 title=f"CED on {cfg.data} ({result.count} faces)", xlabel=f"NME ({result.norm.split(' (')[0]})",
                 files=files)
    return report
