"""The int8 fitter `convert` calls: candidates, the best on the search crops, a budget's search.

Candidates are the recipes of INT8_RECIPES (recipes.py): plain int8 of the converted model and,
for a checkpoint, its weight fixes, each calibrated with each range method; the best by the
landmark shift on the search crops (the calibration crops) is kept. With a budget (Int8Budget)
that the best still misses and a mixed recipe asked for, the fewest float ops that meet it are
searched (search.py). The budget checks on held-out faces (`add_budget_checks`) read the same
Int8Budget.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConversionError, UsageError
from ..export.validate import ShiftStats, shift_stats
from .budget import Int8Budget
from .constants import ConstantMap, map_constants, write_variant
from .graph import (PASSTHROUGH_OPS, Calibrated, OpInfo, Progress, calibrate_all, calibrate_blob, float_op_count, keras_function,
                    latency_ratio, predict_blob, write_ranges)
from .ranges import range_rule
from .recipes import INT8_RECIPES, MIXED_SUFFIX, RESIDUAL_SUFFIX, check_recipes, default_recipes, weight_fix_of
from .residual import residual_variants
from .search import MixedConfig, search_mixed

# Weight-fix candidates started after this many seconds of the fit's CPU time are skipped (and
# named). CPU, not wall time: on a shared machine (measured at load 5-17 on 2 cores) the wall
# clock ran 3-8x the CPU time and a 60 s wall cap cut the best candidate in 3 of 4 conversions;
# on an idle machine the two are within the converter's thread count of each other.
DEFAULT_MAX_SECONDS = 60.0
RANKING_CROPS = 64  # crops for the per-op ranking that orders the mixed-precision search


@dataclass
class Int8Config:
    """How `convert` builds its calibrated (int8, full-int8) formats, and the budget they must meet."""

    methods: tuple[str, ...] = field(default_factory=lambda: default_recipes(budget=True))  # INT8_RECIPES names
    budget: Int8Budget = Int8Budget(max_slowdown=None)  # no shift budget: no search, the best candidate wins
    range_methods: tuple[str, ...] | None = None  # each candidate is calibrated with each; None: its recipe's ranges
    equalize_alpha: float = 0.5
    measure_latency: bool = True
    max_seconds: float | None = None  # no weight-fix candidate starts after this much CPU time of the fit (plain always runs)
    recipe: str = "methods"  # "default" when convert chose the methods (no --int8-method / budget)

    def __post_init__(self) -> None:
        check_recipes(self.methods)
        if self.range_methods is not None and not self.range_methods:
            raise UsageError("int8 fitting needs at least one activation range method (minmax, mse, percentile:P)")
        for m in self.range_methods or ():
            range_rule(m)

    def ranges_of(self, candidate: str) -> tuple[str, ...]:
        """Range methods candidate `candidate` ("plain", a weight fix) is calibrated with."""
        recipe = INT8_RECIPES.get(candidate) or INT8_RECIPES["plain"]
        return self.range_methods or recipe.ranges


@dataclass
class Int8Candidate:
    """One way of building the int8 model and what it measured on the search crops."""

    method: str
    shift: ShiftStats
    float_ops: list[str] = field(default_factory=list)  # labels of ops left in float


@dataclass
class Int8Fit:
    """What `fit_int8` chose for the calibrated formats (the model bytes are in `blobs`)."""

    method: str
    float_ops: list[str]  # labels of ops kept float (empty: fully int8)
    float_op_types: dict[str, int]
    candidates: list[Int8Candidate]
    met: bool | None  # None when no budget was given
    search: str  # what the candidates were measured on
    equalized: list[str] = field(default_factory=list)  # tensors equalise rescaled
    latency_vs_plain: dict[str, float] = field(default_factory=dict)  # format -> median latency ratio
    plain_bytes: dict[str, int] = field(default_factory=dict)
    recipe: str = "methods"  # "default": convert's own choice of methods; "methods": --int8-method / a budget
    skipped: list[str] = field(default_factory=list)  # candidates the time cap left out
    residual: list[str] = field(default_factory=list)  # formats whose float output adds the mean shape back
    seconds: float = 0.0  # wall time of the fit
    cpu_seconds: float = 0.0  # CPU time of the fit (what the cap counts)
    _blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # underscore: kept out of report.json
    _plain: dict[str, bytes] = field(default_factory=dict, repr=False)  # plain int8 per format, for the comparison
    _uncalibrated: dict[str, bytes] = field(default_factory=dict, repr=False)  # e.g. fp32 from the same Keras model

    def plain_blob(self, name: str) -> bytes | None:
        """Plain int8 model bytes of format `name` (None when the fit kept no plain model)."""
        return self._plain.get(name)

    @property
    def uncalibrated(self) -> dict[str, bytes]:
        """Formats without calibration (fp32...) converted from the plain Keras model the fit built."""
        return self._uncalibrated

    @property
    def blobs(self) -> dict[str, bytes]:
        """Format name -> model bytes."""
        return self._blobs

    def sidecar(self) -> dict[str, dict[str, Any]]:
        """Extra sidecar keys per format: how its int8 model was built."""
        info = {"float_ops": list(self.float_ops), "equalized": bool(self.equalized) and weight_fix_of(self.method).equalize}
        # An int8-I/O format has no float output to add the mean shape to: it ships the candidate without it.
        return {name: {"int8": {"method": self.method if name in self.residual else self.method.removesuffix(RESIDUAL_SUFFIX),
                                "mean_shape_residual": name in self.residual, **info}} for name in self._blobs}


@dataclass
class _FitRun:
    """What every step of one fit reads: its inputs, the search crops' reference landmarks, the
    progress line, and the uncalibrated formats converted on the way."""

    loaded: Any | None
    onnx_artifact: Any
    calib: Any
    cfg: Int8Config
    say: Progress
    inputs: np.ndarray  # the calibration crops, preprocessed (float32 NHWC)
    ref: np.ndarray  # the reference's landmarks on the calibration crops
    labels: list[str] | None
    t0: float  # wall clock at the start of the fit
    c0: float  # CPU clock at the start of the fit (what the cap counts)
    uncalibrated: dict[str, bytes] = field(default_factory=dict)

    @property
    def pre(self) -> Any:
        """The converted model's preprocessing (crops to its input)."""
        return self.onnx_artifact.preprocess

    def calibrated(self, name: str, art: Any, formats: Sequence[Any] = ()) -> dict[str, Calibrated]:
        """One Keras conversion, one calibration run for every range method: "name" for minmax, "name/mse"..."""
        from ..export.tflite import convert_one, compact_tflite

        keras_model, func = keras_function(art, self.inputs)
        for fmt in formats:
            self.uncalibrated[fmt.name] = compact_tflite(convert_one(func, keras_model, fmt, self.inputs))
        got = calibrate_all(keras_model, func, self.inputs, self.cfg.ranges_of(name), self.labels)
        return {name if r == "minmax" else f"{name}/{r}": c for r, c in got.items()}


