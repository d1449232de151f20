"""Stage 0: is the float network the one its authors trained? Measured before anything converts.

A foreign checkpoint's tensors fix its shapes but not everything that moves its landmarks: the
activation (ReLU or ReLU6), whether a bn8 with untouched statistics was applied, and, where no
metadata says, the colour order and normalisation it was fed. Each open choice becomes a set of
candidates; every candidate predicts the same face crops (the calibration faces: real photos
when given, synthetic faces otherwise) and is scored for plausibility:

  * the share of points inside the crop (a face crop holds its landmarks);
  * a face-sized spread (points neither collapsed onto one spot nor spread past the crop).

The best candidate wins when it beats the others by `MARGIN`; candidates that predict the same
landmarks (within `AGREE_PX`) are interchangeable and the conventional one is kept; otherwise
resolution stops with one line naming the flag to set. Explicit flags always win. A PFLD-pytorch
checkpoint's source format names its preprocessing (its data loader: OpenCV BGR, x / 255): that
convention is kept unless a measured candidate beats it by the margin.

With the author's own ONNX export (`--reference-onnx`) stage 0 is exact instead: our network
must reproduce it to `REFERENCE_ATOL` on random and real inputs, and the open choices are settled
by which candidate does.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from .checkpoint import LoadedModel, load_checkpoint
from .errors import ToleranceError, UsageError
from .preprocess import Preprocess

MARGIN = 0.02  # plausibility score units (share of points): below this two candidates tie
AGREE_PX = 0.25  # mean landmark distance (px at 112) under which two candidates are the same answer
MAX_OUTSIDE = 0.02  # more points than this outside the crop on face crops: the float model is implausible
SPREAD_RANGE = (0.08, 0.5)  # RMS distance of the points from their centroid, as a share of the crop side
REFERENCE_ATOL = 1e-4  # our network vs the author's ONNX export, normalised output units
RANDOM_INPUTS = 4
SYNTHETIC_FACES = 32
MAX_FACES = 32  # faces per candidate: enough for the shares scored, and 12 candidates stay cheap

# Normalisations a foreign model was commonly trained with, after x / 255: (name, mean, std).
NORMALISATIONS: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("[0,1]", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ("[-1,1]", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
)
# What each model field's candidates are, the conventional value first (kept on a tie of equal answers).
FIELD_CANDIDATES: dict[str, tuple[Any, ...]] = {"activation": ("relu", "relu6"), "head_bn": (False, True)}
FIELD_FLAGS: dict[str, str] = {"activation": "--activation relu|relu6", "head_bn": "--bn8 on|off",
                               "preprocess": "--color BGR|RGB --mean M --std S"}
# Source formats whose training code fixes the preprocessing (PFLD-pytorch: cv2.imread, ToTensor).
CONVENTIONS: dict[str, Preprocess] = {"pfld-pytorch": Preprocess(), "bare-state-dict": Preprocess()}
OWN_FORMAT = "pfld-export"


@dataclass(frozen=True)
class Plausibility:
    """How face-like one candidate's landmarks are on the stage-0 crops."""

    outside: float  # share of points outside the crop
    bad_spread: float  # share of faces whose points are collapsed or spread past a face's size
    score: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "score", round(1.0 - self.outside - 0.5 * self.bad_spread, 6))


@dataclass
class Stage0Result:
    """What stage 0 settled and how: every open choice with its source (measured, flag,
    convention, reference), the winner's plausibility and its margin over the runner-up."""

    choices: dict[str, Any]
    how: dict[str, str]
    plausibility: Plausibility
    margins: dict[str, float]  # per measured choice: winner's score minus the best candidate answering otherwise
    faces: int
    crops: str  # which faces were used
    candidates: list[dict[str, Any]]
    reference: dict[str, Any] | None = None  # --reference-onnx comparison
    gated: bool = True  # False: our own checkpoint, described by its metadata; plausibility is informational
    passed: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{k}={_show(v)} ({self.how[k]})" for k, v in self.choices.items()]
        if self.reference:
            parts.append(f"reference ONNX max diff {self.reference['max_diff']:.2g}")
        p = self.plausibility
        parts.append(f"{100 * p.outside:.1f} % points outside the crop on {self.faces} {self.crops}")
        # A kept convention's "margin" is how far the best other candidate was ahead (under MARGIN).
        parts += [f"{k} margin {v:.3f}" if v >= 0 else f"{k}: best other candidate ahead by {-v:.3f} (< {MARGIN}), convention kept"
                  for k, v in self.margins.items()]
        return "; ".join(parts)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, dict):
        return f"{v['color']} mean {tuple(v['mean'])} std {tuple(v['std'])}"
    return str(v)


