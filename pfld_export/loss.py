"""Training losses: PFLD's pose- and attribute-weighted L2 (Guo et al. 2019), plain L2, Wing.

Every loss has the same signature (see `LossFn`) and returns a `LossOutput`, so `train.py` picks
one from the `LOSSES` table by name (`--loss pfld|l2|wing`) with no if-chain.

Units, decided once here:
  * landmarks (`pred`, `target`) are [N, P, 2] in crop units, i.e. pixels / 112, so 0..1 inside
    the crop (PFLD-pytorch's convention; the FC head outputs these directly);
  * the auxiliary net's output is read as (yaw, pitch, roll) in RADIANS. Radians keep the
    regression target around +-1.5, a sane scale for a linear layer, and cos() wants radians;
  * pose labels (`pose_deg`) arrive in DEGREES, as `pose.euler_from_landmarks` and
    `FaceRecord.pose` give them, and are converted here, in one place.

The PFLD loss, per sample i, averaged over the batch:

    L_i = (1 + sum_k (1 - cos(theta_ik))) * (sum_c w_c [i in c]) * sum_n ||d_in||^2

Departures from PFLD-pytorch (`pfld/loss.py`), each a known bug there:
  (a) attribute-free faces got weight 0 (the weight is a sum over the attributes a face HAS), so
      most of WFLW never trained the landmarks; here "normal" (no flag set) is a class of its own
      with its own inverse-frequency weight, so sum_c w_c > 0 for every face;
  (b) the angle labels were degrees fed straight into cos(); here labels are converted to
      radians and the auxiliary net predicts radians;
  (c) the angle labels came from solvePnP with a camera for a 256-px image applied to 112-px
      crops; here they come from `pose.euler_from_landmarks` with the crop's own camera (or the
      exact pose of synthetic faces) -- see `data/dataset.py`.
And one deliberate reformulation: the paper and PFLD-pytorch MULTIPLY the landmark error by
sum_k (1 - cos theta_k). That factor is ~0 once the pose branch is right (and is 0 exactly for a
frontal face whose pose is predicted well), which switches the landmark loss off -- the network
can "solve" the loss by fitting angles alone. We use (1 + sum_k (1 - cos theta_k)): the plain
landmark L2 is always there, hard poses still weigh up to 7x more, and the auxiliary net still
gets its gradient (scaled by the landmark error, as in the paper). `test_loss.py` checks that a
perfect pose prediction leaves a non-zero landmark gradient.

Attribute weights: classes are "normal" plus WFLW's six flags (pose, expression, illumination,
make-up, occlusion, blur). w_c = 1 / frequency of class c, in the batch (the paper) or in the
whole training set (pass `class_freq`), divided by the number of classes present so the batch
mean of sum_c w_c is exactly 1 (PFLD-pytorch's unnormalised form makes the loss scale jump with
how many classes happen to be in a batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import UsageError


@dataclass
class LossOutput:
    """`total` is what gets back-propagated; the others are detached, for logs."""

    total: torch.Tensor
    landmark_l2: torch.Tensor  # batch mean of sum_n ||d_n||^2, the same number for every loss
    angle: torch.Tensor | None = None  # batch mean of sum_k (1 - cos theta_k), when the loss uses pose


class LossFn(Protocol):
    def __call__(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        angles_rad: torch.Tensor | None,
        pose_deg: torch.Tensor,
        attributes: torch.Tensor,
        pose_valid: torch.Tensor | None = None,
        class_freq: torch.Tensor | None = None,
    ) -> LossOutput: ...


def _check(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.ndim == 2:
        pred = pred.reshape(pred.shape[0], -1, 2)
    if pred.shape != target.shape:
        raise UsageError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    return pred, target


def landmark_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over points of the squared Euclidean error: [N, P, 2] x2 -> [N]."""
    pred, target = _check(pred, target)
    return (pred - target).pow(2).sum(dim=(1, 2))


