"""Bad input and environment faults across every command: one line, a non-zero exit, no traceback.

Each block covers one cause (not one case): corrupt model files, thread counts, a full disk,
models that are not landmark models, and `predict` with nothing it could process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result

from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
from pfld_export.cli import main
from pfld_export.errors import DataError, UsageError
from pfld_export.errors import CheckpointError as ModelFileError, UsageError as OutputError
from pfld_export.model import ModelConfig, build_model
from pfld_export.preprocess import Preprocess

from .conftest import synthetic_face


def _run(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res: Result, code: int, needle: str) -> None:
    """Exit `code`, a SystemExit (not an escaped exception), one `error:` line containing `needle`."""
    assert isinstance(res.exception, SystemExit) or res.exception is None, f"escaped: {res.exception!r}\n{res.output}"
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert len(errors[0]) < 400, errors[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint, its ONNX, broken copies of it, a non-landmark ONNX and a face folder."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from pfld_export.checkpoint import load_checkpoint
    from pfld_export.export.onnx import OnnxConfig, to_onnx

    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    pfld, aux = build_model(0.25)
    ckpt = save_checkpoint(d / "tiny.pth", pfld, CheckpointMeta(model=ModelConfig(width=0.25), preprocess=Preprocess()), aux)
    good = to_onnx(load_checkpoint(ckpt), OnnxConfig(path=d / "tiny.onnx")).path
    (d / "truncated.onnx").write_bytes(good.read_bytes()[:5000])
    (d / "empty.onnx").write_bytes(b"")
    (d / "random.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    # A single Relu on the image: a valid ONNX whose "landmarks" would be 18,816 points.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 112, 112])
    relu = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 13)])
    relu.ir_version = 8
    onnx.save(relu, str(d / "relu.onnx"))
    faces = d / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "a.jpg"), synthetic_face(1)[0])
    return {"ckpt": ckpt, "onnx": good, "truncated": d / "truncated.onnx", "empty": d / "empty.onnx",
            "random": d / "random.onnx", "relu": d / "relu.onnx", "faces": faces}


def _commands(model: Path, a: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Every command that opens a model, with the model under test in the first slot."""
    return {
        "predict": ["predict", model, a["faces"]],
        "eval": ["eval", model, "--data", "synthetic:4", "--out", out / "eval"],
        "fidelity": ["fidelity", model, a["ckpt"], "--images", a["faces"]],
        "fidelity-b": ["fidelity", a["ckpt"], model, "--images", a["faces"]],
        "convert": ["convert", model, "--formats", "fp32", "--color", "BGR", "--out", out / "convert"],
        "bench": ["bench", model, "--reference", a["ckpt"], "--threads", "1", "--runs", "1", "--warmup", "0",
                  "--repeats", "1", "--in-process"],
    }


# --------------------------------------------------------------------------- 1. corrupt model files


@pytest.mark.parametrize("broken", ["truncated", "empty", "random"])
@pytest.mark.parametrize("command", ["predict", "eval", "fidelity", "fidelity-b", "convert", "bench"])
def test_corrupt_onnx_is_one_line_in_every_command(assets: dict[str, Path], tmp_path: Path, broken: str, command: str) -> None:
    res = _run(_commands(assets[broken], assets, tmp_path)[command])
    _one_line_error(res, ModelFileError.exit_code, "ONNX")
    assert assets[broken].name in res.output
    assert not (tmp_path / "convert").exists() and not (tmp_path / "eval").exists()


def test_corrupt_onnx_isolated_bench_keeps_the_exit_code(assets: dict[str, Path]) -> None:
    # The isolated benchmark opens the model in a worker process: the typed error must survive the pipe.
    res = _run(["bench", assets["truncated"], "--reference", assets["ckpt"], "--threads", "1", "--runs", "1",
                "--warmup", "0", "--repeats", "1"])
    _one_line_error(res, ModelFileError.exit_code, "not a readable ONNX model")


# --------------------------------------------------------------------------- 2. thread counts


