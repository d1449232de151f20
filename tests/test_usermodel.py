"""--model-class: the user's own network class, imported only on that flag, weights strict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pfld_export.cli import main
from pfld_export.errors import ShapeMismatchError, UsageError
from pfld_export.preprocess import Preprocess
from pfld_export.usermodel import ModelClassSpec, build, load_user_model

HERE = Path(__file__).parent / "usermodels"
GHOST = HERE / "ghostlike" / "models" / "pfld_ghost.py"
FLAT = HERE / "flat" / "flatnet.py"


def _crops(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _save_ghost(tmp_path: Path, points: int = 98) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build(ModelClassSpec(GHOST, "PFLD_GhostNet", {"width_factor": 1, "input_size": 112, "landmark_number": points}))
    # Fork style: DataParallel prefixes inside a `state_dict` wrapper.
    path = tmp_path / "ghost.pth"
    torch.save({"epoch": 5, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path, net.eval()


def _save_flat(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build(ModelClassSpec(FLAT, "FlatHeadNet", {"points": 5}))
    with torch.no_grad():  # a plausible face: five points around the crop centre, in pixels
        net.fc.weight.mul_(0.01)
        net.fc.bias.copy_(torch.tensor([38.0, 45, 74, 45, 56, 62, 42, 80, 70, 80]))
    path = tmp_path / "flat.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_package_style_sibling_imports_and_output_picked_by_size(tmp_path: Path) -> None:
    path, net = _save_ghost(tmp_path)
    spec = ModelClassSpec.parse(f"{GHOST}:PFLD_GhostNet", '{"width_factor": 1, "input_size": 112, "landmark_number": 98}')
    loaded = load_user_model(spec, path, _crops(), Preprocess())
    assert loaded.meta.provenance["output_index"] == 1 and loaded.num_points == 98
    assert loaded.meta.provenance["output_scale"] == 1.0  # sigmoid outputs: already [0, 1]
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded.inference_model()(x), net(x)[1])


def test_pixel_outputs_detected_and_normalised(tmp_path: Path) -> None:
    path, net = _save_flat(tmp_path)
    loaded = load_user_model(ModelClassSpec.parse(f"{FLAT}:FlatHeadNet", '{"points": 5}'), path, _crops(), Preprocess())
    assert loaded.meta.provenance["output_scale"] == pytest.approx(1 / 112)
    x = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded.inference_model()(x) * 112, net(x), atol=1e-4)
    forced = load_user_model(ModelClassSpec.parse(f"{FLAT}:FlatHeadNet", '{"points": 5}', output_scale=0.5), path, _crops(), Preprocess())
    assert forced.meta.provenance["output_scale"] == 0.5 and forced.meta.provenance["inferred"]["output_scale"] == "flag"


def test_onnx_round_trip_of_a_user_network(tmp_path: Path) -> None:
    from pfld_export.export.onnx import OnnxConfig, to_onnx
    from pfld_export.runtime import TorchPredictor, open_predictor

    path, _ = _save_flat(tmp_path)
    loaded = load_user_model(ModelClassSpec.parse(f"{FLAT}:FlatHeadNet", '{"points": 5}'), path, _crops(), Preprocess(layout="custom5"))
    art = to_onnx(loaded, OnnxConfig(path=tmp_path / "flat.onnx"))
    crops = _crops(4, seed=1)
    ours = TorchPredictor(path=path, preprocess=loaded.meta.preprocess, module=loaded.inference_model(), num_points=5).predict(crops)
    theirs = open_predictor(art.path).predict(crops)
    assert art.num_points == 5 and np.abs(ours - theirs).max() < 1e-3


def _convert(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", *args, "--formats", "fp32", "--out", str(out)])
    return r.exit_code, r.output, out


@pytest.mark.parametrize("case", ["missing file", "missing class", "failing constructor", "state dict mismatch", "bad json"])
def test_bad_model_class_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    path, _ = _save_flat(tmp_path)
    spec, margs = {
        "missing file": (f"{tmp_path}/nope.py:FlatHeadNet", '{"points": 5}'),
        "missing class": (f"{FLAT}:GhostHead", '{"points": 5}'),
        "failing constructor": (f"{FLAT}:FlatHeadNet", '{"points": 5, "depth": 3}'),
        "state dict mismatch": (f"{FLAT}:FlatHeadNet", '{"points": 7}'),
        "bad json": (f"{FLAT}:FlatHeadNet", '{points: 5'),
    }[case]
    code, output, out = _convert(tmp_path, str(path), "--model-class", spec, "--model-args", margs)
    assert code != 0 and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    needle = {"missing file": "does not exist", "missing class": "no nn.Module class 'GhostHead'",
              "failing constructor": "--model-args", "state dict mismatch": "fc.weight", "bad json": "not valid JSON"}[case]
    assert needle in output
    assert not out.exists() or not any(out.iterdir())


def test_user_code_runs_only_on_the_flag(tmp_path: Path) -> None:
    # The same weights without --model-class are refused as an unknown layout, naming the way forward.
    path, _ = _save_flat(tmp_path)
    code, output, _ = _convert(tmp_path, str(path))
    assert code != 0 and "--model-class" in output and "closest known layout" in output


def test_state_dict_mismatch_names_the_tensor(tmp_path: Path) -> None:
    path, _ = _save_flat(tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"fc\.weight is \(10, 392\) in the file, \(14, 392\) in the class"):
        load_user_model(ModelClassSpec.parse(f"{FLAT}:FlatHeadNet", '{"points": 7}'), path, _crops(), Preprocess())


def test_ambiguous_outputs_ask_for_output_index(tmp_path: Path) -> None:
    spec = ModelClassSpec.parse(f"{GHOST}:PFLD_GhostNet", output_index=5)
    path, _ = _save_ghost(tmp_path)
    with pytest.raises(UsageError, match="--output-index 5 is out of range"):
        load_user_model(spec, path, _crops(), Preprocess())


@pytest.mark.slow
def test_whole_chain_on_a_user_network(tmp_path: Path) -> None:
    path, _ = _save_flat(tmp_path)
    code, output, out = _convert(tmp_path, str(path), "--model-class", f"{FLAT}:FlatHeadNet", "--model-args", '{"points": 5}',
                                 "--color", "BGR", "--mean", "0", "--std", "1")
    assert code == 0, output
    assert (out / "flat_fp32.tflite").is_file() and "stage 0" in output