def fit_int8(
    loaded: Any | None, onnx_artifact: Any, calib: Any, io_dtypes: dict[str, str], reference: Any, cfg: Int8Config,
    progress: Progress | None = None, also: Sequence[Any] = (),
) -> Int8Fit:
    """Build each calibrated format (name -> I/O dtype in `io_dtypes`) the best way `cfg` allows.

    Candidates: plain int8 of `onnx_artifact`; for a checkpoint (`loaded`), the weight fixes in
    `cfg.methods`, each written into the plain calibrated flatbuffer (`quant.constants`; re-exported
    through ONNX only where a layer cannot be placed); every one calibrated on the same crops with each of its
    range methods (`cfg.ranges_of`); the best by search-crop shift is kept. With a budget that the
    best still misses and a mixed recipe in `cfg.methods`, the fewest float ops that meet it are searched
    (`search_mixed`). `also`: uncalibrated ExportFormats (fp32...) to convert from the plain
    Keras model on the way, so the caller need not run onnx2tf once more. `cfg.max_seconds`
    caps the fit's CPU time (see DEFAULT_MAX_SECONDS): a weight-fix candidate is not started after it (named in `skipped`).
    Nothing is written here.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    run = _FitRun(loaded=loaded, onnx_artifact=onnx_artifact, calib=calib, cfg=cfg, say=progress or (lambda _m: None),
                  inputs=calib.inputs(onnx_artifact.preprocess), ref=reference.predict(calib.crops), labels=_labels(loaded),
                  t0=t0, c0=c0)
    cals, plain, learned = _plain_candidates(run, also)
    fixes = _weight_fixes(run, learned)
    equalized, skipped = _fix_candidates(run, fixes, plain, learned, cals) if fixes else ([], [])
    first_io = next(iter(io_dtypes.values()), "float32")
    if first_io == "float32":
        # Each candidate also with the mean-shape residual head (the float-I/O formats add the
        # mean back in float; an int8-I/O format is quantized from the candidate as it is).
        cals.update(residual_variants(cals, run.inputs, run.say))
    candidates = _measured(run, cals, first_io)
    budget = MixedConfig(budget=cfg.budget, io_dtype=first_io) if cfg.budget.max_shift_px is not None else None
    best = min(candidates, key=_rank_key(cfg, budget))
    cal = cals[best.method]
    float_ops: list[OpInfo] = []
    met = None if budget is None else cfg.budget.meets(best.shift)
    if budget is not None and not met and any(INT8_RECIPES[m].mixed for m in cfg.methods):
        best, cal, float_ops, met = _mixed_search(run, cals, candidates, budget, best, cal, first_io)
    return _assembled(run, io_dtypes, plain, best, cal, float_ops, met, candidates, equalized, skipped)


def _plain_candidates(
    run: _FitRun, also: Sequence[Any],
) -> tuple[dict[str, Calibrated], Calibrated, dict[str, tuple[float, float]] | None]:
    """Plain int8 calibrated with each range method (the uncalibrated formats of `also` converted
    on the way) and, for a learned-ranges QAT checkpoint, plain with those ranges: the candidates,
    the plain model the others are compared with, and the learned ranges."""
    run.say("calibrating plain int8")
    cals: dict[str, Calibrated] = run.calibrated("plain", run.onnx_artifact, [f for f in also if not f.calibrated])
    plain = cals.get("plain") or next(iter(cals.values()))  # minmax if asked for, else the first range method
    learned = learned_qat_ranges(run.loaded)
    if learned:
        run.say("writing the ranges QAT learned into the int8 model")
        cals["qat-ranges"] = with_site_ranges(plain, learned)
    return cals, plain, learned


def _weight_fixes(run: _FitRun, learned: dict[str, tuple[float, float]] | None) -> list[str]:
    """The weight fixes of `cfg.methods` this source can take, in the order they are tried."""
    loaded, say = run.loaded, run.say
    fixes = [m for m in run.cfg.methods if weight_fix_of(m).rewrites]  # in the asked order: the cap cuts from the end
    if learned and fixes:
        # Learned ranges belong to the checkpoint's own activations: equalising again rescales
        # channels under them (measured on a ranges-only 1X checkpoint: 0.61 px vs 0.35 on the
        # search crops). Bias correction alone keeps them; a `qat --equalize` checkpoint is
        # equalised already, so re-equalising it is not tried at all.
        equalized_qat = bool(loaded.meta.provenance["qat"].get("equalized"))  # learned ranges come from a QAT checkpoint
        fixes = ([] if equalized_qat else [m for m in INT8_RECIPES if m in fixes]) + (["bias"] if _asks_bias_recipe(fixes) else [])
    if fixes and loaded is None:
        say("weight fixes skipped: an ONNX source has no PyTorch weights to rewrite")
        fixes = []
    elif fixes and not _rewritable(loaded):
        if _asks_bias_recipe(fixes) and _bias_correctable(loaded):
            # ReLU6 clips, so channel scales do not commute with it: no equalisation. Bias
            # correction only moves biases by the measured effect of weight rounding: it applies.
            say("equalisation skipped (ReLU6 does not commute with channel scales); bias correction alone tried")
            fixes = ["bias"]
        else:
            # Equalisation and bias correction index into PFLD-pytorch's own anatomy; another
            # layout or a user's class gets the generic methods only.
            say("weight fixes skipped: equalise / bias correction are written for PFLD-pytorch's anatomy, "
                "not this network's; the generic methods remain")
            fixes = []
    return fixes


def _fix_candidates(
    run: _FitRun, fixes: list[str], plain: Calibrated, learned: dict[str, tuple[float, float]] | None,
    cals: dict[str, Calibrated],
) -> tuple[list[str], list[str]]:
    """Calibrate each weight fix in turn into `cals` until the CPU cap; returns the tensors
    equalisation rescaled and the fixes the cap left out."""
    cfg, say = run.cfg, run.say
    equalized: list[str] = []
    skipped: list[str] = []
    variants = _fixed_weights(run.loaded, run.inputs, fixes, cfg.equalize_alpha)
    consts: ConstantMap | None = None  # where plain's layers sit in its flatbuffer, found once for every variant
    for k, m in enumerate(fixes):
        if cfg.max_seconds is not None and time.process_time() - run.c0 > cfg.max_seconds:
            skipped = fixes[k:]
            say(f"time cap {cfg.max_seconds:.0f} s of CPU reached: {', '.join(skipped)} not tried")
            break
        fixed, names = next(variants)
        say(f"calibrating {m}")
        equalized = equalized or names
        got, consts = _calibrated_variant(run, m, fixed, plain, consts)
        cals.update(got)
        if learned and m == "bias":
            # QAT's ranges on the bias-corrected weights too: no conversion, only the scales
            # differ. Measured on a ranges-only 0.25X checkpoint: chosen, 0.457 px held-out
            # against 0.463 (qat-ranges) and 0.489 (best PTQ).
            cals[f"{m}/qat-ranges"] = with_site_ranges(got.get(m) or next(iter(got.values())), learned)
    return equalized, skipped


def _calibrated_variant(
    run: _FitRun, m: str, fixed: Any, plain: Calibrated, consts: ConstantMap | None,
) -> tuple[dict[str, Calibrated], ConstantMap | None]:
    """Weight variant `fixed` of fix `m` calibrated with each range method, and the constant map
    of plain's flatbuffer (found on first use, kept for the next variant)."""
    # A weight variant differs from plain only in constants: they are written into the plain
    # calibrated flatbuffer and its ranges measured again (no ONNX export, no onnx2tf run); a
    # constant that cannot be placed falls back to converting the variant.
    try:
        consts = consts or map_constants(plain.blob, run.loaded.inference_model())
        blob = write_variant(consts, run.loaded.inference_model(), fixed.inference_model())
        got = {m if r == "minmax" else f"{m}/{r}": c
               for r, c in calibrate_blob(blob, run.inputs, run.cfg.ranges_of(m), plain.ops).items()}
    except ConversionError as e:
        run.say(f"{m}: weights not written into the converted model ({e}); converting it through ONNX")
        with tempfile.TemporaryDirectory(prefix="pfld-fix-") as tmp:
            from ..export.onnx import OnnxConfig, to_onnx

            art = to_onnx(fixed, OnnxConfig(path=Path(tmp) / "fixed.onnx", source=run.onnx_artifact.source))
            got = run.calibrated(m, art)
    return got, consts


