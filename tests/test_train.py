"""Training: the dataset, one-batch overfits, resume, --init, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import default_collate

from pfld_export.checkpoint import load_checkpoint
from pfld_export.cli import main
from pfld_export.data.augment import AugmentConfig
from pfld_export.data.dataset import DatasetConfig, FaceDataset
from pfld_export.data.records import FaceRecord, read_image
from pfld_export.data.specs import load_spec
from pfld_export.data.synthetic import SyntheticConfig, generate
from pfld_export.errors import UsageError
from pfld_export.layouts import WFLW98
from pfld_export.model import ModelConfig, build_model
from pfld_export.preprocess import Preprocess, crop_from_landmarks
from pfld_export.train import TrainConfig, TrainEvent, epoch_batches, lr_at, mean_shape, train, train_step

from .conftest import fixture_path


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> list[FaceRecord]:
    """Twelve procedural faces (generated here: the test needs nothing from outside the repo)."""
    out = tmp_path_factory.mktemp("synth")
    return generate(SyntheticConfig(count=12, seed=3), out).records


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic-set cache folder shared by the train() runs below (each spec generated once)."""
    return tmp_path_factory.mktemp("cache")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overfit(records: list[FaceRecord], steps: int, loss: str = "pfld") -> list[float]:
    torch.manual_seed(0)
    ds = FaceDataset(records, WFLW98, Preprocess(), DatasetConfig(augment=None))
    batch = default_collate([ds[i] for i in range(len(ds))])
    model, aux = build_model(0.25, 98)
    model.train()
    aux.train()
    opt = torch.optim.Adam(list(model.parameters()) + list(aux.parameters()), lr=1e-3)
    return [float(train_step(model, aux, batch, loss, opt).total.detach()) for _ in range(steps)]


def test_overfit_one_batch_real_faces() -> None:
    """The 4 real WFLW fixture faces: the PFLD loss falls at least 10x within 40 steps."""
    folder = fixture_path("wflw98")
    records = load_spec(f"wflw:{folder}").records
    assert len(records) == 4
    losses = _overfit(records, 25)
    assert min(losses[-5:]) < losses[0] / 10, f"loss went {losses[0]:.3g} -> {losses[-1]:.3g}"


def test_overfit_one_batch_synthetic(synth: list[FaceRecord]) -> None:
    losses = _overfit(synth[:6], 25, loss="l2")
    assert min(losses[-5:]) < losses[0] / 10, f"loss went {losses[0]:.3g} -> {losses[-1]:.3g}"


def test_dataset_samples(synth: list[FaceRecord]) -> None:
    plain = FaceDataset(synth, WFLW98, Preprocess(), DatasetConfig(augment=None))
    s = plain.sample(0)
    assert s.crop.shape == (112, 112, 3) and s.crop.dtype == np.uint8
    # 1.2x landmark box: the points span 1/1.2 of the crop, centred.
    span = s.points.max(0) - s.points.min(0)
    assert span.max() == pytest.approx(112 / 1.2, abs=0.6)
    assert np.allclose((s.points.max(0) + s.points.min(0)) / 2, 56, atol=1.0)
    assert np.allclose(s.pose, synth[0].pose) and s.pose_valid  # exact pose of a synthetic face
    # The cached patch path crops exactly like evaluation does (preprocess.crop_from_landmarks).
    ref, tf = crop_from_landmarks(read_image(synth[0].image_path), synth[0].points, 1.2)
    assert np.abs(s.points - tf.to_crop(synth[0].points)).max() < 1e-6
    assert np.abs(s.crop.astype(np.float64) - ref).mean() < 4.0
    item = plain[0]
    assert item["image"].shape == (3, 112, 112) and item["target"].shape == (98, 2)
    assert torch.allclose(item["target"], torch.from_numpy(s.points / 112).float())
    # Augmented: reproducible for (seed, epoch, index), different across epochs; cached == uncached.
    aug = FaceDataset(synth, WFLW98, Preprocess(), DatasetConfig(augment=AugmentConfig(), seed=5))
    lazy = FaceDataset(synth, WFLW98, Preprocess(), DatasetConfig(augment=AugmentConfig(), seed=5, cache=False, cache_limit_mb=0))
    assert aug.cached and not lazy.cached
    a1, a2 = aug.sample(3, epoch=1), lazy.sample(3, epoch=1)
    assert np.array_equal(a1.crop, a2.crop) and np.allclose(a1.points, a2.points)
    assert not np.allclose(aug.sample(3, epoch=2).points, a1.points)


