"""Losses on hand-computed values, and the PFLD-pytorch bugs they fix."""

from __future__ import annotations

import math

import pytest
import torch

from pfld_export.errors import UsageError
from pfld_export.loss import (
    LOSSES,
    angle_term,
    attribute_weights,
    class_frequencies,
    get_loss,
    l2_loss,
    pfld_loss,
    wing_loss,
)


def _batch() -> dict[str, torch.Tensor]:
    """Two faces, two points each, prediction all zeros.

    face 0: errors (0.1, 0) and (0, 0.2) -> sum ||d||^2 = 0.05; no attribute ("normal"); pose right.
    face 1: errors (0.3, 0.4) and (0, 0) -> 0.25; flags pose + occlusion; yaw off by 90 deg
            (1 - cos = 1) and pitch off by 60 deg (1 - cos = 0.5): angle term 1.5.
    """
    target = torch.tensor([[[0.1, 0.0], [0.0, 0.2]], [[0.3, 0.4], [0.0, 0.0]]])
    pred = torch.zeros_like(target)
    angles_rad = torch.tensor([[0.0, 0.0, 0.0], [math.pi / 2, 0.0, 0.0]])
    pose_deg = torch.tensor([[0.0, 0.0, 0.0], [0.0, 60.0, 0.0]])
    attrs = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0]], dtype=torch.float32)
    return {"pred": pred, "target": target, "angles": angles_rad, "pose": pose_deg, "attrs": attrs}


def test_pfld_loss_hand_computed() -> None:
    b = _batch()
    # Classes present: normal (face 0), pose and occlusion (face 1); each has frequency 1/2 -> 1/f = 2,
    # divided by the 3 classes present: face 0 weighs 2/3, face 1 weighs (2 + 2)/3 = 4/3.
    w = attribute_weights(b["attrs"])
    assert torch.allclose(w, torch.tensor([2 / 3, 4 / 3]))
    out = pfld_loss(b["pred"], b["target"], b["angles"], b["pose"], b["attrs"])
    expected = ((1 + 0.0) * (2 / 3) * 0.05 + (1 + 1.5) * (4 / 3) * 0.25) / 2
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert out.landmark_l2.item() == pytest.approx((0.05 + 0.25) / 2, rel=1e-6)
    assert out.angle is not None and out.angle.item() == pytest.approx(0.75, rel=1e-6)


def test_l2_and_wing_hand_computed() -> None:
    b = _batch()
    assert l2_loss(b["pred"], b["target"]).total.item() == pytest.approx(0.15, rel=1e-6)
    # Wing on crop-pixel errors (x112), w=10, eps=2: small errors are logarithmic, big ones linear.
    c = 10 - 10 * math.log(1 + 10 / 2)

    def wing(px: float) -> float:
        return 10 * math.log(1 + px / 2) if px < 10 else px - c

    face0 = wing(0.1 * 112) + wing(0.0) + wing(0.0) + wing(0.2 * 112)
    face1 = wing(0.3 * 112) + wing(0.4 * 112) + 0.0 + 0.0
    assert wing_loss(b["pred"], b["target"]).total.item() == pytest.approx((face0 + face1) / 2, rel=1e-5)
    small = torch.tensor([[[0.05 / 112, 0.0]]])  # 0.05 px: the log branch
    assert wing_loss(small, torch.zeros_like(small)).total.item() == pytest.approx(10 * math.log(1 + 0.05 / 2), rel=1e-4)


def test_attribute_free_faces_are_weighted() -> None:
    """Bug (a): PFLD-pytorch summed weights over the flags a face has, so plain faces weighed 0."""
    attrs = torch.zeros(4, 6)
    assert torch.equal(attribute_weights(attrs), torch.ones(4))
    mixed = torch.tensor([[0, 0, 0, 0, 0, 0]] * 3 + [[0, 1, 0, 0, 0, 0]], dtype=torch.float32)
    w = attribute_weights(mixed)
    assert (w > 0).all()
    # Rare class weighs more; the batch mean is 1 by construction.
    assert w[3] > w[0] and w.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert w[3].item() == pytest.approx((1 / 0.25) / 2) and w[0].item() == pytest.approx((1 / 0.75) / 2)


