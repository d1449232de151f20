"""sensitivity.py and mixed.py: per-op int8 sensitivity on real TFLite int8 kernels, selective
quantization, the mixed-precision search and convert's --max-shift budget."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pfld_export.cli import main  # noqa: E402
from pfld_export.export.mixed import (  # noqa: E402
    Calibrated, MixedConfig, calibrate, float_op_count, predict_blob, quantize_calibrated, search_mixed,
)
from pfld_export.export.sensitivity import measure_layers, plot_sensitivity, ranking  # noqa: E402
from pfld_export.export.validate import shift_stats  # noqa: E402
from pfld_export.preprocess import Preprocess  # noqa: E402

POINTS = 5


def _crops(n: int, seed: int) -> np.ndarray:
    """Smooth random uint8 BGR crops (blurred blobs: activations behave like images, not noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 7, 7, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (112, 112), interpolation=cv2.INTER_CUBIC) for s in small])


@pytest.fixture(scope="module")
def tiny() -> Iterator[dict[str, Any]]:
    """A tiny landmark net as a TF function with constant weights (conv, depthwise, conv, two
    means, concat, dense): the op types PFLD converts to, in seconds instead of a full PFLD
    conversion."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def const(*shape: int, scale: float = 1.0) -> Any:
        return tf.constant(rng.normal(0, scale, shape).astype(np.float32))

    w1, b1 = const(3, 3, 3, 8, scale=0.5), const(8, scale=0.1)
    w2, b2 = const(3, 3, 8, 1, scale=0.3), const(8, scale=0.1)
    w3, b3 = const(1, 1, 8, 16, scale=0.3), const(16, scale=0.1)
    w4, b4 = const(3, 3, 16, 4, scale=0.3), const(4, scale=0.1)
    wf, bf = const(20, 2 * POINTS, scale=0.3), const(2 * POINTS, scale=0.1)

    def net(x: Any) -> Any:
        a = tf.nn.relu(tf.nn.conv2d(x, w1, 4, "VALID") + b1)
        b = tf.nn.relu(tf.nn.depthwise_conv2d(a, w2, [1, 2, 2, 1], "VALID") + b2)
        c = tf.nn.conv2d(b, w3, 1, "VALID") + b3
        # Two branches with very different ranges meeting in a concat: PFLD's head in miniature.
        s1 = tf.reduce_mean(c, axis=[1, 2])
        s2 = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(c, w4 * 20.0, 2, "VALID") + b4 * 20.0), axis=[1, 2])
        return tf.sigmoid(tf.matmul(tf.concat([s1, s2], 1), wf) + bf)

    spec = tf.TensorSpec((1, 112, 112, 3), tf.float32, name="input")
    func = tf.function(lambda x: {"landmarks": net(x)}, input_signature=[spec]).get_concrete_function()
    pre = Preprocess()
    calib, val = _crops(24, 1), _crops(6, 2)
    cal = calibrate(None, func, pre.apply(calib))
    ref = np.stack([net(pre.apply(val)[i : i + 1]).numpy().reshape(POINTS, 2) * 112 for i in range(len(val))])
    yield {"cal": cal, "pre": pre, "val": val, "ref": ref, "calib": calib}


def test_calibrated_float_model_matches_keras_and_int8_moves_it(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    got = predict_blob(cal.blob, tiny["pre"], tiny["val"])  # the calibrated flatbuffer still runs in float
    assert np.abs(got - tiny["ref"]).max() < 1e-3
    full = predict_blob(cal.quantize(), tiny["pre"], tiny["val"])
    s = shift_stats(tiny["ref"], full)
    assert 0 < s.mean_px < 20
    # every compute op int8 in the plain model; ranges were recorded for every op output
    assert float_op_count(cal.quantize()) == {}
    assert all(o.tensor in cal.ranges for o in cal.ops)


def test_mse_ranges_shrink_min_max_and_still_hold_zero(tiny: dict[str, Any]) -> None:
    from pfld_export.export.mixed import mse_range

    v = np.random.default_rng(0).laplace(0, 1, 20000)  # heavy tails, as activations have
    lo, hi = mse_range(v, float(v.min()), float(v.max()))
    assert lo <= 0 <= hi and hi < 0.95 * v.max() and lo > 0.95 * v.min()  # rare tails clipped: levels serve the bulk
    tight = np.random.default_rng(1).uniform(-1, 1, 20000)
    assert mse_range(tight, -1.0, 1.0)[1] > 0.9  # nothing to gain from clipping a uniform tensor


def test_selective_quantization_keeps_denylisted_ops_float(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    fc = next(o for o in cal.ops if o.op == "FULLY_CONNECTED")
    blob = quantize_calibrated(cal.blob, [fc.tensor])
    assert float_op_count(blob) == {"FULLY_CONNECTED": 1}
    everything = [o.tensor for o in cal.ops]
    assert sum(float_op_count(cal.quantize(everything)).values()) == len(cal.ops)


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


def test_mixed_search_meets_a_budget_with_few_float_ops(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    full = shift_stats(tiny["ref"], predict_blob(cal.quantize(), tiny["pre"], tiny["val"]))
    order = [o.tensor for o in cal.quantizable][::-1]  # output side first
    budget = MixedConfig(max_shift_px=full.mean_px / 4, max_float_ops=len(order))
    res = search_mixed(cal, order, tiny["ref"], tiny["val"], tiny["pre"], budget)
    assert res.met and res.shift.mean_px <= budget.max_shift_px
    assert 0 < len(res.float_ops) < len(cal.ops)
    assert sum(float_op_count(res.blob).values()) == len(res.float_ops)
    # an impossible budget is reported as not met, with the best candidate found
    res2 = search_mixed(cal, order[:1], tiny["ref"], tiny["val"], tiny["pre"], MixedConfig(max_shift_px=1e-9, max_float_ops=1))
    assert not res2.met and len(res2.steps) == 2


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
    from pfld_export.export.mixed import _bias_corrected

    assert all(_bias_corrected(m) for m in ("equalize+bias", "equalize+bias/mse", "bias", "bias/mse", "bias/qat-ranges",
                                            "bias+residual", "equalize+bias/mse+residual"))
    assert not any(_bias_corrected(m) for m in ("plain", "plain/mse", "qat-ranges", "equalize", "equalize/percentile:99.99",
                                                "plain+residual", "equalize/mse+residual"))
