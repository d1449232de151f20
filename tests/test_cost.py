"""Instructions per invoke (callgrind) and the gate built on them.

The real-count tests use tiny int8 Keras networks (a stack of 3x3 convs at 24x24), made here,
so callgrind has little to run: the cost is valgrind's start-up, one process per count.
They skip, with the reason, where valgrind is not installed (CI installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pfld_export.bench.cost import (
    WINDOW,
    CostConfig,
    arm_instructions_per_invoke,
    find_arm_kit,
    find_valgrind,
    instructions_per_invoke,
    parse_dump_total,
    parse_marks,
    read_dumps,
    simd_level,
)
from pfld_export.check import Tolerances, baseline_document, compare
from pfld_export.cli import main
from pfld_export.errors import CostError, ToolMissingError, UsageError
from pfld_export.report import format_cost

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind is not installed (apt-get install valgrind); CI has it")
# 19 convs + 1 = +5 % of the conv work: the regression the gate must see.
BASE_CONVS = 19


def _int8_conv_stack(path: Path, convs: int) -> Path:
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((24, 24, 3), batch_size=1)
    x = inp
    for _ in range(convs):
        x = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(8)(x)
    conv = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, out))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((1, 24, 24, 3), np.float32)] for _ in range(4))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cost_models")
    return {"base": _int8_conv_stack(d / "base.tflite", BASE_CONVS),
            "extra_conv": _int8_conv_stack(d / "extra_conv.tflite", BASE_CONVS + 1)}


def test_dump_parsing_and_order(tmp_path):
    assert parse_dump_total("version: 1\nsummary: 2060025\ntotals: 2060025\n") == 2060025
    with pytest.raises(CostError, match="totals"):
        parse_dump_total("version: 1\n")
    for k, total in ((10, 7), (2, 5), (1, 3)):
        (tmp_path / f"cg.out.{k}").write_text(f"totals: {total}\n")
    (tmp_path / "cg.out").write_text("totals: 0\n")  # the end-of-run dump: not an invoke
    (tmp_path / "cg.out.x").write_text("totals: 99\n")
    assert read_dumps(tmp_path, "cg.out") == [3, 5, 7]  # numeric order, not text order


def test_simd_level_reads_cpu_flags():
    assert simd_level("flags\t\t: fpu sse2 sse4_1 avx avx2 fma avx512f\n") == "avx2"  # valgrind hides AVX-512
    assert simd_level("flags\t\t: fpu sse2 sse4_1 avx\n") == "avx"
    assert simd_level("flags\t\t: fpu sse2\n") == "sse2"
    assert simd_level("no flags here") == "unknown"


def test_config_and_input_errors_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="1 thread"):
        CostConfig(threads=2)
    with pytest.raises(UsageError, match="invokes"):
        CostConfig(invokes=0)
    with pytest.raises(UsageError, match="convert"):
        instructions_per_invoke([tmp_path / "m.onnx"])
    with pytest.raises(UsageError, match="does not exist"):
        instructions_per_invoke([tmp_path / "absent.tflite"])
    with pytest.raises(ToolMissingError, match="apt-get install valgrind"):
        find_valgrind("valgrind-that-is-not-installed")


def test_arm_marks_parsing_and_a_missing_kit_names_the_make_target(tmp_path):
    assert parse_marks("10\n17\n30\n1030\ntotal 5000\n") == [10, 17, 30, 1030]
    with pytest.raises(CostError, match="did not exit normally"):
        parse_marks("10\n17\n")
    with pytest.raises(CostError, match="fewer models"):
        parse_marks("10\noverflow 99\n")
    with pytest.raises(ToolMissingError, match="make arm-cost-kit"):
        find_arm_kit(tmp_path / "no-kit-here")


def _arm_kit_or_skip() -> None:
    try:
        find_arm_kit()
    except ToolMissingError as e:
        pytest.skip(str(e))


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["cost", str(tmp_path / "absent.tflite")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "does not exist" in res.output


def _gate_doc(result, name: str = "stack") -> dict:
    """A measurement shaped like `check.measure`'s, from one counted model."""
    r = result.rows[0]
    return {"recorded": {"cost": dict(result.env)},
            "models": {name: {"artifacts": {"int8": {"bytes": r.bytes, "instructions": r.instructions}}}}}


@needs_valgrind
def test_gate_flags_an_extra_conv_and_not_a_rerun_under_load(stacks):
    """The 2 % gate fails a model with one more conv (+5 %), passes the same model counted again
    in another process while a busy loop competes for the CPU, and the counts are exact."""
    cfg = CostConfig(invokes=2, warmup=1)
    first = instructions_per_invoke([stacks["base"], stacks["extra_conv"]], cfg)
    base_row, extra_row = first.rows
    assert base_row.spread_rel == 0.0 and len(base_row.per_invoke) == 2
    assert base_row.first_invoke >= base_row.instructions  # the warm-up invoke is not cheaper, and not counted
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        rerun = instructions_per_invoke([stacks["base"]], cfg)
    finally:
        busy.kill()
        busy.wait()
    # Exact, not merely within 0.5 %: a count does not depend on the machine's load.
    assert rerun.rows[0].instructions == base_row.instructions

    growth = extra_row.instructions / base_row.instructions - 1.0
    assert 0.03 < growth < 0.08, f"the extra conv should cost ~5 %, measured {100 * growth:.1f} %"
    baseline = baseline_document(_gate_doc(first), Tolerances())
    assert Tolerances().instructions_rel == 0.02
    ok = [i for i in compare(baseline, _gate_doc(rerun)) if i.metric == "instructions"]
    assert [i.status for i in ok] == ["ok"]
    regressed = _gate_doc(first)
    regressed["models"]["stack"]["artifacts"]["int8"]["instructions"] = extra_row.instructions
    bad = [i for i in compare(baseline, regressed) if i.metric == "instructions"]
    assert [i.status for i in bad] == ["FAIL"] and bad[0].failed
    assert bad[0].change == f"{100 * growth:+.1f} %"

    table = format_cost(first)
    assert f"{base_row.instructions:,}" in table and WINDOW in table


@pytest.mark.slow
@needs_valgrind
def test_cli_json_and_out_file(stacks, tmp_path):
    import json

    out = tmp_path / "cost.json"
    res = CliRunner().invoke(main, ["cost", str(stacks["base"]), "--invokes", "1", "--warmup", "0", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["rows"][0]["instructions"] > 100_000 and doc["rows"][0]["threads"] == 1
    assert doc["env"]["isa"] == simd_level() and doc["window"] == WINDOW
    assert json.loads(res.output)["rows"][0]["instructions"] == doc["rows"][0]["instructions"]


def test_arm_kit_counts_an_extra_conv_and_repeats_within_half_a_percent(stacks):
    """On the ARM cost kit (qemu-user, a core without dot-product), where it is built."""
    _arm_kit_or_skip()
    res = arm_instructions_per_invoke([stacks["base"], stacks["extra_conv"]], CostConfig(invokes=2, warmup=1))
    base_row, extra_row = res.rows
    assert all(r.spread_rel <= 0.005 and r.instructions > 100_000 for r in res.rows)
    assert res.isa.startswith("aarch64") and "dot-product" in res.isa and res.env["runtime"].startswith("ai-edge-litert")
    growth = extra_row.instructions / base_row.instructions - 1.0
    assert 0.03 < growth < 0.08, f"the extra conv should cost ~5 % on aarch64 too, measured {100 * growth:.1f} %"
