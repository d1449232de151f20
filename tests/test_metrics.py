from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pfld_export.errors import DataError, UsageError
from pfld_export.layouts import IBUG68, WFLW98, custom_layout
from pfld_export.metrics import auc, ced, failure_rate, nme, normalizers, plot_ced, resolve_norm


def _faces(layout, n: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(20, 200, (n, layout.num_points, 2))


@pytest.mark.parametrize("layout", [WFLW98, IBUG68, custom_layout(17)], ids=lambda l: l.name)
@pytest.mark.parametrize("norm", ["inter-ocular", "inter-pupil", "box"])
def test_perfect_prediction_is_zero(layout, norm: str) -> None:
    gt = _faces(layout)
    assert np.all(nme(gt.copy(), gt, layout, norm) == 0.0)


@pytest.mark.parametrize("norm", ["inter-ocular", "inter-pupil", "box"])
def test_invariant_to_image_scaling(norm: str) -> None:
    gt = _faces(WFLW98, seed=1)
    pred = gt + np.random.default_rng(2).normal(0, 3, gt.shape)
    base = nme(pred, gt, WFLW98, norm)
    assert np.all(base > 0)
    for k in (0.25, 3.0):
        assert np.allclose(nme(pred * k, gt * k, WFLW98, norm), base, rtol=1e-12)


def test_hand_computed_inter_ocular() -> None:
    gt = np.zeros((68, 2))
    gt[:, 0] = np.linspace(0, 50, 68)
    gt[36] = (10.0, 20.0)
    gt[45] = (110.0, 20.0)  # inter-ocular distance 100
    pred = gt + (3.0, 4.0)  # every point off by 5 px
    assert nme(pred, gt, IBUG68)[0] == pytest.approx(0.05)
    assert nme(pred[None], gt[None], IBUG68).shape == (1,)


def test_inter_pupil_uses_pupils_or_eye_centres() -> None:
    wflw = _faces(WFLW98, 1)
    assert normalizers(wflw, WFLW98, "inter-pupil")[0] == pytest.approx(np.linalg.norm(wflw[0, 96] - wflw[0, 97]))
    ibug = _faces(IBUG68, 1)
    centres = ibug[0, 36:42].mean(0), ibug[0, 42:48].mean(0)
    assert normalizers(ibug, IBUG68, "inter-pupil")[0] == pytest.approx(np.linalg.norm(centres[0] - centres[1]))
    assert "no pupils" in resolve_norm(IBUG68, "inter-pupil")[1]


def test_custom_layout_falls_back_to_box_and_says_so() -> None:
    layout = custom_layout(17)
    used, why = resolve_norm(layout, "inter-ocular")
    assert used == "box" and "no eye corners" in why
    gt = _faces(layout, 1)
    diag = np.linalg.norm(gt[0].max(0) - gt[0].min(0))
    assert nme(gt + (6.0, 8.0), gt, layout)[0] == pytest.approx(10.0 / diag)


def test_bad_inputs() -> None:
    gt = _faces(IBUG68, 2)
    gt[1, 45] = gt[1, 36]
    with pytest.raises(DataError, match="face 1"):
        nme(gt, gt, IBUG68)
    with pytest.raises(DataError, match="shaped"):
        nme(gt[:, :60], gt[:, :60], IBUG68)
    with pytest.raises(UsageError, match="normalisation"):
        nme(gt, gt, IBUG68, "diagonal")
    with pytest.raises(DataError, match="no errors"):
        auc([])


def test_auc_and_failure_rate_hand_computed() -> None:
    assert auc(np.zeros(7)) == pytest.approx(1.0)
    assert auc([0.1, 0.3, np.inf]) == pytest.approx(0.0, abs=1e-3)
    assert auc([0.05]) == pytest.approx(0.5, abs=1e-3)  # CED is 0 up to 0.05, then 1
    assert auc([0.0, 0.05, 0.2, 0.02]) == pytest.approx((1.0 + 0.5 + 0.0 + 0.8) / 4, abs=1e-3)
    assert failure_rate([0.01, 0.2, 0.1, 0.11, np.nan]) == pytest.approx(3 / 5)  # 0.1 itself passes
    assert failure_rate([0.01, 0.2], threshold=0.3) == 0.0


def test_ced_is_a_cumulative_distribution() -> None:
    e = np.random.default_rng(3).uniform(0, 0.15, 200)
    x, y = ced(e, 0.1, steps=50)
    assert x[0] == 0 and x[-1] == pytest.approx(0.1) and len(x) == 51
    assert np.all(np.diff(y) >= 0) and y[-1] == pytest.approx(np.mean(e <= 0.1))


def test_plot_ced_writes_a_png_atomically(tmp_path: Path) -> None:
    out = plot_ced({"a": [0.02, 0.04, 0.2], "b": np.zeros(3)}, tmp_path / "plots" / "ced.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["ced.png"]
