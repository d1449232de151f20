"""`convert`: checkpoint or ONNX -> ONNX -> TFLite in the requested formats, proven at each step.

    load ─▶ calibration + held-out crops ─▶ ONNX (+ ORT parity) ─▶ TFLite per format ─▶ validate ─▶ report

Each stage is a function in this package; `convert` only wires them, times them and writes
report.json. It never prints: progress goes to the `progress` callback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..errors import BudgetError, OutputError, UsageError
from ..io import atomic_write_json, locked_dir, model_stem, writable_dir
from ..layouts import get_layout
from ..preprocess import Preprocess, preprocess_overrides
from ..quant.budget import Int8Budget
from ..quant.sensitivity import SensitivityConfig, SensitivityInputs
from ..runtime import Predictor, TorchPredictor, onnx_metadata, open_predictor, sidecar_path, ONNX_META_MODEL, ONNX_META_PREPROCESS
from .calibrate import DEFAULT_COUNT, DEFAULT_VAL_COUNT, calibration_and_validation, is_synthetic
from .formats import FORMATS, INT8_PRESET, parse_size, select_formats
from .onnx import PARITY_ATOL_PX, OnnxArtifact, OnnxConfig, ParityResult, check_parity, import_onnx, to_onnx
from .tflite import TfliteArtifact, TfliteConfig, to_tflite
from .validate import FormatValidation, ValidateConfig, nme_of, validate_tflite

Progress = Callable[[str, "float | None"], None]  # (stage, None) at start, (stage, seconds) at the end


@dataclass
class ConvertConfig:
    """Everything `pfld-export convert` takes."""

    model: Path
    out_dir: Path = Path("out/convert")
    formats: str | tuple[str, ...] | None = None  # None: formats.DEFAULT_FORMATS (or INT8_PRESET with int8)
    int8: bool = False
    calib: str | None = None  # folder of face images or dataset spec; None: `synthetic`
    calib_count: int = DEFAULT_COUNT
    val_images: str | None = None
    val_count: int = DEFAULT_VAL_COUNT
    eval_data: str | None = None
    size_budget: int | str = 2_000_000
    name: str | None = None
    width: float | None = None  # only checked: width belongs to the trained weights
    color: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    keep_onnx: bool = False
    seed: int = 0
    opset: int = 13
    parity_atol_px: float = PARITY_ATOL_PX
    detector: Any | None = None  # detect.Detector for folder calibration; default detector when None
    cache_dir: Path | None = None  # where synthetic faces are generated
    # int8 fidelity (quant/fit.py): the budget of the calibrated formats and the recipes allowed to meet it.
    budget: Int8Budget = Int8Budget()  # a NME-increase budget needs eval_data
    int8_methods: tuple[str, ...] | None = None  # INT8_RECIPES names; None: recipes.default_recipes(); ("plain",): the converter's own
    int8_max_seconds: float | None = None  # default fit's cap (CPU s) on starting weight-fix candidates; None: fit.DEFAULT_MAX_SECONDS, 0: no cap
    # Float model the shift and NME-increase checks are measured against instead of the source's
    # own float (a QAT checkpoint is read against its teacher: the landmarks the user validated).
    reference: Path | None = None
    # Stage 0: choices the tensors cannot tell (None: measured) and the author's own export to match.
    activation: str | None = None
    bn8: bool | None = None
    reference_onnx: Path | None = None
    # Bring your own network (usermodel.py): FILE:Class, constructor JSON, landmark output, its scale.
    model_class: str | None = None
    model_args: str | None = None
    output_index: int | None = None
    output_scale: float | None = None


@dataclass
class Source:
    """The loaded input: its float reference predictor and how to make its ONNX."""

    kind: str  # checkpoint | onnx
    path: Path
    preprocess: Preprocess
    reference: Predictor
    model: dict[str, Any] | None
    loaded: Any | None = None  # checkpoint.LoadedModel for checkpoints


@dataclass
class ConvertReport:
    """What `convert` did and found; report.json is this, serialised."""

    source: str
    source_kind: str
    reference: str  # backend the shifts are measured against (torch, or onnx for ONNX input)
    model: dict[str, Any] | None
    preprocess: dict[str, Any]
    calibration: str
    validation: str
    onnx: OnnxArtifact
    onnx_kept: bool
    parity: ParityResult
    artifacts: list[TfliteArtifact]
    formats: list[FormatValidation]
    size_budget: int
    eval_data: str | None
    reference_nme: float | None
    timings: dict[str, float]
    report_path: Path
    tool_version: str = __version__
    int8_fit: Any | None = None  # quant.fit.Int8Fit when the int8 variants were fitted (methods / budgets)
    stage0: Any | None = None  # stage0.Stage0Result: the float model checked before anything converted
    reference_model: str | None = None  # --reference: the float model shifts were measured against
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = all(f.passed for f in self.formats)

    def raise_for_budgets(self) -> None:
        """BudgetError naming the failed checks, if any format failed one: one short line (the FAIL
        lines of the table carry the details), with the first failure's figure and fix."""
        bad = [(f.format, c) for f in self.formats for c in f.failures]
        if not bad:
            return
        fmt, first = bad[0]
        others = [f"{f} {c.name}" for f, c in bad[1:]]
        more = f"; also {', '.join(others[:5])}" + (f" and {len(others) - 5} more" if len(others) > 5 else "") if others else ""
        fix = f"; {first.fix}" if first.fix else ""
        raise BudgetError(f"{len(bad)} budget check(s) failed: {fmt} {first.name} ({first.figure or first.detail}){more}{fix}; "
                          f"failing models are kept as *.over-budget.tflite; details in {self.report_path}")


