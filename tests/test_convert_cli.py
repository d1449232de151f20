"""`pfld-export convert` on the command line: bad input is one line and a non-zero exit; the real
third-party fixtures convert end to end (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
from pfld_export.cli import main
from pfld_export.errors import DataError, UsageError
from pfld_export.model import LandmarkModel, build_model
from pfld_export.preprocess import Preprocess

from .conftest import fixture_path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    pfld, aux = build_model(width=0.25)
    return save_checkpoint(tmp_path / "w025.pth", pfld, CheckpointMeta(model=pfld.config, preprocess=Preprocess()), aux=aux)


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def _one_error(result: Result, exit_code: int) -> str:
    """The command failed with `exit_code` and said so in exactly one `error:` line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_checkpoint(tmp_path: Path) -> None:
    line = _one_error(_run(tmp_path / "nope.pth", "--out", tmp_path / "o"), UsageError.exit_code)
    assert "nope.pth does not exist" in line
    assert not (tmp_path / "o" / "report.json").exists()


def test_empty_calibration_folder(ckpt: Path, tmp_path: Path) -> None:
    empty = tmp_path / "faces"
    empty.mkdir()
    line = _one_error(_run(ckpt, "--int8", "--calib", empty, "--out", tmp_path / "o"), DataError.exit_code)
    assert str(empty) in line and "no image files" in line


def test_too_few_calibration_faces(ckpt: Path, tmp_path: Path) -> None:
    # Two real photos hold fewer than the 20 faces int8 calibration needs: refuse, do not guess ranges.
    src = fixture_path("unlabeled")
    few = tmp_path / "few"
    few.mkdir()
    for name in ("astronaut.png", "t1.jpg"):
        os.symlink(src / name, few / name)  # referenced in place, never copied
    line = _one_error(_run(ckpt, "--int8", "--calib", few, "--out", tmp_path / "o"), DataError.exit_code)
    assert "usable faces, need at least 20" in line


def test_calib_count_below_minimum(ckpt: Path, tmp_path: Path) -> None:
    line = _one_error(_run(ckpt, "--int8", "--calib-count", "5", "--out", tmp_path / "o"), DataError.exit_code)
    assert "--calib-count 5" in line


def test_bad_eval_data_fails_before_converting(ckpt: Path, tmp_path: Path) -> None:
    result = _run(ckpt, "--eval-data", f"300w:{tmp_path / 'nowhere'}", "--out", tmp_path / "o")
    line = _one_error(result, DataError.exit_code)
    assert "nowhere" in line
    assert "convert: onnx" not in result.stderr  # no conversion work was started


def test_unwritable_output_folder(ckpt: Path, tmp_path: Path) -> None:
    # A regular file where a folder should be: unwritable even for root (chmod would not stop root).
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    line = _one_error(_run(ckpt, "--out", blocker / "sub"), UsageError.exit_code)
    assert "not writable" in line and "--out" in line


def test_width_contradicting_the_weights(ckpt: Path, tmp_path: Path) -> None:
    line = _one_error(_run(ckpt, "--width", "1.0", "--out", tmp_path / "o"), UsageError.exit_code)
    assert "--width 1.0 contradicts" in line and "0.25X" in line and "train --width 1.0" in line


def test_matching_width_is_accepted_up_to_the_next_error(ckpt: Path, tmp_path: Path) -> None:
    # --width equal to the weights' passes the check; the run then stops at the (bad) calib spec.
    line = _one_error(_run(ckpt, "--width", "0.25", "--calib", tmp_path / "missing", "--out", tmp_path / "o"), DataError.exit_code)
    assert "neither an existing folder" in line


def test_foreign_onnx_needs_preprocessing_flags(tmp_path: Path) -> None:
    pfld, _ = build_model(width=0.25)
    onnx_path = tmp_path / "foreign.onnx"
    torch.onnx.export(LandmarkModel(pfld).eval(), (torch.zeros(1, 3, 112, 112),), str(onnx_path), dynamo=False,
                      input_names=["input"], output_names=["output"], opset_version=13)
    line = _one_error(_run(onnx_path, "--out", tmp_path / "o"), UsageError.exit_code)
    assert "no preprocessing metadata" in line and "--color" in line and "--mean" in line


