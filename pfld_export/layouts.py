"""Point layouts: which landmark is which (98-point WFLW, 68-point iBUG/300-W, custom N).

A layout knows what metrics and augmentation need: the outer eye corners that normalise NME,
pupils where the layout defines them, the mirror permutation for horizontal flips, and the
subset of points (with a matching 3D mean-face model in `pose.py`) used for head pose.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


def _mirror(n: int, pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    perm = list(range(n))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


@dataclass(frozen=True)
class PointLayout:
    """Semantic description of an N-point annotation scheme."""

    name: str
    num_points: int
    eye_corners: tuple[int, int] | None  # outer corners (subject's right, left) for inter-ocular NME
    pupils: tuple[int, int] | None  # for inter-pupil NME
    eyes: tuple[tuple[int, ...], tuple[int, ...]] | None  # points of each eye (pupil fallback = mean)
    mirror: tuple[int, ...]  # mirror[i] = index that point i becomes after a horizontal flip
    pose_points: tuple[int, ...]  # indices matched to pose.MEAN_FACE_3D rows, in that order
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # named facial parts, for drawing


# WFLW: 0-32 contour, 33-41 right brow, 42-50 left brow, 51-59 nose, 60-67 right eye,
# 68-75 left eye, 76-95 mouth, 96/97 pupils ("right"/"left" are the subject's).
_WFLW_PAIRS = (
    [(i, 32 - i) for i in range(16)]
    + [(33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47)]
    + [(55, 59), (56, 58)]
    + [(60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73)]
    + [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86), (88, 92), (89, 91), (93, 95), (96, 97)]
)
# iBUG 68: 0-16 contour, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth.
_IBUG_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)

WFLW98 = PointLayout(
    name="wflw98",
    num_points=98,
    eye_corners=(60, 72),
    pupils=(96, 97),
    eyes=(tuple(range(60, 68)), tuple(range(68, 76))),
    mirror=_mirror(98, _WFLW_PAIRS),
    # Brow corners, eye corners, nostrils, mouth corners, lower lip centre, chin: the 14 points
    # PFLD-pytorch tracks, in the order of pose.MEAN_FACE_3D.
    pose_points=(33, 38, 50, 46, 60, 64, 68, 72, 55, 59, 76, 82, 85, 16),
    parts=(
        ("contour", tuple(range(0, 33))),
        ("brows", tuple(range(33, 51))),
        ("nose", tuple(range(51, 60))),
        ("eyes", tuple(range(60, 76)) + (96, 97)),
        ("mouth", tuple(range(76, 96))),
    ),
)

IBUG68 = PointLayout(
    name="ibug68",
    num_points=68,
    eye_corners=(36, 45),
    pupils=None,
    eyes=(tuple(range(36, 42)), tuple(range(42, 48))),
    mirror=_mirror(68, _IBUG_PAIRS),
    pose_points=(17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8),
    parts=(
        ("contour", tuple(range(0, 17))),
        ("brows", tuple(range(17, 27))),
        ("nose", tuple(range(27, 36))),
        ("eyes", tuple(range(36, 48))),
        ("mouth", tuple(range(48, 68))),
    ),
)

_KNOWN = {l.name: l for l in (WFLW98, IBUG68)}


def custom_layout(num_points: int) -> PointLayout:
    """A layout with no known semantics: no eye corners (NME falls back to the box diagonal)."""
    if num_points < 1:
        raise UsageError(f"point count must be positive, got {num_points}")
    return PointLayout(
        name=f"custom{num_points}",
        num_points=num_points,
        eye_corners=None,
        pupils=None,
        eyes=None,
        mirror=tuple(range(num_points)),  # unknown semantics: flips are disabled by augmentation
        pose_points=(),
        parts=(("points", tuple(range(num_points))),),
    )


def get_layout(spec: str | int) -> PointLayout:
    """Look a layout up by name (`wflw98`, `ibug68`, `customN`) or by point count (98, 68, N)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        n = int(spec)
        for layout in _KNOWN.values():
            if layout.num_points == n:
                return layout
        return custom_layout(n)
    if spec in _KNOWN:
        return _KNOWN[spec]
    if spec.startswith("custom") and spec[6:].isdigit():
        return custom_layout(int(spec[6:]))
    raise UsageError(f"unknown point layout {spec!r}; use one of wflw98, ibug68, customN or a point count")