def plausibility(points: np.ndarray, size: int) -> Plausibility:
    """Score landmarks [N, P, 2] in crop pixels of `size`-px crops."""
    pts = np.asarray(points, np.float64)
    if not np.isfinite(pts).all():
        return Plausibility(outside=1.0, bad_spread=1.0)
    outside = float(((pts < 0) | (pts > size)).any(-1).mean())
    if pts.shape[1] < 3:  # too few points for a spread
        return Plausibility(outside=outside, bad_spread=0.0)
    rms = np.sqrt(((pts - pts.mean(1, keepdims=True)) ** 2).sum(-1).mean(1)) / size
    lo, hi = SPREAD_RANGE
    return Plausibility(outside=outside, bad_spread=float(((rms < lo) | (rms > hi)).mean()))


def synthetic_crops(count: int = SYNTHETIC_FACES, size: int = 112, seed: int = 0) -> np.ndarray:
    """Procedural face crops in memory (1.2x landmark box), for when no real faces are given."""
    from .data.synthetic import face_rng, render_face
    from .preprocess import crop_from_landmarks

    crops = []
    for i in range(count):
        img, pts, _, _ = render_face(face_rng(seed, i))
        crops.append(crop_from_landmarks(img, pts, 1.2, size)[0])
    return np.stack(crops)


def _predict(loaded: LoadedModel, pre: Preprocess, crops: np.ndarray) -> np.ndarray:
    import torch

    net = loaded.inference_model()
    with torch.no_grad():
        out = net(torch.from_numpy(pre.apply_nchw(crops))).numpy()
    return out.reshape(len(crops), -1, 2) * pre.input_size


def preprocess_candidates(base: Preprocess, given: Mapping[str, Any] | None = None) -> list[Preprocess]:
    """Every colour order x usual normalisation agreeing with the flags `given` (color / mean /
    std), keeping `base`'s scale, size and layout."""
    given = dict(given or {})
    cands = [dataclasses.replace(base, color=c, mean=m, std=s) for c in ("BGR", "RGB") for _, m, s in NORMALISATIONS]
    return [p for p in cands if all(getattr(p, k) == v for k, v in given.items())]


def resolve(
    path: str | os.PathLike[str],
    crops: np.ndarray | None = None,
    crops_what: str = "synthetic faces",
    flags: Mapping[str, Any] | None = None,
    preprocess: Preprocess | None = None,
    reference_onnx: str | os.PathLike[str] | None = None,
    given: Mapping[str, Any] | None = None,
) -> tuple[LoadedModel, Stage0Result]:
    """Load a checkpoint with every choice its tensors leave open settled (flag, reference or
    measurement), and the float model checked for plausibility.

    `flags`: explicit `ModelConfig` fields (activation, head_bn). `preprocess`: explicit
    preprocessing (None: the file's metadata, its source format's convention, or measured).
    `given`: preprocessing fields set by flags (color / mean / std) over either; only the fields
    they leave open are measured. Raises UsageError naming the flag when a choice is too close to
    call, and ToleranceError when `reference_onnx` disagrees with every candidate.
    """
    flags = dict(flags or {})
    return resolve_with(lambda combo: load_checkpoint(path, preprocess=preprocess, overrides={**flags, **combo}),
                        Path(path), crops, crops_what, flags, preprocess, reference_onnx, given)