def convert(cfg: ConvertConfig, progress: Progress | None = None) -> ConvertReport:
    """Run every stage; returns the report (budget failures are in it, not raised: see
    `ConvertReport.raise_for_budgets`). Typed errors for bad input, failed conversions and
    ONNX parity.

    The output folder holds one result set, written together or not at all: the run works in a
    hidden staging folder inside --out and moves its files in only once everything is written
    (a full disk, an error or Ctrl-C leaves --out as it was). The folder is locked for the run
    (a second convert into it stops at once). Files the previous report.json listed and this run
    did not write are removed; formats that fail a budget are renamed `*.over-budget.*`.
    """
    select_formats(cfg.formats, cfg.int8)  # bad options fail before the folder is touched
    parse_size(cfg.size_budget)
    if cfg.reference is not None and not Path(cfg.reference).is_file():  # not after minutes of face detection
        raise UsageError(f"--reference {cfg.reference} does not exist; pass the float checkpoint or .onnx to measure against")
    writable_dir(Path(cfg.out_dir))
    with locked_dir(cfg.out_dir) as out:
        for left in out.glob(f"{_STAGING}*"):  # a killed run's staging folder (we hold the lock)
            shutil.rmtree(left, ignore_errors=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out))
        except OSError as e:
            raise OutputError(f"cannot write into {out} ({e.strerror}); free space there or choose another --out") from None
        try:
            report = _publish(_convert(dataclasses.replace(cfg, out_dir=staging), progress), staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report


_STAGING = ".convert-staging-"


def _publish(report: ConvertReport, staging: Path, out: Path) -> ConvertReport:
    """Move a finished result set from `staging` into `out`, rewrite report.json with the final
    paths, and remove what the previous report listed and this one does not."""
    from ..report import to_jsonable

    stale = _listed_outputs(out / "report.json")
    for p in sorted(staging.iterdir()):
        if p.is_file() and p.name != "report.json":
            os.replace(p, out / p.name)  # renames take no space: the set appears in one go

    def moved(p: Path) -> Path:
        return out / p.name if Path(p).parent == staging else p

    for f in report.formats:
        f.path = moved(f.path)
    report = dataclasses.replace(
        report, artifacts=[dataclasses.replace(a, path=moved(a.path), sidecar=moved(a.sidecar)) for a in report.artifacts],
        onnx=dataclasses.replace(report.onnx, path=moved(report.onnx.path)), report_path=out / "report.json")
    atomic_write_json(report.report_path, to_jsonable(report))
    _remove(stale - _listed_outputs(report.report_path), out)
    return report


def _convert(cfg: ConvertConfig, progress: Progress | None) -> ConvertReport:
    formats = select_formats(cfg.formats, cfg.int8)
    size_budget = parse_size(cfg.size_budget)
    from ..quant.fit import int8_config_for

    int8_cfg = int8_config_for(cfg, formats)  # None: the converter's plain int8 (--int8-method plain)
    out = writable_dir(Path(cfg.out_dir))
    timings: dict[str, float] = {}
    stage = _stage_timer(timings, progress)
    with stage("load"):
        src = load_source(cfg)
        if cfg.reference is not None and not Path(cfg.reference).is_file():  # fail in seconds, before any crops
            raise UsageError(f"--reference {cfg.reference} does not exist; pass the float checkpoint or .onnx to measure against")
    name = cfg.name or model_stem(src.path)
    vcfg = ValidateConfig(size_budget=size_budget, reference_formats=reference_only_formats(cfg))
    if cfg.eval_data:  # before converting: a bad spec or point layout should fail in seconds
        from ..data.specs import load_spec

        vcfg.eval_records = load_spec(cfg.eval_data, cache_dir=cfg.cache_dir).records
    with stage("calibration crops"):
        calib, val = calibration_and_validation(cfg.calib or "synthetic", cfg.val_images, src.preprocess, cfg.calib_count,
                                                cfg.val_count, cfg.seed, cfg.detector, cfg.cache_dir)
    with stage("stage 0"):
        s0 = settle_source(cfg, src, calib)
        target = _reference(cfg, src)
    if cfg.eval_data:
        with stage("reference NME"):
            vcfg.reference_nme = nme_of(target, vcfg.eval_records)
    with tempfile.TemporaryDirectory(prefix="pfld-convert-") as tmp:
        ocfg = OnnxConfig(path=(out if cfg.keep_onnx else Path(tmp)) / f"{name}.onnx", opset=cfg.opset, source=str(src.path))
        with stage("onnx"):
            art = to_onnx(src.loaded, ocfg) if src.kind == "checkpoint" else import_onnx(src.path, src.preprocess, ocfg)
        with stage("onnx parity"):
            src_points = src.reference.predict(val.crops)
            parity = check_parity(src.reference, open_predictor(art.path), val.crops, cfg.parity_atol_px, src_points)
            ref_points = src_points if target is src.reference else target.predict(val.crops)
        fit = None
        if int8_cfg is None and any(f.calibrated for f in formats):
            from ..quant.fit import Int8Config, learned_qat_ranges

            if learned_qat_ranges(src.loaded):  # a QAT checkpoint's int8 uses the ranges it was trained with
                int8_cfg = Int8Config(methods=("plain",), range_methods=("minmax",), budget=Int8Budget(max_bytes=size_budget, max_slowdown=None))
        if int8_cfg is not None:
            from ..quant.fit import fit_int8

            with stage("int8 fit"):
                fit = fit_int8(src.loaded, art, calib, {f.name: f.io_dtype for f in formats if f.calibrated}, target,
                               int8_cfg, progress=lambda m: progress and progress(f"int8 fit: {m}", None), also=formats)
        with stage("tflite"):
            tcfg = TfliteConfig(out_dir=out, name=name, source=str(src.path))
            artifacts = to_tflite(art, formats, calib, tcfg, progress=lambda f: progress and progress(f"tflite {f}", None),
                                  override={**fit.uncalibrated, **fit.blobs} if fit else None,
                                  sidecar_extra=fit.sidecar() if fit else None)
    if not cfg.keep_onnx:  # the temp file is gone; the report names it without a dangling path
        art = dataclasses.replace(art, path=Path(art.path.name))
    with stage("validate"):
        by_name = {f.name: f for f in formats}
        rows = [validate_tflite(a, by_name[a.format], ref_points, val.crops, vcfg) for a in artifacts]
        if fit is not None:
            _compare_with_plain(rows, fit, art.preprocess, ref_points, val.crops)
        if int8_cfg is not None:
            from ..quant.fit import add_budget_checks

            add_budget_checks(rows, by_name, cfg, fit)
        artifacts = [_mark_over_budget(a, r) for a, r in zip(artifacts, rows)]
    report = ConvertReport(
        source=str(src.path), source_kind=src.kind, reference=src.reference.backend, model=src.model,
        preprocess=src.preprocess.to_dict(), calibration=calib.description, validation=val.description, onnx=art,
        onnx_kept=cfg.keep_onnx, parity=parity, artifacts=artifacts, formats=rows, size_budget=size_budget,
        eval_data=cfg.eval_data, reference_nme=vcfg.reference_nme, timings=timings, report_path=out / "report.json",
        int8_fit=fit, reference_model=str(cfg.reference) if cfg.reference else None, stage0=s0,
    )
    from ..report import to_jsonable

    atomic_write_json(report.report_path, to_jsonable(report))
    return report


def reference_only_formats(cfg: ConvertConfig) -> tuple[str, ...]:
    """Formats `--int8` adds only as the reference (fp32 unless --formats asked for it): their
    size is reported, not held against the budget (a file nobody ships)."""
    if not cfg.int8:
        return ()
    asked = {f.name for f in select_formats(cfg.formats)} if cfg.formats else set()
    return tuple(f for f in INT8_PRESET if not FORMATS[f].calibrated and f not in asked)


def _compare_with_plain(rows: list[FormatValidation], fit: Any, pre: Preprocess, ref_points: Any, crops: Any) -> None:
    """What plain int8 gives on the same held-out faces, next to each fitted int8 format."""
    from ..quant.graph import predict_blob
    from .validate import shift_stats

    for row in rows:
        blob = fit.plain_blob(row.format)
        if blob is not None and fit.method != "plain":
            row.plain_shift = shift_stats(ref_points, predict_blob(blob, pre, crops))
        elif blob is not None:
            row.plain_shift = row.shift


def _mark_over_budget(art: TfliteArtifact, row: FormatValidation) -> TfliteArtifact:
    """A format that failed a budget must not sit under the name a deployment picks up: rename it
    (and its sidecar) `<name>.over-budget.*`, and say in the sidecar which checks failed."""
    if row.passed:
        return art
    path = art.path.with_name(f"{art.path.stem}.over-budget{art.path.suffix}")
    side = sidecar_path(path)
    try:
        meta = json.loads(art.sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    meta["budget"] = {"passed": False, "failed": [f"{c.name} ({c.detail})" for c in row.failures]}
    atomic_write_json(side, meta)
    os.replace(art.path, path)
    art.sidecar.unlink(missing_ok=True)
    row.path = path
    return dataclasses.replace(art, path=path, sidecar=side)


def _listed_outputs(report_path: Path) -> set[Path]:
    """Files a report.json says its run wrote (artifacts, sidecars, a kept ONNX, the report)."""
    try:
        doc = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return set()
    paths = {report_path}
    for a in doc.get("artifacts") or []:
        paths.update(Path(a[k]) for k in ("path", "sidecar") if isinstance(a, dict) and a.get(k))
    onnx = doc.get("onnx") or {}
    if doc.get("onnx_kept") and isinstance(onnx, dict) and onnx.get("path"):
        paths.add(Path(onnx["path"]))
    return paths


def _remove(paths: set[Path], out: Path) -> None:
    """Delete stale outputs of an earlier run, never anything outside `out`."""
    root = out.resolve()
    for p in paths:
        if p.resolve().parent == root:
            p.unlink(missing_ok=True)


def load_source(cfg: ConvertConfig) -> Source:
    """Checkpoint (ours or PFLD-pytorch) or ONNX, with preprocessing overrides and the --width check."""
    path = Path(cfg.model)
    if not path.is_file():
        raise UsageError(f"model {path} does not exist; pass a checkpoint (.pth/.pth.tar) or an .onnx file")
    override = preprocess_overrides(cfg.color, cfg.mean, cfg.std)
    if path.suffix.lower() == ".onnx":
        meta = onnx_metadata(path)
        model = _json_or_none(meta.get(ONNX_META_MODEL))
        _check_width(cfg.width, model["width"] if model else None, path)
        # Nothing may say how a foreign ONNX was fed: what the flags leave out is measured on
        # face crops when it is opened, never defaulted.
        ref = open_predictor(path, overrides=override)
        if ONNX_META_PREPROCESS not in meta:  # a foreign model's layout follows from its point count
            ref.preprocess = dataclasses.replace(ref.preprocess, layout=get_layout(ref.num_points).name)
        return Source(kind="onnx", path=path, preprocess=ref.preprocess, reference=ref, model=model)
    if cfg.model_class is not None:
        return _user_source(cfg, path, override)
    from ..checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    _check_width(cfg.width, loaded.meta.model.width, path)
    pre = dataclasses.replace(loaded.meta.preprocess, **override)
    loaded.meta.preprocess = pre
    ref = TorchPredictor(path=path, preprocess=pre, module=loaded.inference_model(), num_points=loaded.meta.model.points, name=path.name)
    return Source(kind="checkpoint", path=path, preprocess=pre, reference=ref, model=loaded.meta.model.to_dict(), loaded=loaded)


def settle_source(cfg: ConvertConfig, src: Source, calib: Any) -> Any:
    """Stage 0 on the calibration faces: a checkpoint's open choices settled (flags, the author's
    export, or measured) and its float model checked for plausibility; `src` is updated in place.
    Returns the `stage0.Stage0Result` (None for an ONNX source: its graph is the author's)."""
    from .. import stage0

    what = "synthetic faces" if is_synthetic(cfg.calib or "synthetic") else "calibration faces"
    override = preprocess_overrides(cfg.color, cfg.mean, cfg.std)
    if src.kind != "checkpoint":
        if cfg.reference_onnx is not None or cfg.activation is not None or cfg.bn8 is not None:
            raise UsageError("--reference-onnx / --activation / --bn8 describe a PyTorch checkpoint; an ONNX source already is its graph")
        # The graph is the author's; what stage 0 checks is that it is fed right: face-shaped landmarks.
        crops = calib.crops[: stage0.MAX_FACES]
        foreign = src.model is None
        result = stage0.Stage0Result(
            choices={}, how={"preprocess": "flags" if foreign and override else ("measured" if foreign else "metadata")},
            plausibility=stage0.plausibility(src.reference.predict(crops), src.preprocess.input_size), margins={},
            faces=len(crops), crops=what, candidates=[], gated=foreign)
        stage0.require_plausible(result, src.path.name)
        return result
    flags = {k: v for k, v in (("activation", cfg.activation), ("head_bn", cfg.bn8)) if v is not None}
    explicit = dataclasses.replace(src.preprocess, **override) if override else None
    if cfg.model_class is not None:
        if flags:
            raise UsageError("--activation / --bn8 describe the built-in PFLD; a --model-class network is defined by its own code")
        user = src.loaded
        loaded, result = stage0.resolve_with(lambda _: user, src.path, calib.crops, what, {}, explicit, cfg.reference_onnx)
    else:
        loaded, result = stage0.resolve(src.path, calib.crops, what, flags, explicit, cfg.reference_onnx)
    if result.reference is None:
        stage0.require_plausible(result, src.path.name)
    src.loaded, src.preprocess = loaded, loaded.meta.preprocess
    src.model = loaded.meta.model.to_dict() if loaded.meta.model is not None else None
    src.reference = TorchPredictor(path=src.path, preprocess=src.preprocess, module=loaded.inference_model(),
                                   num_points=loaded.num_points, name=src.path.name)
    return result


def sensitivity_inputs(cfg: SensitivityConfig) -> SensitivityInputs:
    """The source a `pfld-export sensitivity` run measures: loaded, its calibration and held-out
    crops cut, stage 0 settled on them (the sweep itself is `quant.sensitivity.sensitivity`)."""
    writable_dir(Path(cfg.out_dir))  # fail before minutes of face detection, not after
    scfg = ConvertConfig(model=Path(cfg.model), calib=cfg.calib)
    src = load_source(scfg)
    calib, val = calibration_and_validation(cfg.calib or "synthetic", cfg.images, src.preprocess, cfg.calib_count,
                                            cfg.val_count, cfg.seed, cfg.detector, cfg.cache_dir)
    settle_source(scfg, src, calib)  # stage 0: a foreign checkpoint is measured as the network its authors trained
    return SensitivityInputs(path=src.path, kind=src.kind, loaded=src.loaded, preprocess=src.preprocess,
                             reference=src.reference, calib=calib, val=val)


def _user_source(cfg: ConvertConfig, path: Path, override: dict[str, Any]) -> Source:
    """A --model-class network: the user's class, its weights, the landmark output picked."""
    from ..preprocess import Preprocess
    from ..stage0 import synthetic_crops
    from ..usermodel import ModelClassSpec, load_user_model

    if cfg.width is not None:
        raise UsageError("--width describes PFLD's multiplier; a --model-class network has none: drop --width")
    spec = ModelClassSpec.parse(cfg.model_class or "", cfg.model_args, cfg.output_index, cfg.output_scale)
    explicit = Preprocess(input_size=spec.input_size, **override) if override else None
    loaded = load_user_model(spec, path, synthetic_crops(16, spec.input_size), explicit)
    pre = loaded.meta.preprocess
    ref = TorchPredictor(path=path, preprocess=pre, module=loaded.inference_model(), num_points=loaded.num_points, name=path.name)
    return Source(kind="checkpoint", path=path, preprocess=pre, reference=ref, model=None, loaded=loaded)


def _reference(cfg: ConvertConfig, src: Source) -> Predictor:
    """The float predictor shifts are read against: --reference's, or the source's own."""
    if cfg.reference is None:
        return src.reference
    if not Path(cfg.reference).is_file():
        raise UsageError(f"--reference {cfg.reference} does not exist; pass the float checkpoint or .onnx to measure against")
    ref = load_source(ConvertConfig(model=Path(cfg.reference), color=cfg.color, mean=cfg.mean, std=cfg.std))
    if ref.reference.num_points != src.reference.num_points:
        raise UsageError(f"--reference {cfg.reference} predicts {ref.reference.num_points} points, {src.path.name} "
                         f"{src.reference.num_points}; pass the float model this one was tuned from")
    if ref.preprocess.to_dict() != src.preprocess.to_dict():
        raise UsageError(f"--reference {cfg.reference} expects different preprocessing ({ref.preprocess.to_dict()}) than "
                         f"{src.path.name} ({src.preprocess.to_dict()}); pass the float model this one was tuned from")
    return ref.reference


def _check_width(asked: float | None, actual: float | None, path: Path) -> None:
    if asked is None or asked == actual:
        return
    if actual is None:
        raise UsageError(f"--width {asked} cannot be checked: {path.name} records no width; drop --width (conversion never changes it)")
    raise UsageError(
        f"--width {asked} contradicts {path.name}, whose weights are a {actual}X model: width is a property of the "
        f"trained weights, not a conversion setting; {_train_advice(asked)}"
    )


def _train_advice(width: float) -> str:
    """Advice to train the asked width, or the widths `train` accepts (never a command it refuses)."""
    from ..model import WIDTHS

    if width in WIDTHS:
        return f"train a {width}X model with `pfld-export train --width {width}` and convert that"
    return f"{width}X is not a width train builds either; drop --width, or train one of {', '.join(map(str, WIDTHS))}"


def _json_or_none(text: str | None) -> Any:
    import json

    return json.loads(text) if text else None


def _stage_timer(timings: dict[str, float], progress: Progress | None) -> Callable[[str], Any]:
    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if progress:
            progress(name, None)
        t = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t, 3)
        if progress:
            progress(name, timings[name])

    return stage