def _measured(run: _FitRun, cals: dict[str, Calibrated], first_io: str) -> list[Int8Candidate]:
    """Every calibrated candidate's landmark shift on the search crops, in `cals` order."""
    candidates = []
    for m, cal in cals.items():
        s = shift_stats(run.ref, predict_blob(cal.quantize((), first_io), run.pre, run.calib.crops))
        candidates.append(Int8Candidate(m, s))
        run.say(f"{m}: mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px on the search crops")
    return candidates


def _rank_key(cfg: Int8Config, budget: MixedConfig | None) -> Callable[[Int8Candidate], float]:
    """How candidates are ranked: the budget's score with a shift budget, else the mean shift."""
    return (lambda c: cfg.budget.score(c.shift)) if budget else (lambda c: c.shift.mean_px)


def _mixed_search(
    run: _FitRun, cals: dict[str, Calibrated], candidates: list[Int8Candidate], budget: MixedConfig,
    best: Int8Candidate, cal: Calibrated, first_io: str,
) -> tuple[Int8Candidate, Calibrated, list[OpInfo], bool | None]:
    """The fewest float ops that meet the budget, searched from the best candidate (and the best
    float-preserving one when the best bias-corrects); appends each search's result to
    `candidates` and returns the winner, its calibrated model, its float ops and whether it met."""
    from .sensitivity import measure_layers, ranking

    cfg, calib, pre = run.cfg, run.calib, run.pre
    float_ops: list[OpInfo] = []
    met: bool | None = False  # the best candidate missed the budget: why the search runs
    # Bias correction changes the float network on purpose, so floating ops of that variant
    # can never get below its float drift (measured: 0.46 px with 60 float ops on the
    # 17-point fixture); the best float-preserving variant is searched as well.
    bases = [best.method]
    exact = [c for c in candidates if not weight_fix_of(c.method).bias]
    if weight_fix_of(best.method).bias and exact:
        bases.append(min(exact, key=_rank_key(cfg, budget)).method)
    k = min(len(calib.crops), RANKING_CROPS)
    for base in bases:
        run.say(f"ranking ops of {base} for mixed precision")
        sens = measure_layers(cals[base], run.ref[:k], calib.crops[:k], pre, first_io)
        res = search_mixed(cals[base], ranking(sens), run.ref, calib.crops, pre, budget, progress=run.say)
        cand = Int8Candidate(f"{base}{MIXED_SUFFIX}", res.shift, [o.label for o in res.float_ops])
        candidates.append(cand)
        if cfg.budget.score(res.shift) < cfg.budget.score(best.shift):
            best, cal, float_ops, met = cand, cals[base], res.float_ops, res.met
        if met:
            break
    return best, cal, float_ops, met


