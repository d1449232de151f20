from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
from pfld_export.cli import main
from pfld_export.data.records import FaceRecord, read_image
from pfld_export.data.specs import load_spec
from pfld_export.errors import DataError, UsageError
from pfld_export.evaluate import EvalConfig, evaluate, fidelity
from pfld_export.options import parse_triple
from pfld_export.layouts import WFLW98
from pfld_export.model import ModelConfig, build_model
from pfld_export.preprocess import Preprocess, crop_from_landmarks, preprocess_overrides
from pfld_export.runtime import open_predictor

from .conftest import fixture_path


@dataclass
class Oracle:
    """A test double that 'predicts' the ground truth, recomputing each crop's transform itself.

    If evaluate() crops, batches or maps points back wrongly, its NME is no longer ~0.
    `noisy` gives some faces a known error, to check outliers are named.
    """

    records: list[FaceRecord]
    scale: float = 1.2
    noisy: dict[int, float] = field(default_factory=dict)
    name: str = "oracle"
    backend: str = "test"
    preprocess: Preprocess = Preprocess()
    _i: int = 0

    @property
    def num_points(self) -> int:
        return self.records[0].num_points

    def predict(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for crop in crops:
            r = self.records[self._i]
            img = read_image(r.image_path)
            expect, tf = crop_from_landmarks(img, r.points, self.scale, 112)
            assert np.array_equal(crop, expect), "evaluate fed a different crop"
            p = tf.to_crop(r.points) + self.noisy.get(self._i, 0.0)
            out.append(p)
            self._i += 1
        return np.asarray(out, np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> list[FaceRecord]:
    return load_spec("synthetic:10:2", cache_dir=tmp_path_factory.mktemp("cache")).records


def test_perfect_predictor_scores_zero_and_outliers_are_named(synth: list[FaceRecord]) -> None:
    res = evaluate(Oracle(synth), synth, EvalConfig(batch_size=3))
    assert res.count == 10 and res.nme_mean < 1e-4 and res.auc > 0.99 and res.failure_rate == 0
    assert res.outliers == [] and res.layout == "wflw98" and "inter-ocular" in res.norm
    assert res.predictions is not None and np.allclose(res.predictions, np.stack([r.points for r in synth]), atol=0.01)
    noisy = Oracle(synth, noisy={4: 15.0, 7: 3.0})
    res = evaluate(noisy, synth, EvalConfig(batch_size=4))
    assert [s for s, _ in res.outliers] == [f"{synth[k].source} ({synth[k].image_path.name})" for k in (4, 7)]
    assert res.outliers[0][1] > res.outliers[1][1] > 0.01
    assert res.failure_rate == pytest.approx(np.mean(res.nme_per_face > 0.1))


def test_per_attribute_rows_follow_the_flags(synth: list[FaceRecord]) -> None:
    res = evaluate(Oracle(synth, noisy={0: 5.0}), synth)
    for k, name in enumerate(("pose", "expression", "illumination", "makeup", "occlusion", "blur")):
        n = sum(r.attributes[k] for r in synth)
        assert (name in res.per_attribute) == (n > 0)
        if n:
            assert res.per_attribute[name]["count"] == n


def test_progress_and_point_mismatch(synth: list[FaceRecord]) -> None:
    seen: list[tuple[int, int]] = []
    evaluate(Oracle(synth), synth, EvalConfig(batch_size=4), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    ibug_like = [FaceRecord(r.image_path, r.points[:68], layout="ibug68") for r in synth]
    with pytest.raises(DataError, match="predicts 98 points but the data has 68"):
        evaluate(Oracle(synth), ibug_like)
    with pytest.raises(DataError, match="no faces"):
        evaluate(Oracle(synth), [])


def test_real_68_point_faces_with_ppm_png_jpg() -> None:
    recs = load_spec(f"300w:{fixture_path('ibug68')}").records
    res = evaluate(Oracle(recs, noisy={3: 20.0}), recs)
    assert res.count == 11 and np.sum(res.nme_per_face > 1e-3) == 1 and res.layout == "ibug68"
    assert res.outliers[0][0] == recs[3].source  # the .pts path already names the image


class Shifted:
    """Model a's prediction moved by a fixed offset: fidelity must report exactly that offset."""

    def __init__(self, base: Any, offset: tuple[float, float]) -> None:
        self.base, self.offset = base, np.array(offset, np.float32)
        self.name, self.backend, self.preprocess, self.num_points = "shifted", "test", base.preprocess, base.num_points

    def predict(self, crops: np.ndarray) -> np.ndarray:
        return self.base.predict(crops) + self.offset

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pfld, aux = build_model(0.25, 98)
    meta = CheckpointMeta(model=ModelConfig(width=0.25, points=98), preprocess=Preprocess())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", pfld, meta, aux)


def test_fidelity(tiny_ckpt: Path) -> None:
    a = open_predictor(tiny_ckpt, threads=1)
    crops = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    same = fidelity(a, a, crops, WFLW98)
    assert (same.mean_px, same.p99_px, same.max_px, same.mean_pct_iod, same.count) == (0.0, 0.0, 0.0, 0.0, 5)
    moved = fidelity(a, Shifted(a, (3.0, 4.0)), crops, WFLW98, batch_size=2)
    assert moved.mean_px == pytest.approx(5.0, abs=1e-4) and moved.max_px == pytest.approx(5.0, abs=1e-4)
    pa = a.predict(crops).astype(np.float64)
    iod = np.linalg.norm(pa[:, 60] - pa[:, 72], axis=-1)
    assert moved.mean_pct_iod == pytest.approx(np.mean(500.0 / iod), rel=1e-4)
    with pytest.raises(DataError, match="crops shaped"):
        fidelity(a, a, crops[0], WFLW98)


def test_preprocess_flags() -> None:
    assert parse_triple("0.5", "--mean") == (0.5, 0.5, 0.5)
    assert parse_triple(" 1, 2,3", "--std") == (1.0, 2.0, 3.0) and parse_triple(None, "--std") is None
    pre = dataclasses.replace(Preprocess(), **preprocess_overrides(color="rgb", std=(0.5,)))
    assert pre.color == "RGB" and pre.std == (0.5, 0.5, 0.5) and pre.mean == (0.0, 0.0, 0.0)
    assert preprocess_overrides() == {}
    with pytest.raises(UsageError, match="--mean '0.5,0.5' is not one number or three"):
        parse_triple("0.5,0.5", "--mean")


def test_cli_acceptance_ghostone_on_wflw(tmp_path: Path) -> None:
    model = fixture_path("checkpoints", "pfld_ghostone_98pt.onnx")
    data = fixture_path("wflw98")
    out = tmp_path / "ev"
    res = CliRunner().invoke(main, ["eval", str(model), "--data", f"wflw:{data}", "--color", "RGB",
                                    "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "eval.json").read_text())
    assert report["count"] == 4 and 0.030 <= report["nme_mean"] <= 0.050
    assert report["preprocess"]["color"] == "RGB" and len(report["per_face"]) == 4
    assert (out / "ced.png").read_bytes()[:4] == b"\x89PNG"
    assert "NME mean" in res.output and f"{report['nme_mean']:.4g}" in res.output


def test_cli_with_our_checkpoint_on_synthetic(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFLD_EXPORT_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["eval", str(tiny_ckpt), "--data", "synthetic:6:3", "--out", str(tmp_path / "o"), "--json",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["count"] == 6 and report["model"]["backend"] == "torch" and report["nme_mean"] > 0


@pytest.mark.parametrize("args,code,match", [
    (["eval", "missing.onnx", "--data", "synthetic:2"], 2, "does not exist"),
    (["eval", "{ckpt}", "--data", "nope:x"], 4, "unknown dataset spec"),
    (["eval", "{ckpt}", "--data", "synthetic:2", "--mean", "1,2"], 2, "--mean '1,2' is not one number or three"),
    (["eval", "{ckpt}", "--data", "synthetic:2", "--crop-scale", "0"], 2, "crop scale"),
])
def test_cli_bad_input_is_one_line(args: list[str], code: int, match: str, tiny_ckpt: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFLD_EXPORT_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, [a.replace("{ckpt}", str(tiny_ckpt)) for a in args] + ["--out", str(tmp_path / "o")])
    assert res.exit_code == code, res.output
    assert match in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
