"""Check every .tflite: ops, names and shapes, landmark shift, NME and size against the registry.

Optimum-style order: I/O names first, then shapes and dtypes, then values (landmark shift on
held-out real crops against the float source, then NME on --eval-data). A file whose names or
shapes are wrong is not compared by value: the numbers would be meaningless.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..runtime import open_predictor, tflite_interpreter_class
from .formats import ExportFormat, format_size
from .onnx import INPUT_NAME, OUTPUT_NAME
from .tflite import TfliteArtifact


@dataclass
class OpsReport:
    """Operators in a .tflite and how many of them XNNPACK takes."""

    counts: dict[str, int]  # op name -> occurrences
    non_builtin: list[str]  # custom / Flex (SELECT_TF_OPS) ops: need a special runtime on phones
    delegated: int  # nodes XNNPACK runs
    total: int  # nodes in the graph
    undelegated: dict[str, int]  # op name -> nodes left to the reference kernels
    builtin_only: bool = field(init=False)  # fields, not properties, so report.json carries them
    xnnpack_coverage: float = field(init=False)

    def __post_init__(self) -> None:
        self.builtin_only = not self.non_builtin
        self.xnnpack_coverage = self.delegated / self.total if self.total else 0.0


@dataclass
class ShiftStats:
    """Per-point landmark distance (px at 112) between a candidate and its float source."""

    faces: int
    mean_px: float
    p99_px: float
    max_px: float


@dataclass
class Check:
    """One pass/fail line: what was checked, whether it held, and the numbers."""

    name: str
    ok: bool
    detail: str
    # For the one error line a failed run ends with (the FAIL lines above it carry `detail`):
    figure: str = ""  # the number that missed, short; empty: `detail` is short already
    fix: str = ""  # the main way to meet it, short
    # A check that, when it does not hold, is a WARNING line (the figure, what would fix it) and
    # leaves the format passed: a goal, or the size of a format converted only as the reference.
    warn: bool = False


@dataclass
class ValidateConfig:
    """What every file is held to besides its format's budget."""

    size_budget: int = 2_000_000  # bytes per .tflite (the paper's ~2 MB target)
    # Formats converted only as the reference the shipped ones are read against (fp32 under
    # --int8): their size is reported against the budget, never a failure.
    reference_formats: tuple[str, ...] = ()
    eval_records: Sequence[Any] | None = None  # FaceRecords for NME (--eval-data), or None
    eval_config: Any | None = None  # evaluate.EvalConfig, default when None
    reference_nme: float | None = None  # NME of the float source on eval_records


@dataclass
class FormatValidation:
    """Everything known about one .tflite after validation."""

    format: str
    path: Path
    bytes: int
    ops: OpsReport
    shift: ShiftStats | None
    nme: float | None
    nme_increase: float | None
    input_quant: dict[str, float] | None
    output_quant: dict[str, float] | None
    checks: list[Check] = field(default_factory=list)
    passed: bool = False  # every check held (warnings aside); set by validate_tflite once the checks are in
    plain_shift: ShiftStats | None = None  # a fitted int8 format: what plain int8 gives on the same held-out faces

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.warn]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.warn]

    def settle(self) -> None:
        """Set `passed` from the checks: every one held, or only warns."""
        self.passed = not self.failures


def tflite_ops(path: str | Path) -> OpsReport:
    """Parse the flatbuffer for op names (custom/Flex ops included, which an interpreter without
    Flex cannot even load), then load it with the default XNNPACK delegate to see what it takes."""
    from ai_edge_litert import schema_py_generated as schema

    buf = Path(path).read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for oc in model.operatorCodes:
        # Builtin codes >= 127 live in `builtinCode`; older files only fill the deprecated byte.
        code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        custom = oc.customCode.decode() if isinstance(oc.customCode, bytes) else oc.customCode
        codes.append(custom if code == schema.BuiltinOperator.CUSTOM else names.get(code, f"BUILTIN_{code}"))
    counts: Counter[str] = Counter()
    non_builtin: set[str] = set()
    for sg in model.subgraphs:
        for op in sg.operators or []:
            name = codes[op.opcodeIndex]
            counts[name] += 1
            if name not in names.values():
                non_builtin.add(name)
    delegated, total, undelegated = _xnnpack_coverage(path) if not non_builtin else (0, sum(counts.values()), dict(counts))
    return OpsReport(counts=dict(counts), non_builtin=sorted(non_builtin), delegated=delegated, total=total, undelegated=undelegated)


def _xnnpack_coverage(path: str | Path) -> tuple[int, int, dict[str, int]]:
    """Nodes inside XNNPACK partitions: walk back from each DELEGATE node's outputs to its inputs.

    The interpreter keeps the original nodes and appends one DELEGATE node per partition; the
    partition is exactly the nodes between that node's input and output tensors.
    """
    interp = tflite_interpreter_class()(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    ops = interp._get_ops_details()  # public API has no op list; this is what the TF tools use
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): o["index"] for o in original for t in o["outputs"]}
    by_index = {o["index"]: o for o in original}
    inside: set[int] = set()
    for d in (o for o in ops if o["op_name"] == "DELEGATE"):
        stop = {int(t) for t in d["inputs"]}
        todo = [int(t) for t in d["outputs"]]
        while todo:
            t = todo.pop()
            n = producer.get(t)
            if t in stop or n is None or n in inside:
                continue
            inside.add(n)
            todo.extend(int(x) for x in by_index[n]["inputs"] if x >= 0)
    left = Counter(o["op_name"] for o in original if o["index"] not in inside)
    return len(inside), len(original), dict(left)