def _assembled(
    run: _FitRun, io_dtypes: dict[str, str], plain: Calibrated, best: Int8Candidate, cal: Calibrated,
    float_ops: list[OpInfo], met: bool | None, candidates: list[Int8Candidate], equalized: list[str], skipped: list[str],
) -> Int8Fit:
    """The Int8Fit of the chosen candidate: its model per format, plain int8 per format beside it
    (bytes and, when asked, the latency ratio), and the fit's wall and CPU time."""
    from ..export.tflite import compact_tflite

    cfg, calib = run.cfg, run.calib
    deny = [o.tensor for o in float_ops]
    blobs = {name: compact_tflite(cal.quantize(deny, io)) for name, io in io_dtypes.items()}
    fit = Int8Fit(_blobs=blobs, method=best.method, float_ops=[o.label for o in float_ops],
                  float_op_types=float_op_count(next(iter(blobs.values()))) if blobs else {}, candidates=candidates,
                  met=met, search=f"{len(calib.crops)} calibration crops vs the float source", equalized=equalized,
                  recipe=cfg.recipe, skipped=skipped, _uncalibrated=run.uncalibrated,
                  residual=[n for n, io in io_dtypes.items() if io == "float32" and best.method.endswith(RESIDUAL_SUFFIX)])
    for name, io in io_dtypes.items():
        base = compact_tflite(plain.quantize((), io))
        fit._plain[name] = base
        fit.plain_bytes[name] = len(base)
        if cfg.measure_latency and best.method != "plain":
            fit.latency_vs_plain[name] = latency_ratio(blobs[name], base, calib.crops[:1], run.pre)[0]
    fit.seconds = round(time.perf_counter() - run.t0, 3)
    fit.cpu_seconds = round(time.process_time() - run.c0, 3)
    return fit


