"""Tables for people, JSON for machines: the only module that formats results."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy values and paths -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Plain-text table; `align` is one char per column, 'l' or 'r' (numbers right by default)."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
            for i in range(len(headers))
        )

    def fmt(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(list(headers)), sep] + [fmt(r) for r in cells])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_info(info: Any) -> str:
    """`pfld-export info` output."""
    src = getattr(info, "sources", {}) or {}

    def how(*fields: str) -> str:
        tags = sorted({src[f] for f in fields if f in src})
        return f"  [{'; '.join(tags)}]" if tags else ""

    rows = [
        ("file", info.path),
        ("source format", info.source_format),
        ("width", f"{info.width:g}{how('width')}"),
        ("channels", f"{', '.join(map(str, info.channels))} (conv1, stages 3-6, conv7, conv8){how('channels')}"),
        ("points", f"{info.points} ({info.layout}){how('points')}"),
        ("input size", f"{info.input_size}{how('input_size')}"),
        ("conv2", f"{info.conv2}{how('conv2')}"),
        ("conv biases", f"{'yes' if info.conv_bias else 'no'}{how('conv_bias')}"),
        ("head", f"{'pooled' if info.head == 'pool' else 'flattened'} S1/S2{how('head')}"),
        ("activation", f"{info.activation}{how('activation')}"),
        ("bn8 after conv8", ("yes (older PFLD-pytorch forward)" if info.head_bn else "no (current PFLD-pytorch forward)") + how("head_bn")),
        ("parameters", f"{info.parameters:,}"),
        (f"MACs @{info.input_size}x{info.input_size}", f"{info.macs:,} ({info.macs / 1e6:.1f} M)"),
        ("float32 weights", f"{info.float32_bytes:,} B ({human_bytes(info.float32_bytes)})"),
        ("int8 weights", f"{info.int8_bytes:,} B ({human_bytes(info.int8_bytes)})"),
        ("auxiliary net", "yes (dropped on export)" if info.has_auxiliary else "no"),
        ("preprocess", f"{info.preprocess['color']}, x*{info.preprocess['scale']:.6g}, mean {info.preprocess['mean']}, std {info.preprocess['std']}{how('preprocess')}"),
        ("stage 0", info.stage0),
    ]
    if info.epoch is not None:
        rows.append(("epoch", str(info.epoch)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


# --- one formatter per command below ---
def format_eval(rep: Any) -> str:
    """`pfld-export eval`: headline accuracy, per-attribute rows, named outliers, where files went."""
    r = rep.result
    m = rep.model
    pre = rep.preprocess
    lines = [
        f"model: {m.get('path')} ({m.get('backend')}, {m.get('dtype', '?')}); input {pre['color']}, "
        f"x*{pre['scale']:.6g}, mean {list(pre['mean'])}, std {list(pre['std'])}",
        f"data:  {rep.data}",
        f"NME normalised by {r.norm}; failure = NME > {r.threshold:g}",
        "",
    ]
    rows: list[list[Any]] = [["all", r.count, r.nme_mean, r.auc, 100.0 * r.failure_rate]]
    for name, v in r.per_attribute.items():
        rows.append([name, int(v["count"]), v["nme"], v["auc"], 100.0 * v["failure_rate"]])
    lines.append(table(["faces", "count", "NME mean", f"AUC@{r.threshold:g}", f"FR@{r.threshold:g} %"], rows, align="lrrrr"))
    if r.outliers:
        lines += ["", "outliers (worst first):"]
        lines += [f"  {e:.4f}  {src}" for src, e in r.outliers]
    if rep.problems:
        lines += ["", f"skipped {len(rep.problems)} annotation entries:"]
        lines += [f"  {p}" for p in rep.problems[:10]]
        if len(rep.problems) > 10:
            lines.append(f"  ... and {len(rep.problems) - 10} more (all listed in {rep.json_path})")
    lines += ["", f"wrote {rep.json_path} and {rep.ced_path}"]
    return "\n".join(lines)


def format_fidelity(rep: Any) -> str:
    """`pfld-export fidelity`: how far model B's landmarks move from model A's on real crops."""
    r = rep.result
    rows = [["mean", r.mean_px, r.mean_pct_iod], ["p99", r.p99_px, r.p99_pct_iod], ["max", r.max_px, None]]

    def model_line(tag: str, m: dict[str, Any]) -> str:
        pp = m.get("preprocess", {})
        feed = f"{pp.get('color')}, mean {pp.get('mean')}, std {pp.get('std')}" if pp else "?"
        return f"{tag}: {m.get('path')} ({m.get('backend')}, {m.get('dtype', '?')}; input {feed})"

    lines = [
        model_line("A", rep.model_a),
        model_line("B", rep.model_b),
        f"{rep.faces} faces ({rep.layout}) found by {rep.detector} in {rep.images} files of {rep.images_dir}"
        + (f"; {len(rep.no_face)} without a face" if rep.no_face else "")
        + (f"; {len(rep.problems)} unreadable" if rep.problems else ""),
        "",
        table(["landmark shift", "px (crop)", "% IOD"], rows, align="lrr"),
    ]
    if rep.problems:
        lines += [""] + [f"skipped {p}" for p in rep.problems]
    return "\n".join(lines)


def format_train_epoch(rec: dict[str, Any], epochs: int) -> str:
    """One line per finished epoch (stderr while `train` runs)."""
    val = f"  val NME {rec['val_nme']:.4f}" if rec.get("val_nme") is not None else ""
    return (f"epoch {rec.get('epoch', '?')}/{epochs}  loss {rec.get('train_loss', float('nan')):.4g}"
            f"  L2 {rec.get('train_l2', float('nan')):.4g}{val}  lr {rec.get('lr', float('nan')):.2g}  {rec.get('seconds', 0):.0f} s")


def format_train(result: Any) -> str:
    """`pfld-export train` final report: per-epoch table and where the checkpoints are."""
    rows = [(h.get("epoch"), h.get("train_loss"), h.get("train_l2"), h.get("val_nme"), h.get("lr"), h.get("seconds"))
            for h in result.history]
    out = [table(["epoch", "train loss", "train L2", "val NME", "lr", "seconds"], rows)]
    c = result.config
    out.append("")
    out.append(f"model       width {c.get('width')}, {c.get('points')} points, conv2 {c.get('conv2')}, loss {c.get('loss')}")
    out.append(f"data        {c.get('data')}: {result.train_faces} train / {result.val_faces} val faces")
    if result.best_val_nme is not None:
        before = f"{result.initial_val_nme:.4f} initial -> " if result.initial_val_nme is not None else ""
        out.append(f"val NME     {before}{result.best_val_nme:.4f} best (epoch {result.best_epoch})")
    out.append(f"best        {result.best_checkpoint}")
    out.append(f"last        {result.last_checkpoint}")
    out.append(f"history     {result.history_file}")
    procs = getattr(result, "processes", 1)
    on = f"{procs} processes (DDP), {result.device} each; --batch {c.get('batch')} is global" if procs > 1 else result.device
    out.append(f"wall time   {result.wall_s:.1f} s on {on}")
    return "\n".join(out)

def format_distil(result: Any) -> str:
    """`pfld-export distil` final report: the teacher, what it labelled, then the training report."""
    t = result.teacher
    rows = [(s.source, s.images, s.faces, s.train_faces, s.val_faces, s.samples_per_epoch, len(s.skipped))
            for s in result.sources]
    out = [f"teacher     {t['path']} ({t['backend']}, {t['points']} points, {t['layout']}, sha256 {t['sha256'][:16]}...)",
           f"labels      {result.labels_file} ({'reused' if result.labels_reused else 'computed once'})", "",
           table(["data", "images", "faces", "train", "val", "samples/epoch", "skipped"], rows), "",
           format_train(result.train)]
    if result.train.best_val_nme is not None:
        out.append("(val NME here is the student's agreement with the teacher on held-out images)")
    return "\n".join(out)


def format_qat(result: Any) -> str:
    """`pfld-export qat` report: simulated int8 shift before/after on held-out faces."""
    b, a, d = result.simulated_int8_before, result.simulated_int8_after, result.float_drift
    rows = [("int8 (simulated) before", b.mean_px, b.p99_px, b.max_px), ("int8 (simulated) after", a.mean_px, a.p99_px, a.max_px),
            ("tuned float (not shipped)", d.mean_px, d.p99_px, d.max_px)]
    out = [table(["vs the teacher's float landmarks, px at 112", "mean", "p99", "max"], rows), ""]
    out.append(f"teacher     {result.teacher}")
    out.append(f"trained on  {result.calibration}")
    out.append(f"measured on {result.validation}")
    out.append(f"checkpoint  {result.checkpoint} ({result.steps} steps, {result.seconds:.0f} s)")
    out.append(f"next        pfld-export convert {result.checkpoint} --int8 --reference {result.teacher} --calib <the same faces>")
    return "\n".join(out)


def format_convert(rep: Any) -> str:
    """`pfld-export convert` output: what went in, one row per .tflite, failed checks, timings."""
    from .export.formats import format_size

    m = rep.model or {}
    what = f"width {m['width']}, {m['points']} points" if m else f"{rep.onnx.num_points} points"
    par = rep.parity
    lines = [
        f"source       {rep.source} ({rep.source_kind}, {what})",
        f"preprocess   {rep.preprocess['color']}, x*{rep.preprocess['scale']:.6g}, mean {rep.preprocess['mean']}, std {rep.preprocess['std']}",
        f"calibration  {rep.calibration}",
        *([f"stage 0      {rep.stage0.summary()}"] if getattr(rep, "stage0", None) is not None else []),
        f"validation   {rep.validation} (shifts are vs {rep.reference_model + ' (--reference)' if rep.reference_model else rep.reference})",
        f"onnx         opset {rep.onnx.opset}, {sum(rep.onnx.op_types.values())} nodes, ORT vs {rep.reference} max "
        f"{par.max_px:.2g} px (tolerance {par.atol_px:g}){' -> ' + str(rep.onnx.path) if rep.onnx_kept else ''}",
    ]
    if rep.onnx.rewrites:
        lines.append(f"             {len(rep.onnx.rewrites)} whole-map AveragePool -> ReduceMean (same math; int8-safe head)")
    if rep.eval_data:
        lines.append(f"eval data    {rep.eval_data}: {'reference' if rep.reference_model else 'source'} NME {rep.reference_nme:.4f}")
    rows = []
    for f in rep.formats:
        s = f.shift
        rows.append([
            f.format, f.path.name, format_size(f.bytes), "ok" if f.ops.builtin_only else "NO",
            f"{100 * f.ops.xnnpack_coverage:.0f}%", None if s is None else round(s.mean_px, 4),
            None if s is None else round(s.p99_px, 4), None if s is None else round(s.max_px, 4),
            None if f.nme is None else f"{f.nme:.4f} ({f.nme_increase:+.4f})",
            ("WARN" if f.warnings else "pass") if f.passed else "FAIL",
        ])
    headers = ["format", "file", "size", "ops", "XNNPACK", "shift mean px", "p99 px", "max px", "NME", "budget"]
    lines += ["", table(headers, rows, align="lllrrrrrrl"), ""]
    for a in rep.artifacts:
        if a.input_quant or a.output_quant:
            q = ", ".join(f"{k} scale {v['scale']:.6g} zero point {v['zero_point']}"
                          for k, v in (("input", a.input_quant), ("output", a.output_quant)) if v)
            lines.append(f"{a.format} int8 I/O: {q}")
    for f in rep.formats:
        if f.ops.undelegated:
            left = ", ".join(f"{k} x{v}" for k, v in sorted(f.ops.undelegated.items()))
            lines.append(f"{f.format}: XNNPACK leaves {left} to TFLite's reference kernels")
    lines += _int8_recipe_lines(rep)
    if getattr(rep, "int8_fit", None) is not None:
        lines += format_int8_fit(rep.int8_fit).splitlines()[1:] + [""]
    for f in rep.formats:
        for c in f.failures:
            lines.append(f"FAIL {f.format} {c.name}: {c.detail}")
    for f in rep.formats:
        for c in f.warnings:
            lines.append(f"WARNING {f.format} {c.name}: {c.detail}")
    lines.append("timings      " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings.items()))
    warned = any(f.warnings for f in rep.formats)
    state = "budget failures above" if not rep.passed else ("budgets met, warnings above" if warned else "all budgets met")
    lines.append(f"report       {rep.report_path} ({state})")
    return "\n".join(lines)


def format_bench(result: Any) -> str:
    """`pfld-export bench`: one row per (model, threads), ratios to the same-run PyTorch reference."""
    headers = ["model", "backend", "dtype", "size", "thr", "median ms", "p90 ms", "p99 ms", "faces/s",
               "x torch", "(range)", "cpu x torch", "peak RSS"]
    rows = [
        [r.name + (" *" if r.reference else ""), r.backend, r.dtype, human_bytes(r.bytes) if r.bytes else "-", r.threads,
         r.median_ms, r.p90_ms, r.p99_ms, round(r.faces_per_s), r.ratio_to_torch,
         f"{r.ratio_low:.3g}-{r.ratio_high:.3g}", r.cpu_ratio_to_torch, human_bytes(r.peak_rss_bytes) if r.peak_rss_bytes else "-"]
        for r in result.rows
    ]
    m, c = result.machine, result.config
    load = m.get("loadavg_at_start")
    lines = [
        f"host: {m.get('cpu')}, {m.get('logical_cores')} cores, load {load[0] if load else '?'} at start; "
        f"{c['repeats']} interleaved rounds x {c['runs']} runs (+{c['warmup']} warm-up) per model and thread count",
        f"reference (*): {result.reference.path} [{result.reference.how}]" + (f" {result.reference.note}" if result.reference.note else ""),
        "",
        table(headers, rows, align="llllrrrrrrlrl"),
        "",
        "x torch = model median / PyTorch median of the same round, median over rounds (lower is faster);",
        "cpu x torch = the same with the invoking thread's CPU time (steadier under load; exact at 1 thread).",
        "single-face invoke only, preprocessing excluded. peak RSS: the model's own worker process.",
    ]
    return "\n".join(lines)


def _ms(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def bench_summary_markdown(doc: dict[str, Any], results_file: str) -> str:
    """benchmarks/README.md summary from a `make bench` results document (plain JSON)."""
    m, c, v = doc["machine"], doc["config"], doc["versions"]
    threads = list(c["threads"])
    load = m.get("loadavg_at_start")
    out = [
        f"Measured {doc['date'][:10]} on **{m['cpu']}** ({m['logical_cores']} cores, {human_bytes(m['memory_bytes'])}, "
        f"load average {load[0] if load else '?'} at start; host `{doc.get('host_label', m.get('host'))}`), "
        f"torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, ai-edge-litert {v.get('ai-edge-litert')}. "
        f"Raw numbers: [`results/{results_file}`](results/{results_file}).",
        "",
        f"Single-face invoke, preprocessing excluded; median of {c['repeats']} interleaved rounds x {c['runs']} runs "
        f"(+{c['warmup']} warm-up). **x torch** = model / PyTorch eager measured in the same round (median over rounds; "
        "lower is faster). **cpu x torch** = the same ratio of the invoking thread's CPU time at one thread: the figure "
        "to compare across runs (the regression gate reports it; it gates instructions per inference), since absolute ms, and even wall-clock ratios, move "
        "with machine load. "
        "**SD845 (estimate)** is arithmetic from MACs (`pfld_export/bench/estimate.py`), *not a measurement*; "
        "measure a phone with `make bench-arm`. The reference row's size is its checkpoint file (a trained one also "
        "carries the auxiliary net and optimizer state).",
        "",
    ]
    headers = ["model", "format", "size"]
    for t in threads:
        headers += [f"{t} thr median ms", f"{t} thr p90 ms", f"{t} thr x torch"]
    headers += ["cpu x torch (1 thr)", "faces/s (1 thr)" if 1 in threads else "faces/s", "peak RSS", "SD845 1 thr (estimate)"]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
    for model in doc["models"]:
        by = {}
        for r in model["rows"]:
            by.setdefault(r["path"], {})[r["threads"]] = r
        for path, per in by.items():
            first = per[threads[0]]
            cells = [f"{model['name']} ({model['macs'] / 1e6:.0f} M MACs)", first["format"] + (" (reference)" if first["reference"] else ""),
                     human_bytes(first["bytes"]) if first["bytes"] else "-"]
            for t in threads:
                r = per.get(t)
                cells += ["-", "-", "-"] if r is None else [_ms(r["median_ms"]), _ms(r["p90_ms"]), f"{r['ratio_to_torch']:.3g}"]
            one = per.get(1)
            cells.append(f"{one['cpu_ratio_to_torch']:.3g}" if one and "cpu_ratio_to_torch" in one else "-")
            cells.append(f"{first['faces_per_s']:,.0f}")
            cells.append(human_bytes(first["peak_rss_bytes"]) if first.get("peak_rss_bytes") else "-")
            est = first.get("sd845_estimate")
            cells.append(est["label"] if est else "-")
            out.append("| " + " | ".join(cells) + " |")
    if doc.get("sd845_estimate_reference"):
        out += ["", f"Estimate basis: {doc['sd845_estimate_reference']}."]
    return "\n".join(out)


def _bench_arm_rows(results: Sequence[Any]) -> list[list[Any]]:
    return [[Path(r.model).name, t.threads, t.inference_avg_ms, t.std_ms, t.percentiles_ms.get("median"), t.init_ms,
             t.peak_memory_mb, "{}/{}".format(*t.parsed.xnnpack_nodes) if t.parsed.xnnpack_nodes else None,
             "ok" if t.ok else f"FAILED: {t.parsed.failure_reason}"]
            for r in results for t in r.runs]


_BENCH_ARM_HEADERS = ["model", "threads", "avg ms", "std ms", "median ms", "init ms", "peak MB", "xnnpack", "status"]


def format_bench_arm(result: Any) -> str:
    """`pfld-export bench-arm` on one device: the device line, one row per model and thread count."""
    d = result.device
    out = [f"device {d.serial}: {d.model} ({d.abi}), profile {d.profile}, big cores "
           f"{','.join(map(str, d.big_cores)) or '?'} (taskset mask {d.mask or '-'})"]
    if any(r.emulated for r in result.results):
        out.append("EMULATED device: these milliseconds are qemu's, not a phone's (emulated: true in the JSON)")
    out.append(table(_BENCH_ARM_HEADERS, _bench_arm_rows(result.results)))
    out.extend(f"wrote {f}" for f in result.files)
    return "\n".join(out)


def format_bench_arm_devices(result: Any) -> str:
    """`pfld-export bench-arm` on several devices: one table, device (SoC, ABI, big cores) x model x
    threads; a device that failed or disconnected has a row saying so (after any rows it finished)."""
    rows: list[list[Any]] = []
    for o in result.devices:
        d = o.device
        soc = (d.board or d.profile) if d is not None else "?"
        who = [o.serial, soc + (" (emulated)" if d is not None and d.emulated else ""), d.abi if d else "?",
               ",".join(map(str, d.big_cores)) if d and d.big_cores else "?"]
        rows.extend([*who, *row] for row in _bench_arm_rows(o.results))
        if o.error is not None:
            model = Path(o.failed_model).name if o.failed_model else "-"
            rows.append([*who, model, None, None, None, None, None, None, None, f"DEVICE FAILED: {o.error}"])
    out = [table(["device", "SoC", "ABI", "big cores", *_BENCH_ARM_HEADERS], rows)]
    if any(r.emulated for o in result.devices for r in o.results):
        out.append("EMULATED device(s) in this table: their milliseconds are qemu's, not a phone's (emulated: true in the JSON)")
    out.extend(f"wrote {f}" for o in result.devices for f in o.files)
    return "\n".join(out)


def _check_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("B", "instr"):
        return f"{v:,.0f}"
    return f"{v:.4g}"


def format_check(result: Any, verbose: bool = False) -> str:
    """`pfld-export check`: what moved and by how much; every item with --verbose."""
    shown = [i for i in result.items if verbose or i.status != "ok"]
    headers = ["model", "artifact", "metric", "baseline", "measured", "change", "limit", "status", "note"]
    rows = [[i.model, i.artifact, i.label + (f" ({i.unit})" if i.unit and i.unit != "x" else ""),
             _check_value(i.baseline, i.unit), _check_value(i.measured, i.unit), i.change,
             _check_value(i.limit, i.unit), i.status, i.note] for i in shown]
    n_ok = sum(1 for i in result.items if i.status == "ok")
    n_gated = sum(1 for i in result.items if i.status not in ("info", "skipped"))
    fails = [i for i in result.items if i.failed]
    lines = []
    if rows:
        lines += [table(headers, rows, align="lllrrrrll"), ""]
    rec = result.baseline_recorded or {}
    mach = rec.get("machine", {})
    lines.append(f"baseline {result.baseline_path}: recorded {rec.get('date', '?')} on {mach.get('cpu', '?')} "
                 f"({mach.get('logical_cores', '?')} cores)" + ("" if getattr(result, "cost_gated", True) else
                                                                " - counted at another SIMD level: instructions reported, not gated"))
    skipped = [i for i in result.items if i.status == "skipped"]
    if skipped:
        # Loud on purpose: a gate that did not look must not read like a gate that passed.
        lines.append(f"SKIPPED: {len(skipped)} instruction checks were not measured ({getattr(result, 'cost_skipped', None) or 'no counts'}); "
                     "the cost of these models is NOT gated on this machine")
    if result.updated:
        lines.append(f"updated {result.baseline_path} with {len(result.items)} gated values ({result.wall_s:.0f} s); review and commit the diff")
    elif fails:
        lines.append(f"FAILED: {len(fails)} of {n_gated} checks moved past their tolerance ({result.wall_s:.0f} s): "
                     + "; ".join(f"{i.model} {i.artifact} {i.label} {i.change}" for i in fails))
    else:
        lines.append(f"passed: {n_ok} of {n_gated} checks within tolerance ({result.wall_s:.0f} s)")
    return "\n".join(lines)


def format_predict(result: Any) -> str:
    """`pfld-export predict`: per-input rows (at most 40) and the summary line."""
    rows = []
    for it in result.items[:40]:
        src = it.source if it.frame is None else f"{it.source}#{it.frame}"
        rows.append([src[-48:], len(it.faces), it.detect_ms, it.landmarks_ms, it.overlay or "-"])
    s = result.summary()
    lines = [table(["input", "faces", "detect ms", "landmarks ms", "overlay"], rows, align="lrrrl")]
    if len(result.items) > 40:
        lines.append(f"... {len(result.items) - 40} more (see --json)")
    lines += ["", table(["images", "faces", "mean detect ms / image", "mean landmarks ms / face"],
                        [[s["images"], s["faces"], s["detect_ms_mean"], s["landmarks_ms_per_face"]]])]
    for v in result.videos:
        lines.append(f"video {v.source}: {v.frames_processed} of {v.frames_read} frames predicted"
                     + (f" -> {v.output}" if v.output else ""))
    if result.grid:
        lines.append(f"grid: {result.grid}")
    if result.json_path:
        lines.append(f"json: {result.json_path}")
    return "\n".join(lines)


def format_sensitivity(rep: Any, top: int = 20) -> str:
    """`pfld-export sensitivity`: ops ranked by the landmark shift each causes alone in int8."""
    f = rep.full_int8
    lines = [
        f"model        {rep.model}{' (equalised)' if rep.equalized else ''}",
        f"calibration  {rep.calibration} (ranges: {rep.range_method})",
        f"measured on  {rep.validation}, I/O {rep.io_dtype}",
        f"all int8     mean {f.mean_px:.3f} px, p99 {f.p99_px:.3f} px, max {f.max_px:.3f} px (vs float)",
        "",
    ]
    loo = any(r.float_gain_px is not None for r in rep.layers)
    headers = ["rank", "op", "layer", "output", "range", "mean px", "p99 px", "max px"] + (["float gain px"] if loo else [])
    rows = []
    for r in rep.layers[:top]:
        row = [r.rank, r.op, r.label, "x".join(str(v) for v in r.shape[1:]), f"[{r.range[0]:.3g}, {r.range[1]:.3g}]",
               round(r.alone.mean_px, 4), round(r.alone.p99_px, 4), round(r.alone.max_px, 3)]
        if loo:
            row.append(None if r.float_gain_px is None else round(r.float_gain_px, 4))
        rows.append(row)
    lines.append(table(headers, rows, align="rlllrrrr" + ("r" if loo else "")))
    if len(rep.layers) > top:
        lines.append(f"... {len(rep.layers) - top} more ops in {rep.json_path}")
    lines += [""] + rep.notes + [f"wrote {rep.json_path} and {rep.png_path}"]
    return "\n".join(lines)


def _int8_recipe_lines(rep: Any) -> list[str]:
    """How the int8 formats were built, and what plain int8 gives on the same held-out faces."""
    calibrated = [f for f in rep.formats if f.format in ("int8", "full-int8")]
    if not calibrated:
        return []
    fit = getattr(rep, "int8_fit", None)
    if fit is None:
        return ["int8 recipe  plain (the converter's own calibration, min/max ranges; `--int8-method plain`)"]
    how = {"default": "the default fit", "methods": "--int8-method / budget"}.get(fit.recipe, fit.recipe)
    extra = f"; not tried (time cap): {', '.join(fit.skipped)}" if fit.skipped else ""
    lines = [f"int8 recipe  {fit.method} ({how}, {fit.seconds:.0f} s, {fit.cpu_seconds:.0f} s CPU{extra})"]
    for f in calibrated:
        p, s = f.plain_shift, f.shift
        if p is not None and s is not None and fit.method != "plain":
            lines.append(f"             {f.format}: plain int8 would give mean {p.mean_px:.3f} px, p99 {p.p99_px:.3f} px "
                         f"(this one {s.mean_px:.3f} / {s.p99_px:.3f})")
    residual = getattr(fit, "residual", [])
    if residual:
        rest = [f.format for f in calibrated if f.format not in residual]
        lines.append(f"             mean shape added back in float after the int8 residual: {', '.join(residual)}"
                     + (f"; {', '.join(rest)} (int8 output) without it" if rest else ""))
    return lines


def format_int8_fit(fit: Any) -> str:
    """The int8 fitting lines under `convert`'s table: what was tried, what was kept, its cost."""
    lines = ["", f"candidates   ranked on {fit.search}; the best is shipped (int8 recipe above)"]
    rows = [[c.method, round(c.shift.mean_px, 4), round(c.shift.p99_px, 4), len(c.float_ops)] for c in fit.candidates]
    lines.append(table(["candidate", "mean px", "p99 px", "float ops"], rows, align="lrrr"))
    if fit.float_ops:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(fit.float_op_types.items()))
        lines.append(f"kept float   {len(fit.float_ops)} ops ({kinds}): {', '.join(fit.float_ops)}")
    else:
        lines.append("kept float   nothing: every op is int8")
    for name, ratio in fit.latency_vs_plain.items():
        size = len(fit.blobs[name]) if name in fit.blobs else None
        plain = fit.plain_bytes.get(name)
        extra = f", size {human_bytes(size)} vs {human_bytes(plain)} plain" if size and plain else ""
        lines.append(f"cost         {name}: latency x{ratio:.2f} of plain int8 (XNNPACK, 1 thread, same run){extra}")
    if fit.met is not None:
        lines.append(f"budget       {'met on the search crops' if fit.met else 'NOT met on the search crops'}")
    return "\n".join(lines)


def format_cost(result: Any) -> str:
    """`pfld-export cost`: instructions per invoke, one row per model."""
    headers = ["model", "size", "thr", "instructions / invoke", "M", "spread", "first invoke", "counted"]
    rows = [[r.name, human_bytes(r.bytes), r.threads, f"{r.instructions:,}", f"{r.instructions / 1e6:.2f}",
             f"{100 * r.spread_rel:.3f} %", f"{r.first_invoke:,}",
             len(r.per_invoke)] for r in result.rows]
    c = result.config
    return "\n".join([
        table(headers, rows, align="llrrrrrr"),
        "",
        f"{result.tool}, window {result.window}; {c['warmup']} warm-up + {c['invokes']} counted invoke(s) per model, "
        f"median shown; XNNPACK at {result.isa} under the tool (a regression metric, not the host's cost). "
        f"{result.env.get('runtime', '')}, {result.wall_s:.0f} s.",
    ])
