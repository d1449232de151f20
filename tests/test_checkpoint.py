from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pfld_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from pfld_export.cli import main
from pfld_export.errors import CheckpointError, PickledModuleError, ShapeMismatchError, UnsupportedArchitectureError
from pfld_export.model import ModelConfig, build_model
from pfld_export.preprocess import Preprocess

from .conftest import fixture_path


def _meta(width: float = 0.25, points: int = 98, conv2: str = "full") -> CheckpointMeta:
    return CheckpointMeta(model=ModelConfig(width=width, points=points, conv2=conv2), preprocess=Preprocess())


def test_round_trip_our_format(tmp_path: Path) -> None:
    pfld, aux = build_model(0.25, 68, "depthwise")
    meta = _meta(0.25, 68, "depthwise")
    meta.metrics["nme"] = 0.05
    path = save_checkpoint(tmp_path / "m.pth", pfld, meta, aux, extra={"epoch": 7})
    loaded = load_checkpoint(path)
    assert loaded.meta.model == ModelConfig(0.25, 68, "depthwise")
    assert loaded.meta.metrics["nme"] == 0.05
    assert loaded.extra["epoch"] == 7 and loaded.aux is not None
    x = torch.rand(1, 3, 112, 112)
    pfld.eval()
    assert torch.equal(loaded.model(x)[1], pfld(x)[1])
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temp file"


@pytest.mark.parametrize("key", ["pfld_backbone", "plfd_backbone"])
@pytest.mark.parametrize("width,points,conv2", [(0.5, 17, "depthwise"), (1.0, 98, "full"), (0.25, 68, "full")])
def test_pfld_pytorch_layouts_infer_config(tmp_path: Path, key: str, width: float, points: int, conv2: str) -> None:
    pfld, aux = build_model(width, points, conv2)
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 3, key: pfld.state_dict(), "auxiliarynet": aux.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.meta.model == ModelConfig(width, points, conv2)
    assert loaded.meta.source_format == "pfld-pytorch" and loaded.extra["epoch"] == 3


def test_bare_and_dataparallel_state_dicts(tmp_path: Path) -> None:
    pfld, _ = build_model(0.75, 98)
    torch.save(pfld.state_dict(), tmp_path / "bare.pth")
    torch.save({f"module.{k}": v for k, v in pfld.state_dict().items()}, tmp_path / "dp.pth")
    for name in ("bare.pth", "dp.pth"):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.meta.model.width == 0.75 and loaded.aux is None