def test_dataset_level_class_frequencies() -> None:
    attrs_set = torch.tensor([[0, 0, 0, 0, 0, 0]] * 9 + [[0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    freq = class_frequencies(attrs_set)
    assert freq[0].item() == pytest.approx(0.9) and freq[6].item() == pytest.approx(0.1)
    batch = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    w = attribute_weights(batch, freq)
    assert w[0].item() == pytest.approx(1 / 0.9 / 2) and w[1].item() == pytest.approx(1 / 0.1 / 2)
    # A flag the set never had (augmentation added occlusion) falls back to its batch frequency.
    occluded = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    w2 = attribute_weights(occluded, freq)
    assert torch.isfinite(w2).all() and w2[0].item() == pytest.approx((1 / 0.5) / 3)
    with pytest.raises(UsageError, match="class_freq has 3 entries"):
        attribute_weights(batch, torch.ones(3))


def test_angles_are_radians_labels_degrees() -> None:
    """Bug (b): labels in degrees must be converted before cos(); a right prediction in radians costs 0."""
    pose_deg = torch.tensor([[30.0, -20.0, 10.0]])
    exact = torch.deg2rad(pose_deg)
    assert angle_term(exact, pose_deg).item() == pytest.approx(0.0, abs=1e-6)
    # Feeding the degrees themselves (the old bug) would be far off: cos(30 rad - 30 deg) etc.
    assert angle_term(pose_deg, pose_deg).item() > 0.5
    # One degree of error: 1 - cos(1 deg) per angle, not 1 - cos(1 rad).
    off = torch.deg2rad(pose_deg + 1.0)
    assert angle_term(off, pose_deg).item() == pytest.approx(3 * (1 - math.cos(math.radians(1))), rel=1e-4)
    assert angle_term(off, pose_deg, torch.tensor([0.0])).item() == 0.0


def test_right_pose_keeps_landmark_gradient() -> None:
    """The bare product (1 - cos) x L2 vanishes when the pose branch is right; (1 + ...) does not."""
    b = _batch()
    pred = b["pred"].clone().requires_grad_(True)
    perfect = torch.deg2rad(b["pose"])
    out = pfld_loss(pred, b["target"], perfect, b["pose"], b["attrs"])
    out.total.backward()
    assert out.angle is not None and out.angle.item() == pytest.approx(0.0, abs=1e-7)
    assert out.total.item() > 0 and pred.grad is not None and pred.grad.abs().sum().item() > 0
    # ... and the auxiliary net still gets a gradient when its angles are off.
    ang = torch.zeros(2, 3, requires_grad=True)
    pfld_loss(b["pred"], b["target"], ang, b["pose"] + 10.0, b["attrs"]).total.backward()
    assert ang.grad is not None and ang.grad.abs().sum().item() > 0


def test_loss_table_and_bad_input() -> None:
    assert set(LOSSES) == {"pfld", "l2", "wing"}
    assert get_loss("pfld")[1] is True and get_loss("l2")[1] is False
    with pytest.raises(UsageError, match="unknown loss 'l1'.*pfld, l2, wing"):
        get_loss("l1")
    b = _batch()
    with pytest.raises(UsageError, match="needs the auxiliary net"):
        pfld_loss(b["pred"], b["target"], None, b["pose"], b["attrs"])
    with pytest.raises(UsageError, match="does not match target shape"):
        l2_loss(torch.zeros(2, 3, 2), b["target"])
    # [N, 2P] network output is accepted as well as [N, P, 2].
    assert l2_loss(b["pred"].reshape(2, 4), b["target"]).total.item() == pytest.approx(0.15, rel=1e-6)
