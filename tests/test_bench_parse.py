"""parse_benchmark_output on every dialect: the real samples in ../shared/fixtures/benchmark_model
(expected values from its README; skipped when the fixtures are absent) and strings written here,
which always run."""

from __future__ import annotations

import pytest

from pfld_export.bench.parse import parse_benchmark_output

from .conftest import fixture_path

# file: (dialect, inference avg, init, first, warmup avg) in µs, from the fixtures README table.
EXPECTED = {
    "a_bare_adb_crlf_old_memory_line.txt": ("bare+crlf", 249684, 16242, 360262, 304586),
    "b_bare_scientific.txt": ("bare", 2950340, 17187, 3512391, 3512390),
    "c_info_prefix_percentiles.txt": ("info", 699438, 102320, 670083, 670083),
    "d_logcat_apk.txt": ("logcat", 14575.2, 5685, 18535, 14462.3),
    "e_very_old_2018.txt": ("2018", 66767.6, 9933, None, 76605.9),
    "f_small_model.txt": ("info", 15.5197, 769, 533, 14.6845),
    "g_op_profiling_second_count_line.txt": ("bare", 160123, 16242, 170112, 170112),
}


def _read(name: str) -> str:
    # Bytes -> str keeps the CR LF line ends exactly as adb delivered them.
    return fixture_path("benchmark_model", name).read_bytes().decode("utf-8")


@pytest.mark.fixtures
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_timings(name: str) -> None:
    dialect, avg, init, first, warm = EXPECTED[name]
    out = parse_benchmark_output(_read(name))
    assert out.ok and out.failure_reason is None
    assert out.dialect == dialect
    assert out.inference_avg_us == pytest.approx(avg)
    assert out.init_us == pytest.approx(init)
    assert out.first_us == (None if first is None else pytest.approx(first))
    assert out.warmup_avg_us == pytest.approx(warm)


@pytest.mark.fixtures
def test_fixture_extras() -> None:
    a = parse_benchmark_output(_read("a_bare_adb_crlf_old_memory_line.txt"))
    assert a.memory is not None and (a.memory.init_mb, a.memory.overall_mb, a.memory.kind) == (4.92969, 138.809, "peak")
    assert a.peak_memory_mb == 138.809 and a.count == 50 and a.std_us == 1442
    b = parse_benchmark_output(_read("b_bare_scientific.txt"))
    assert b.warmup is not None and b.warmup.count == 1 and b.warmup.curr_us == 3512391
    assert b.memory is not None and b.memory.kind == "delta" and b.peak_memory_mb is None  # a delta is not a peak
    c = parse_benchmark_output(_read("c_info_prefix_percentiles.txt"))
    assert c.percentiles == {"p5": 502674, "median": 576856, "p95": 1373207}
    assert c.peak_memory_mb == 93.2383 and c.xnnpack_nodes == (49, 49) and c.xnnpack_created
    assert c.num_threads is None and c.graph == "model.tflite" and c.model_size_mb == 4.2
    d = parse_benchmark_output(_read("d_logcat_apk.txt"))
    assert d.count == 69 and d.warmup is not None and d.warmup.count == 38
    e = parse_benchmark_output(_read("e_very_old_2018.txt"))
    assert e.count == 50 and e.std_us == 612
    f = parse_benchmark_output(_read("f_small_model.txt"))
    assert f.count == 64398 and f.percentiles["median"] == 15
    g = parse_benchmark_output(_read("g_op_profiling_second_count_line.txt"))
    assert g.count == 50 and g.run is not None and g.run.first_us == 164033


@pytest.mark.fixtures
def test_fixture_failures() -> None:
    h = parse_benchmark_output(_read("h_failure_delegate.txt"))
    assert not h.ok and h.inference_avg_us is None
    assert h.unsupported_ops == ["CUSTOM TFLite_Detection_PostProcess"]
    assert "GPU delegate does not support: CUSTOM TFLite_Detection_PostProcess" in h.failure_reason
    assert "Benchmarking failed." in h.raw_lines
    i = parse_benchmark_output(_read("i_failure_nnapi.txt"))
    assert not i.ok and "NNAPI" in i.failure_reason and "Node number 248" in i.failure_reason