@pytest.mark.parametrize("threads", ["0", "-1"])
@pytest.mark.parametrize("command", ["predict", "eval", "fidelity", "bench", "train", "qat"])
def test_threads_below_one_are_refused_alike_by_every_command(assets: dict[str, Path], tmp_path: Path, threads: str,
                                                              command: str) -> None:
    args = {**_commands(assets["ckpt"], assets, tmp_path),
            "train": ["train", "--data", "synthetic:12", "--epochs", "1", "--out", tmp_path / "train"],
            "qat": ["qat", "--init", assets["ckpt"], "--data", assets["faces"], "--out", tmp_path / "qat"],
            }[command]
    if command == "bench":
        args[args.index("--threads") + 1] = threads
    else:
        args += ["--threads", threads]
    res = _run(args)
    _one_line_error(res, UsageError.exit_code, f"--threads must be positive (a whole number of 1 or more), got {threads}")


def test_threads_check_is_in_the_library_not_only_the_cli(assets: dict[str, Path]) -> None:
    from pfld_export.runtime import open_predictor

    for bad in (0, -3):
        with pytest.raises(UsageError, match="--threads must be positive"):
            open_predictor(assets["ckpt"], threads=bad)
    assert open_predictor(assets["ckpt"], threads=1).predict(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, 98, 2)


# --------------------------------------------------------------------------- 3. a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, tiny filesystem (tmpfs) to fill up. Needs root (mount); skips where it cannot."""
    yield from _tmpfs(tmp_path, "256k")


def _tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root and mount(8); a full disk cannot be made here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); a full disk cannot be made")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def big_small_disk(tmp_path: Path) -> Iterator[Path]:
    """Like `small_disk`, with room for one tiny conversion (a 0.25X fp32 .tflite is ~1.3 MB)."""
    yield from _tmpfs(tmp_path, "8m")


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill `disk` until about `leave` bytes are free (tmpfs hands out whole 4 KiB pages)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass  # full: what we wanted


def test_full_disk_eval_writes_its_result_set_together_or_not_at_all(assets: dict[str, Path], small_disk: Path) -> None:
    # Room for eval.json (a few kB) but not for ced.png: the old code left eval.json alone.
    _fill(small_disk, leave=12 * 1024)
    out = small_disk / "eval"
    res = _run(["eval", assets["ckpt"], "--data", "synthetic:4", "--out", out])
    _one_line_error(res, OutputError.exit_code, "No space left on device")
    assert not (out / "eval.json").exists() and not (out / "ced.png").exists()
    assert not [p for p in out.glob(".*tmp*")], "temp files left behind"


def test_full_disk_bench_out_and_train_are_one_line(assets: dict[str, Path], small_disk: Path, tmp_path: Path) -> None:
    _fill(small_disk)
    res = _run(["bench", assets["ckpt"], "--threads", "1", "--runs", "1", "--warmup", "0", "--repeats", "1",
                "--in-process", "--out", small_disk / "bench.json"])
    _one_line_error(res, OutputError.exit_code, "No space left on device")
    res = _run(["train", "--data", "synthetic:12", "--epochs", "1", "--batch", "4", "--out", small_disk / "train",
                "--cache-dir", tmp_path / "cache", "--threads", "1"])
    _one_line_error(res, OutputError.exit_code, "No space left on device")
    assert not [p for p in (small_disk / "train").glob("*.pth")]


@pytest.mark.slow
def test_full_disk_convert_is_one_line_and_leaves_the_previous_set_as_it_was(assets: dict[str, Path],
                                                                            big_small_disk: Path) -> None:
    out = big_small_disk / "convert"
    res = _run(["convert", assets["ckpt"], "--formats", "fp32", "--out", out, "--calib-count", "20"])
    assert res.exit_code == 0, res.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"report.json", "tiny_fp32.json", "tiny_fp32.tflite"}
    _fill(big_small_disk)
    res = _run(["convert", assets["ckpt"], "--formats", "fp32,fp16", "--out", out, "--calib-count", "20"])
    _one_line_error(res, OutputError.exit_code, "No space left on device")
    # Together or not at all: the earlier result set is untouched, no half-written new one beside it.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_read_only_output_is_one_line(assets: dict[str, Path], small_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = _run(["bench", assets["ckpt"], "--threads", "1", "--runs", "1", "--warmup", "0", "--repeats", "1",
                "--in-process", "--out", small_disk / "bench.json"])
    assert res.exit_code == UsageError.exit_code and "Traceback" not in res.output, res.output
    assert "writable" in res.output or "Read-only" in res.output