def angle_term(angles_rad: torch.Tensor, pose_deg: torch.Tensor, pose_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample sum_k (1 - cos(pred_k - gt_k)) over yaw, pitch, roll: [N, 3] x2 -> [N].

    `angles_rad` is the auxiliary net's output (radians), `pose_deg` the labels in degrees.
    Samples whose `pose_valid` is 0 (a layout without pose points) get 0.
    """
    if angles_rad.shape != pose_deg.shape or angles_rad.shape[-1] != 3:
        raise UsageError(f"angles must be [N, 3] (yaw, pitch, roll); got {tuple(angles_rad.shape)} and {tuple(pose_deg.shape)}")
    term = (1.0 - torch.cos(angles_rad - torch.deg2rad(pose_deg))).sum(dim=1)
    if pose_valid is not None:
        term = term * pose_valid.to(term.dtype)
    return term


def attribute_classes(attributes: torch.Tensor) -> torch.Tensor:
    """[N, A] flags -> [N, A + 1] class membership; column 0 is "normal" (no flag set)."""
    flags = (attributes > 0).to(torch.float32)
    normal = (flags.sum(dim=1, keepdim=True) == 0).to(torch.float32)
    return torch.cat([normal, flags], dim=1)


def class_frequencies(attributes: torch.Tensor) -> torch.Tensor:
    """Frequency of each class ("normal" first, then each flag) over a set of faces: [N, A] -> [A + 1]."""
    return attribute_classes(attributes).mean(dim=0)


def attribute_weights(attributes: torch.Tensor, class_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample sum_c w_c over the classes a face belongs to, w_c = 1 / (freq_c * classes present).

    `class_freq` (from `class_frequencies` over the training set) replaces the batch frequencies.
    Never 0: every face is in at least one class ("normal" when it has no flag).
    """
    classes = attribute_classes(attributes)
    batch_freq = classes.mean(dim=0)
    if class_freq is None:
        freq = batch_freq
    else:
        if class_freq.shape != batch_freq.shape:
            raise UsageError(
                f"class_freq has {class_freq.shape[0]} entries, expected {batch_freq.shape[0]} "
                f"(normal + {batch_freq.shape[0] - 1} attributes)"
            )
        # Augmentation can add a flag (synthetic occlusion) the set itself never had: fall back to
        # the batch frequency for it rather than dividing by zero.
        cf = class_freq.to(batch_freq)
        freq = torch.where(cf > 0, cf, batch_freq)
    used = freq > 0
    inv = torch.where(used, 1.0 / freq.clamp_min(1e-12), torch.zeros_like(freq))
    return (classes @ inv) / used.sum().clamp_min(1).to(inv)


def pfld_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    angles_rad: torch.Tensor | None,
    pose_deg: torch.Tensor,
    attributes: torch.Tensor,
    pose_valid: torch.Tensor | None = None,
    class_freq: torch.Tensor | None = None,
) -> LossOutput:
    """PFLD's loss: mean_i (1 + sum_k (1 - cos theta_ik)) * sum_c w_c * sum_n ||d_in||^2.

    Fixes over PFLD-pytorch (see the module docstring): (a) "normal" faces have their own class
    weight; (b) angles in radians; (c) labels from the corrected solvePnP. Uses (1 + angle term)
    instead of the bare product so the landmark loss never vanishes.
    """
    if angles_rad is None:
        raise UsageError("the pfld loss needs the auxiliary net's angles; use --loss l2 or wing without it")
    sq = landmark_sq_error(pred, target)
    ang = angle_term(angles_rad, pose_deg, pose_valid)
    w_attr = attribute_weights(attributes, class_freq)
    total = ((1.0 + ang) * w_attr * sq).mean()
    return LossOutput(total=total, landmark_l2=sq.mean().detach(), angle=ang.mean().detach())


def l2_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    angles_rad: torch.Tensor | None = None,
    pose_deg: torch.Tensor | None = None,
    attributes: torch.Tensor | None = None,
    pose_valid: torch.Tensor | None = None,
    class_freq: torch.Tensor | None = None,
) -> LossOutput:
    """Plain L2: mean_i sum_n ||d_in||^2 (the PFLD loss with every weight at 1). Ignores pose."""
    sq = landmark_sq_error(pred, target)
    return LossOutput(total=sq.mean(), landmark_l2=sq.mean().detach())


def wing(x: torch.Tensor, w: float = 10.0, eps: float = 2.0) -> torch.Tensor:
    """Wing function (Feng et al. 2018) of absolute errors `x` in pixels: log near 0, linear beyond w."""
    c = w - w * math.log(1.0 + w / eps)
    return torch.where(x < w, w * torch.log1p(x / eps), x - c)


def wing_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    angles_rad: torch.Tensor | None = None,
    pose_deg: torch.Tensor | None = None,
    attributes: torch.Tensor | None = None,
    pose_valid: torch.Tensor | None = None,
    class_freq: torch.Tensor | None = None,
    size: int = 112,
    w: float = 10.0,
    eps: float = 2.0,
) -> LossOutput:
    """Wing loss, mean over the batch of the sum over coordinates. Errors are scaled to crop
    pixels first (x `size`), because the paper's w=10, eps=2 are pixel values."""
    pred, target = _check(pred, target)
    per = wing((pred - target).abs() * size, w, eps).sum(dim=(1, 2))
    sq = landmark_sq_error(pred, target)
    return LossOutput(total=per.mean(), landmark_l2=sq.mean().detach())


# The one table `train --loss` reads; `uses_pose` says whether the auxiliary net must run.
LOSSES: dict[str, tuple[Callable[..., LossOutput], bool]] = {
    "pfld": (pfld_loss, True),
    "l2": (l2_loss, False),
    "wing": (wing_loss, False),
}


def get_loss(name: str) -> tuple[Callable[..., LossOutput], bool]:
    """(loss function, whether it needs the auxiliary net's angles) for a `--loss` name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