def shift_stats(reference: np.ndarray, candidate: np.ndarray) -> ShiftStats:
    """Distances between matching points [N, P, 2] (px): mean, 99th percentile and max."""
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"landmark arrays differ in shape: {ref.shape} vs {got.shape}")
    d = np.linalg.norm(got - ref, axis=-1).ravel()
    return ShiftStats(faces=int(ref.shape[0]), mean_px=float(d.mean()), p99_px=float(np.percentile(d, 99)), max_px=float(d.max()))


def validate_tflite(
    artifact: TfliteArtifact, fmt: ExportFormat, reference_points: np.ndarray, crops: np.ndarray, cfg: ValidateConfig,
) -> FormatValidation:
    """Check one .tflite against `fmt`'s budgets and `cfg`; never raises for a failed budget.

    `reference_points` are the float source's predictions on `crops` (held-out real faces).
    """
    ops = tflite_ops(artifact.path)
    res = FormatValidation(format=fmt.name, path=artifact.path, bytes=artifact.path.stat().st_size, ops=ops, shift=None,
                           nme=None, nme_increase=None, input_quant=artifact.input_quant, output_quant=artifact.output_quant)
    res.checks.append(Check("ops", ops.builtin_only, "all TFLite builtins" if ops.builtin_only else f"non-builtin ops {ops.non_builtin}: needs Flex/custom runtime"))
    names_ok, shapes_ok, io_detail = _io_checks(artifact.path, fmt, reference_points.shape[1], crops.shape[1])
    res.checks.append(Check("names", names_ok, io_detail["names"]))
    res.checks.append(Check("shapes", shapes_ok, io_detail["shapes"]))
    if names_ok and shapes_ok and ops.builtin_only:
        pred = open_predictor(artifact.path)
        res.shift = shift_stats(reference_points, pred.predict(crops))
        b = fmt.budget
        ok = res.shift.mean_px <= b.shift_mean_px and res.shift.max_px <= b.shift_max_px
        res.checks.append(Check("shift", ok, f"mean {res.shift.mean_px:.3g} px (budget {b.shift_mean_px}), max {res.shift.max_px:.3g} px (budget {b.shift_max_px}) on {res.shift.faces} held-out faces"))
        if cfg.eval_records is not None and cfg.reference_nme is not None:
            res.nme = nme_of(pred, cfg.eval_records, cfg.eval_config)
            res.nme_increase = res.nme - cfg.reference_nme
            res.checks.append(Check("nme", res.nme_increase <= b.nme_increase, f"NME {res.nme:.4f} vs source {cfg.reference_nme:.4f}: +{res.nme_increase:.4f} (budget +{b.nme_increase})"))
        if b.goal_mean_px is not None:
            res.checks.append(goal_check(res.shift, b))
    else:
        res.checks.append(Check("shift", False, "not compared: names, shapes or ops are wrong"))
    ref_only = fmt.name in cfg.reference_formats
    res.checks.append(Check("size", res.bytes <= cfg.size_budget, f"{format_size(res.bytes)} (budget {format_size(cfg.size_budget)})"
                            + ("; converted only as the reference the int8 formats are read against, not shipped" if ref_only else ""),
                            warn=ref_only))
    res.settle()
    return res


def goal_check(s: ShiftStats, b: Any) -> Check:
    """The int8 goal of format budget `b` (mean and p99 shift) as a warning check."""
    ok = s.mean_px <= b.goal_mean_px and (b.goal_p99_px is None or s.p99_px <= b.goal_p99_px)
    detail = (f"mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px on {s.faces} held-out faces (goal mean {b.goal_mean_px} px, "
              f"p99 {b.goal_p99_px} px)")
    if not ok:
        detail += ("; landmarks move more than the int8 goal: --max-shift makes it a hard budget (exit 7), "
                   "benchmarks/int8_fidelity.md lists what closes the gap (QAT, --int8-noise training)")
    return Check("goal", ok, detail, warn=True)


def nme_of(predictor: Any, records: Sequence[Any], eval_config: Any | None = None) -> float:
    """Mean NME of `predictor` on annotated records, through evaluate.evaluate."""
    from ..evaluate import EvalConfig, evaluate

    return float(evaluate(predictor, list(records), eval_config if eval_config is not None else EvalConfig()).nme_mean)


def _io_checks(path: Path, fmt: ExportFormat, points: int, size: int) -> tuple[bool, bool, dict[str, str]]:
    interp = tflite_interpreter_class()(model_path=str(path))
    sig = interp.get_signature_list().get("serving_default", {})
    names = (list(sig.get("inputs", [])), list(sig.get("outputs", [])))
    names_ok = names == ([INPUT_NAME], [OUTPUT_NAME])
    i, o = interp.get_input_details(), interp.get_output_details()
    got = [(tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]).name) for d in (i + o)]
    want = [((1, size, size, 3), fmt.io_dtype), ((1, 2 * points), fmt.io_dtype)]
    shapes_ok = got == want
    return names_ok, shapes_ok, {
        "names": f"{names[0]} -> {names[1]}" + ("" if names_ok else f" (expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}'])"),
        "shapes": ", ".join(f"{s} {t}" for s, t in got) + ("" if shapes_ok else f" (expected {want})"),
    }