# --------------------------------------------------------------------------- 4. not a landmark model


@pytest.mark.parametrize("command", ["predict", "eval", "fidelity", "fidelity-b", "convert", "bench"])
def test_non_landmark_onnx_is_refused_by_every_command(assets: dict[str, Path], tmp_path: Path, command: str) -> None:
    out = tmp_path / "pred"
    args = _commands(assets["relu"], assets, tmp_path)[command]
    if command == "predict":
        args += ["--out", out]
    res = _run(args)
    _one_line_error(res, ModelFileError.exit_code, "is not a landmark model")
    assert "[1, 3, 112, 112]" in res.output and "56-point" not in res.output
    assert not (out / "predictions.json").exists()


def test_landmark_check_refuses_implausible_values(assets: dict[str, Path]) -> None:
    # A valid [1, 2N] output whose values are nowhere near the crop is not landmarks either.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pfld_export.runtime import open_predictor

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, [1, 196])
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    big = numpy_helper.from_array(np.full((1, 196), 1e6, np.float32), "big")
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
             helper.make_node("ReduceMean", ["flat"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Add", ["m", "big"], ["landmarks"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [shape, big]), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = assets["relu"].parent / "huge.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelFileError, match="is not a landmark model: on a probe face"):
        open_predictor(path)
    assert open_predictor(assets["onnx"]).num_points == 98  # the real thing still opens


# --------------------------------------------------------------------------- 5. predict with nothing processed


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "clip.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return {"empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt", "missing": tmp_path / "missing.jpg",
            "video": tmp_path / "clip.mp4"}


@pytest.mark.parametrize("case,needle", [("empty", "holds no image or video files"), ("corrupt", "cannot read image"),
                                         ("missing", "does not exist"), ("video", "cannot read video")])