def _bias_correctable(loaded: Any) -> bool:
    """A built-in PFLD whose layout bias correction knows (any activation)."""
    from ..model import bias_correctable

    config = getattr(getattr(loaded, "meta", None), "model", None)
    return config is not None and bias_correctable(config) and getattr(loaded.meta, "source_format", "") != "model-class"


def _rewritable(loaded: Any) -> bool:
    """Whether the PFLD-specific weight rewrites apply: a built-in PFLD of the standard anatomy."""
    config = getattr(getattr(loaded, "meta", None), "model", None)
    return bool(getattr(config, "standard", False)) and getattr(loaded.meta, "source_format", "") != "model-class"


def _asks_bias_recipe(fixes: Sequence[str]) -> bool:
    """Whether a recipe that bias-corrects the weights was asked for (not the QAT-only "bias" fix)."""
    return any(m in INT8_RECIPES and weight_fix_of(m).bias for m in fixes)


def learned_qat_ranges(loaded: Any | None) -> dict[str, tuple[float, float]] | None:
    """Activation ranges a `pfld-export qat --ranges learned` checkpoint carries (site -> range)."""
    info = loaded.meta.provenance.get("qat") if loaded is not None else None
    if not info or info.get("range_method") != "learned" or not info.get("ranges"):
        return None
    return {k: (float(v[0]), float(v[1])) for k, v in info["ranges"].items()}