def test_width_checked_against_our_onnx_metadata(ckpt: Path, tmp_path: Path) -> None:
    from pfld_export.checkpoint import load_checkpoint
    from pfld_export.export.onnx import OnnxConfig, to_onnx

    art = to_onnx(load_checkpoint(ckpt), OnnxConfig(path=tmp_path / "ours.onnx"))
    # Our ONNX carries its preprocessing and model config: no --color needed, and --width is checked.
    line = _one_error(_run(art.path, "--width", "0.5", "--out", tmp_path / "o"), UsageError.exit_code)
    assert "--width 0.5 contradicts ours.onnx" in line and "0.25X" in line


@pytest.mark.parametrize(("args", "needle"), [
    (["--formats", "fp32,int4"], "unknown format 'int4'"),
    (["--mean", "0.5,0.5"], "--mean '0.5,0.5' is not one number or three"),
    (["--size-budget", "big"], "size 'big' is not understood"),
])
def test_bad_options(ckpt: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    line = _one_error(_run(ckpt, *args, "--out", tmp_path / "o"), UsageError.exit_code)
    assert needle in line


# ------------------------------------------------------------------ real fixtures, end to end


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _check_real_conversion(result: Result, out: Path, stem: str) -> dict:
    # A budget miss (exit 7) is a legitimate outcome for a third-party model; anything else is not.
    assert result.exit_code in (0, 7), result.output
    rep = _report(out)
    by = {f["format"]: f for f in rep["formats"]}
    assert list(by) == ["fp32", "int8", "full-int8"]
    # The float TFLite is the source's math: within 0.01 px on every held-out real face.
    assert by["fp32"]["shift"]["max_px"] <= 0.01 and by["fp32"]["shift"]["faces"] >= 10
    for f in ("int8", "full-int8"):
        assert (out / f"{stem}_{f.replace('-', '_')}.tflite").is_file()
        s = by[f]["shift"]
        assert s is not None and 0 < s["mean_px"] <= s["max_px"]
        assert f"{round(s['mean_px'], 4):.4g}" in result.output  # the table reports it (4 decimals, 4 digits)
        assert by[f]["ops"]["builtin_only"]
    assert "real faces found by yunet" in rep["calibration"] and rep["validation"].startswith("held-out")
    return rep


@pytest.mark.slow
def test_pfld_pytorch_17_point_checkpoint(tmp_path: Path) -> None:
    ckpt_path = fixture_path("checkpoints", "pfld17_w050_dwconv2_polariszhao_layout.pth.tar")
    out = tmp_path / "out"
    result = _run(ckpt_path, "--int8", "--calib", fixture_path("unlabeled"), "--out", out, "--width", "0.5")
    rep = _check_real_conversion(result, out, "pfld17_w050_dwconv2_polariszhao_layout")
    assert rep["model"]["points"] == 17 and rep["model"]["conv2"] == "depthwise" and rep["reference"] == "torch"


@pytest.mark.slow
def test_ghostone_onnx(tmp_path: Path) -> None:
    onnx_path = fixture_path("checkpoints", "pfld_ghostone_98pt.onnx")
    out = tmp_path / "out"
    result = _run(onnx_path, "--int8", "--calib", fixture_path("unlabeled"), "--out", out,
                  "--color", "RGB", "--mean", "0.5", "--std", "0.5")
    rep = _check_real_conversion(result, out, "pfld_ghostone_98pt")
    assert rep["reference"] == "onnx" and rep["preprocess"]["color"] == "RGB"
    # Its four whole-map AveragePools (56, 28, 14, 7 px) were rewritten to ReduceMean (the int8 head pitfall).
    assert len(rep["onnx"]["rewrites"]) == 4
    assert {f["format"]: f["passed"] for f in rep["formats"]} == {"fp32": True, "int8": True, "full-int8": True}
    # A real trained model under int8, on real held-out faces (benchmarks/conversion.md: int8 0.62 px mean /
    # 4.06 p99, full-int8 0.58 / 3.06). Bounds about twice that: the AvgPool head this model ships with,
    # not rewritten, gave 6.0 px mean / 31 px max; the registry budget (3 / 16 px) would let half of that pass.
    for f in ("int8", "full-int8"):
        s = next(r for r in rep["formats"] if r["format"] == f)["shift"]
        assert s["mean_px"] <= 1.2 and s["p99_px"] <= 8.0, (f, s)
    # Its fp32 (2.8 MB) is over the default 2 MB, but with --int8 it is only the reference: a warning.
    size = next(c for c in rep["formats"][0]["checks"] if c["name"] == "size")
    assert not size["ok"] and size["warn"] and result.exit_code == 0
    assert "WARNING fp32 size: " in result.output


# ------------------------------------------------------------------ stage 0: the network its authors trained

FORK = "pfld17_w050_relu6_epoch68"


def _fork_onnx_diff(ours: Path, theirs: Path, n: int = 4) -> float:
    """Max difference of the landmark outputs on random inputs (the fork's export keeps its
    weights as graph inputs and puts the 28x28 feature first: pick the 34-value output)."""
    import numpy as np

    from pfld_export.runtime import open_predictor
    from pfld_export.stage0 import reference_outputs

    x = np.random.default_rng(0).random((n, 3, 112, 112), dtype=np.float32)
    ref = reference_outputs(theirs, x, 34)
    sess = open_predictor(ours).session  # type: ignore[attr-defined]
    got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0].reshape(1, -1) for i in range(n)])
    return float(np.abs(got - ref).max())


