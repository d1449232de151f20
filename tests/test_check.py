"""The regression gate: comparison logic on synthetic baselines, the baselines file, the CLI,
and (slow) the real end-to-end gate against the committed models/baselines.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pfld_export.check import (
    METRICS,
    SCHEMA,
    CheckResult,
    Tolerances,
    baseline_document,
    compare,
    load_baseline,
    same_cost_env,
    same_cpu,
    write_baseline,
)
from pfld_export.cli import main
from pfld_export.errors import UsageError
from pfld_export.report import format_check

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "models" / "baselines.json"
MACHINE = {"cpu": "AMD EPYC", "logical_cores": 2}


def _measured(**overrides: float) -> dict:
    """A measurement shaped like `check.measure`'s, with per-metric overrides `fmt__metric=value`."""
    arts = {
        "torch": {"nme": 0.080, "latency_ms": 3.6},
        "fp32": {"bytes": 1_262_780, "instructions": 40_000_000, "latency_ratio": 0.17, "nme": 0.081, "shift_mean_px": 0.002,
                 "shift_max_px": 0.01},
        "int8": {"bytes": 404_160, "instructions": 12_000_000, "latency_ratio": 0.10, "nme": 0.085, "shift_mean_px": 0.6,
                 "shift_max_px": 2.5},
    }
    for k, v in overrides.items():
        fmt, metric = k.split("__")
        arts[fmt][metric] = v
    return {"recorded": {"machine": dict(MACHINE), "date": "2026-01-01T00:00:00+00:00", "cost": {"isa": "avx2"}},
            "models": {"pfld025": {"artifacts": arts}}}


def _baseline(tol: Tolerances | None = None) -> dict:
    return baseline_document(_measured(), tol or Tolerances())


def _status(items, artifact: str, metric: str) -> str:
    return next(i.status for i in items if i.artifact == artifact and i.metric == metric)


def test_identical_measurement_passes_every_metric():
    items = compare(_baseline(), _measured())
    assert items and all(i.status == ("info" if i.metric == "latency_ratio" else "ok") for i in items)
    gated = {(i.artifact, i.metric) for i in items if i.status == "ok"}
    assert ("int8", "bytes") in gated and ("torch", "nme") in gated and ("fp32", "instructions") in gated
    assert ("fp32", "latency_ratio") not in gated  # reported as info
    assert ("torch", "latency_ms") not in {(i.artifact, i.metric) for i in items}  # absolute ms are recorded, never compared


def test_size_growth_of_two_percent_fails_and_within_one_percent_passes():
    base = 404_160
    fail = compare(_baseline(), _measured(int8__bytes=base * 1.02))
    item = next(i for i in fail if i.artifact == "int8" and i.metric == "bytes")
    assert item.status == "FAIL" and item.failed
    assert item.change == "+2.0 %" and item.limit == pytest.approx(base * 1.01)
    ok = compare(_baseline(), _measured(int8__bytes=base * 1.009))
    assert _status(ok, "int8", "bytes") == "ok"


def test_a_shrink_past_the_tolerance_is_an_improvement_not_a_failure():
    items = compare(_baseline(), _measured(int8__bytes=404_160 * 0.95))
    item = next(i for i in items if i.artifact == "int8" and i.metric == "bytes")
    assert item.status == "improved" and not item.failed and "--update" in item.note


def test_instructions_gate_at_two_percent_and_latency_ratio_is_only_reported():
    tol = Tolerances()
    assert tol.instructions_rel == 0.02
    worse = compare(_baseline(), _measured(int8__instructions=12_000_000 * 1.025))
    item = next(i for i in worse if i.artifact == "int8" and i.metric == "instructions")
    assert item.status == "FAIL" and item.change == "+2.5 %" and item.limit == pytest.approx(12_240_000)
    assert _status(compare(_baseline(), _measured(int8__instructions=12_000_000 * 1.015)), "int8", "instructions") == "ok"
    # The CPU-time ratio twice as bad is a row of information, not a failure.
    slow = compare(_baseline(), _measured(int8__latency_ratio=0.20))
    item = next(i for i in slow if i.artifact == "int8" and i.metric == "latency_ratio")
    assert item.status == "info" and not item.failed and item.change == "+100.0 %"
    # Counted at another SIMD level (other XNNPACK kernels): warned, not gated; size still fails there.
    other = compare(_baseline(), _measured(int8__instructions=13_000_000, int8__bytes=500_000), gate_cost=False)
    assert _status(other, "int8", "instructions") == "warn"
    assert _status(other, "int8", "bytes") == "FAIL"