# --------------------------------------------------------------- strings written here
def test_profiling_summary_line_is_not_the_run_stats() -> None:
    text = (
        "count=3 first=900 curr=800 min=800 max=900 avg=850 std=50\n"
        "count=40 first=700 curr=690 min=650 max=760 avg=701.5 std=20\n"
        "Inference timings in us: Init: 1200, First inference: 900, Warmup (avg): 850, Inference (avg): 701.5\n"
        "============================== Summary by node type ==============================\n"
        "Timings (microseconds): count=999 first=1 curr=1 min=1 max=1 avg=1 std=0\n"
        "count=7 first=2 curr=2 min=2 max=2 avg=2 std=0\n"
    )
    out = parse_benchmark_output(text)
    assert out.ok and out.count == 40 and out.inference_avg_us == 701.5 and out.std_us == 20
    assert out.warmup is not None and out.warmup.count == 3


def test_scientific_crlf_and_logcat_brief() -> None:
    text = (
        "I/tflite  ( 4242): Initialized session in 1.5ms.\r\n"
        "I/tflite  ( 4242): count=10 first=1.2e+03 curr=1e3 min=9.5e2 max=1.2e+03 avg=1.05e+03 std=3\r\n"
        "I/tflite  ( 4242): count=100 first=1000 curr=1000 min=900 max=1100 avg=1.001e+03 std=4\r\n"
        "I/tflite  ( 4242): Inference timings in us: Init: 1500, First inference: 1.2e+03, Warmup (avg): 1.05e+03, Inference (avg): 1.001e+03\r\n"
    )
    out = parse_benchmark_output(text)
    assert out.ok and out.dialect == "logcat+crlf"
    assert (out.inference_avg_us, out.first_us, out.warmup_avg_us, out.init_us) == (1001, 1200, 1050, 1500)


def test_no_summary_line_falls_back_to_stats() -> None:
    text = "INFO: Initialized session in 2ms.\nINFO: count=5 first=10 curr=11 min=9 max=12 avg=10.5 std=1\n"
    out = parse_benchmark_output(text)
    assert out.ok and out.inference_avg_us == 10.5 and out.init_us == 2000 and out.warmup is None


@pytest.mark.parametrize(
    "text, needle",
    [
        ("INFO: STARTING!\nINFO: Graph: [m.tflite]\n", "no inference timing"),
        ("", "no inference timing"),
        ("/system/bin/sh: ./benchmark_model: not executable: 64-bit ELF file\n", "not executable"),
        ("CANNOT LINK EXECUTABLE \"./benchmark_model\": library \"libc++_shared.so\" not found\n", "CANNOT LINK"),
        ("INFO: Loaded model m.tflite\nSegmentation fault\n", "Segmentation fault"),
        ("ERROR: Following operations are not supported by XNNPACK delegate:\nCUSTOM MyOp: Operation is not supported.\n"
         "GATHER_ND: Operation is not supported.\nERROR: Failed to apply XNNPACK delegate.\nBenchmarking failed.\n",
         "XNNPACK delegate does not support: CUSTOM MyOp, GATHER_ND"),
    ],
)
def test_failures_written_here(text: str, needle: str) -> None:
    out = parse_benchmark_output(text)
    assert not out.ok and needle in out.failure_reason
    assert out.raw_lines or not text


def test_emulated_marker_version_and_xnnpack_subgraphs() -> None:
    text = (
        "INFO: Num threads: [4]\n"
        "INFO: Emulated device: pfld-export rig; timings are NOT device timings\n"
        "INFO: Tool version: [runner-1+ai-edge-litert-2.3.0]\n"
        "VERBOSE: Replacing 10 out of 12 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 2 partitions for subgraph 0.\n"
        "VERBOSE: Replacing 3 out of 3 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 1 partitions for subgraph 1.\n"
        "INFO: count=2 first=5 curr=5 min=5 max=5 avg=5 std=0\n"
        "INFO: Inference timings in us: Init: 1, First inference: 5, Warmup (avg): 5, Inference (avg): 5\n"
    )
    out = parse_benchmark_output(text)
    assert out.ok and out.emulated and out.num_threads == 4
    assert out.tool_version == "runner-1+ai-edge-litert-2.3.0"
    assert out.xnnpack_nodes == (13, 15)
    assert not parse_benchmark_output(text.replace("INFO: Emulated device", "INFO: Real device")).emulated