@pytest.mark.slow
def test_fork_checkpoint_reproduces_its_authors_onnx_without_hint_flags(tmp_path: Path) -> None:
    ckpt_path = fixture_path("checkpoints", f"{FORK}.pth.tar")
    out = tmp_path / "out"
    result = _run(ckpt_path, "--formats", "fp32", "--calib", fixture_path("unlabeled"), "--keep-onnx", "--out", out)
    assert result.exit_code == 0, result.output
    rep = _report(out)
    assert rep["model"]["activation"] == "relu6" and rep["stage0"]["how"]["activation"] == "measured"
    assert "stage 0" in result.output
    assert _fork_onnx_diff(out / f"{FORK}.onnx", fixture_path("checkpoints", f"{FORK}_fork_export.onnx")) <= 1e-4


@pytest.mark.slow
def test_reference_onnx_passes_and_a_wrong_activation_is_refused(tmp_path: Path) -> None:
    ckpt_path = fixture_path("checkpoints", f"{FORK}.pth.tar")
    ref = fixture_path("checkpoints", f"{FORK}_fork_export.onnx")
    common = ("--formats", "fp32", "--calib", fixture_path("unlabeled"), "--reference-onnx", ref)
    ok = _run(ckpt_path, *common, "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    assert _report(tmp_path / "ok")["stage0"]["how"]["activation"] == "reference ONNX"
    line = _one_error(_run(ckpt_path, *common, "--activation", "relu", "--out", tmp_path / "bad"), 6)
    assert "stage 0" in line and "exceeds tolerance 0.0001" in line
    assert not (tmp_path / "bad" / f"{FORK}_fp32.tflite").exists()


def test_foreign_onnx_partial_preprocessing_is_measured_or_refused_naming_flags(tmp_path: Path) -> None:
    # GhostOne was trained on RGB [-1, 1]; --color RGB alone used to bake in mean 0 / std 1 silently.
    onnx_path = fixture_path("checkpoints", "pfld_ghostone_98pt.onnx")
    line = _one_error(_run(onnx_path, "--color", "RGB", "--formats", "fp32", "--out", tmp_path / "o"), UsageError.exit_code)
    assert "no preprocessing metadata" in line and "--mean" in line and "--std" in line and "--color ..." not in line
    assert not (tmp_path / "o" / "report.json").exists()


def test_eval_of_a_foreign_onnx_does_not_default_its_preprocessing(tmp_path: Path) -> None:
    onnx_path = fixture_path("checkpoints", "pfld_ghostone_98pt.onnx")
    r = CliRunner().invoke(main, ["eval", str(onnx_path), "--data", f"wflw:{fixture_path('wflw98')}", "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "no preprocessing metadata" in r.output and "--color" in r.output
    assert "Traceback" not in r.output