def test_predict_with_nothing_processed_fails(assets: dict[str, Path], bad_inputs: dict[str, Path], tmp_path: Path,
                                              case: str, needle: str) -> None:
    res = _run(["predict", assets["ckpt"], bad_inputs[case], "--out", tmp_path / "out"])
    _one_line_error(res, DataError.exit_code, "no input could be processed")
    assert needle in res.output
    assert "convert it to .mp4" not in res.output  # the file already is one
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_predict_skipping_one_bad_file_among_good_ones_succeeds(assets: dict[str, Path], bad_inputs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    res = _run(["predict", assets["ckpt"], assets["faces"], bad_inputs["corrupt"], "--out", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "x.jpg" in res.output
    assert (tmp_path / "out" / "predictions.json").exists()


# --------------------------------------------------------------------------- weak spots


def test_random_bytes_pth_says_not_a_checkpoint_and_never_suggests_unsafe_loading(tmp_path: Path) -> None:
    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    res = _run(["info", bad])
    _one_line_error(res, ModelFileError.exit_code, "is not a PyTorch checkpoint")
    assert "weights_only" not in res.output


def test_readme_exit_code_table_matches_the_error_classes() -> None:
    import re

    from pfld_export import errors

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Exit codes"):]
    section = section[:section.index("\n## ", 3)]
    rows = re.findall(r"^\| (\d+) \|[^|]*\|([^|\n]*)\|", section, re.M)
    table = {name: int(code) for code, names in rows for name in re.findall(r"`(\w+)`", names)}
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.PfldError)}
    documented = {n for n in classes if n in table}
    assert documented >= {"PfldError", "UsageError", "OutputError", "CheckpointError", "ModelFileError", "DataError",
                          "ConversionError", "ToleranceError", "BudgetError", "DeviceError"}, documented
    for name in documented:
        assert classes[name].exit_code == table[name], (name, classes[name].exit_code, table[name])
    # Every class's code appears in the table, so a new code cannot go undocumented.
    assert {c.exit_code for c in classes.values()} <= {int(code) for code, _ in rows}


def test_size_budget_and_width_are_refused_before_any_work(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(["convert", assets["ckpt"], "--size-budget", "0", "--out", out])
    _one_line_error(res, UsageError.exit_code, "give a positive size")
    res = _run(["convert", assets["ckpt"], "--width", "0.3", "--out", out])
    _one_line_error(res, UsageError.exit_code, "--width 0.3 contradicts")
    assert "train --width 0.3" not in res.output and "drop --width" in res.output
    assert not out.exists()  # an early failure leaves no empty --out


def test_a_second_convert_into_a_locked_folder_stops_at_once(assets: dict[str, Path], tmp_path: Path) -> None:
    from pfld_export.io import locked_dir

    out = tmp_path / "out"
    with locked_dir(out):
        with pytest.raises(UsageError, match="another pfld-export run is writing into"):
            with locked_dir(out):
                pass
        res = _run(["convert", assets["ckpt"], "--formats", "fp32", "--out", out])
        _one_line_error(res, UsageError.exit_code, "another pfld-export run is writing into")
    assert not out.exists()  # created by the lock, left empty, removed again
    with locked_dir(out):  # released: the next run gets it
        (out / "kept.txt").write_text("x")
    assert (out / "kept.txt").exists()


def test_bench_arm_adb_failure_names_the_exit_code(assets: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "m.tflite"  # need not be valid: adb fails first
    model.write_bytes(b"x")
    res = _run(["bench-arm", model, "--benchmark-model", "/bin/true", "--adb", "/bin/false", "--out", tmp_path / "arm"])
    assert res.exit_code == 8 and "Traceback" not in res.output, res.output
    assert "failed: exit code 1, no output" in res.output and "failed: ;" not in res.output


@pytest.mark.slow
def test_rerun_with_fewer_formats_and_a_failed_budget_leaves_exactly_the_report(assets: dict[str, Path], tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    res = _run(["convert", assets["ckpt"], "--formats", "fp32,fp16", "--calib-count", "20", "--out", out])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.glob("*.tflite")} == {"tiny_fp32.tflite", "tiny_fp16.tflite"}
    res = _run(["convert", assets["ckpt"], "--formats", "fp32", "--size-budget", "1", "--calib-count", "20", "--out", out])
    _one_line_error(res, 7, "1 budget check(s) failed: fp32 size (")
    # fp16 is stale (the new report does not list it); the over-budget fp32 is not under its normal name.
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "tiny_fp32.over-budget.json", "tiny_fp32.over-budget.tflite"]
    side = json.loads((out / "tiny_fp32.over-budget.json").read_text())
    assert side["budget"]["passed"] is False and side["budget"]["failed"][0].startswith("size")
    report = json.loads((out / "report.json").read_text())
    assert [Path(a["path"]).name for a in report["artifacts"]] == ["tiny_fp32.over-budget.tflite"]


def test_a_full_disk_met_outside_our_writers_is_still_one_line() -> None:
    import errno

    import click

    from pfld_export.cli import friendly

    @click.command()
    @friendly
    def writes_elsewhere() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/onnx2tf-x/model.pb")

    @click.command()
    @friendly
    def has_a_bug() -> None:
        raise OSError(errno.EBADF, "bad file descriptor")

    res = CliRunner().invoke(writes_elsewhere, [])
    _one_line_error(res, OutputError.exit_code, "No space left on device writing /tmp/onnx2tf-x/model.pb")
    res = CliRunner().invoke(has_a_bug, [])
    assert isinstance(res.exception, OSError)  # a bug is not dressed up as a user error
