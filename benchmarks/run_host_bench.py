#!/usr/bin/env python
"""`make bench`: host latency of the reference models, recorded with machine, date and versions.

    python benchmarks/run_host_bench.py [--threads 1,2] [--runs 100] [--repeats 5] [--label HOST]
    python benchmarks/run_host_bench.py --summarize benchmarks/results/<file>.json   # README only
    python benchmarks/run_host_bench.py --gate-noise 5   # spread of the gate's latency ratios

1. takes the reference checkpoints of `pfld_export.check.REFERENCE_MODELS`, as the gate does:
   a 0.25X PFLD trained 3 epochs on synthetic faces (its committed weights, models/reference/)
   and an untrained seeded 1X PFLD (built, cached under out/reference/; latency does not depend
   on weight values);
2. converts each with the `--int8` preset (fp32, int8, full-int8; ONNX kept) into out/bench/,
   reusing a previous conversion of the same checkpoint;
3. benchmarks checkpoint, ONNX and every .tflite with `pfld_export.bench.host.benchmark`
   (one worker process per model and thread count, interleaved rounds, same-run PyTorch ratios);
4. writes benchmarks/results/<date>-<host>.json and regenerates the summary between the
   `host-bench` markers in benchmarks/README.md, with the Snapdragon 845 ESTIMATE from
   `pfld_export.bench.estimate` (MACs-based, labelled as an estimate).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- host-bench:begin -->", "<!-- host-bench:end -->"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "host"


def measure(args: argparse.Namespace) -> dict:
    """Build, convert and benchmark every selected reference model; the results document."""
    from pfld_export.bench.estimate import sd845_estimate
    from pfld_export.bench.host import BenchConfig, benchmark
    from pfld_export.check import REFERENCE_MODELS, CheckConfig, convert_reference, reference_checkpoint
    from pfld_export.checkpoint import load_checkpoint
    from pfld_export.export.formats import FORMATS, INT8_PRESET
    from pfld_export.model import macs
    from pfld_export.report import to_jsonable
    from pfld_export.runtime import read_sidecar

    wanted = [m for m in args.models.split(",") if m]
    refs = [r for r in REFERENCE_MODELS if r.name in wanted]
    if len(refs) != len(wanted):
        raise SystemExit(f"error: --models {args.models!r}: known reference models are {[r.name for r in REFERENCE_MODELS]}")
    threads = tuple(int(t) for t in args.threads.split(","))
    bcfg = BenchConfig(threads=threads, runs=args.runs, warmup=args.warmup, repeats=args.repeats)
    ccfg = CheckConfig(work_dir=Path(args.work_dir), cache_dir=Path(args.cache_dir), formats=INT8_PRESET, reuse_conversion=True)
    models = []
    first = None
    for ref in refs:
        ckpt = reference_checkpoint(ref, ccfg, _log)
        conv = convert_reference(replace(ref, accuracy=False), ckpt, ccfg, _log)  # latency only: no NME pass
        out = ccfg.work_dir / ref.name
        files = [ckpt] + ([out / conv["onnx"]] if conv.get("onnx") else []) + [out / a["file"] for a in conv["artifacts"].values()]
        _log(f"{ref.name}: benchmarking {len(files)} models x threads {threads}, {bcfg.repeats} rounds x {bcfg.runs} runs")
        res = benchmark(files, bcfg, progress=lambda d, n, w: _log(f"  {d}/{n} {w}") if d % 10 == 0 or d == n else None)
        first = first or res
        n_macs = macs(load_checkpoint(ckpt).inference_model())
        rows = []
        for row in to_jsonable(res.rows):
            path = Path(row["path"])
            side = read_sidecar(path) if path.suffix == ".tflite" and path.is_file() else None
            fmt = (side or {}).get("format")
            row["format"] = fmt or row["backend"]
            if fmt in FORMATS:
                # Registry-driven: integer kernels for the calibrated int8 op set, float otherwise.
                precision = "int8" if FORMATS[fmt].ops_set == "TFLITE_BUILTINS_INT8" else "fp32"
                est = sd845_estimate(n_macs, precision, threads=1)
                row["sd845_estimate"] = {"ms": est.ms, "low_ms": est.low_ms, "high_ms": est.high_ms, "precision": precision,
                                         "threads": 1, "label": est.label(), "method": est.method}
            rows.append(row)
        models.append({"name": ref.name, "width": ref.width, "epochs": ref.epochs, "macs": n_macs,
                       "checkpoint_sha256": conv["checkpoint_sha256"], "reference": to_jsonable(res.reference), "rows": rows})
    assert first is not None  # at least one model was selected above
    est_ref = sd845_estimate(1_000_000, "fp32").reference
    return {"date": first.date, "host_label": _label(args.label), "machine": first.machine, "versions": first.versions,
            "config": first.config, "models": models, "sd845_estimate_reference": est_ref,
            "command": "make bench (benchmarks/run_host_bench.py)"}


def gate_noise(args: argparse.Namespace) -> dict:
    """Repeat the regression gate's benchmark on its cached conversion (out/check, run `make check`
    first) and record how much the wall-clock and CPU-time ratios move between repeats."""
    import os

    from pfld_export.bench.host import benchmark
    from pfld_export.check import REFERENCE_MODELS, CheckConfig
    from pfld_export.errors import UsageError

    ccfg = CheckConfig(cache_dir=Path(args.cache_dir))
    out: dict = {"config": ccfg.bench.__dict__ | {"reference": None}, "repeats": []}
    for i in range(args.gate_noise):
        entry: dict = {"loadavg_1min": os.getloadavg()[0], "models": {}}
        for ref in REFERENCE_MODELS:
            folder = ccfg.work_dir / ref.name
            files = sorted(folder.glob("*.tflite"))
            if not files:
                raise UsageError(f"no converted models in {folder}; run `make check` first")
            conv = folder / "check-conversion.json"
            ckpt = Path(json.loads(conv.read_text())["checkpoint"]) if conv.is_file() else None
            if ckpt is None or not ckpt.is_file():
                raise UsageError(f"{folder} does not name the checkpoint it was converted from; run `make check` first")
            res = benchmark([ckpt, *files], ccfg.bench)  # the very files the gate measured, never retrained here
            entry["models"][ref.name] = {r.name: {"wall_ratio": r.ratio_to_torch, "cpu_ratio": r.cpu_ratio_to_torch,
                                                  "median_ms": r.median_ms, "cpu_median_ms": r.cpu_median_ms}
                                         for r in res.rows}
            out.setdefault("machine", res.machine)
            out.setdefault("versions", res.versions)
            out.setdefault("date", res.date)
        _log(f"gate noise repeat {i + 1}/{args.gate_noise} done (load {entry['loadavg_1min']:.1f})")
        out["repeats"].append(entry)
    summary: dict = {}
    for model in out["repeats"][0]["models"]:
        for name in out["repeats"][0]["models"][model]:
            vals = {k: [rep["models"][model][name][k] for rep in out["repeats"]] for k in ("wall_ratio", "cpu_ratio")}
            summary.setdefault(model, {})[name] = {k: {"min": min(v), "max": max(v), "spread": max(v) / min(v) - 1}
                                                   for k, v in vals.items()}
    out["summary"] = summary
    return out


def update_readme(readme: Path, doc: dict, results_file: str) -> None:
    """Regenerate the section between the host-bench markers (create the file if needed)."""
    from pfld_export.io import atomic_write_text
    from pfld_export.report import bench_summary_markdown

    block = f"{BEGIN}\n{bench_summary_markdown(doc, results_file)}\n{END}"
    text = readme.read_text() if readme.is_file() else "# Benchmarks\n\n## Host latency (`make bench`)\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(readme, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="pfld025-synthetic,pfld100-seeded")
    ap.add_argument("--work-dir", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--cache-dir", default=str(ROOT / "out" / "reference"))
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"))
    ap.add_argument("--label", default=None, help="host part of the results file name (default: the hostname)")
    ap.add_argument("--summarize", default=None, help="only regenerate the README summary from this results file")
    ap.add_argument("--gate-noise", type=int, default=0, help="repeat the gate's benchmark N times; record the spread")
    args = ap.parse_args(argv)

    from pfld_export.errors import PfldError
    from pfld_export.io import atomic_write_json

    try:
        if args.summarize:
            doc = json.loads(Path(args.summarize).read_text())
            update_readme(Path(args.readme), doc, Path(args.summarize).name)
            return 0
        if args.label is None:
            import socket

            args.label = socket.gethostname()
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        if args.gate_noise:
            doc = gate_noise(args)
            path = Path(args.results_dir) / f"{day}-{_label(args.label)}-gate-noise.json"
            atomic_write_json(path, doc)
            for model, rows in doc["summary"].items():
                for name, v in rows.items():
                    _log(f"{model} {name}: wall ratio {v['wall_ratio']['min']:.3g}-{v['wall_ratio']['max']:.3g}, "
                         f"cpu ratio {v['cpu_ratio']['min']:.3g}-{v['cpu_ratio']['max']:.3g}")
            _log(f"wrote {path}")
            return 0
        doc = measure(args)
        path = Path(args.results_dir) / f"{day}-{_label(args.label)}.json"
        atomic_write_json(path, doc)
        update_readme(Path(args.readme), doc, path.name)
        _log(f"wrote {path} and the summary in {args.readme}")
        return 0
    except PfldError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