def with_site_ranges(cal: Calibrated, site_ranges: dict[str, tuple[float, float]]) -> Calibrated:
    """`cal` with the activation ranges of every op that maps to a QAT site replaced (the
    converter then quantizes with exactly the scales QAT trained against)."""
    from .qat import site_of_label

    ranges = dict(cal.ranges)
    for o in cal.ops:  # execution order, so a PAD sees its producer's new range
        site = site_of_label(o.op, o.label)
        if site in site_ranges:
            lo, hi = site_ranges[site]
            ranges[o.tensor] = (min(lo, 0.0), max(hi, 0.0))
        elif o.op in PASSTHROUGH_OPS and o.inputs and o.inputs[0] in ranges:
            ranges[o.tensor] = ranges[o.inputs[0]]  # data movement keeps its input's scale
    blob = write_ranges(cal.blob, ranges)
    return Calibrated(blob=blob, ops=cal.ops, method="qat-ranges", faces=cal.faces, ranges=ranges)


def _labels(loaded: Any | None) -> list[str] | None:
    if loaded is None:
        return None
    from .sensitivity import conv_labels

    return conv_labels(loaded)


def _fixed_weights(loaded: Any, inputs: np.ndarray, methods: Sequence[str], alpha: float) -> Iterator[tuple[Any, list[str]]]:
    """Copies of `loaded` with equalised (and, for equalize+bias, also bias-corrected) float
    weights, one per method in order; the equalisation is computed once and shared. "bias" is
    bias correction of the weights as they are (for checkpoints whose ranges were learned).
    `inputs`: the fit's preprocessed calibration crops (float32 NHWC)."""
    import torch

    from .equalize import EqualizeConfig, bias_correct, equalize

    x = np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards: one thread avoids oversubscribing shared cores
    try:
        eq = equalize(loaded.inference_model(), x, EqualizeConfig(alpha=alpha)) if any(weight_fix_of(m).equalize for m in methods) else None
        names = [t.name for t in eq.tensors] if eq is not None else []
        for m in methods:
            fix = weight_fix_of(m)
            base = eq.model if eq is not None and fix.equalize else loaded.inference_model()
            net = bias_correct(base, x).model if fix.bias else base
            yield dataclasses.replace(loaded, model=net.pfld), names
    finally:
        torch.set_num_threads(prev)