def resolve_with(
    load: Callable[[dict[str, Any]], LoadedModel],
    path: Path,
    crops: np.ndarray | None,
    crops_what: str,
    flags: Mapping[str, Any],
    preprocess: Preprocess | None,
    reference_onnx: str | os.PathLike[str] | None = None,
    given: Mapping[str, Any] | None = None,
) -> tuple[LoadedModel, Stage0Result]:
    """`resolve` for any loader: `load(choices)` builds the network with those open fields set
    (a `--model-class` network has none open; only its preprocessing may be)."""
    base = load({})
    crops, crops_what = _stage0_crops(crops, crops_what, base.meta.preprocess.input_size)
    opened = [f for f in base.meta.provenance.get("open", []) if f not in flags]
    how: dict[str, str] = {k: "flag" for k in flags}
    foreign = base.meta.source_format != OWN_FORMAT
    pres, convention = _preprocess_choices(base.meta.preprocess, base.meta.source_format, preprocess is not None or not foreign,
                                           dict(given or {}))
    pre_fixed = len(pres) == 1
    fields = {f: FIELD_CANDIDATES[f] for f in opened}
    combos = [dict(zip(fields, vals)) for vals in itertools.product(*fields.values())] or [{}]
    loaded_by = {tuple(combo.values()): base if not combo else load(combo) for combo in combos}
    rows, preds = _score_candidates(combos, loaded_by, pres, crops)

    ref_result = None
    if reference_onnx is not None:
        ref_result, rows = _keep_matching_reference(reference_onnx, path, loaded_by, rows, crops, pres[0])
        how.update({f: "reference ONNX" for f in opened})
    choices, margins = _settle_fields(opened, rows, preds, how, measured=ref_result is None,
                                      context=(Path(path).name, len(crops), crops_what))
    key = tuple(choices[f] for f in opened)
    winners = [r for r in rows if tuple(r["choice"].values()) == key]
    pre_i = max(winners, key=lambda r: r["plausibility"].score)["preprocess"]
    if not pre_fixed:
        pre_i, how["preprocess"], pre_margin = _pick_preprocess(winners, pres, convention, preds, key, Path(path).name, len(crops), crops_what)
        margins["preprocess"] = round(pre_margin, 4)
        choices["preprocess"] = pres[pre_i].to_dict()
    chosen = loaded_by[key]
    chosen.meta.preprocess = pres[pre_i]
    chosen.meta.provenance["inferred"] = {**chosen.meta.provenance.get("inferred", {}), **how}
    chosen.meta.provenance["open"] = []
    win = next(r for r in winners if r["preprocess"] == pre_i)["plausibility"]
    result = Stage0Result(
        choices=choices, how=how, plausibility=win, margins=margins, faces=len(crops), crops=crops_what,
        candidates=[{"choice": {**r["choice"], "preprocess": _show(pres[r["preprocess"]].to_dict())},
                     "score": r["plausibility"].score, "outside": r["plausibility"].outside} for r in rows],
        reference=ref_result, gated=foreign,
    )
    chosen.meta.provenance["stage0"] = {"how": how, "margins": margins, "outside": win.outside, "faces": len(crops), "crops": crops_what}
    return chosen, result


def _stage0_crops(crops: np.ndarray | None, what: str, size: int) -> tuple[np.ndarray, str]:
    """The faces every candidate predicts: synthetic when none are given, else an even spread of at most `MAX_FACES`."""
    if crops is None:
        return synthetic_crops(size=size), "synthetic faces"
    if len(crops) > MAX_FACES:  # each candidate runs them all
        crops = crops[np.linspace(0, len(crops) - 1, MAX_FACES).round().astype(int)]
    return crops, what


def _preprocess_choices(base: Preprocess, source_format: str, fixed: bool,
                        given: dict[str, Any]) -> tuple[list[Preprocess], Preprocess | None]:
    """The preprocessing candidates stage 0 scores, and the source format's convention among them.

    One candidate when it is fixed (explicit, our own metadata, or every field flagged); else the
    usual ones agreeing with the flags, or, when the flags name an unusual value, each usual one
    with the flags applied (the value is the user's; what it leaves open is still measured)."""
    if fixed:
        return [dataclasses.replace(base, **given)], None
    pres = preprocess_candidates(base, given)
    if not pres:
        pres = list({p: None for p in (dataclasses.replace(c, **given) for c in preprocess_candidates(base))})
    convention = CONVENTIONS.get(source_format)
    if convention is not None:
        convention = dataclasses.replace(convention, **given)
        if not any((p.color, p.mean, p.std) == (convention.color, convention.mean, convention.std) for p in pres):
            convention = None
    return pres, convention


def _score_candidates(combos: list[dict[str, Any]], loaded_by: dict[tuple[Any, ...], LoadedModel], pres: list[Preprocess],
                      crops: np.ndarray) -> tuple[list[dict[str, Any]], dict[tuple[Any, ...], np.ndarray]]:
    """Every network x preprocessing candidate on the crops: one row each (choice, preprocess
    index, plausibility) and the landmarks keyed by the choice values plus the preprocess index."""
    rows: list[dict[str, Any]] = []
    preds: dict[tuple[Any, ...], np.ndarray] = {}
    for combo in combos:
        key = tuple(combo.values())
        for i, pre in enumerate(pres):
            pts = _predict(loaded_by[key], pre, crops)
            preds[key + (i,)] = pts
            rows.append({"choice": combo, "preprocess": i, "plausibility": plausibility(pts, pre.input_size)})
    return rows, preds


