"""int8 fidelity ablation: every int8 recipe of pfld_export/quant/ (INT8_RECIPES) and its settings, measured alone.

    python benchmarks/int8_ablation.py --model out/models/w100/best.pth --model ... \
        --json benchmarks/results/int8_ablation.json

For each checkpoint: calibration crops are the real faces of ../shared/fixtures/unlabeled found by
the default detector, split by source image into calibration and held-out validation (the
convert pipeline's own split). Every variant is an int8 TFLite built by the real converter and
run with the real kernels; figures are held-out landmark shifts against the float PyTorch model
(px at 112), NME on annotated faces (wflw98 fixture for 98-point models, plus held-out
synthetic faces), file size, and latency relative to the converter's plain int8 model in the
same run (ai-edge-litert XNNPACK, 1 thread, interleaved rounds, median).

Results go to --json (one entry per model and variant) and are summarised by hand in
benchmarks/int8_fidelity.md. Nothing here is a test: it is slow (minutes per model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"

from pfld_export.export.calibrate import CalibrationSet, calibration_and_validation  # noqa: E402
from pfld_export.export.formats import FORMATS  # noqa: E402
from pfld_export.export.onnx import OnnxConfig, to_onnx  # noqa: E402
from pfld_export.export.pipeline import ConvertConfig, load_source  # noqa: E402
from pfld_export.export.tflite import convert_one, compact_tflite  # noqa: E402
from pfld_export.export.validate import nme_of, shift_stats  # noqa: E402
from pfld_export.quant.budget import DEFAULT_MAX_SLOWDOWN, Int8Budget  # noqa: E402
from pfld_export.quant.equalize import EqualizeConfig, bias_correct, equalize  # noqa: E402
from pfld_export.quant.graph import calibrate, float_op_count, keras_function, latency_ratio, predict_blob  # noqa: E402
from pfld_export.quant.recipes import INT8_RECIPES  # noqa: E402
from pfld_export.quant.search import MixedConfig, search_mixed  # noqa: E402
from pfld_export.quant.sensitivity import conv_labels, measure_layers, ranking  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One ablation row: a recipe of INT8_RECIPES (its weight fix, and whether ops may stay float,
    come from the registry) with one setting changed."""

    recipe: str  # INT8_RECIPES name
    ranges: str = "minmax"  # the one range method it is calibrated with
    equalize: EqualizeConfig = field(default_factory=EqualizeConfig)  # equalisation settings, for recipes that equalise
    calib: str = "all"  # calibration crops: all, first50, augmented (mirrored + contrast)
    float_ops: str = "limit"  # mixed: up to --max-float-ops; fast: also within 1.15x latency; all: as many as it takes


VARIANTS: dict[str, Variant] = {
    "plain": Variant("plain"), "mse": Variant("plain", "mse"), "percentile": Variant("plain", "percentile:99.99"),
    "percentile-5": Variant("plain", "percentile:99.999"), "calib50": Variant("plain", calib="first50"),
    "calib-aug": Variant("plain", calib="augmented"),
    "eq-blocks": Variant("equalize", equalize=EqualizeConfig(head=False)),
    "eq-head": Variant("equalize", equalize=EqualizeConfig(blocks=False)), "eq-both": Variant("equalize"),
    "eq-both-a1": Variant("equalize", equalize=EqualizeConfig(alpha=1.0)), "eq-bias": Variant("equalize+bias"),
    "eq-both-mse": Variant("equalize", "mse"), "eq-bias-mse": Variant("equalize+bias", "mse"),
    "eq-streams-mse": Variant("equalize", "mse", EqualizeConfig(streams=True)),
    "eq-streams-bias-mse": Variant("equalize+bias", "mse", EqualizeConfig(streams=True)),
    "mixed": Variant("mixed"), "mixed-fast": Variant("mixed", float_ops="fast"), "mixed-all": Variant("mixed", float_ops="all"),
}
ALL = ("converter", *VARIANTS)  # converter: the TFLite converter's own calibration, the baseline