def int8_config_for(cfg: Any, formats: Sequence[Any]) -> Int8Config | None:
    """The Int8Config a ConvertConfig asks for, or None for the converter's plain int8.

    Budgets need an int8 format to apply to and --max-nme-increase needs --eval-data: both are
    refused up front, before minutes of conversion.
    """
    calibrated = [f for f in formats if f.calibrated]
    asked: Int8Budget = cfg.budget  # its values were checked when it was made
    budget = asked.given
    if budget and not calibrated:
        raise UsageError("--max-shift / --max-nme-increase apply to int8 formats; add --int8 (or --formats int8,full-int8)")
    if asked.max_nme_increase is not None and not cfg.eval_data:
        raise UsageError("--max-nme-increase needs annotated faces to measure NME on; add --eval-data wflw:DIR or 300w:DIR")
    if not calibrated:
        return None
    methods = cfg.int8_methods
    recipe, cap = "methods", None
    if methods is None:
        methods = default_recipes(budget)
        recipe, cap = ("methods", None) if budget else ("default", DEFAULT_MAX_SECONDS)
    asked_cap = getattr(cfg, "int8_max_seconds", None)
    if asked_cap is not None:
        if asked_cap < 0:
            raise UsageError(f"--int8-max-seconds {asked_cap} must be >= 0 (0: no cap)")
        cap = asked_cap or None
    elif tuple(methods) == ("plain",) and not budget:
        return None  # the converter's own plain int8, for comparison with the default
    from ..export.formats import parse_size

    return Int8Config(methods=tuple(methods), budget=dataclasses.replace(asked, max_bytes=parse_size(cfg.size_budget)),
                      max_seconds=cap, recipe=recipe)


def add_budget_checks(rows: Sequence[Any], formats: dict[str, Any], cfg: Any, fit: Int8Fit | None) -> None:
    """Append --max-shift / --max-nme-increase checks (held-out figures) to the calibrated
    formats' validation rows; a failed check names the best figure reached and what was tried.
    An explicit --max-shift replaces the format's goal (a warning) by the user's hard budget."""
    from ..export.validate import Check

    budget: Int8Budget = cfg.budget
    how = _how(fit)
    for row in rows:
        if not formats[row.format].calibrated:
            continue
        if budget.max_shift_px is not None:
            row.checks = [c for c in row.checks if c.name != "goal"]
        if budget.max_shift_px is not None:
            p99_budget = budget.p99_px
            s = row.shift
            ok = s is not None and budget.meets(s)
            got = "not measured" if s is None else f"best reached mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px on {s.faces} held-out faces"
            fix = "" if ok else ("; allow more float ops (--max-float-ops), raise --max-shift, or fine-tune for int8 with "
                                 "`pfld-export qat --ranges learned --equalize --init CKPT --data PHOTOS` and convert "
                                 "that with --reference CKPT; a model you train yourself can train int8-robust with `pfld-export train --int8-noise 8` "
                                 "(measured gains and their NME cost: benchmarks/int8_fidelity.md)")
            row.checks.append(Check("max-shift", ok, f"{got} (budget mean {budget.max_shift_px} px, p99 {p99_budget:g} px) with {how}{fix}",
                                    figure=f"{got}; budget mean {budget.max_shift_px} px, p99 {p99_budget:g} px",
                                    fix="allow more float ops (--max-float-ops) or raise --max-shift; more ways in the FAIL line above"))
        if budget.max_nme_increase is not None:
            inc = row.nme_increase
            ok = inc is not None and inc <= budget.max_nme_increase
            got = "NME not measured" if inc is None else f"best reached NME +{inc:.4f}"
            fix = "" if ok else "; allow more float ops (--max-float-ops) or raise --max-nme-increase (see benchmarks/int8_fidelity.md)"
            row.checks.append(Check("max-nme-increase", ok, f"{got} (budget +{budget.max_nme_increase}) with {how}{fix}",
                                    figure=f"{got}; budget +{budget.max_nme_increase}",
                                    fix="allow more float ops (--max-float-ops) or raise --max-nme-increase"))
        row.settle()


def _how(fit: Int8Fit | None) -> str:
    if fit is None:
        return "plain int8"
    tried = ", ".join(f"{c.method} {c.shift.mean_px:.2f}" for c in fit.candidates)
    floats = f", {len(fit.float_ops)} ops float" if fit.float_ops else ", all ops int8"
    return f"{fit.method}{floats} (tried on search crops, mean px: {tried})"