def _keep_matching_reference(reference_onnx: str | os.PathLike[str], path: Path, loaded_by: dict[tuple[Any, ...], LoadedModel],
                             rows: list[dict[str, Any]], crops: np.ndarray,
                             pre: Preprocess) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rows of the networks that reproduce the author's export; ToleranceError when none does."""
    ref_result, matching = _match_reference(reference_onnx, loaded_by, crops, pre)
    if not matching:
        raise ToleranceError(
            f"stage 0: {Path(path).name} vs its author's export {Path(reference_onnx).name}", ref_result["max_diff"], REFERENCE_ATOL,
            "the network built from the weights is not the one the author ran; check --activation / --bn8, "
            "or convert the author's ONNX directly")
    return ref_result, [r for r in rows if tuple(r["choice"].values()) in matching]


def _settle_fields(opened: list[str], rows: list[dict[str, Any]], preds: dict[tuple[Any, ...], np.ndarray],
                   how: dict[str, str], measured: bool, context: tuple[str, int, str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Each open network field from the best row: measured when it wins by `MARGIN` against the
    best row answering otherwise (same preprocessing), the conventional value when the two agree
    within `AGREE_PX`, else UsageError naming the flag. `how` gains each field's source."""
    best = max(rows, key=lambda r: r["plausibility"].score)
    margins: dict[str, float] = {}
    choices: dict[str, Any] = {f: best["choice"][f] for f in opened}
    for f in opened if measured else []:
        rivals = [r for r in rows if r["choice"][f] != best["choice"][f] and r["preprocess"] == best["preprocess"]]
        rival = max(rivals, key=lambda r: r["plausibility"].score)
        gap = best["plausibility"].score - rival["plausibility"].score
        margins[f] = round(gap, 4)
        if gap >= MARGIN:
            how[f] = "measured"
            continue
        a = preds[tuple(best["choice"].values()) + (best["preprocess"],)]
        b = preds[tuple(rival["choice"].values()) + (rival["preprocess"],)]
        if float(np.linalg.norm(a - b, axis=-1).mean()) <= AGREE_PX:
            choices[f] = FIELD_CANDIDATES[f][0]
            how[f] = "measured (candidates agree; conventional value kept)"
            continue
        name, faces, what = context
        raise UsageError(
            f"stage 0 cannot tell {f} of {name} from face crops (plausibility {best['plausibility'].score:.3f} "
            f"vs {rival['plausibility'].score:.3f} on {faces} {what}); set it: {FIELD_FLAGS[f]}")
    return choices, margins


def _pick_preprocess(rows: list[dict[str, Any]], pres: list[Preprocess], convention: Preprocess | None,
                     preds: dict[tuple[Any, ...], np.ndarray], key: tuple[Any, ...], name: str, faces: int,
                     what: str) -> tuple[int, str, float]:
    ranked = sorted(rows, key=lambda r: -r["plausibility"].score)
    best, runner = ranked[0], ranked[1]
    gap = best["plausibility"].score - runner["plausibility"].score
    if convention is not None:
        conv_i = next(i for i, p in enumerate(pres) if (p.color, p.mean, p.std) == (convention.color, convention.mean, convention.std))
        conv = next(r for r in rows if r["preprocess"] == conv_i)
        if best["plausibility"].score - conv["plausibility"].score < MARGIN:
            return conv_i, "convention of the source format, consistent with measurement", conv["plausibility"].score - best["plausibility"].score
        return best["preprocess"], "measured (beats the source format's convention)", best["plausibility"].score - conv["plausibility"].score
    if gap >= MARGIN:
        return best["preprocess"], "measured", gap
    a, b = preds[key + (best["preprocess"],)], preds[key + (runner["preprocess"],)]
    if float(np.linalg.norm(a - b, axis=-1).mean()) <= AGREE_PX:
        return best["preprocess"], "measured (candidates agree)", gap
    raise UsageError(
        f"stage 0 cannot tell how {name} was fed (colour order / normalisation: {_show(pres[best['preprocess']].to_dict())} "
        f"scores {best['plausibility'].score:.3f}, {_show(pres[runner['preprocess']].to_dict())} {runner['plausibility'].score:.3f} "
        f"on {faces} {what}); set it: {FIELD_FLAGS['preprocess']}")


def reference_outputs(path: str | os.PathLike[str], inputs: np.ndarray, values: int) -> np.ndarray:
    """Run an author's ONNX export on NCHW float inputs; the output holding `values` numbers per face."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # forks export weights as graph inputs: ORT warns once per tensor
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise UsageError(f"--reference-onnx {path} cannot be opened by ONNX Runtime ({str(e).splitlines()[0][:160]}); pass the author's .onnx export") from None
    outs = sess.get_outputs()
    pick = [o for o in outs if int(np.prod([d if isinstance(d, int) else 1 for d in o.shape])) == values]
    if len(pick) != 1:
        shapes = ", ".join(f"{o.name} {o.shape}" for o in outs)
        raise UsageError(f"--reference-onnx {Path(path).name}: no single output holds {values} values per face ({shapes}); "
                         "pass the export of this checkpoint")
    inp = sess.get_inputs()[0]
    shape = inp.shape
    nhwc = len(shape) == 4 and shape[-1] == 3
    rows = []
    for i in range(len(inputs)):
        x = inputs[i : i + 1]
        rows.append(sess.run([pick[0].name], {inp.name: x.transpose(0, 2, 3, 1) if nhwc else x})[0].reshape(1, -1))
    return np.concatenate(rows, 0)


def _match_reference(path: str | os.PathLike[str], loaded_by: dict[tuple[Any, ...], LoadedModel], crops: np.ndarray,
                     pre: Preprocess) -> tuple[dict[str, Any], set[tuple[Any, ...]]]:
    import torch

    rng = np.random.default_rng(0)
    size = pre.input_size
    real = pre.apply_nchw(crops[: min(len(crops), 16)])
    rand = rng.random((RANDOM_INPUTS, 3, size, size), dtype=np.float32)
    x = np.concatenate([rand, real], 0).astype(np.float32)
    any_loaded = next(iter(loaded_by.values()))
    ref = reference_outputs(path, x, 2 * any_loaded.num_points)
    diffs: dict[tuple[Any, ...], float] = {}
    for key, loaded in loaded_by.items():
        with torch.no_grad():
            ours = loaded.inference_model()(torch.from_numpy(x)).numpy()
        diffs[key] = float(np.abs(ours - ref).max())
    matching = {k for k, d in diffs.items() if d <= REFERENCE_ATOL}
    best = min(diffs.values())
    return ({"path": str(path), "max_diff": best, "atol": REFERENCE_ATOL, "inputs": f"{RANDOM_INPUTS} random + {len(real)} real",
             "candidates": {"/".join(map(str, k)) or "as loaded": d for k, d in diffs.items()}}, matching)


def require_plausible(result: Stage0Result, name: str) -> None:
    """Stop a conversion whose float model does not look like a face-landmark model on faces."""
    p = result.plausibility
    if not result.gated or (p.outside <= MAX_OUTSIDE and p.bad_spread <= 0.1):
        return
    result.passed = False
    raise UsageError(
        f"stage 0: {name} puts {100 * p.outside:.1f} % of points outside the crop ({100 * p.bad_spread:.0f} % of faces "
        f"with a non-face spread) on {result.faces} {result.crops}: the float model is implausible before any conversion; "
        "likely causes: wrong activation (--activation), preprocessing (--color/--mean/--std), a crop convention other than "
        "1.2x the face box, or not a landmark model; pass --reference-onnx with the author's export to check exactly")


@dataclass
class ModelInfo:
    """What `pfld-export info` shows: the configuration with where each field came from."""

    path: str
    source_format: str
    width: float
    points: int
    conv2: str
    head_bn: bool
    layout: str
    parameters: int
    macs: int
    float32_bytes: int
    int8_bytes: int
    has_auxiliary: bool
    preprocess: dict[str, Any]
    epoch: int | None = None
    channels: tuple[int, ...] = ()
    activation: str = "relu"
    conv_bias: bool = False
    head: str = "pool"
    input_size: int = 112
    sources: dict[str, str] = field(default_factory=dict)  # field -> tensors | metadata | flag | measured ...
    stage0: str = ""


def model_info(path: str | os.PathLike[str], calib: str | None = None, flags: Mapping[str, Any] | None = None) -> ModelInfo:
    """Configuration and cost of the inference network (auxiliary branch excluded), with every
    choice the tensors leave open measured on face crops (`calib` folder, else synthetic faces)."""
    from .model import count_parameters, macs

    crops, what = None, "synthetic faces"
    if calib is not None:
        from .export.calibrate import calibration_crops

        crops = calibration_crops(calib, load_checkpoint(path).meta.preprocess, MAX_FACES, minimum=1).crops
        what = "calibration faces"
    loaded, result = resolve(path, crops, what, flags)
    net = loaded.inference_model()
    n = count_parameters(net)
    epoch = loaded.extra.get("epoch", loaded.meta.training.get("epoch"))
    m = loaded.meta.model
    return ModelInfo(
        path=str(path), source_format=loaded.meta.source_format, width=m.width, points=m.points, conv2=m.conv2,
        head_bn=m.head_bn, layout=loaded.meta.preprocess.layout, parameters=n, macs=macs(net, m.input_size),
        float32_bytes=4 * n, int8_bytes=n, has_auxiliary=loaded.aux is not None, preprocess=loaded.meta.preprocess.to_dict(),
        epoch=int(epoch) if epoch is not None else None, channels=tuple(m.channels or ()), activation=m.activation,
        conv_bias=m.conv_bias, head=m.head, input_size=m.input_size, sources=dict(loaded.meta.provenance.get("inferred", {})),
        stage0=result.summary(),
    )


class Probe(Protocol):
    """What measuring a model's preprocessing needs of an opened model (a `runtime.Predictor`)."""

    name: str
    preprocess: Preprocess
    num_points: int

    def predict(self, crops: np.ndarray) -> np.ndarray: ...


def measure_preprocess(model: Probe, given: Mapping[str, Any], crops: np.ndarray | None = None,
                       crops_what: str = "synthetic faces") -> tuple[Preprocess, str, float]:
    """How an opened model without preprocessing metadata (a foreign ONNX) must be fed: the
    candidates consistent with the flags `given` (color / mean / std) scored on face crops.
    Returns (preprocess, how, margin); UsageError naming the missing flags when the crops cannot
    tell. `model.preprocess` is left as it was."""
    opened_with = model.preprocess
    size = opened_with.input_size
    crops, crops_what = _stage0_crops(crops, crops_what, size)
    layout = dataclasses.replace(opened_with, layout=f"custom{model.num_points}")
    cands = preprocess_candidates(layout, given)
    missing = [f"--{k}" for k in ("color", "mean", "std") if k not in given]
    if not cands:  # e.g. --mean 0.3 alone: not one of the usual pairs, so nothing to measure
        raise UsageError(f"{model.name} carries no preprocessing metadata and {', '.join(f'--{k}' for k in given)} "
                         f"alone matches no usual normalisation; give {' and '.join(missing)} too")
    scored = []
    try:
        for p in cands:
            model.preprocess = p
            pts = model.predict(crops)
            scored.append((plausibility(pts, size).score, p, pts))
    finally:
        model.preprocess = opened_with
    scored.sort(key=lambda t: -t[0])
    best_p = plausibility(scored[0][2], size)
    if best_p.outside > MAX_OUTSIDE or best_p.bad_spread > 0.1:
        raise UsageError(
            f"{model.name} carries no preprocessing metadata and no usual preprocessing makes it predict face-shaped "
            f"landmarks on {len(crops)} {crops_what} (best: {100 * best_p.outside:.0f} % of points outside the crop); "
            f"say how it was trained with {' '.join(m + ' ...' for m in missing) or '--color --mean --std'}")
    if len(scored) == 1:
        return scored[0][1], "flags", 0.0
    (s1, p1, a), (s2, p2, b) = scored[0], scored[1]
    if s1 - s2 >= MARGIN:
        return p1, "measured", s1 - s2
    if float(np.linalg.norm(a - b, axis=-1).mean()) <= AGREE_PX:
        return p1, "measured (candidates agree)", s1 - s2
    raise UsageError(
        f"{model.name} carries no preprocessing metadata and face crops cannot tell how it was fed "
        f"({_show(p1.to_dict())} scores {s1:.3f}, {_show(p2.to_dict())} {s2:.3f} on {len(crops)} {crops_what}); "
        f"say how it was trained with {' '.join(m + ' ...' for m in missing)} (e.g. GhostOne PFLD: --color RGB --mean 0.5 --std 0.5)")