def test_dataset_refuses_mismatched_layout(synth: list[FaceRecord]) -> None:
    from pfld_export.errors import DataError
    from pfld_export.layouts import IBUG68

    with pytest.raises(DataError, match="98 points but the layout ibug68 has 68"):
        FaceDataset(synth, IBUG68, Preprocess(layout="ibug68"))


def test_schedule_and_batches() -> None:
    assert lr_at(0, 100, 1e-3, "cosine", 10) == pytest.approx(1e-4)
    assert lr_at(10, 100, 1e-3, "cosine", 10) == pytest.approx(1e-3)
    assert lr_at(99, 100, 1e-3, "cosine", 10) < 2e-5
    assert lr_at(99, 100, 1e-3, "constant", 10) == 1e-3
    b = epoch_batches(9, 4, seed=0, epoch=0)
    assert [len(x) for x in b] == [4, 4]  # a lone last face is dropped (batch norm)
    assert sorted(sum(epoch_batches(10, 4, 0, 1), [])) == list(range(10))
    assert epoch_batches(10, 4, 0, 1) == epoch_batches(10, 4, 0, 1) != epoch_batches(10, 4, 0, 2)


def test_mean_shape_in_crop_units(synth: list[FaceRecord]) -> None:
    ms = mean_shape(synth)
    assert ms.shape == (98, 2)
    assert ms.min() >= 0.08 and ms.max() <= 0.92  # inside the 1.2x crop's margin
    assert ms[60, 0] < ms[72, 0]  # subject's right eye is on the image left


class _Stop(Exception):
    pass


