"""Label-free distillation: end to end on synthetic faces with a tiny teacher, the label cache, the
weighted mix, and the refusals (teacher point count, empty data, width)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pfld_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pfld_export.cli import main
from pfld_export.data.records import FaceRecord
from pfld_export.data.specs import load_spec
from pfld_export.distil import DistilConfig, distil, mix, parse_source
from pfld_export.errors import UsageError
from pfld_export.io import file_sha256
from pfld_export.model import build_model
from pfld_export.preprocess import Preprocess
from pfld_export.report import format_distil
from pfld_export.runtime import open_predictor
from pfld_export.train import init_head, mean_shape

SPEC = "synthetic:24:5"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _teacher(path: Path, points: int, cache: Path, color: str = "BGR") -> Path:
    """A 0.25X PFLD whose head starts at the mean synthetic shape (so its answers are face-shaped);
    its backbone is random, so its answers also depend on the face it sees."""
    torch.manual_seed(1)
    model, aux = build_model(0.25, points)
    shape = mean_shape(load_spec(SPEC, cache_dir=cache).records)
    idx = np.linspace(0, 97, points).round().astype(int)
    init_head(model, shape[idx])
    layout = "wflw98" if points == 98 else f"custom{points}"
    meta = CheckpointMeta(model=model.config, preprocess=Preprocess(color=color, layout=layout))  # type: ignore[arg-type]
    return save_checkpoint(path, model.eval(), meta, aux)


def test_distil_end_to_end_student_predicts_teacher_points(tmp_path: Path, cache: Path) -> None:
    teacher = _teacher(tmp_path / "teacher.pth", 98, cache, color="RGB")
    out = tmp_path / "run"
    res = distil(DistilConfig(teacher=teacher, data=[SPEC], out=out, width=0.25, epochs=2, batch=8, cache_dir=cache,
                              threads=1))
    assert res.labels_file.is_file() and not res.labels_reused
    assert res.sources[0].faces == 24 and res.sources[0].val_faces > 0
    assert len(res.train.history) == 2 and np.isfinite(res.train.history[-1]["train_loss"])
    student = load_checkpoint(res.train.best_checkpoint)
    assert student.meta.model.points == 98 and student.meta.model.width == 0.25
    # The student carries our preprocessing, not the teacher's (RGB here).
    assert student.meta.preprocess.color == "BGR" and student.meta.preprocess.layout == "wflw98"
    prov = student.meta.provenance
    assert prov["trained_by"] == "pfld-export distil"
    assert prov["teacher"]["sha256"] == file_sha256(teacher) and prov["teacher"]["path"] == str(teacher)
    pred = open_predictor(res.train.best_checkpoint)
    crops = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    assert pred.predict(crops).shape == (2, 98, 2)
    # The labels are the teacher's points, not the synthetic annotations: the teacher's answer on a
    # face's 1.2x crop, mapped back to the image.
    z = np.load(res.labels_file)
    gt = {str(r.image_path): r.points for r in load_spec(SPEC, cache_dir=cache).records}
    first = str(z["image"][0])
    assert np.abs(z["points"][0] - gt[first]).mean() > 0.5

    # A second run with the same teacher and data reuses the cached labels (the teacher does not rerun).
    again = distil(DistilConfig(teacher=teacher, data=[SPEC], out=out, width=0.25, epochs=3, resume=out / "last.pth",
                                cache_dir=cache, threads=1))
    assert again.labels_reused and len(again.train.history) == 3
    text = format_distil(again)
    assert "reused" in text and str(teacher) in text and "synthetic:24:5" in text


def test_distil_cli_custom_layout_and_refusals(tmp_path: Path, cache: Path) -> None:
    """A teacher of an unknown 17-point layout trains (no flips, no pose term); the CLI prints one
    line per refusal, exits non-zero and writes nothing."""
    teacher = _teacher(tmp_path / "t17.pth", 17, cache)
    out = tmp_path / "s17"
    r = CliRunner().invoke(main, ["distil", "--teacher", str(teacher), "--data", f"{SPEC}@2", "--width", "0.5",
                                  "--epochs", "1", "--batch", "8", "--out", str(out), "--cache-dir", str(cache),
                                  "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])[0]  # stderr lines follow
    assert doc["teacher"]["points"] == 17 and doc["teacher"]["layout"] == "custom17"
    assert load_checkpoint(out / "best.pth").meta.model.points == 17

    def refused(args: list[str], code: int, words: str, where: Path) -> None:
        res = CliRunner().invoke(main, ["distil", *args, "--out", str(where), "--cache-dir", str(cache)])
        assert res.exit_code == code, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.output
        assert "Traceback" not in res.output and not where.exists()

    two = _teacher(tmp_path / "t2.pth", 2, cache)
    refused(["--teacher", str(two), "--data", SPEC], 2, "predicts 2 point(s)", tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["--teacher", str(teacher), "--data", str(empty)], 4, "no image files", tmp_path / "b")
    blank = tmp_path / "blank"
    blank.mkdir()
    import cv2

    cv2.imwrite(str(blank / "wall.png"), np.full((200, 200, 3), 128, np.uint8))
    refused(["--teacher", str(teacher), "--data", str(blank)], 4, "no faces found", tmp_path / "c")
    refused(["--teacher", str(teacher), "--data", SPEC, "--width", "0.3"], 2, "--width 0.3 is not supported", tmp_path / "d")
    refused(["--teacher", str(teacher), "--data", f"{SPEC}@zero"], 2, "weight", tmp_path / "e")


def test_parse_source_and_mix() -> None:
    assert parse_source("photos/").weight == 1.0 and parse_source("photos/").is_photos
    s = parse_source("synthetic:2000:3@0.5")
    assert (s.spec, s.weight, s.is_photos) == ("synthetic:2000:3", 0.5, False)
    for bad in ("photos/@-1", "@2", "photos/@x"):
        with pytest.raises(UsageError):
            parse_source(bad)
    a = [FaceRecord(image_path=Path(f"a{i}.png"), points=np.zeros((3, 2), np.float32)) for i in range(4)]
    b = [FaceRecord(image_path=Path(f"b{i}.png"), points=np.zeros((3, 2), np.float32)) for i in range(36)]
    recs, counts = mix([a, b], [3, 1], seed=0)
    assert counts == [30, 10] and len(recs) == 40
    # The small group repeats, every face about equally often; the large one is subsampled without repeats.
    names = [r.image_path.name for r in recs[:30]]
    assert {names.count(f"a{i}.png") for i in range(4)} <= {7, 8}
    assert len({r.image_path for r in recs[30:]}) == 10


def test_a_foreign_onnx_teacher_is_fed_as_its_flags_say(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An ONNX without our metadata is opened with the --color/--mean/--std given: nothing is left
    to measure (a real teacher such as GhostOne cannot be measured and would be refused)."""
    import onnx

    import pfld_export.stage0
    from pfld_export.distil import open_teacher

    def no_measuring(*_: object, **__: object) -> None:
        raise AssertionError("the flags say everything; nothing should be measured")

    monkeypatch.setattr(pfld_export.stage0, "measure_preprocess", no_measuring)
    from pfld_export.model import LandmarkModel

    loaded = load_checkpoint(_teacher(tmp_path / "t.pth", 98, cache))
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(LandmarkModel(loaded.model).eval(), (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False,
                      input_names=["input"], output_names=["output"])
    assert not onnx.load(str(path)).metadata_props  # a third party's export: nothing says how to feed it
    pred = open_teacher(DistilConfig(teacher=path, out=tmp_path / "o", color="rgb", mean=(0.5, 0.5, 0.5),
                                     std=(0.5, 0.5, 0.5)))
    assert (pred.preprocess.color, pred.preprocess.mean, pred.preprocess.std) == ("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert pred.num_points == 98
