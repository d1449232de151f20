"""quant/sensitivity.py: per-op int8 sensitivity on real TFLite int8 kernels (the tiny network of
conftest.py), and the `sensitivity` command's input checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pfld_export.cli import main
from pfld_export.errors import UsageError
from pfld_export.quant.graph import Calibrated
from pfld_export.quant.sensitivity import SensitivityConfig, measure_layers, plot_sensitivity, ranking


def test_sensitivity_ranks_every_quantizable_op_with_finite_shifts(tiny: dict[str, Any], tmp_path: Path) -> None:
    cal: Calibrated = tiny["cal"]
    rep = measure_layers(cal, tiny["ref"], tiny["val"], tiny["pre"], leave_one_out=True)
    quantizable = [o.tensor for o in cal.quantizable]
    assert sorted(r.tensor for r in rep.layers) == sorted(quantizable)  # one entry per quantizable op
    assert len(quantizable) >= 6
    for r in rep.layers:
        assert math.isfinite(r.alone.mean_px) and math.isfinite(r.alone.p99_px) and r.alone.mean_px >= 0
        assert r.float_gain_px is not None and math.isfinite(r.float_gain_px)
    means = [r.alone.mean_px for r in rep.layers]
    assert means == sorted(means, reverse=True) and [r.rank for r in rep.layers] == list(range(1, len(means) + 1))
    # quantizing one op alone never costs more than a few times the whole int8 model here
    assert max(means) <= 3 * rep.full_int8.mean_px + 1.0
    assert set(ranking(rep)) == set(quantizable)
    rep.model = "tiny"
    png = plot_sensitivity(rep, tmp_path / "s.png", top=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def test_sensitivity_refuses_a_bad_top_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--top 0 must be at least 1"):
        SensitivityConfig(model=tmp_path / "missing.pth", top=0)
    res = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "missing.pth"), "--top", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--top 0 must be at least 1" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["sensitivity", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.pth does not exist" in res.output
