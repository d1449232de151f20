"""Stage 0: open choices measured on face crops, plausibility, the author's export as reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pfld_export.errors import ToleranceError, UsageError
from pfld_export.model import PFLD, ModelConfig
from pfld_export.preprocess import Preprocess
from pfld_export.stage0 import MAX_OUTSIDE, Stage0Result, plausibility, require_plausible, resolve


def test_plausibility_scores_inside_share_and_face_spread() -> None:
    rng = np.random.default_rng(0)
    face = 56 + rng.normal(0, 20, (8, 17, 2))  # spread like landmarks on a 1.2x crop
    assert plausibility(face, 112).outside < 0.05 and plausibility(face, 112).bad_spread == 0
    collapsed = np.full((8, 17, 2), 56.0) + rng.normal(0, 0.5, (8, 17, 2))
    assert plausibility(collapsed, 112).bad_spread == 1.0
    outside = face + 90
    assert plausibility(outside, 112).outside > 0.9 and plausibility(outside, 112).score < plausibility(face, 112).score
    assert plausibility(np.full((2, 5, 2), np.nan), 112).score < 0


def _bare(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = PFLD(ModelConfig(width=0.25, points=17))
    sd = net.state_dict()
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    return path


def test_equal_answers_keep_the_conventional_activation(tmp_path: Path) -> None:
    # An untrained network never reaches 6: ReLU and ReLU6 predict the same landmarks, so the
    # measurement has nothing to choose and keeps PFLD-pytorch's ReLU, saying so.
    path = _bare(tmp_path)
    crops = np.random.default_rng(1).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    loaded, res = resolve(path, crops, "random crops", preprocess=Preprocess())
    assert loaded.meta.model.activation == "relu"
    assert res.how["activation"].startswith("measured (candidates agree")
    assert loaded.meta.provenance["inferred"]["activation"] == res.how["activation"]


def test_flags_win_over_measurement(tmp_path: Path) -> None:
    path = _bare(tmp_path)
    crops = np.random.default_rng(1).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    loaded, res = resolve(path, crops, "random crops", {"activation": "relu6"}, Preprocess())
    assert loaded.meta.model.activation == "relu6" and res.how == {"activation": "flag"} and res.candidates[0]["choice"] == {
        "preprocess": "BGR mean (0.0, 0.0, 0.0) std (1.0, 1.0, 1.0)"}


def test_reference_onnx_settles_the_activation_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = PFLD(ModelConfig(width=0.25, points=17, activation="relu6"))
    with torch.no_grad():  # activations well above 6, so ReLU and ReLU6 differ
        net.conv1.weight.mul_(40)
        net.fc.weight.mul_(100)
    torch.save({"plfd_backbone": net.state_dict()}, tmp_path / "fork.pth.tar")
    # The fork's own export: feature first, landmarks second (as PFLD-pytorch's pytorch2onnx writes it).
    class Both(torch.nn.Module):
        def __init__(self, p: PFLD) -> None:
            super().__init__()
            self.p = p

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.p(x)

    torch.onnx.export(Both(net.eval()), (torch.zeros(1, 3, 112, 112),), str(tmp_path / "fork.onnx"), dynamo=False,
                      input_names=["input_1"], opset_version=13)
    crops = np.random.default_rng(1).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    loaded, res = resolve(tmp_path / "fork.pth.tar", crops, "random crops", preprocess=Preprocess(layout="custom17"),
                          reference_onnx=tmp_path / "fork.onnx")
    assert loaded.meta.model.activation == "relu6" and res.how["activation"] == "reference ONNX"
    assert res.reference is not None and res.reference["max_diff"] <= 1e-4 < res.reference["candidates"]["relu"]
    with pytest.raises(ToleranceError, match="stage 0"):
        resolve(tmp_path / "fork.pth.tar", crops, "random crops", {"activation": "relu"}, Preprocess(layout="custom17"),
                reference_onnx=tmp_path / "fork.onnx")


def test_implausible_foreign_model_stops_with_likely_causes() -> None:
    res = Stage0Result(choices={}, how={}, plausibility=plausibility(np.full((4, 5, 2), 200.0), 112), margins={},
                       faces=4, crops="calibration faces", candidates=[])
    assert res.plausibility.outside > MAX_OUTSIDE
    with pytest.raises(UsageError, match="outside the crop.*--activation.*--color"):
        require_plausible(res, "x.pth")
    assert not res.passed
    own = Stage0Result(choices={}, how={}, plausibility=res.plausibility, margins={}, faces=4, crops="", candidates=[], gated=False)
    require_plausible(own, "ours.pth")  # our own checkpoints are described by their metadata: informational only


def test_a_foreign_checkpoint_opened_with_flags_goes_through_stage_0_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags' preprocessing is what the open choices are measured under, in one stage 0; a
    flag left out (here mean and std) is measured among the candidates agreeing with the others."""
    import pfld_export.stage0 as stage0
    from pfld_export.runtime import open_predictor

    path = _bare(tmp_path)
    calls: list[object] = []
    measure = stage0.resolve

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("given"))
        return measure(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stage0, "resolve", counted)
    full = {"color": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    pred = open_predictor(path, overrides=full)
    assert calls == [full]
    assert (pred.preprocess.color, pred.preprocess.mean, pred.preprocess.std) == ("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    calls.clear()
    assert open_predictor(path, overrides={"color": "RGB"}).preprocess.color == "RGB" and len(calls) == 1