def _cfg(out: Path, cache: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(out=out, data="synthetic:12:3", val_fraction=0.25, epochs=2, batch=4, lr=1e-3,
                                   cache_dir=cache, eval_initial=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_interrupt_then_resume_matches_uninterrupted_run(tmp_path: Path, cache: Path) -> None:
    # The reference run loads data in a worker process, the interrupted one in-process: samples are
    # a pure function of (seed, epoch, index), so the weights must still agree.
    full = train(_cfg(tmp_path / "full", cache, workers=1))
    assert [h["epoch"] for h in full.history] == [1, 2] and full.best_val_nme is not None

    def stop_after_first_epoch(ev: TrainEvent) -> None:
        if ev.kind == "epoch" and ev.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "cut", cache), stop_after_first_epoch)
    mid = load_checkpoint(tmp_path / "cut" / "last.pth")
    assert mid.extra["epoch"] == 1 and mid.extra["interrupted"] is True
    # The checkpoint is plain tensors / Python: weights_only loading works (load_checkpoint uses it).
    assert isinstance(mid.extra["optimizer"]["state"], dict) and mid.extra["optimizer"]["state"]

    resumed = train(TrainConfig(out=tmp_path / "cut", resume=tmp_path / "cut" / "last.pth", epochs=2,
                                cache_dir=cache, threads=1))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a = load_checkpoint(full.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v.float(), b.model.state_dict()[k].float(), atol=1e-6), k
    sa, sb = a.extra["optimizer"]["state"], b.extra["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(sa[i][k].float(), sb[i][k].float(), atol=1e-7), (i, k)
    assert a.extra["scheduler"] == b.extra["scheduler"]
    assert resumed.history[1]["val_nme"] == pytest.approx(full.history[1]["val_nme"], rel=1e-5)
    # A resumed run keeps its settings: contradicting one is refused with the way out.
    with pytest.raises(UsageError, match="--resume continues the saved run.*lr"):
        train(TrainConfig(out=tmp_path / "cut", resume=tmp_path / "cut" / "last.pth", epochs=3, lr=0.01, cache_dir=cache))
    with pytest.raises(UsageError, match="already trained 2 epochs"):
        train(TrainConfig(out=tmp_path / "cut", resume=tmp_path / "cut" / "last.pth", epochs=2, cache_dir=cache))


def test_int8_noise_trains_a_different_network_and_is_part_of_the_run(tmp_path: Path, cache: Path) -> None:
    plain = train(_cfg(tmp_path / "plain", cache, epochs=1))
    noisy = train(_cfg(tmp_path / "noisy", cache, epochs=1, int8_noise=8.0))
    a, b = load_checkpoint(plain.last_checkpoint), load_checkpoint(noisy.last_checkpoint)
    assert a.meta.training["config"]["int8_noise"] == 0.0 and b.meta.training["config"]["int8_noise"] == 8.0
    moved = max((v.float() - b.model.state_dict()[k].float()).abs().max().item()
                for k, v in a.model.state_dict().items() if v.is_floating_point())
    assert moved > 1e-6  # same seed and data: only the noise differs
    assert set(a.model.state_dict()) == set(b.model.state_dict())  # the checkpoint is a plain PFLD
    with pytest.raises(UsageError, match="--resume continues the saved run.*int8_noise"):
        train(TrainConfig(out=tmp_path / "noisy", resume=noisy.last_checkpoint, epochs=2, int8_noise=2.0, cache_dir=cache))
    with pytest.raises(UsageError, match="--int8-noise must be in"):
        TrainConfig(int8_noise=-1.0)


def test_activation_relu6_is_a_training_option_carried_by_the_checkpoint(tmp_path: Path, cache: Path) -> None:
    import torch

    res = train(_cfg(tmp_path / "r6", cache, epochs=1, activation="relu6"))
    got = load_checkpoint(res.last_checkpoint)
    assert got.meta.model.activation == "relu6" and got.meta.training["config"]["activation"] == "relu6"
    assert isinstance(got.model.relu, torch.nn.ReLU6)
    # Resuming keeps it; contradicting it is refused.
    with pytest.raises(UsageError, match="--resume continues the saved run.*activation"):
        train(TrainConfig(out=tmp_path / "r6", resume=res.last_checkpoint, epochs=2, activation="relu", cache_dir=cache))
    with pytest.raises(UsageError, match="contradicts --init"):
        train(_cfg(tmp_path / "r", cache, epochs=1, init=res.last_checkpoint, activation="relu"))
    # int8-robust training follows ReLU6 too: same seed and data, only the noise differs.
    noisy = load_checkpoint(train(_cfg(tmp_path / "r6n", cache, epochs=1, activation="relu6", int8_noise=4.0)).last_checkpoint)
    assert noisy.meta.model.activation == "relu6" and noisy.meta.training["config"]["int8_noise"] == 4.0
    assert any(not torch.equal(v, noisy.model.state_dict()[k]) for k, v in got.model.state_dict().items() if v.is_floating_point())
    with pytest.raises(UsageError, match="--activation 'gelu'"):
        TrainConfig(activation="gelu")


def test_init_from_17_point_pfld_pytorch_checkpoint(tmp_path: Path, cache: Path) -> None:
    ckpt = fixture_path("checkpoints", "pfld17_w050_dwconv2_polariszhao_layout.pth.tar")
    res = train(_cfg(tmp_path / "ft", cache, init=ckpt, epochs=1))
    loaded = load_checkpoint(res.best_checkpoint)
    # Width and conv2 come from the init weights; the head is new because 17 != 98 points.
    assert loaded.meta.model.width == 0.5 and loaded.meta.model.conv2 == "depthwise" and loaded.meta.model.points == 98
    assert loaded.meta.provenance["new_head"] is True and loaded.meta.provenance["init_points"] == 17
    assert loaded.meta.model.activation == "relu6"  # the fork's measured activation carries over, not a default
    src = load_checkpoint(ckpt).model.state_dict()
    got = loaded.model.state_dict()
    assert src["conv1.weight"].shape == got["conv1.weight"].shape
    with pytest.raises(UsageError, match="width is a property of trained weights"):
        train(_cfg(tmp_path / "bad", cache, init=ckpt, width=0.25, epochs=1))


def test_cli_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", "synthetic:32", "--epochs", "1", "--out", str(out),
                                  "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    loaded = load_checkpoint(out / "best.pth")
    assert loaded.meta.model == ModelConfig(0.25, 98, "full")
    assert loaded.meta.training["data"] == "synthetic:32" and loaded.meta.training["epoch"] == 1
    assert loaded.aux is not None and (out / "last.pth").is_file()
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["epochs"]) == 1 and hist["epochs"][0]["val_nme"] > 0
    assert "val NME" in r.output and str(out / "best.pth") in r.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--width", "0.3"], 2, "width 0.3 is not supported"),
        (["--data", "nonsense:1"], 4, "unknown dataset spec"),
        (["--resume", "missing.pth"], 3, "does not exist"),
        (["--epochs", "0"], 2, "--epochs must be at least 1"),
        (["--int8-noise", "100"], 2, "--int8-noise must be in [0, 64]"),
    ],
)
def test_cli_bad_input_one_line(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c"), *args])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert sum(1 for line in r.output.splitlines() if line.startswith("error:")) == 1
