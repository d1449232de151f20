"""Host benchmark: rows, statistics, same-run ratios, reference resolution, worker processes, CLI.

Models are tiny and made here: a 0.25X PFLD checkpoint (the reference), its ONNX export, and a
small Keras network converted to .tflite (input 112x112x3 -> 196 values, like PFLD), so the
file runs through ai-edge-litert exactly as a converted PFLD would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pfld_export.bench.host import BenchConfig, bench_crop, benchmark, machine_info, resolve_reference, tool_versions
from pfld_export.cli import main
from pfld_export.errors import ModelFileError, UsageError
from pfld_export.runtime import open_predictor, sidecar_path

FAST = dict(threads=(1,), runs=4, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch

    from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
    from pfld_export.model import LandmarkModel, ModelConfig, PFLD
    from pfld_export.preprocess import Preprocess

    d = tmp_path_factory.mktemp("bench_models")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = PFLD(ModelConfig(width=0.25)).eval()
    ckpt = save_checkpoint(d / "ref.pth", net, CheckpointMeta(model=net.config, preprocess=Preprocess()))
    onnx_path = d / "ref.onnx"
    torch.onnx.export(LandmarkModel(net).eval(), (torch.zeros(1, 3, 112, 112),), str(onnx_path), input_names=["input"],
                      output_names=["landmarks"], opset_version=13, dynamo=False)

    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((112, 112, 3), batch_size=1)
    x = tf.keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(196, activation="sigmoid")(x)
    blob = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, out)).convert()
    tfl = d / "tiny.tflite"
    tfl.write_bytes(blob)
    side = {"preprocess": Preprocess().to_dict(), "format": "fp32", "source": str(ckpt), "model": net.config.to_dict()}
    sidecar_path(tfl).write_text(json.dumps(side))
    orphan = d / "orphan" / "tiny.tflite"  # a sidecar with a model config but no checkpoint
    orphan.parent.mkdir()
    orphan.write_bytes(blob)
    sidecar_path(orphan).write_text(json.dumps({**side, "source": "gone/ref.pth"}))
    bare = d / "bare" / "tiny.tflite"  # no sidecar at all
    bare.parent.mkdir()
    bare.write_bytes(blob)
    return {"ckpt": ckpt, "onnx": onnx_path, "tflite": tfl, "orphan": orphan, "bare": bare}


def test_rows_statistics_and_ratios_in_process(models):
    res = benchmark([models["ckpt"], models["onnx"], models["tflite"]], BenchConfig(isolate=False, **FAST))
    assert [r.name for r in res.rows] == ["ref.pth", "ref.onnx", "tiny.tflite"]
    assert [r.backend for r in res.rows] == ["torch", "onnx", "tflite"]
    ref = res.rows[0]
    assert ref.reference and ref.ratio_to_torch == 1.0
    assert res.reference.how == "given" and res.reference.path == str(models["ckpt"])
    for r in res.rows:
        assert r.samples == 8 and len(r.round_median_ms) == 2
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms <= r.p99_ms
        assert r.faces_per_s == pytest.approx(1000.0 / r.median_ms)
        assert r.peak_rss_bytes is None  # no honest per-model RSS in one shared process
    assert ref.cpu_ratio_to_torch == 1.0
    for r in res.rows[1:]:
        per_round = [m / t for m, t in zip(r.round_median_ms, ref.round_median_ms)]
        assert r.ratio_to_torch == pytest.approx(float(np.median(per_round)))
        assert r.ratio_low <= r.ratio_to_torch <= r.ratio_high
        assert r.cpu_ratio_low <= r.cpu_ratio_to_torch <= r.cpu_ratio_high
    for r in res.rows:
        # One thread computes in the calling thread: its CPU time is (almost) all of the wall time
        # on an idle core and never more than it (plus clock granularity).
        assert 0 < r.cpu_p10_ms <= r.cpu_median_ms <= r.median_ms * 1.05 + 0.01
    assert res.row("tiny.tflite", 1).bytes == models["tflite"].stat().st_size
    with pytest.raises(UsageError, match="no benchmark row"):
        res.row("tiny.tflite", 2)


def test_worker_processes_report_per_model_rss(models):
    res = benchmark([models["ckpt"], models["tflite"]], BenchConfig(isolate=True, **FAST))
    torch_row, tfl_row = res.rows
    for r in res.rows:
        assert r.base_rss_bytes and r.peak_rss_bytes and r.peak_rss_bytes > r.base_rss_bytes
    # The torch worker holds libtorch; the .tflite worker only ai-edge-litert. Inherited-peak
    # bugs (ru_maxrss across fork+exec) would make them equal.
    assert torch_row.peak_rss_bytes > tfl_row.peak_rss_bytes + 50 * 2**20


def test_invoker_runs_the_same_network_as_predict(models):
    crop = bench_crop(3)
    for key in ("ckpt", "onnx", "tflite"):
        pred = open_predictor(models[key], threads=1)
        with pred.invoker(crop) as call:
            call()
        if key == "ckpt":
            with pred.invoker(crop) as call:
                raw = call().numpy()
        elif key == "onnx":
            with pred.invoker(crop) as call:
                raw = call()[0]
        else:
            with pred.invoker(crop) as call:
                call()
                raw = pred.interpreter.get_tensor(pred._out_index)
        np.testing.assert_allclose(raw.reshape(1, -1, 2) * 112, pred.predict(crop), rtol=1e-5, atol=1e-4)


def test_reference_from_sidecar_or_built_from_its_model_config(models, tmp_path):
    cfg = BenchConfig(**FAST)
    path, info = resolve_reference([models["tflite"]], cfg, tmp_path)
    assert info.how == "sidecar" and path == models["ckpt"]
    path, info = resolve_reference([models["orphan"]], cfg, tmp_path)
    assert info.how == "built" and path.is_file() and "0.25" in info.note
    res = benchmark([models["orphan"]], BenchConfig(isolate=False, **FAST))
    assert res.reference.how == "built" and res.rows[0].reference and res.rows[0].backend == "torch"
    with pytest.raises(UsageError, match="--reference"):
        resolve_reference([models["bare"]], cfg, tmp_path)
    path, info = resolve_reference([models["bare"]], BenchConfig(reference=models["ckpt"], **FAST), tmp_path)
    assert info.how == "given" and path == models["ckpt"]


def test_bad_input_raises_usage_errors(models, tmp_path):
    with pytest.raises(UsageError, match="threads"):
        BenchConfig(threads=(0,))
    with pytest.raises(UsageError, match="runs"):
        BenchConfig(runs=0)
    with pytest.raises(UsageError, match="does not exist"):
        benchmark([tmp_path / "nope.tflite"], BenchConfig(**FAST))
    with pytest.raises(UsageError, match="unknown model type"):
        (tmp_path / "x.txt").write_text("x")
        benchmark([tmp_path / "x.txt"], BenchConfig(**FAST))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(ModelFileError, match="junk.tflite"):  # a broken model file: exit 3, like a broken checkpoint
        benchmark([models["ckpt"], junk], BenchConfig(isolate=True, **FAST))


def test_machine_and_versions_are_recorded():
    m = machine_info()
    assert m["cpu"] and m["logical_cores"] >= 1 and m["memory_bytes"] > 0
    v = tool_versions()
    assert v["torch"].startswith("2.") and v["ai-edge-litert"] != "absent"


def test_cli_table_json_and_out_file(models, tmp_path):
    runner = CliRunner()
    args = ["bench", str(models["ckpt"]), str(models["tflite"]), "--threads", "1", "--runs", "3", "--warmup", "1",
            "--repeats", "1", "--in-process"]
    res = runner.invoke(main, args + ["--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "x torch" in res.output and "tiny.tflite" in res.output and "ref.pth *" in res.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["ref.pth", "tiny.tflite"]
    assert saved["machine"]["cpu"] and saved["versions"]["onnxruntime"]
    res = runner.invoke(main, args + ["--json"])
    assert res.exit_code == 0 and json.loads(res.output)["reference"]["how"] == "given"


def test_cli_bad_input_is_one_line_and_nonzero(models, tmp_path):
    runner = CliRunner()
    for args, needle in (
        (["bench", str(tmp_path / "missing.tflite")], "does not exist"),
        (["bench", str(models["ckpt"]), "--threads", "1,x"], "--threads"),
        (["bench", str(models["bare"]), "--in-process"], "--reference"),
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def _load_bench_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_host_bench.py"
    spec = importlib.util.spec_from_file_location("run_host_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_summary_is_regenerated_between_markers_only(models, tmp_path):
    from pfld_export.bench.estimate import sd845_estimate
    from pfld_export.report import to_jsonable

    res = benchmark([models["ckpt"], models["tflite"]], BenchConfig(isolate=False, **FAST))
    rows = to_jsonable(res.rows)
    est = sd845_estimate(28_000_000, "int8")
    rows[1]["format"], rows[0]["format"] = "int8", "torch"
    rows[1]["sd845_estimate"] = {"label": est.label()}
    doc = {"date": res.date, "machine": res.machine, "versions": res.versions, "config": res.config,
           "models": [{"name": "tiny", "macs": 28_000_000, "rows": rows}], "sd845_estimate_reference": est.reference}
    script = _load_bench_script()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro kept\n\n{script.BEGIN}\nold table\n{script.END}\n\n## After\nkept too\n")
    script.update_readme(readme, doc, "2026-01-01-test.json")
    text = readme.read_text()
    assert "old table" not in text and "intro kept" in text and "## After\nkept too" in text
    section = text[text.index(script.BEGIN):text.index(script.END)]
    assert "results/2026-01-01-test.json" in section and "SD845 1 thr (estimate)" in section
    assert est.label() in section and "not a measurement" in section
    assert section.count("| tiny (28 M MACs) |") == 2
    script.update_readme(readme, doc, "2026-01-01-test.json")  # idempotent: one section, not two
    assert readme.read_text().count(script.BEGIN) == 1
