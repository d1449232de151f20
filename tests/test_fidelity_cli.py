"""`pfld-export fidelity` (predict.fidelity_on_folder + evaluate.fidelity) through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
from pfld_export.cli import main
from pfld_export.errors import DataError, UsageError
from pfld_export.model import ModelConfig, build_model
from pfld_export.predict import FidelityConfig, fidelity_on_folder
from pfld_export.preprocess import Preprocess

from .conftest import fixture_path
from .conftest import synthetic_face


def _save(path: Path, seed: int, points: int = 98) -> Path:
    import torch

    torch.manual_seed(seed)
    pfld, _ = build_model(0.25, points)
    return save_checkpoint(path, pfld, CheckpointMeta(model=ModelConfig(width=0.25, points=points), preprocess=Preprocess()))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"a": _save(d / "a.pth", 0), "b": _save(d / "b.pth", 1), "p68": _save(d / "p68.pth", 0, 68)}


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faces")
    for i in range(3):
        cv2.imwrite(str(d / f"face{i}.png"), synthetic_face(i)[0])
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["fidelity", *args])
    assert "Traceback" not in r.output
    return r.exit_code, r.output


def test_model_against_itself_is_exactly_zero(models: dict[str, Path], faces_dir: Path) -> None:
    code, out = _run(str(models["a"]), str(models["a"]), "--images", str(faces_dir), "--json", "--threads", "1")
    assert code == 0, out
    doc = json.loads(out)
    r = doc["result"]
    assert r["count"] == 3 and doc["faces"] == 3
    assert (r["mean_px"], r["p99_px"], r["max_px"], r["mean_pct_iod"], r["p99_pct_iod"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert len(doc["problems"]) == 1 and "broken.jpg" in doc["problems"][0]["where"]


def test_different_models_shift_and_table(models: dict[str, Path], faces_dir: Path) -> None:
    code, out = _run(str(models["a"]), str(models["b"]), "--images", str(faces_dir), "--limit", "2", "--threads", "1")
    assert code == 0, out
    assert "landmark shift" in out and "% IOD" in out and "2 faces" in out
    rep = fidelity_on_folder(FidelityConfig(models["a"], models["b"], faces_dir, limit=2, threads=1))
    assert rep.result.mean_px > 0 and rep.result.max_px >= rep.result.p99_px >= 0
    # The same crops for both models: swapping A and B gives the same pixel shift.
    swapped = fidelity_on_folder(FidelityConfig(models["b"], models["a"], faces_dir, limit=2, threads=1))
    assert swapped.result.mean_px == pytest.approx(rep.result.mean_px)


def test_preprocess_override_applies_to_one_side(models: dict[str, Path], faces_dir: Path) -> None:
    same = fidelity_on_folder(FidelityConfig(models["a"], models["a"], faces_dir, color="RGB", limit=1, threads=1))
    assert same.result.mean_px == 0.0, "an override on both sides keeps them identical"
    one = fidelity_on_folder(FidelityConfig(models["a"], models["a"], faces_dir, color="RGB", mean=(0.5, 0.5, 0.5),
                                            override="b", limit=1, threads=1))
    assert one.result.mean_px > 0.0 and one.model_b["preprocess"]["color"] == "RGB"
    assert one.model_a["preprocess"]["color"] == "BGR"


def test_no_faces_is_refused_with_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((240, 320, 3), 120, np.uint8))
    code, out = _run(str(models["a"]), str(models["a"]), "--images", str(tmp_path))
    assert code == DataError.exit_code
    assert out.startswith("error: no faces found") and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("args,words", [
    (["--images", "/definitely/not/here"], "not a folder"),
    (["--images", ".", "--limit", "0"], "--limit"),
    (["--images", ".", "--mean", "a,b"], "--mean"),
])
def test_bad_arguments(models: dict[str, Path], args: list[str], words: str) -> None:
    code, out = _run(str(models["a"]), str(models["a"]), *args)
    assert code != 0 and words in out and len(out.strip().splitlines()) == 1, out


def test_point_count_mismatch(models: dict[str, Path], faces_dir: Path) -> None:
    with pytest.raises(UsageError, match="98 points but .* 68"):
        fidelity_on_folder(FidelityConfig(models["a"], models["p68"], faces_dir, threads=1))


def test_real_faces_onnx_against_itself() -> None:
    """The GhostOne ONNX (a foreign model: preprocessing from flags) on real unlabeled faces."""
    onnx = fixture_path("checkpoints", "pfld_ghostone_98pt.onnx")
    images = fixture_path("unlabeled")
    code, out = _run(str(onnx), str(onnx), "--images", str(images), "--limit", "12", "--color", "RGB",
                     "--mean", "0.5", "--std", "0.5", "--json", "--threads", "1")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["faces"] == 12 and doc["result"]["max_px"] == 0.0
    assert doc["model_a"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
