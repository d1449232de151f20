"""Conversion size, time and int8 landmark shift, recorded in benchmarks/conversion.md.

    python benchmarks/bench_conversion.py [--w025 CKPT] [--w100 CKPT] [--fixtures ../shared/fixtures]
                                          [--baseline] [--json benchmarks/results/conversion.json]

1. Sizes of every registry format for 0.25X and 1X (sizes do not depend on training), and what
   the compaction (shared zero-point vectors, short names) saved.
2. Wall and CPU time of `pfld-export convert <1X> --formats full-int8` in a fresh process
   (TensorFlow import included). With --baseline, the same run also times onnx2tf's own
   all-variants conversion of the same ONNX (what a naive pipeline does), offline.
3. Landmark shift of fp16 / dynamic / int8 / full-int8 against PyTorch on held-out real faces
   of ../shared/fixtures/unlabeled (calibrated on the other images), for the given checkpoints;
   without --w025/--w100 the models are untrained (said so in the output).

CPU time is what to compare on a shared, busy machine; wall time is what a user waits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pfld_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint  # noqa: E402
from pfld_export.export.formats import FORMATS, format_size  # noqa: E402
from pfld_export.export.pipeline import ConvertConfig, convert  # noqa: E402
from pfld_export.io import atomic_write_json  # noqa: E402
from pfld_export.model import LandmarkModel, build_model, count_parameters  # noqa: E402
from pfld_export.preprocess import Preprocess  # noqa: E402


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "date": date.today().isoformat(),
            "load_avg_start": os.getloadavg()}


def model_for(width: float, ckpt: str | None, tmp: Path) -> tuple[Path, str]:
    if ckpt:
        loaded = load_checkpoint(ckpt)
        if loaded.meta.model.width != width:
            raise SystemExit(f"{ckpt} is a {loaded.meta.model.width}X model, expected {width}X")
        epoch = loaded.extra.get("epoch", loaded.meta.training.get("epoch"))
        return Path(ckpt), f"{ckpt} (epoch {epoch}, metrics {loaded.meta.metrics or '-'})"
    pfld, aux = build_model(width=width)
    path = save_checkpoint(tmp / f"w{int(width * 100):03d}_untrained.pth", pfld, CheckpointMeta(model=pfld.config, preprocess=Preprocess()), aux=aux)
    return path, "UNTRAINED (random init): sizes are valid, shifts are not meaningful"


def plain_size(path: Path) -> int:
    """Bytes the same model takes without shared vectors (what the converter writes, names aside)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))
    b = flatbuffers.Builder(1 << 20)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return len(b.Output())


def sizes(path: Path, out: Path) -> dict[str, Any]:
    rep = convert(ConvertConfig(model=path, out_dir=out, formats=",".join(FORMATS), calib="synthetic"))
    params = count_parameters(LandmarkModel(load_checkpoint(path).model))
    return {"parameters": params, "formats": {a.format: {"bytes": a.bytes, "without_sharing": plain_size(a.path)} for a in rep.artifacts}}


def timed_cli(args: list[str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("pfld-export")), *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 7):
        raise SystemExit(f"convert failed ({proc.returncode}): {proc.stderr[-500:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1), "exit": proc.returncode}


def onnx2tf_baseline(ckpt: Path, tmp: Path) -> dict[str, float]:
    """onnx2tf 1.28.8 doing everything itself (SavedModel + all seven .tflite variants), offline,
    calibrated on the same 200 synthetic crops `convert` uses by default."""
    import numpy as np

    from pfld_export.export.calibrate import calibration_crops
    from pfld_export.export.onnx import OnnxConfig, to_onnx
    from pfld_export.export.tflite import ONNX2TF_SAMPLE

    loaded = load_checkpoint(ckpt)
    art = to_onnx(loaded, OnnxConfig(path=tmp / "base.onnx"))
    work = tmp / "baseline"
    work.mkdir()
    x = calibration_crops("synthetic", loaded.meta.preprocess, 200).inputs(loaded.meta.preprocess)
    np.save(work / ONNX2TF_SAMPLE, x[:20])  # offline: no COCO download
    np.save(work / "calib.npy", x)
    code = (f"import os; os.chdir({str(work)!r}); import onnx2tf; onnx2tf.convert(input_onnx_file_path={str(art.path)!r}, "
            f"output_folder_path='sm', output_integer_quantized_tflite=True, verbosity='error', not_use_onnxsim=True, "
            f"custom_input_op_name_np_data_path=[['input', 'calib.npy', [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = sorted(p.name for p in (work / "sm").glob("*.tflite"))
    return {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1), "tflite_files": len(files)}


def shifts(path: Path, unlabeled: Path, out: Path) -> dict[str, Any]:
    rep = convert(ConvertConfig(model=path, out_dir=out, formats="fp32,fp16,dynamic,int8,full-int8", calib=str(unlabeled)))
    return {"calibration": rep.calibration, "validation": rep.validation,
            "formats": {r.format: {**vars(r.shift), "passed": r.passed} for r in rep.formats if r.shift}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w025", help="trained 0.25X checkpoint (default: untrained)")
    ap.add_argument("--w100", help="trained 1X checkpoint (default: untrained)")
    ap.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    ap.add_argument("--baseline", action="store_true", help="also time onnx2tf's own all-variants conversion (minutes)")
    ap.add_argument("--parts", default="sizes,cli,shift", help="comma-separated subset of sizes,cli,shift")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "conversion.json"))
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    res: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as t:
        tmp = Path(t)
        models = {"0.25": model_for(0.25, a.w025, tmp), "1.0": model_for(1.0, a.w100, tmp)}
        res["models"] = {w: desc for w, (_, desc) in models.items()}
        if "sizes" in parts:
            res["sizes"] = {w: sizes(p, tmp / f"sizes{w}") for w, (p, _) in models.items()}
        if "cli" in parts:
            res["convert_full_int8_1x"] = timed_cli(["convert", str(models["1.0"][0]), "--formats", "full-int8", "--out", str(tmp / "cli")])
            res["convert_full_int8_1x"]["stages_s"] = json.loads((tmp / "cli" / "report.json").read_text())["timings"]
        if a.baseline:
            res["onnx2tf_all_variants_1x"] = onnx2tf_baseline(models["1.0"][0], tmp)
        unlabeled = Path(a.fixtures) / "unlabeled"
        if "shift" in parts and unlabeled.is_dir():
            res["shift_unlabeled"] = {w: shifts(p, unlabeled, tmp / f"shift{w}") for w, (p, _) in models.items()}
    res["machine"]["load_avg_end"] = os.getloadavg()
    atomic_write_json(a.json, res)
    for w, s in res.get("sizes", {}).items():
        print(f"{w}X ({s['parameters']:,} params): " + ", ".join(f"{f} {format_size(v['bytes'])} (unshared {format_size(v['without_sharing'])})" for f, v in s["formats"].items()))
    print(json.dumps({k: v for k, v in res.items() if k not in ("sizes",)}, indent=1, default=str))


if __name__ == "__main__":
    main()
