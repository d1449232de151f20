"""quant/fit.py, budget.py and recipes.py: the int8 fitter `convert` calls, its one budget, the
recipe registry, and convert's --max-shift / --int8-method options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pfld_export.cli import main
from pfld_export.errors import UsageError
from pfld_export.export.formats import select_formats
from pfld_export.export.pipeline import ConvertConfig
from pfld_export.preprocess import Preprocess
from pfld_export.quant.budget import P99_PER_MEAN, Int8Budget
from pfld_export.quant.fit import DEFAULT_MAX_SECONDS, Int8Config, int8_config_for
from pfld_export.quant.recipes import INT8_RECIPES, default_recipes, parse_recipes, weight_fix_of


@pytest.mark.parametrize("args, needle", [
    (["--max-shift", "0.25"], "--int8"),
    (["--int8", "--max-nme-increase", "0.002"], "--eval-data"),
    (["--int8", "--int8-method", "plain,magic"], "magic"),
    (["--int8", "--max-shift", "-1"], "positive"),
])
def test_convert_budget_options_refuse_bad_input_in_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    ckpt = _tiny_checkpoint(tmp_path)
    res = CliRunner().invoke(main, ["convert", str(ckpt), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in res.output


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
    from pfld_export.model import ModelConfig, build_model

    pfld, aux = build_model(width=0.25)
    return save_checkpoint(tmp_path / "tiny.pth", pfld, CheckpointMeta(model=ModelConfig(width=0.25), preprocess=Preprocess()), aux)


def test_convert_max_shift_failure_is_one_line_with_the_best_figure(tmp_path: Path) -> None:
    """A real conversion (0.25X, synthetic calibration) against an impossible budget."""
    import torch

    torch.manual_seed(0)
    ckpt = _tiny_checkpoint(tmp_path)
    res = CliRunner().invoke(main, [
        "convert", str(ckpt), "--formats", "int8", "--calib", "synthetic:24:0", "--calib-count", "20", "--out",
        str(tmp_path / "o"), "--max-shift", "0.00001", "--int8-method", "plain",
    ])
    assert res.exit_code == 7, res.output
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    text = "\n".join(err)
    assert "Traceback" not in res.output
    # One short error line naming the check; the figure and the way out are on its FAIL line.
    assert len(err) == 1 and "int8 max-shift" in text
    fail = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL int8 max-shift:")]
    assert len(fail) == 1 and "best reached mean" in fail[0] and "--max-float-ops" in fail[0]
    assert "(budget mean 1e-05 px, p99 4e-05 px)" in fail[0]  # the p99 budget defaults to 4 x the mean
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    row = next(f for f in report["formats"] if f["format"] == "int8")
    check = next(c for c in row["checks"] if c["name"] == "max-shift")
    assert not check["ok"] and f"{row['shift']['mean_px']:.3f}" in check["detail"]


def test_convert_without_max_shift_checks_the_goal_and_only_warns(tmp_path: Path) -> None:
    """No --max-shift: the int8 goal is checked on held-out faces; a miss is a WARNING line with
    the figure and exit 0 (the same model under --max-shift exits 7, test above)."""
    import torch

    torch.manual_seed(0)
    ckpt = _tiny_checkpoint(tmp_path)
    res = CliRunner().invoke(main, [
        "convert", str(ckpt), "--formats", "int8", "--calib", "synthetic:24:0", "--calib-count", "20", "--out",
        str(tmp_path / "o"), "--int8-method", "plain",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    row = next(f for f in report["formats"] if f["format"] == "int8")
    goal = next(c for c in row["checks"] if c["name"] == "goal")
    s = row["shift"]
    assert goal["warn"] and goal["ok"] == (s["mean_px"] <= 0.25 and s["p99_px"] <= 1.0) and row["passed"]
    warned = [ln for ln in res.stdout.splitlines() if ln.startswith("WARNING int8 goal:")]
    assert len(warned) == (0 if goal["ok"] else 1)
    assert not warned or f"mean {s['mean_px']:.3f} px" in warned[0] and "--max-shift" in warned[0]
    assert "int8 recipe  plain (the converter's own calibration" in res.stdout


def test_bias_corrected_candidates_are_told_apart_by_their_weight_fix() -> None:
    """The mixed search also starts from the best float-preserving candidate; every
    bias-corrected name (with or without equalisation, any range method) must count as not."""
    assert all(weight_fix_of(m).bias for m in ("equalize+bias", "equalize+bias/mse", "bias", "bias/mse", "bias/qat-ranges",
                                               "bias+residual", "equalize+bias/mse+residual", "bias+residual+mixed"))
    assert not any(weight_fix_of(m).bias for m in ("plain", "plain/mse", "qat-ranges", "equalize", "equalize/percentile:99.99",
                                                   "plain+residual", "equalize/mse+residual"))
    assert all(weight_fix_of(m).equalize for m in ("equalize", "equalize/mse+mixed", "equalize+mixed", "equalize+bias+mixed"))
    assert not any(weight_fix_of(m).equalize for m in ("plain+mixed", "bias/qat-ranges", "qat-ranges+mixed"))


def test_int8_config_for_picks_the_default_fit_unless_told_otherwise() -> None:
    fmts = select_formats(None, int8=True)
    cfg = ConvertConfig(model=Path("m.pth"), int8=True)
    got = int8_config_for(cfg, fmts)
    assert got is not None and got.methods == ("plain", "equalize+bias", "equalize") and got.recipe == "default"
    assert got.max_seconds == DEFAULT_MAX_SECONDS
    assert got.budget.max_shift_px is None  # no budget: the goal only warns
    assert int8_config_for(dataclasses.replace(cfg, int8_methods=("plain",)), fmts) is None  # the converter's own int8
    budget = int8_config_for(dataclasses.replace(cfg, budget=Int8Budget(max_shift_px=0.25)), fmts)
    assert budget is not None and budget.methods == ("plain", "equalize", "equalize+bias", "mixed")
    assert budget.recipe == "methods" and budget.max_seconds is None
    assert budget.budget.p99_px == 1.0 and budget.budget.max_bytes == 2_000_000  # the size budget rides along
    assert int8_config_for(dataclasses.replace(cfg, int8_max_seconds=0.0), fmts).max_seconds is None  # type: ignore[union-attr]
    assert int8_config_for(dataclasses.replace(cfg, int8_max_seconds=5.0), fmts).max_seconds == 5.0  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="--int8-max-seconds -1"):
        int8_config_for(dataclasses.replace(cfg, int8_max_seconds=-1.0), fmts)
    assert int8_config_for(ConvertConfig(model=Path("m.pth")), select_formats(None)) is None  # nothing calibrated


def test_int8_budget_defaults_and_the_p99_default() -> None:
    b = Int8Budget()
    assert (b.max_shift_px, b.max_p99_px, b.max_nme_increase, b.max_bytes) == (None, None, None, None)
    assert b.max_float_ops == 16 and b.max_slowdown == 1.15 and not b.given and b.p99_px is None
    assert P99_PER_MEAN == 4.0
    assert Int8Budget(max_shift_px=0.25).p99_px == 1.0  # 4 x the mean
    assert Int8Budget(max_shift_px=0.25, max_p99_px=0.5).p99_px == 0.5  # an asked p99 wins
    assert Int8Budget(max_nme_increase=0.0).given
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.max_float_ops = 3  # type: ignore[misc]


@pytest.mark.parametrize("kw, message", [
    ({"max_shift_px": 0.0}, "--max-shift 0.0 must be a positive number of pixels"),
    ({"max_shift_px": 0.2, "max_p99_px": -1.0}, "--max-shift-p99 -1.0 must be a positive number of pixels"),
    ({"max_p99_px": 1.0}, "--max-shift-p99 needs --max-shift (the mean budget) as well"),
    ({"max_nme_increase": -0.1}, "--max-nme-increase -0.1 must be >= 0"),
    ({"max_float_ops": -1}, "--max-float-ops -1 must be >= 0"),
    ({"max_slowdown": 0.9}, "--max-slowdown 0.9 must be >= 1 (a ratio to the all-int8 model's latency)"),
])
def test_int8_budget_refuses_bad_values_with_the_flag_to_fix(kw: dict[str, float], message: str) -> None:
    with pytest.raises(UsageError) as e:
        Int8Budget(**kw)  # type: ignore[arg-type]
    assert str(e.value) == message


def test_budget_meets_and_scores_shifts() -> None:
    from pfld_export.export.validate import ShiftStats

    b = Int8Budget(max_shift_px=0.5)
    ok = ShiftStats(faces=4, mean_px=0.4, p99_px=1.9, max_px=3.0)
    wide = dataclasses.replace(ok, p99_px=2.5)
    assert b.meets(ok) and not b.meets(wide)
    assert b.score(ok) == pytest.approx(0.95) and b.score(wide) == pytest.approx(1.25)


def test_every_recipe_is_a_convert_choice_listed_in_help() -> None:
    res = CliRunner().invoke(main, ["convert", "--help"])
    assert res.exit_code == 0
    help_text = " ".join(res.output.split())
    assert f"Comma-separated int8 recipes: {', '.join(INT8_RECIPES)}" in help_text
    assert set(INT8_RECIPES) == {"plain", "equalize", "equalize+bias", "mixed"}
    assert parse_recipes(",".join(INT8_RECIPES)) == tuple(INT8_RECIPES)
    assert parse_recipes(" plain , mixed ") == ("plain", "mixed")
    for name, recipe in INT8_RECIPES.items():
        assert recipe.name == name and Int8Config(methods=(name,)).methods == (name,)


def test_recipes_drive_the_default_fits() -> None:
    assert default_recipes(budget=False) == ("plain", "equalize+bias", "equalize")  # best first: the cap cuts the last
    assert default_recipes(budget=True) == tuple(INT8_RECIPES)
    assert [r.name for r in INT8_RECIPES.values() if r.mixed] == ["mixed"]
    assert INT8_RECIPES["equalize+bias"].fix is not None and INT8_RECIPES["equalize+bias"].fix.bias
    assert INT8_RECIPES["mixed"].fix is None and INT8_RECIPES["plain"].ranges == ("minmax", "mse")
    assert Int8Config().ranges_of("equalize") == ("minmax", "mse") and Int8Config(range_methods=("mse",)).ranges_of("bias") == ("mse",)


def test_an_unknown_recipe_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"int8 method\(s\) \['magic'\] unknown; choose from plain, equalize, equalize\+bias, mixed"):
        parse_recipes("plain,magic")
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "m.pth"), "--int8", "--int8-method", "magic", "--out", str(tmp_path / "o")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1
    assert lines[0] == "error: int8 method(s) ['magic'] unknown; choose from plain, equalize, equalize+bias, mixed"