def test_without_valgrind_instruction_rows_are_skipped_loudly_not_passed():
    measured = _measured()
    for art in measured["models"]["pfld025"]["artifacts"].values():
        art.pop("instructions", None)
    why = "NOT MEASURED: valgrind is not installed"
    items = compare(_baseline(), measured, cost_skipped=why)
    skipped = [i for i in items if i.metric == "instructions"]
    assert len(skipped) == 2 and all(i.status == "skipped" and not i.failed and i.note == why for i in skipped)
    # Without a reason a missing count is a failure, as any missing metric.
    assert _status(compare(_baseline(), measured), "int8", "instructions") == "missing"
    result = CheckResult(passed=True, items=items, baseline_path="b.json", updated=False, latency_gated=True, cost_gated=True,
                         cost_skipped=why, baseline_recorded={}, measured=measured, wall_s=1.0)
    text = format_check(result)
    assert "SKIPPED: 2 instruction checks" in text and "NOT gated" in text and why in text


def test_cost_env_must_match_in_simd_level():
    assert same_cost_env({"cost": {"isa": "avx2"}}, {"cost": {"isa": "avx2", "tool": "valgrind-3.22.0"}})
    assert not same_cost_env({"cost": {"isa": "avx2"}}, {"cost": {"isa": "avx"}})
    assert same_cost_env({}, {"cost": {"isa": "avx2"}})  # a baseline from before counts: nothing to compare


def test_nme_and_shift_worse_than_budget_fail():
    items = compare(_baseline(), _measured(int8__nme=0.085 * 1.10, torch__nme=0.080 * 1.06))
    assert _status(items, "int8", "nme") == "FAIL"
    assert _status(items, "torch", "nme") == "FAIL"
    items = compare(_baseline(), _measured(int8__nme=0.085 * 1.03))
    assert _status(items, "int8", "nme") == "ok"
    items = compare(_baseline(), _measured(int8__shift_mean_px=0.6 + 0.15, int8__shift_max_px=2.5 + 0.5))
    assert _status(items, "int8", "shift_mean_px") == "FAIL"
    assert _status(items, "int8", "shift_max_px") == "ok"
    item = next(i for i in items if i.artifact == "int8" and i.metric == "shift_mean_px")
    assert item.change == "+0.15 px"


def test_nan_measurement_fails():
    items = compare(_baseline(), _measured(int8__nme=float("nan")))
    assert _status(items, "int8", "nme") == "FAIL"


def test_missing_artifact_fails_and_new_artifact_is_reported_but_passes():
    measured = _measured()
    del measured["models"]["pfld025"]["artifacts"]["int8"]
    items = compare(_baseline(), measured)
    missing = [i for i in items if i.artifact == "int8"]
    assert missing and all(i.status == "missing" and i.failed for i in missing)

    measured = _measured()
    measured["models"]["pfld025"]["artifacts"]["fp16"] = {"bytes": 650_000, "latency_ratio": 0.17}
    items = compare(_baseline(), measured)
    new = [i for i in items if i.artifact == "fp16"]
    assert {i.metric for i in new} == {"bytes", "latency_ratio"}
    assert all(i.status == "new" and not i.failed for i in new)


def test_tolerances_come_from_the_baselines_file():
    loose = _baseline(Tolerances(size_rel=0.05))
    assert _status(compare(loose, _measured(int8__bytes=404_160 * 1.02)), "int8", "bytes") == "ok"
    with pytest.raises(UsageError, match="unknown tolerance"):
        Tolerances.from_dict({"size": 0.1})
    with pytest.raises(UsageError, match="non-negative"):
        Tolerances.from_dict({"size_rel": -1})


