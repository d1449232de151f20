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
    assert "unsupported architecture" in r.output and "model.0.0.weight" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_info_cli_prints_inferred_config() -> None:
    path = fixture_path("checkpoints", "pfld17_w050_dwconv2_polariszhao_layout.pth.tar")
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert "0.5" in r.output and "17" in r.output and "depthwise" in r.output and "474,402" in r.output