def _augment(cs: CalibrationSet, seed: int) -> CalibrationSet:
    """More varied calibration: each crop, mirrored, and at 0.7x / 1.3x contrast about mid-grey."""
    rng = np.random.default_rng(seed)
    c = cs.crops.astype(np.float32)
    flips = c[:, :, ::-1]
    gains = rng.choice([0.7, 1.3], size=(len(c), 1, 1, 1)).astype(np.float32)
    contrast = np.clip((c - 128.0) * gains + 128.0, 0, 255)
    crops = np.concatenate([c, flips, contrast]).astype(np.uint8)
    return CalibrationSet(crops, cs.sources * 3, f"{cs.description} + mirrored + contrast x0.7/x1.3")


def _crops(v: Variant, calib: CalibrationSet) -> CalibrationSet:
    """The calibration crops variant `v` is calibrated on."""
    if v.calib == "first50":
        return calib.subset(np.arange(min(50, len(calib))), "first 50 crops")
    return _augment(calib, 0) if v.calib == "augmented" else calib


def _variant_weights(v: Variant, loaded: Any, x: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """`loaded` with the weight fix of `v`'s recipe applied (and what it moved in float)."""
    fix = INT8_RECIPES[v.recipe].fix
    if fix is None or not fix.rewrites:
        return loaded, {}
    net, info = loaded.inference_model(), {}
    if fix.equalize:
        res = equalize(net, x, v.equalize)
        net, info["float_max_diff_px"] = res.model, res.float_max_diff_px
    if fix.bias:
        bc = bias_correct(net, x)
        net, info["bias_float_moved_px"] = bc.model, bc.float_max_diff_px
    return dataclasses.replace(loaded, model=net.pfld), info


def run_model(path: Path, args: argparse.Namespace, crops_cache: dict[str, Any]) -> list[dict[str, Any]]:
    src = load_source(ConvertConfig(model=path))
    pre = src.preprocess
    key = str(args.calib)
    if key not in crops_cache:
        crops_cache[key] = calibration_and_validation(str(args.calib), None, pre, args.calib_count, args.val_count, 0)
    calib, val = crops_cache[key]
    ref = src.reference.predict(val.crops)
    evals: dict[str, Any] = {}
    from pfld_export.data.specs import load_spec

    if src.loaded.meta.model.points == 98:
        if (FIXTURES / "wflw98").is_dir():
            evals["wflw98 (4 real faces)"] = load_spec(f"wflw:{FIXTURES / 'wflw98'}").records
        evals["synthetic held-out (100)"] = load_spec("synthetic:100:77").records
    ref_nme = {k: nme_of(src.reference, r) for k, r in evals.items()}
    labels = conv_labels(src.loaded)
    x_nchw = pre.apply_nchw(calib.crops)
    rows: list[dict[str, Any]] = []
    baseline: dict[str, bytes] = {}
    weights_cache: dict[str, Any] = {}

    def record(variant: str, blobs: dict[str, bytes], extra: dict[str, Any]) -> None:
        row: dict[str, Any] = {"model": str(path), "variant": variant, **extra}
        for fmt, blob in blobs.items():
            blob = compact_tflite(blob)
            s = shift_stats(ref, predict_blob(blob, pre, val.crops))
            r = {"mean_px": s.mean_px, "p99_px": s.p99_px, "max_px": s.max_px, "bytes": len(blob),
                 "float_ops": float_op_count(blob)}
            if fmt == "int8":
                with tempfile.TemporaryDirectory() as tmp:
                    p = Path(tmp) / "m.tflite"
                    p.write_bytes(blob)
                    from pfld_export.runtime import open_predictor

                    pred = open_predictor(p, preprocess=pre)
                    r["nme_increase"] = {k: nme_of(pred, recs) - ref_nme[k] for k, recs in evals.items()}
            if fmt in baseline:
                r["latency_ratio"], r["ms"], r["baseline_ms"] = latency_ratio(blob, baseline[fmt], val.crops[:1], pre,
                                                                               runs=args.runs, repeats=args.repeats)
            row[fmt] = r
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk in ("mean_px", "p99_px", "bytes", "latency_ratio", "nme_increase")}) for k, v in row.items()}), flush=True)

    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        def calibrated(loaded: Any, cs: CalibrationSet, method: str = "minmax") -> Any:
            art = to_onnx(loaded, OnnxConfig(path=Path(tmp) / f"m{len(weights_cache)}.onnx"))
            inputs = cs.inputs(pre)
            km, func = keras_function(art, inputs)
            return calibrate(km, func, inputs, method, labels), (km, func, inputs)

        plain_cal, (km, func, inputs) = calibrated(src.loaded, calib)
        for fmt in ("int8", "full-int8"):
            baseline[fmt] = compact_tflite(convert_one(func, km, FORMATS[fmt], inputs))
        io = {"int8": "float32", "full-int8": "int8"}
        for variant in args.variants:
            t = time.perf_counter()
            extra: dict[str, Any] = {}
            if variant == "converter":
                record(variant, dict(baseline), {"calibration": calib.description})
                continue
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant}; choose from {', '.join(ALL)}")
            v = VARIANTS[variant]
            recipe = INT8_RECIPES[v.recipe]
            if recipe.fix is not None and recipe.fix.rewrites:
                loaded, extra = _variant_weights(v, src.loaded, x_nchw)
                cal, _ = calibrated(loaded, calib, v.ranges)
                weights_cache[variant] = cal
            elif not recipe.mixed:
                cal = plain_cal if (v.ranges, v.calib) == ("minmax", "all") else calibrated(src.loaded, _crops(v, calib), v.ranges)[0]
            else:
                best = min(weights_cache.items(), default=("plain", plain_cal),
                           key=lambda kv: shift_stats(src.reference.predict(calib.crops[:64]),
                                                      predict_blob(kv[1].quantize(), pre, calib.crops[:64])).mean_px)
                cal = best[1]
                search_ref = src.reference.predict(calib.crops)
                sens = measure_layers(cal, search_ref[:64], calib.crops[:64], pre)
                limit = len(cal.ops) if v.float_ops == "all" else args.max_float_ops
                budget = Int8Budget(max_shift_px=args.max_shift, max_float_ops=limit,  # p99: the budget's default, 4 x the mean
                                    max_slowdown=DEFAULT_MAX_SLOWDOWN if v.float_ops == "fast" else None)
                res = search_mixed(cal, ranking(sens), search_ref, calib.crops, pre, MixedConfig(budget))
                extra = {"base": best[0], "float_ops": [o.label for o in res.float_ops], "met_on_search": res.met,
                         "search_mean_px": res.shift.mean_px}
                deny = [o.tensor for o in res.float_ops]
                record(variant, {f: cal.quantize(deny, d) for f, d in io.items()}, extra)
                continue
            extra["seconds"] = round(time.perf_counter() - t, 1)
            record(variant, {f: cal.quantize((), d) for f, d in io.items()}, extra)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per model: variant, int8 (float I/O) and full-int8 shift, NME change, size, latency."""
    out: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        out += [f"### `{Path(model).parent.name}/{Path(model).name}`", "",
                "| variant | int8 mean / p99 px | full-int8 mean / p99 px | NME change (int8) | bytes (full-int8) | latency vs converter int8 | float ops |",
                "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            a, f = r.get("int8", {}), r.get("full-int8", {})
            nme = ", ".join(f"{k.split(' (')[0]} {v:+.4f}" for k, v in a.get("nme_increase", {}).items()) or "n/a (no labels in this layout)"
            lat = f"{a.get('latency_ratio', float('nan')):.2f}x / {f.get('latency_ratio', float('nan')):.2f}x"
            out.append(f"| {r['variant']} | {a['mean_px']:.3f} / {a['p99_px']:.2f} | {f['mean_px']:.3f} / {f['p99_px']:.2f} | {nme} | "
                       f"{f['bytes']:,} | {lat} | {len(r.get('float_ops', []))} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--markdown"]:  # python benchmarks/int8_ablation.py --markdown results.json ...
        print(markdown([r for p in sys.argv[2:] for r in json.loads(Path(p).read_text())["rows"]]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, type=Path)
    ap.add_argument("--calib", default=str(FIXTURES / "unlabeled"))
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--val-count", type=int, default=60)
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--max-shift", type=float, default=0.25)
    ap.add_argument("--max-float-ops", type=int, default=16)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "int8_ablation.json")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    for m in args.model:
        rows += run_model(m, args, cache)
        from pfld_export.io import atomic_write_json

        atomic_write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