def test_head_bn_inferred_from_bn8_statistics(tmp_path: Path) -> None:
    pfld, _ = build_model(0.25, 98)
    torch.save(pfld.state_dict(), tmp_path / "fresh.pth")
    assert load_checkpoint(tmp_path / "fresh.pth").meta.model.head_bn is False
    sd = pfld.state_dict()
    sd["bn8.running_mean"] += 0.5
    torch.save(sd, tmp_path / "trained_bn8.pth")
    assert load_checkpoint(tmp_path / "trained_bn8.pth").meta.model.head_bn is True


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    pfld, _ = build_model(1.0, 98)
    sd = pfld.state_dict()
    sd["conv5_1.conv.0.weight"] = torch.zeros(10, 128, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ShapeMismatchError, match=r"conv5_1\.conv\.0\.weight.*\(10, 128, 1, 1\).*\(512, 128, 1, 1\)"):
        load_checkpoint(tmp_path / "bad.pth")


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    pfld, _ = build_model(0.25, 98)
    torch.save(pfld.state_dict(), tmp_path / "ok.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:3000])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name in ("trunc.pth", "text.pth", "missing.pth"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)


class _Evil:
    """Unpickling this would create a file: the loader must refuse before that happens."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.target,))


def test_pickled_module_refused_without_running_it(tmp_path: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "module.pth")
    with pytest.raises(PickledModuleError, match="only state dicts are accepted"):
        load_checkpoint(tmp_path / "module.pth")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(PickledModuleError):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists(), "loading a checkpoint executed code"


def test_unsupported_architecture(tmp_path: Path) -> None:
    torch.save({"model.0.0.weight": torch.zeros(16, 3, 3, 3), "model.1.0.weight": torch.zeros(16, 1, 3, 3)}, tmp_path / "x.pth")
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.0\.0\.weight.*not PFLD"):
        load_checkpoint(tmp_path / "x.pth")


# --- the real third-party fixtures ---

def test_fixture_pfld17_loads_and_predicts() -> None:
    import cv2

    path = fixture_path("checkpoints", "pfld17_w050_dwconv2_polariszhao_layout.pth.tar")
    loaded = load_checkpoint(path)
    # This fork applies bn8 after conv8 (its running stats moved in training); inferred, not assumed.
    assert loaded.meta.model == ModelConfig(0.5, 17, "depthwise", head_bn=True)
    img_path = sorted(fixture_path("ibug68").glob("300w_indoor_020.png"))[0]
    img = cv2.imread(str(img_path))
    pts = np.loadtxt(img_path.with_suffix(".pts"), skiprows=3, max_rows=68)
    from pfld_export.preprocess import crop_from_landmarks

    crop, _ = crop_from_landmarks(img, pts, 1.2)
    x = torch.from_numpy(loaded.meta.preprocess.apply_nchw(crop[None]))
    with torch.no_grad():
        out = loaded.inference_model()(x).numpy()
    assert out.shape == (1, 34)
    assert np.isfinite(out).all() and (out > -0.5).all() and (out < 1.5).all()


def test_fixture_pickled_module_refused_by_cli() -> None:
    path = fixture_path("checkpoints", "mobilenetv2_025_68pt_pickled_module.pth")
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code != 0
    assert "pickled object (model2.MobileNetV2)" in r.output and "only state dicts are accepted" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_fixture_mobilenetv3_refused_by_cli() -> None:
    path = fixture_path("checkpoints", "pfld106_mobilenetv3_lite.pth")
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code != 0
    assert "unsupported architecture" in r.output and "model.0.0.weight" in r.output and "--model-class" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_info_cli_prints_inferred_config() -> None:
    path = fixture_path("checkpoints", "pfld17_w050_dwconv2_polariszhao_layout.pth.tar")
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert "0.5" in r.output and "17" in r.output and "depthwise" in r.output and "474,402" in r.output


def _public_025x_state_dict() -> dict[str, torch.Tensor]:
    """A state dict shaped like the public 0.25X PFLD-pytorch model: every layer x0.25 (plain
    int rounding, so conv6_1 / conv7 / conv8 are 4 / 8 / 32), ReLU, 98 points, trained bn8."""
    from pfld_export.model import PFLD

    torch.manual_seed(1)
    cfg = ModelConfig(width=0.25, points=98, channels=(16, 16, 32, 32, 4, 8, 32), head_bn=True)
    net = PFLD(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def test_public_025x_every_layer_scaled_loads_with_its_channels(tmp_path: Path) -> None:
    sd = _public_025x_state_dict()
    torch.save({"epoch": 3, "pfld_backbone": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "public.pth.tar")
    loaded = load_checkpoint(tmp_path / "public.pth.tar")
    cfg = loaded.meta.model
    assert cfg.channels == (16, 16, 32, 32, 4, 8, 32) and cfg.width == 0.25 and cfg.points == 98 and cfg.head_bn
    assert loaded.meta.provenance["open"] == ["activation"]
    assert loaded.meta.provenance["inferred"]["channels"] == "tensors"
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_variants_inferred_from_tensors(tmp_path: Path) -> None:
    from pfld_export.model import PFLD

    cfg = ModelConfig(width=0.5, points=5, conv2="depthwise", channels=(32, 32, 64, 64, 16, 32, 128), conv_bias=True,
                      head="flatten", input_size=128)
    torch.save(PFLD(cfg).state_dict(), tmp_path / "v.pth")
    got = load_checkpoint(tmp_path / "v.pth").meta.model
    assert (got.conv_bias, got.head, got.input_size, got.points, got.conv2) == (True, "flatten", 128, 5, "depthwise")
    assert load_checkpoint(tmp_path / "v.pth").meta.preprocess.input_size == 128
    forced = load_checkpoint(tmp_path / "v.pth", overrides={"activation": "relu6"})
    assert forced.meta.model.activation == "relu6" and forced.meta.provenance["inferred"]["activation"] == "flag"
    assert forced.meta.provenance["open"] == []


def test_untouched_bn8_statistics_with_trained_affine_are_left_open(tmp_path: Path) -> None:
    pfld, _ = build_model(0.25, 98)
    sd = pfld.state_dict()
    sd["bn8.weight"] = sd["bn8.weight"] * 1.5
    torch.save(sd, tmp_path / "amb.pth")
    assert load_checkpoint(tmp_path / "amb.pth").meta.provenance["open"] == ["activation", "head_bn"]


def test_unknown_keys_name_closest_layout_first_mismatch_and_model_class(tmp_path: Path) -> None:
    torch.save({"backbone.stem.weight": torch.zeros(8, 3, 3, 3), "head.fc.weight": torch.zeros(10, 8)}, tmp_path / "g.pth")
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_checkpoint(tmp_path / "g.pth")
    msg = str(e.value)
    assert "closest known layout: PFLD-pytorch" in msg and "first missing tensor conv1.weight" in msg
    assert "--model-class" in msg and "\n" not in msg


# --- stage 0 on the real fork checkpoint and its author's export ---

def test_stage0_fork_activation_matches_its_authors_export() -> None:
    from pfld_export.errors import ToleranceError
    from pfld_export.stage0 import resolve, synthetic_crops

    ckpt = fixture_path("checkpoints", "pfld17_w050_relu6_epoch68.pth.tar")
    ref = fixture_path("checkpoints", "pfld17_w050_relu6_epoch68_fork_export.onnx")
    crops = synthetic_crops(12)
    loaded, res = resolve(ckpt, crops, preprocess=Preprocess(layout="custom17"), reference_onnx=ref)
    assert loaded.meta.model.activation == "relu6" and res.reference is not None and res.reference["max_diff"] <= 1e-4
    assert res.reference["candidates"]["relu"] > 0.1  # plain ReLU is a different network
    with pytest.raises(ToleranceError, match="stage 0"):
        resolve(ckpt, crops, flags={"activation": "relu"}, preprocess=Preprocess(layout="custom17"), reference_onnx=ref)


def test_stage0_measures_relu6_on_faces_without_a_reference() -> None:
    from pfld_export.stage0 import resolve, synthetic_crops

    ckpt = fixture_path("checkpoints", "pfld17_w050_relu6_epoch68.pth.tar")
    loaded, res = resolve(ckpt, synthetic_crops(24), preprocess=Preprocess(layout="custom17"))
    assert loaded.meta.model.activation == "relu6" and res.how["activation"] == "measured"
    assert res.margins["activation"] >= 0.02 and res.plausibility.outside <= 0.02