def test_update_writes_a_file_that_then_passes(tmp_path):
    path = tmp_path / "models" / "baselines.json"
    measured = _measured(int8__bytes=410_000)
    write_baseline(path, measured, Tolerances(size_rel=0.02))
    assert [p.name for p in path.parent.iterdir()] == ["baselines.json"]  # atomic: no temp file left
    loaded = load_baseline(path)
    assert loaded["schema"] == SCHEMA and loaded["tolerances"]["size_rel"] == 0.02
    assert loaded["models"]["pfld025"]["artifacts"]["int8"]["bytes"] == 410_000
    items = compare(loaded, measured)
    assert items and all(i.status in ("ok", "info") for i in items)
    # ...and the old measurement, 1.4 % smaller, is now within the file's 2 % tolerance too.
    assert all(not i.failed for i in compare(loaded, _measured()))


def test_load_baseline_errors_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="--update"):
        load_baseline(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_baseline(bad)
    bad.write_text(json.dumps({"schema": 99, "models": {}}))
    with pytest.raises(UsageError, match="schema"):
        load_baseline(bad)


def test_same_cpu_needs_model_and_core_count():
    a = {"machine": {"cpu": "AMD EPYC", "logical_cores": 2}}
    assert same_cpu(a, {"machine": {"cpu": "AMD EPYC", "logical_cores": 2}})
    assert not same_cpu(a, {"machine": {"cpu": "AMD EPYC", "logical_cores": 4}})
    assert not same_cpu(a, {"machine": {"cpu": "Intel Xeon", "logical_cores": 2}})
    assert not same_cpu({}, a)


def test_committed_baselines_are_valid_and_a_tightened_copy_fails():
    """The committed file gates every reference model; tightened below itself, it must fail."""
    base = load_baseline(COMMITTED)
    assert set(base["models"]) == {"pfld025-synthetic", "pfld100-seeded"}
    keys = {m.key for m in METRICS}
    for name, model in base["models"].items():
        for fmt in ("fp32", "fp16", "dynamic", "int8", "full-int8"):
            assert {"bytes", "instructions", "latency_ratio"} <= set(model["artifacts"][fmt]) <= keys | {
                "file", "latency_ms", "latency_ratio_wall"}, (name, fmt)
    assert base["tolerances"]["instructions_rel"] == 0.02 and base["recorded"]["cost"]["isa"]
    assert "nme" in base["models"]["pfld025-synthetic"]["artifacts"]["int8"]
    assert all(i.status == ("info" if i.metric == "latency_ratio" else "ok") for i in compare(base, base))
    tight = copy.deepcopy(base)
    tight["models"]["pfld025-synthetic"]["artifacts"]["int8"]["bytes"] = int(
        base["models"]["pfld025-synthetic"]["artifacts"]["int8"]["bytes"] * 0.97)
    failed = [i for i in compare(tight, base) if i.failed]
    assert [(i.model, i.artifact, i.metric) for i in failed] == [("pfld025-synthetic", "int8", "bytes")]


def test_cli_missing_or_broken_baseline_is_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["check", "--baseline", str(tmp_path / "none.json")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "--update" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    res = runner.invoke(main, ["check", "--baseline", str(bad)])
    assert res.exit_code == 2 and "re-record it with --update" in res.output


def _run_check(baseline: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["check", "--baseline", str(baseline), "--reuse", "--work-dir", str(ROOT / "out" / "check"),
                                    "--cache-dir", str(ROOT / "out" / "reference"), *extra])
    return res.exit_code, res.output


@pytest.mark.slow
def test_real_check_passes_on_main_and_fails_when_a_baseline_is_tightened(tmp_path):
    """End to end: train/convert/benchmark (cached under out/), compare with the committed file."""
    code, out = _run_check(COMMITTED)
    assert code == 0, out
    assert "passed:" in out
    tight = load_baseline(COMMITTED)
    int8 = tight["models"]["pfld025-synthetic"]["artifacts"]["int8"]
    int8["bytes"] = int(int8["bytes"] * 0.98)
    int8["nme"] = int8["nme"] * 0.8
    path = tmp_path / "tight.json"
    path.write_text(json.dumps(tight))
    code, out = _run_check(path)
    assert code == 7, out
    assert "FAILED" in out and "int8" in out and "size" in out and "NME" in out


def test_count_instructions_without_valgrind_says_why_and_update_refuses(tmp_path):
    from pfld_export.bench.cost import CostConfig
    from pfld_export.check import CheckConfig, count_instructions, run_check
    from pfld_export.errors import ToolMissingError

    model = tmp_path / "m.tflite"
    model.write_bytes(b"not read: valgrind is looked up first")
    cfg = CheckConfig(baseline=tmp_path / "b.json", cost=CostConfig(valgrind="valgrind-that-is-not-installed"))
    counts, why = count_instructions([model], cfg)
    assert counts is None and why.startswith("NOT MEASURED") and "apt-get install valgrind" in why
    # --update without valgrind stops before any training or conversion: it would drop the counts.
    upd = CheckConfig(baseline=tmp_path / "b.json", update=True, work_dir=tmp_path / "w", cache_dir=tmp_path / "c",
                      cost=CostConfig(valgrind="valgrind-that-is-not-installed"))
    with pytest.raises(ToolMissingError, match="valgrind"):
        run_check(upd)
    assert not (tmp_path / "c").exists() and not (tmp_path / "b.json").exists()


def test_committed_reference_weights_are_the_baselines_weights():
    """The trained reference is read from its committed file, and that file is the one the
    baseline was measured on: weights changed without --update fail here, in the fast suite."""
    from pfld_export.checkpoint import load_checkpoint
    from pfld_export.io import file_sha256

    entry = load_baseline(COMMITTED)["models"]["pfld025-synthetic"]
    weights = ROOT / entry["weights"]
    assert file_sha256(weights) == entry["checkpoint_sha256"]
    loaded = load_checkpoint(weights)
    assert loaded.meta.model.width == 0.25 and loaded.aux is None  # the network only: no pose net, no optimizer


def test_a_trained_reference_comes_from_its_committed_weights_without_training(tmp_path):
    from pfld_export.check import REFERENCE_MODELS, CheckConfig, reference_checkpoint

    ref = next(r for r in REFERENCE_MODELS if r.epochs)
    cfg = CheckConfig(baseline=tmp_path / "b.json", cache_dir=tmp_path / "cache", reference_dir=tmp_path / "ref")
    with pytest.raises(UsageError, match=r"git checkout -- .*--retrain --update"):
        reference_checkpoint(ref, cfg)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / f"{ref.name}.pth").write_bytes(b"read by the converter, not here")
    assert reference_checkpoint(ref, cfg) == tmp_path / "ref" / f"{ref.name}.pth"
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_retrain_with_update_writes_the_committed_weights(tmp_path):
    from pfld_export.check import CheckConfig, ReferenceModel, reference_checkpoint
    from pfld_export.checkpoint import load_checkpoint

    ref = ReferenceModel("tiny-trained", width=0.25, epochs=1, accuracy=True, data="synthetic:48")
    cfg = CheckConfig(baseline=tmp_path / "b.json", cache_dir=tmp_path / "cache", reference_dir=tmp_path / "ref", retrain=True)
    trained = reference_checkpoint(ref, cfg)
    assert trained.parent.parent == tmp_path / "cache" and not (tmp_path / "ref").exists()  # no --update: nothing committed
    committed = reference_checkpoint(ref, CheckConfig(**{**cfg.__dict__, "update": True}))
    assert committed == tmp_path / "ref" / "tiny-trained.pth"
    a, b = load_checkpoint(trained), load_checkpoint(committed)
    assert b.aux is None and "optimizer" not in b.extra
    assert all((a.model.state_dict()[k] == v).all() for k, v in b.model.state_dict().items())


def test_other_weights_than_the_baselines_are_a_warning_row():
    base = _baseline()
    base["models"]["pfld025"].update(weights="models/reference/pfld025.pth", checkpoint_sha256="a" * 64)
    same = copy.deepcopy(_measured())
    same["models"]["pfld025"]["checkpoint_sha256"] = "a" * 64
    assert not [i for i in compare(base, same) if i.artifact == "weights"]
    other = copy.deepcopy(same)
    other["models"]["pfld025"]["checkpoint_sha256"] = "b" * 64
    rows = [i for i in compare(base, other) if i.artifact == "weights"]
    assert [(r.status, r.failed) for r in rows] == [("warn", False)] and "bbbbbbbbbbbb" in rows[0].note
