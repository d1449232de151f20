"""Procedural synthetic faces with exact 98-point WFLW landmarks and a known head pose.

These are not photographs of anyone: every face is drawn with OpenCV from a small 3D face model
(landmarks plus a head outline, ears, neck, hair, iris circles), given a random identity and
expression, rotated by a random (yaw, pitch, roll) and projected with the same pinhole camera as
`pose.euler_from_landmarks` (focal = image width, centre in the middle). The 98 points are the
projections themselves, so they lie exactly on the drawn features: the skin outline runs through
the contour points, brow/eye/lip shapes are splines through their points, the iris is centred on
the pupil points, the nostril base line through 55-59 and the bridge highlight through 51-54.

What varies per face: head shape (width, jaw squareness, chin), eye/nose/mouth/brow geometry,
skin, lip, iris and hair colour, hair style and hairline, ears, beard, glasses; expression (mouth
open, smile, brow raise/frown, blinks, gaze); pose; face size and position; background (gradients,
shapes, noise textures); lighting (side light, gradients, exposure, colour cast, grey); occluders
(patches, hands, masks, hair strands, sunglasses); blur (defocus, motion, low resolution), noise
and JPEG artefacts; makeup. WFLW's six attribute flags are set from what was drawn.

Deterministic: face `i` of seed `s` comes from `np.random.default_rng((s, i))` only, so the same
seed gives identical bytes, and a larger count extends a smaller one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..errors import UsageError
from ..io import atomic_path, atomic_write_text
from ..pose import project, rotation_matrix
from .records import FaceRecord

# Bump when the renderer changes: cached datasets are keyed by it (specs.py).
SYNTHETIC_VERSION = 2
ANNOTATION_NAME = "list_98pt_rect_attr_synthetic.txt"
MANIFEST_NAME = "synthetic.json"
NUM_POINTS = 98

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Ranges are the extremes; most faces are near frontal and neutral."""

    count: int = 200
    seed: int = 0
    image_size: int = 256
    max_yaw: float = 40.0  # degrees; the model's silhouettes hold up to about 45
    max_pitch: float = 25.0
    max_roll: float = 35.0
    face_fraction: tuple[float, float] = (0.32, 0.72)  # landmark-box width / image width
    expression: float = 1.0  # 0 = neutral faces only (mouth closed, brows at rest, eyes open)
    identity: float = 1.0  # 0 = every face has the mean shape (only colours etc. vary)
    occlusion_prob: float = 0.15
    blur_prob: float = 0.15
    makeup_prob: float = 0.12
    glasses_prob: float = 0.12
    png_compression: int = 1  # 0-9; fast and lossless either way

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"synthetic count must be at least 1, got {self.count}")
        if self.image_size < 64:
            raise UsageError(f"synthetic image_size must be at least 64 px, got {self.image_size}")
        lo, hi = self.face_fraction
        if not (0.1 <= lo <= hi <= 0.9):
            raise UsageError(f"face_fraction must satisfy 0.1 <= low <= high <= 0.9, got {self.face_fraction}")
        if not (0 <= self.max_yaw <= 60 and 0 <= self.max_pitch <= 45 and 0 <= self.max_roll <= 90):
            raise UsageError(
                f"pose limits out of range (yaw <= 60, pitch <= 45, roll <= 90): "
                f"{self.max_yaw}, {self.max_pitch}, {self.max_roll}"
            )


@dataclass
class SyntheticResult:
    """A WFLW-format folder: `images/*.png` plus the annotation list, and its records."""

    annotation_file: Path
    images_dir: Path
    records: list[FaceRecord]


# ----------------------------------------------------------------------------------------------
# 3D face model (object frame of pose.py: +X subject's left, +Y down, +Z into the head; ~cm)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Identity:
    width: float  # head width scale
    height: float  # face height scale
    jaw_n: float  # superellipse exponent of the jaw outline (2 = oval, 3 = square)
    eye_size: float
    eye_open: float  # resting openness
    iris: float
    brow_thick: float
    brow_arch: float
    brow_y: float
    nose_len: float
    nose_width: float
    nose_proj: float
    mouth_width: float
    upper_lip: float
    lower_lip: float


@dataclass
class _Expression:
    mouth_open: float  # 0..1
    smile: float  # -0.4..1
    brow: float  # -1 (frown) .. 1 (raise)
    eye_open: float  # multiplier, ~0.1 (closing) .. 1.25 (wide)
    gaze: tuple[float, float]  # -1..1 horizontal (to subject's left), vertical (down)


def _sample_identity(rng: np.random.Generator, k: float) -> _Identity:
    def v(sd: float, lim: float) -> float:
        return float(np.clip(rng.normal(0.0, sd), -lim, lim)) * k

    return _Identity(
        width=1.0 + v(0.05, 0.1),
        height=1.0 + v(0.025, 0.05),  # moves the chin, a head-pose point: kept small
        jaw_n=2.35 + v(0.3, 0.55),
        eye_size=1.0 + v(0.08, 0.16),
        eye_open=1.0 + v(0.12, 0.25),
        iris=1.0 + v(0.06, 0.12),
        brow_thick=1.0 + v(0.22, 0.4),
        brow_arch=1.0 + v(0.35, 0.7),
        brow_y=v(0.08, 0.15),
        nose_len=1.0 + v(0.06, 0.12),
        nose_width=1.0 + v(0.08, 0.15),
        nose_proj=1.0 + v(0.12, 0.25),
        mouth_width=1.0 + v(0.05, 0.1),
        upper_lip=1.0 + v(0.2, 0.4),
        lower_lip=1.0 + v(0.12, 0.25),
    )


def _sample_expression(rng: np.random.Generator, k: float) -> _Expression:
    if k <= 0:
        return _Expression(0.0, 0.0, 0.0, 1.0, (0.0, 0.0))
    mouth = float(rng.uniform(0.15, 1.0)) if rng.random() < 0.3 else 0.0
    smile = float(rng.uniform(-0.4, 1.0)) if rng.random() < 0.45 else 0.0
    brow = float(rng.uniform(-1.0, 1.0)) if rng.random() < 0.35 else 0.0
    r = rng.random()
    eye = float(rng.uniform(0.08, 0.5)) if r < 0.08 else float(rng.uniform(1.0, 1.3)) if r < 0.2 else 1.0
    gaze = (float(rng.uniform(-1, 1)), float(rng.uniform(-0.6, 0.6))) if rng.random() < 0.6 else (0.0, 0.0)
    return _Expression(mouth * k, smile * k, brow * k, 1.0 + (eye - 1.0) * k, (gaze[0] * k, gaze[1] * k))


def _superellipse_outline(a: float, y_top: float, y_bot: float, n: float, count: int) -> np.ndarray:
    """`count` points equally spaced along the lower half-superellipse from (-a, y_top) to (a, y_top)."""
    u = np.linspace(-math.pi / 2, math.pi / 2, 721)
    s, c = np.sin(u), np.cos(u)
    x = a * np.sign(s) * np.abs(s) ** (2.0 / n)
    y = y_top + (y_bot - y_top) * np.abs(c) ** (2.0 / n)
    seg = np.hypot(np.diff(x), np.diff(y))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, arc[-1], count)
    return np.stack([np.interp(t, arc, x), np.interp(t, arc, y)], 1)


def _silhouette(x0: np.ndarray, y: np.ndarray, z_front: np.ndarray, yaw: float, depth: float = 0.85) -> np.ndarray:
    """3D points on the head's side outline for a given yaw.

    Each point's horizontal cross-section is a superellipse through the frontal outline point
    (|x| = x0) and the face front (z = z_front at x = 0). The visible outline of a turned head is
    the extreme point of that cross-section along the image x axis, so the far side's contour
    slides onto the cheek and the near side's towards the ear, as annotators place WFLW contours.
    """
    a = np.abs(x0)[:, None] + 1e-9
    c = depth * a
    zc = z_front[:, None] + c
    phi = np.radians(np.linspace(-35.0, 88.0, 124))[None, :]
    m = 2.6  # flatter than an ellipse at the front: faces are broad, not round
    cs, sn = np.cos(phi), np.sin(phi)
    side = np.sign(x0)[:, None] + (x0 == 0)[:, None]
    px = side * a * np.abs(cs) ** (2 / m)
    pz = zc - c * np.sign(sn) * np.abs(sn) ** (2 / m)
    ya = math.radians(yaw)
    proj = px * math.cos(ya) - pz * math.sin(ya)  # image-x after Ry(-yaw), see pose.rotation_matrix
    best = np.where(side > 0, proj.argmax(1, keepdims=True), proj.argmin(1, keepdims=True))
    bx = np.take_along_axis(px, best, 1)[:, 0]
    bz = np.take_along_axis(pz, best, 1)[:, 0]
    return np.stack([bx, y, bz], 1)


@dataclass
class _Face3D:
    points: np.ndarray  # [98, 3] landmarks
    head: np.ndarray  # head outline above the contour (from point 32 over the top to point 0)
    hairline: np.ndarray  # across the forehead, subject's right to left
    ears: tuple[np.ndarray, np.ndarray]
    neck: np.ndarray
    shoulders: np.ndarray
    irises: tuple[np.ndarray, np.ndarray]  # circle outlines [K, 3]
    nostrils: tuple[np.ndarray, np.ndarray]
    alae: tuple[np.ndarray, np.ndarray]  # nostril wing creases
    folds: tuple[np.ndarray, np.ndarray]  # nasolabial folds
    lid_creases: tuple[np.ndarray, np.ndarray]
    bridge_sides: tuple[np.ndarray, np.ndarray]
    glasses: tuple[np.ndarray, np.ndarray]  # lens outlines
    beard: np.ndarray  # lower face region outline


# Head-pose points (brow ends, eye corners, alar bases, mouth corners, lower lip, chin) sit exactly
# on pose.MEAN_FACE_3D for the mean identity, so solvePnP recovers the rendered pose. The other
# points follow where WFLW annotators put them (checked against a real WFLW-trained model).
_BROW_OUT = (6.826, -6.761, -4.402)
_ALA = (2.006, -1.41, -6.166)
_BRIDGE_TOP_Y = -5.35
_SUBNASALE_DROP = 0.45  # 57 below the alar bases
_TIP_ABOVE_SUBNASALE = 1.1


def _build_face(idn: _Identity, ex: _Expression, yaw: float, hair_top: float) -> _Face3D:
    """The 98 landmarks and the drawn-only geometry of one face in model space (no randomness)."""
    p = np.zeros((NUM_POINTS, 3))
    a_top, y_top = _contour_points(p, idn, ex, yaw)
    _brow_points(p, idn, ex)
    irises, lid_creases = _eye_points(p, idn, ex)
    nw, nostrils, alae, bridge_sides = _nose_points(p, idn, ex)
    mw = _mouth_points(p, idn, ex)
    return _head_geometry(p, idn, yaw, hair_top, a_top, y_top, nw, mw, irises, lid_creases, nostrils, alae, bridge_sides)


def _contour_points(p: np.ndarray, idn: _Identity, ex: _Expression, yaw: float) -> tuple[float, float]:
    """Points 0..32 into `p`; returns the outline's half-width and top (the head is drawn from them)."""
    W, H = idn.width, idn.height
    jaw_drop = 1.1 * ex.mouth_open

    # --- contour 0..32: subject's right ear, down the jaw to the chin (16), up to the left ear.
    y_top, y_chin = -6.0 * H, 7.42 * H + jaw_drop
    a_top = 8.3 * W
    outline = _superellipse_outline(a_top, y_top, y_chin, idn.jaw_n, 33)
    t = (outline[:, 1] - y_top) / (y_chin - y_top)
    z_front = -6.6 + (-4.07 + 6.6) * t**1.5  # face front depth at each contour level
    p[0:33] = _silhouette(outline[:, 0], outline[:, 1], z_front, yaw)
    p[16] = (0.0, y_chin, -4.07)
    return a_top, y_top


def _brow_points(p: np.ndarray, idn: _Identity, ex: _Expression) -> None:
    # --- brows 33..50 (right: 33 outer, 34-37 upper edge outwards->in, 38-41 lower edge in->out;
    # left mirrors: 42 inner upper, 43-45 upper, 46 outer, 47-50 lower edge out->in).
    raise_in = 0.75 * ex.brow if ex.brow > 0 else 0.45 * ex.brow
    raise_out = 0.55 * ex.brow if ex.brow > 0 else 0.1 * ex.brow
    for sgn, upper_ids, lower_ids, outer in ((-1, (37, 36, 35, 34), (38, 39, 40, 41), 33), (1, (42, 43, 44, 45), (50, 49, 48, 47), 46)):
        b_in = np.array([sgn * (1.330 + (0.15 * ex.brow if ex.brow < 0 else 0.0)), -7.122 - raise_in - idn.brow_y, -6.904])
        b_out = np.array([sgn * _BROW_OUT[0], _BROW_OUT[1] - raise_out - idn.brow_y, _BROW_OUT[2]])
        th_in = 0.62 * idn.brow_thick
        for j, tt in enumerate((0.0, 0.25, 0.5, 0.75)):
            base = b_in + tt * (b_out - b_in) + np.array([0.0, -0.55 * idn.brow_arch * math.sin(math.pi * tt**0.8), -0.35 * math.sin(math.pi * tt)])
            p[lower_ids[j]] = base
            p[upper_ids[j]] = base + np.array([0.0, -th_in * (1 - tt) ** 0.55, 0.0])
        p[outer] = b_out


def _eye_points(p: np.ndarray, idn: _Identity, ex: _Expression) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Points 60..75 and the pupils 96/97 into `p`; returns the iris outlines and lid creases."""
    # --- eyes: right 60 outer, 61-63 upper lid outer->inner, 64 inner, 65-67 lower lid inner->outer;
    # left 68 inner, 69-71 upper inner->outer, 72 outer, 73-75 lower outer->inner. 96/97 pupils.
    openness = idn.eye_open * ex.eye_open * (1.0 + 0.15 * max(ex.brow, 0.0))
    up_h = 0.68 * idn.eye_size * openness
    low_h = 0.42 * idn.eye_size * min(openness, 1.1)
    r_iris = 0.58 * idn.eye_size * idn.iris
    irises, lid_creases = [], []
    for sgn, (o_i, up_ids, in_i, low_ids, pupil) in (
        (-1, (60, (61, 62, 63), 64, (67, 66, 65), 96)),
        (1, (72, (71, 70, 69), 68, (73, 74, 75), 97)),
    ):
        outer = np.array([sgn * 5.311, -5.485, -3.988])
        inner = np.array([sgn * 1.790, -5.394, -4.413])
        outer[0] += sgn * 0.25 * (idn.eye_size - 1.0)
        inner[1] -= 0.05 * ex.smile  # cheeks push the lower lids up when smiling
        p[o_i], p[in_i] = outer, inner
        # lid curves: t from outer (0) to inner (1); peaks shifted like real lids
        for j, tt in enumerate((0.25, 0.5, 0.75)):
            c = outer + tt * (inner - outer)
            p[up_ids[j]] = c + np.array([0.0, -up_h * math.sin(math.pi * tt**0.85), -0.35 * math.sin(math.pi * tt)])
            lh = low_h * (1.0 - 0.25 * max(ex.smile, 0.0))
            p[low_ids[j]] = c + np.array([0.0, lh * math.sin(math.pi * tt**1.15), -0.3 * math.sin(math.pi * tt)])
        centre = (outer + inner) / 2
        half_w = float(np.linalg.norm(inner - outer)) / 2
        pupil_pt = centre + np.array([ex.gaze[0] * 0.38 * half_w, ex.gaze[1] * 0.22 - 0.05, -0.62])
        p[pupil] = pupil_pt
        ang = np.linspace(0, 2 * math.pi, 20, endpoint=False)
        irises.append(pupil_pt + np.stack([r_iris * np.cos(ang), r_iris * np.sin(ang), 0.12 * np.abs(np.cos(ang))], 1))
        crease = [outer + tt * (inner - outer) + np.array([0.0, -(up_h + 0.32) * math.sin(math.pi * tt**0.9) - 0.1, -0.3 * math.sin(math.pi * tt)])
                  for tt in np.linspace(0.05, 0.9, 7)]
        lid_creases.append(np.array(crease))
    return irises, lid_creases


def _nose_points(p: np.ndarray, idn: _Identity, ex: _Expression) -> tuple[float, tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Points 51..59 into `p`; returns the nose width factor, nostrils, alar creases and bridge sides."""
    # --- nose: 51-54 bridge top->tip, 55-59 base from subject's right alar to left alar.
    ax, ay, az = _ALA
    sub_y = ay + _SUBNASALE_DROP * idn.nose_len
    tip_y = sub_y - _TIP_ABOVE_SUBNASALE * idn.nose_len
    tip_z = -6.17 - 2.7 * idn.nose_proj
    top = np.array([0.0, _BRIDGE_TOP_Y, -5.95])
    tip = np.array([0.0, tip_y, tip_z])
    for j, tt in enumerate((0.0, 1 / 3, 2 / 3, 1.0)):
        p[51 + j] = top + tt * (tip - top) + np.array([0.0, 0.0, -0.25 * math.sin(math.pi * tt)])
    nw = idn.nose_width * (1.0 + 0.08 * max(ex.smile, 0.0))
    p[55] = (-ax * nw, ay, az)
    p[59] = (ax * nw, ay, az)
    p[56] = (-0.5 * ax * nw, (ay + sub_y) / 2 + 0.02, -6.95 - 0.3 * (idn.nose_proj - 1))
    p[58] = (0.5 * ax * nw, (ay + sub_y) / 2 + 0.02, -6.95 - 0.3 * (idn.nose_proj - 1))
    p[57] = (0.0, sub_y, -7.15 - 0.4 * (idn.nose_proj - 1))
    ang = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    nostrils = tuple(
        np.array([sgn * 0.5 * ax * nw, sub_y - 0.25, -6.85]) + np.stack([0.36 * nw * np.cos(ang), 0.2 * np.sin(ang), 0 * ang], 1)
        for sgn in (-1, 1)
    )
    alae = tuple(
        np.array([[sgn * ax * nw, ay, az], [sgn * (ax + 0.15) * nw, ay - 0.55, -6.2], [sgn * (ax - 0.05) * nw, ay - 1.15, -6.4], [sgn * (ax - 0.55) * nw, ay - 1.45, -6.8]])
        for sgn in (-1, 1)
    )
    bridge_sides = tuple(
        np.array([[sgn * 0.95, -5.3, -5.6], [sgn * 1.0, -4.2, -6.3], [sgn * 1.15, -3.1, -6.7], [sgn * 1.6, -2.2, -6.5]]) for sgn in (-1, 1)
    )
    return nw, nostrils, alae, bridge_sides


def _mouth_points(p: np.ndarray, idn: _Identity, ex: _Expression) -> float:
    """Points 76..95 into `p`; returns the mouth half-width."""
    # --- mouth: 76 right corner, 77-81 upper outer, 82 left corner, 83-87 lower outer (left->right);
    # 88 right inner corner, 89-91 upper inner, 92 left inner corner, 93-95 lower inner (left->right).
    mw = 2.774 * idn.mouth_width * (1.0 + 0.12 * max(ex.smile, 0.0) - 0.08 * ex.mouth_open)
    y_corner = 2.081 - 0.5 * ex.smile + 0.25 * ex.mouth_open
    y_mid = 2.0 + 0.1 * ex.mouth_open
    gap = 1.7 * ex.mouth_open

    def lip_line(x: float) -> float:
        return y_mid + (y_corner - y_mid) * (abs(x) / mw) ** 2

    def lip_z(x: float) -> float:
        return -5.049 - 1.2 * (1.0 - (x / mw) ** 2)

    def q(x: float) -> float:  # opening profile along the inner lips
        return math.sqrt(max(0.0, 1.0 - (x / (0.9 * mw)) ** 2))

    ul, ll = 0.62 * idn.upper_lip, 1.116 * idn.lower_lip  # 85 at MEAN_FACE_3D's lower lip when neutral
    p[76] = (-mw, y_corner, -5.049 + 0.2 * max(ex.smile, 0))
    p[82] = (mw, y_corner, -5.049 + 0.2 * max(ex.smile, 0))
    for i, (fx, fh) in zip(range(77, 82), ((-0.62, 0.72), (-0.24, 1.0), (0.0, 0.86), (0.24, 1.0), (0.62, 0.72))):
        x = fx * mw
        p[i] = (x, lip_line(x) - 0.2 * gap * q(x) - ul * fh, lip_z(x) - 0.05)
    for i, (fx, fh) in zip(range(83, 88), ((0.64, 0.7), (0.28, 0.96), (0.0, 1.0), (-0.28, 0.96), (-0.64, 0.7))):
        x = fx * mw
        p[i] = (x, lip_line(x) + 0.8 * gap * q(x) + ll * fh, lip_z(x) + 0.15)
    p[88] = (-0.9 * mw, lip_line(0.9 * mw), lip_z(0.9 * mw) + 0.15)
    p[92] = (0.9 * mw, lip_line(0.9 * mw), lip_z(0.9 * mw) + 0.15)
    for i, fx in zip((89, 90, 91), (-0.5, 0.0, 0.5)):
        x = fx * 0.9 * mw
        p[i] = (x, lip_line(x) - 0.2 * gap * q(x) + 0.02, lip_z(x) + 0.2)
    for i, fx in zip((93, 94, 95), (0.5, 0.0, -0.5)):
        x = fx * 0.9 * mw
        p[i] = (x, lip_line(x) + 0.8 * gap * q(x) - 0.02, lip_z(x) + 0.2)
    return mw


def _head_geometry(p: np.ndarray, idn: _Identity, yaw: float, hair_top: float, a_top: float, y_top: float, nw: float, mw: float,
                   irises: list[np.ndarray], lid_creases: list[np.ndarray], nostrils: tuple[np.ndarray, ...],
                   alae: tuple[np.ndarray, ...], bridge_sides: tuple[np.ndarray, ...]) -> _Face3D:
    """Head outline, hairline, ears, neck, shoulders, folds, glasses and beard around the landmarks `p`."""
    W, H = idn.width, idn.height
    # --- non-landmark geometry for rendering
    hx = np.linspace(-1, 1, 25)
    ang = hx * math.pi / 2
    head_a = a_top * 1.03
    head_y = y_top + (hair_top - y_top) * np.cos(ang) ** 0.8
    head_x = head_a * np.sin(ang)
    head = _silhouette(head_x[::-1], head_y[::-1], np.full(25, -6.2), yaw, depth=0.95)
    hl_x = np.linspace(-1, 1, 15)
    hl_y = -10.6 * H + 2.4 * np.abs(hl_x) ** 2.2
    hl_xx = hl_x * a_top * 0.93
    hl_z = -6.2 + 5.5 * np.abs(hl_x) ** 2.5
    hairline = np.stack([hl_xx, hl_y, hl_z], 1)
    ears = tuple(
        np.array([sgn * (a_top * 0.97 + 0.9 * (np.cos(e) * 0.5 + 0.5)), -3.2 + 2.6 * np.sin(e), 1.6 + 0.4 * np.cos(e)]).T
        for sgn in (-1, 1)
        for e in [np.linspace(-math.pi / 2, 3 * math.pi / 2, 14)]
    )
    nx = 4.9 * W
    neck = np.array([[-nx, 2.0, 1.5], [-nx * 1.02, 13.0, 1.5], [-nx * 1.35, 18.0, 2.5], [nx * 1.35, 18.0, 2.5], [nx * 1.02, 13.0, 1.5], [nx, 2.0, 1.5]])
    shoulders = np.array([[-nx * 1.1, 14.5, 3.0], [-17.0, 18.5, 4.0], [-21.0, 40.0, 4.0], [21.0, 40.0, 4.0], [17.0, 18.5, 4.0], [nx * 1.1, 14.5, 3.0]])
    folds = tuple(
        np.array([[sgn * 2.3 * nw, -1.9, -6.0], [sgn * (mw + 0.75), 0.4, -5.5], [sgn * (mw + 0.55), 2.6, -5.1]]) for sgn in (-1, 1)
    )
    lens_ang = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    glasses = tuple(
        np.array([sgn * 3.55, -5.35, -5.6])
        + np.stack([2.25 * np.sign(np.cos(lens_ang)) * np.abs(np.cos(lens_ang)) ** 0.6, 1.45 * np.sign(np.sin(lens_ang)) * np.abs(np.sin(lens_ang)) ** 0.7, 0 * lens_ang], 1)
        for sgn in (-1, 1)
    )
    beard = np.concatenate([p[4:29], np.array([[p[28, 0], 0.6, -5.0], [2.6 * nw, -0.9, -6.0], [0, -0.95, -7.0], [-2.6 * nw, -0.9, -6.0], [p[4, 0], 0.6, -5.0]])])
    return _Face3D(points=p, head=head, hairline=hairline, ears=ears, neck=neck, shoulders=shoulders,
                   irises=(irises[0], irises[1]), nostrils=nostrils, alae=alae, folds=folds,
                   lid_creases=(lid_creases[0], lid_creases[1]), bridge_sides=bridge_sides, glasses=glasses, beard=beard)


def mean_face_98() -> np.ndarray:
    """The generator's neutral 98-point 3D face [98, 3] (pose.py object frame, ~cm), frontal view.

    Its 14 head-pose points coincide with `pose.MEAN_FACE_3D`; it is left/right symmetric, so
    `layouts.WFLW98.mirror` maps it onto its own mirror image.
    """
    neutral = _sample_identity(np.random.default_rng(0), 0.0)
    return _build_face(neutral, _Expression(0.0, 0.0, 0.0, 1.0, (0.0, 0.0)), 0.0, -15.0).points.copy()


# ----------------------------------------------------------------------------------------------
# 2D drawing helpers (sub-pixel, anti-aliased)
# ----------------------------------------------------------------------------------------------

_SHIFT = 4
_ONE = 1 << _SHIFT


def _fx(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _spline(pts: np.ndarray, closed: bool, per: int = 6) -> np.ndarray:
    """Catmull-Rom curve through every point (so landmarks stay exactly on the drawn shape)."""
    p = np.asarray(pts, np.float64)
    n = len(p)
    if n < 3:
        return p
    if closed:
        ext = np.concatenate([p[-1:], p, p[:2]])
        segs = n
    else:
        ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
        segs = n - 1
    p0, p1, p2, p3 = (ext[k : k + segs][:, None, :] for k in range(4))
    t = np.linspace(0, 1, per, endpoint=False)[None, :, None]
    c = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t + (-p0 + 3 * p1 - 3 * p2 + p3) * t * t * t)
    c = c.reshape(-1, 2)
    return c if closed else np.concatenate([c, p[-1:]])


def _fill(img: np.ndarray, pts: np.ndarray, color: tuple[float, ...] | float) -> None:
    if len(pts) < 3:  # a silhouette wholly behind the camera's near plane (`clip_near`)
        return
    cv2.fillPoly(img, [_fx(pts)], _col(color), cv2.LINE_AA, _SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color: tuple[float, ...] | float, thickness: int = 1, closed: bool = False) -> None:
    cv2.polylines(img, [_fx(pts)], closed, _col(color), max(1, int(thickness)), cv2.LINE_AA, _SHIFT)


def _col(c: tuple[float, ...] | float) -> tuple[float, ...]:
    if isinstance(c, (int, float)):
        return (float(c),) * 3
    return tuple(float(v) for v in c)


def _box(pts: np.ndarray, pad: float, size: int) -> tuple[int, int, int, int] | None:
    """Integer region [x0, x1) x [y0, y1) around points plus `pad`, clipped; None if empty."""
    p = np.asarray(pts, np.float64).reshape(-1, 2)
    x0, y0 = np.floor(p.min(0) - pad).astype(int)
    x1, y1 = np.ceil(p.max(0) + pad).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(size, x1), min(size, y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _blend(img: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> None:
    """img = img*(1-a) + layer*a, in place (same-shaped views); alpha float32 [h, w] in 0..1."""
    a = alpha[..., None]
    f = img.astype(np.float32)
    f += (layer.astype(np.float32) - f) * a
    np.clip(f + 0.5, 0, 255, out=f)
    img[:] = f.astype(np.uint8)


def _soft_stroke(img: np.ndarray, pts: np.ndarray, color: tuple[float, ...], width: float, strength: float, blur: float) -> None:
    """A blurred stroke (shadow, crease, highlight) blended over the image, computed in its ROI."""
    k = max(1.0, blur)
    box = _box(pts, 3 * k + width, img.shape[0])
    if box is None:
        return
    x0, y0, x1, y1 = box
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _line(m, np.asarray(pts) - (x0, y0), 255, max(1, round(width)))
    a = cv2.GaussianBlur(m, (0, 0), k).astype(np.float32) * (strength / 255.0)
    roi = img[y0:y1, x0:x1]
    _blend(roi, np.full_like(roi, _col(color)), np.clip(a, 0, 1))


def _masked_layer(img: np.ndarray, shape: np.ndarray, pad: float, draw: Callable[[np.ndarray, np.ndarray], None], soft: float = 0.0) -> None:
    """Draw into a copy of the ROI around `shape` and keep it only inside `shape` (clipping)."""
    box = _box(shape, pad + 3 * soft, img.shape[0])
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], np.float64)
    roi = img[y0:y1, x0:x1]
    m = np.zeros(roi.shape[:2], np.uint8)
    _fill(m, shape - off, 255)
    if soft > 0:
        m = cv2.GaussianBlur(m, (0, 0), soft)
    layer = roi.copy()
    draw(layer, off)
    _blend(roi, layer, m.astype(np.float32) / 255.0)


def _jitter_color(rng: np.random.Generator, c: tuple[float, float, float], amount: float) -> tuple[float, float, float]:
    return tuple(float(np.clip(v * (1 + rng.normal(0, amount)), 0, 255)) for v in c)  # type: ignore[return-value]


_SKIN = np.array([(42, 55, 88), (55, 78, 125), (72, 102, 160), (95, 135, 195), (125, 162, 218), (150, 185, 232), (172, 202, 240)], np.float64)
_HAIR = np.array([(20, 20, 22), (25, 35, 55), (35, 55, 90), (60, 95, 140), (100, 150, 200), (40, 60, 150), (150, 150, 155), (200, 200, 205), (30, 30, 120)], np.float64)
_IRIS = np.array([(30, 45, 70), (40, 70, 110), (110, 90, 60), (140, 120, 70), (80, 110, 80), (60, 60, 60)], np.float64)


def _pick(rng: np.random.Generator, palette: np.ndarray) -> tuple[float, float, float]:
    """A colour between two neighbouring palette entries."""
    i = rng.uniform(0, len(palette) - 1)
    lo = int(i)
    hi = min(lo + 1, len(palette) - 1)
    c = palette[lo] * (1 - (i - lo)) + palette[hi] * (i - lo)
    return tuple(float(v) for v in c)  # type: ignore[return-value]


def _grad(size: int, ang: float) -> np.ndarray:
    """Linear ramp [size, size] float32 in about -0.5..0.5 along direction `ang`."""
    v = (np.arange(size, dtype=np.float32) - size / 2) / size
    return v[None, :] * np.float32(math.cos(ang)) + v[:, None] * np.float32(math.sin(ang))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = int(rng.integers(0, 4))
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    c2 = rng.uniform(0, 255, 3).astype(np.float32)
    g = _grad(size, float(rng.uniform(0, 2 * math.pi))) + 0.5
    img = c1 + (c2 - c1) * g[..., None]
    if kind >= 1:  # low-frequency blotches: walls, foliage, out-of-focus scenes
        res = int(rng.integers(3, 12))
        noise = rng.uniform(0, 255, (res, res, 3)).astype(np.float32)
        up = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        w = 0.6 * kind / 3
        img = cv2.addWeighted(img, 1 - w, up, w, 0.0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 9))):  # objects and edges
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        if rng.random() < 0.5:
            x1, y1 = x0 + rng.uniform(0.05, 0.6) * size, y0 + rng.uniform(0.05, 0.6) * size
            cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), col, -1 if rng.random() < 0.7 else int(rng.integers(1, 6)), cv2.LINE_AA)
        else:
            cv2.ellipse(img, (int(x0), int(y0)), (int(rng.uniform(4, 0.35 * size)), int(rng.uniform(4, 0.35 * size))),
                        float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.8, 4.0)))
    if rng.random() < 0.4:  # fine texture
        tex = rng.standard_normal((size // 2, size // 2), dtype=np.float32) * np.float32(rng.uniform(4, 18))
        tex = cv2.resize(tex, (size, size), interpolation=cv2.INTER_LINEAR)
        img = np.clip(img.astype(np.float32) + tex[..., None], 0, 255).astype(np.uint8)
    return img


# ----------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------


def _sample_pose(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[float, float, float]:
    yaw = rng.normal(0, 14) if rng.random() < 0.65 else rng.uniform(-cfg.max_yaw, cfg.max_yaw)
    pitch = rng.normal(0, 9) if rng.random() < 0.85 else rng.uniform(-cfg.max_pitch, cfg.max_pitch)
    roll = rng.normal(0, 9) if rng.random() < 0.8 else rng.uniform(-cfg.max_roll, cfg.max_roll)
    return (float(np.clip(yaw, -cfg.max_yaw, cfg.max_yaw)), float(np.clip(pitch, -cfg.max_pitch, cfg.max_pitch)),
            float(np.clip(roll, -cfg.max_roll, cfg.max_roll)))


def _place(rng: np.random.Generator, cfg: SyntheticConfig, face: _Face3D, rot: np.ndarray, size: int) -> np.ndarray:
    """Translation putting the landmark box at a random size and position inside the image."""
    wh = (size, size)
    z = 40.0
    t = np.array([0.0, 0.0, z])
    box_w = float(np.ptp(project(face.points, rot, t, wh)[:, 0]))
    z = z * box_w / (rng.uniform(*cfg.face_fraction) * size)
    margin = 0.04 * size
    for _ in range(4):
        t = np.array([t[0], t[1], z])
        pts = project(face.points, rot, t, wh)
        lo, hi = pts.min(0), pts.max(0)
        room = size - 2 * margin - (hi - lo)
        if np.any(room < 0):  # too big for the image at this pose: step back
            z *= float(np.max((hi - lo) / (size - 2 * margin))) * 1.02
            continue
        shift = margin + rng.uniform(0, 1, 2) * room - lo
        t = t + np.array([shift[0] * z / size, shift[1] * z / size, 0.0])
        pts = project(face.points, rot, t, wh)
        # Perspective makes the shift inexact; nudge what is left back inside.
        lo, hi = pts.min(0), pts.max(0)
        nudge = np.maximum(0, 2.0 - lo) - np.maximum(0, hi - (size - 3.0))
        return t + np.array([nudge[0] * z / size, nudge[1] * z / size, 0.0])
    return t


def _c(v: np.ndarray | tuple[float, ...], k: float = 1.0, add: float = 0.0) -> tuple[float, float, float]:
    """Scaled colour tuple, clipped to 0..255."""
    a = np.clip(np.asarray(v, np.float64) * k + add, 0, 255)
    return (float(a[0]), float(a[1]), float(a[2]))


def clip_near(poly: np.ndarray, rot: np.ndarray, t: np.ndarray, near_fraction: float = 0.05) -> np.ndarray:
    """The closed polygon `poly` (object points [N, 3]) cut to the part at camera depth >=
    near_fraction x the face's depth (Sutherland-Hodgman against one plane), in object points.
    A polygon wholly in front comes back unchanged (the same array), so faces that never met
    the plane render exactly as before."""
    cam = poly @ rot.T + t
    near = near_fraction * float(t[2])
    if np.all(cam[:, 2] >= near):
        return poly
    out = []
    for i in range(len(cam)):
        a, b = cam[i], cam[(i + 1) % len(cam)]
        if a[2] >= near:
            out.append(a)
        if (a[2] >= near) != (b[2] >= near):
            out.append(a + (b - a) * (near - a[2]) / (b[2] - a[2]))
    if len(out) < 3:
        return poly[:0]
    return (np.asarray(out) - t) @ rot  # back to object points: rot is orthonormal


def render_face(
    rng: np.random.Generator, cfg: SyntheticConfig | None = None, image_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[int, int, int, int, int, int]]:
    """Draw one synthetic face.

    Returns (image uint8 BGR [S, S, 3], points float64 [98, 2] in 0-based image pixels (WFLW
    order), pose (yaw, pitch, roll) in degrees as in `pose.py`, WFLW attribute flags (pose,
    expression, illumination, makeup, occlusion, blur)). All randomness comes from `rng`.
    """
    cfg = cfg or SyntheticConfig()
    size = int(image_size or cfg.image_size)
    idn = _sample_identity(rng, cfg.identity)
    ex = _sample_expression(rng, cfg.expression)
    yaw, pitch, roll = _sample_pose(rng, cfg)
    face = _build_face(idn, ex, yaw, -15.0 * idn.height + float(rng.uniform(-0.5, 0.8)))
    rot = rotation_matrix(yaw, pitch, roll)
    t = _place(rng, cfg, face, rot, size)

    P, P_fill = _projections(rot, t, size)
    pts = P(face.points)
    u = size / t[2]  # pixels per model unit at the face
    fw = float(np.ptp(pts[:, 0]))
    attrs = [0, 0, 0, 0, 0, 0]
    attrs[0] = int(abs(yaw) > 28 or abs(pitch) > 20 or abs(roll) > 30)
    attrs[1] = int(ex.mouth_open > 0.35 or abs(ex.smile) > 0.6 or abs(ex.brow) > 0.6 or ex.eye_open < 0.5)

    skin, hair, makeup, lip, iris_col = _colours(rng, cfg)
    attrs[3] = int(makeup)
    img = _background(rng, size)
    head2 = P(face.head)
    contour = pts[0:33]
    _draw_behind(rng, img, face, P, P_fill, skin, hair)
    lx = _draw_skin(rng, img, pts, contour, head2, skin, fw, size)
    _draw_beard(rng, img, face, P, hair, u)
    _draw_hair(rng, img, face, P, head2, hair, size)
    _draw_shading(img, face, P, pts, ex, skin, lx, u)
    _draw_brows(rng, img, pts, skin, hair)
    _draw_eyes(rng, img, face, P, pts, skin, iris_col, makeup, u)
    _draw_mouth(img, pts, ex, lip, u)
    occluded = _draw_glasses(rng, img, face, P, u, cfg)
    if rng.random() < cfg.occlusion_prob:
        occluded = True
        _occluder(rng, img, pts, contour, P, skin, hair, fw)
    attrs[4] = int(occluded)

    img, attrs[2], attrs[5] = _camera(rng, img, cfg)
    return img, pts, (yaw, pitch, roll), (attrs[0], attrs[1], attrs[2], attrs[3], attrs[4], attrs[5])


Projection = Callable[[np.ndarray], np.ndarray]


def _projections(rot: np.ndarray, t: np.ndarray, size: int) -> tuple[Projection, Projection]:
    """Model points -> image pixels, and the same for silhouettes that may reach behind the camera."""

    def P(x: np.ndarray) -> np.ndarray:
        return project(np.asarray(x, np.float64).reshape(-1, 3), rot, t, (size, size))

    def P_fill(x: np.ndarray) -> np.ndarray:
        """P for a filled silhouette behind the face, clipped at the camera's near plane.

        Shoulders reach 40 units below the chin; a strongly pitched face placed close to the
        camera can put them behind it (measured: 2 faces in 9,000, e.g. seed 5 face 636).
        """
        return P(clip_near(np.asarray(x, np.float64).reshape(-1, 3), rot, t))

    return P, P_fill


def _colours(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, tuple[float, float, float], bool,
                                                                       tuple[float, float, float], tuple[float, float, float]]:
    """Skin, hair, makeup or not, lip and iris colours."""
    skin = np.array(_jitter_color(rng, _pick(rng, _SKIN), 0.05))
    hair = _jitter_color(rng, _pick(rng, _HAIR), 0.1)
    makeup = bool(rng.random() < cfg.makeup_prob)
    lip = _c(skin * np.array([0.8, 0.74, 1.0]), float(rng.uniform(0.78, 0.98)))
    if makeup:
        lip = _c(rng.choice(np.array([(40, 30, 170), (90, 40, 150), (60, 60, 200), (50, 20, 110), (120, 80, 200)], np.float64)))
    iris_col = _jitter_color(rng, _pick(rng, _IRIS), 0.12)
    return skin, hair, makeup, lip, iris_col


def _draw_behind(rng: np.random.Generator, img: np.ndarray, face: _Face3D, P: Projection, P_fill: Projection,
                 skin: np.ndarray, hair: tuple[float, float, float]) -> None:
    """Behind the face: long hair, shoulders, neck, ears."""
    if rng.random() < 0.35:  # long hair falls behind the neck
        drop = float(rng.uniform(4, 14))
        back = np.concatenate([face.head, np.array([[face.head[-1, 0] - 1.5, drop, 2.0], [face.head[0, 0] + 1.5, drop, 2.0]])])
        _fill(img, _spline(P_fill(back), True, 4), hair)
    _fill(img, P_fill(face.shoulders), _c(rng.uniform(0, 255, 3)))
    _fill(img, P_fill(face.neck), _c(skin, float(rng.uniform(0.6, 0.78))))
    for e in face.ears:
        ear = _spline(P(e), True, 3)
        _fill(img, ear, _c(skin, 0.88))
        _line(img, ear, _c(skin, 0.62), 1, True)


def _draw_skin(rng: np.random.Generator, img: np.ndarray, pts: np.ndarray, contour: np.ndarray, head2: np.ndarray,
               skin: np.ndarray, fw: float, size: int) -> float:
    """The skin, shaded; returns the side light's horizontal direction (cosine of its angle)."""
    # ---- skin: one outline through the 33 contour points and over the forehead
    outline = np.concatenate([_spline(contour, False, 5), _spline(head2, False, 3)[1:-1]])
    box = _box(outline, 2, size)
    _fill(img, outline, _c(skin))
    lx_ang = float(rng.uniform(0, 2 * math.pi))
    lx = math.cos(lx_ang)
    if box is not None:  # roundness (darker towards the outline) and a side light, inside the skin
        x0, y0, x1, y1 = box
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        _fill(m, outline - (x0, y0), 255)
        dt = cv2.distanceTransform((m > 127).astype(np.uint8), cv2.DIST_L2, 3)
        rnd = np.sqrt(np.clip(dt / max(2.0, 0.22 * fw), 0, 1))
        yy = (np.arange(y0, y1, dtype=np.float32) - pts[:, 1].mean()) / fw
        xx = (np.arange(x0, x1, dtype=np.float32) - pts[:, 0].mean()) / fw
        ramp = xx[None, :] * np.float32(lx) + yy[:, None] * np.float32(math.sin(lx_ang))
        shade = (0.72 + 0.28 * rnd) * (1.0 + float(rng.uniform(0.05, 0.45)) * np.clip(ramp, -0.7, 0.7))
        mult = 1.0 + (m.astype(np.float32) / 255.0) * (shade - 1.0)
        roi = img[y0:y1, x0:x1]
        roi[:] = np.clip(roi.astype(np.float32) * mult[..., None] + 0.5, 0, 255).astype(np.uint8)
    return lx


def _draw_beard(rng: np.random.Generator, img: np.ndarray, face: _Face3D, P: Projection, hair: tuple[float, float, float],
                u: float) -> None:
    # ---- beard / stubble (texture only, under the features)
    if rng.random() < 0.15:
        beard = _spline(P(face.beard), True, 3)
        tex_k = float(rng.uniform(0.3, 0.85))
        col = np.array(hair, np.float32)

        def stubble(layer: np.ndarray, off: np.ndarray) -> None:
            tex = rng.uniform(0.3, 1.0, layer.shape[:2]).astype(np.float32)[..., None] * tex_k
            layer[:] = np.clip(layer * (1 - tex) + col * tex, 0, 255).astype(np.uint8)

        _masked_layer(img, beard, 2, stubble, soft=max(1.0, 0.4 * u))


def _draw_hair(rng: np.random.Generator, img: np.ndarray, face: _Face3D, P: Projection, head2: np.ndarray,
               hair: tuple[float, float, float], size: int) -> None:
    # ---- hair over the forehead: hairline (right -> left) then the head outline back over the top
    if rng.random() < 0.9:
        hair_poly = np.concatenate([_spline(P(face.hairline), False, 3), _spline(head2, False, 3)])
        _fill(img, hair_poly, hair)
        if rng.random() < 0.5:  # strands
            for _ in range(int(rng.integers(5, 20))):
                a = hair_poly[rng.integers(0, len(hair_poly))]
                _line(img, np.stack([a, a + rng.normal(0, 0.03 * size, 2)]), _c(hair, float(rng.uniform(0.7, 1.3))), 1)


def _draw_shading(img: np.ndarray, face: _Face3D, P: Projection, pts: np.ndarray, ex: _Expression, skin: np.ndarray,
                  lx: float, u: float) -> None:
    # ---- smile folds, nose shading
    if ex.smile > 0.3:
        for f in face.folds:
            _soft_stroke(img, _spline(P(f), False, 5), _c(skin, 0.6), max(1, 0.15 * u), 0.5 * ex.smile, 0.3 * u)
    shadow, light = _c(skin, 0.62), _c(skin, 1.18, 12)
    far = 0 if lx > 0 else 1  # the side away from the light gets the bridge shadow
    _soft_stroke(img, _spline(P(face.bridge_sides[far]), False, 5), shadow, max(1, 0.35 * u), 0.5, 0.35 * u)
    _soft_stroke(img, _spline(pts[51:55], False, 5), light, max(1, 0.25 * u), 0.4, 0.2 * u)
    _soft_stroke(img, pts[53:55], light, max(1, 0.5 * u), 0.45, 0.3 * u)
    for a in face.alae:
        _soft_stroke(img, _spline(P(a), False, 5), shadow, max(1, 0.12 * u), 0.7, 0.1 * u)
    _soft_stroke(img, _spline(pts[55:60], False, 5), shadow, max(1, 0.14 * u), 0.8, 0.1 * u)
    for n in face.nostrils:
        _fill(img, P(n), _c(skin, 0.3))


def _draw_brows(rng: np.random.Generator, img: np.ndarray, pts: np.ndarray, skin: np.ndarray,
                hair: tuple[float, float, float]) -> None:
    # ---- brows
    brow_col = _c(hair, float(rng.uniform(0.6, 1.0))) if rng.random() < 0.8 else _c(skin, 0.45)
    for ids in (list(range(33, 42)), list(range(42, 51))):
        brow = _spline(pts[ids], True, 4)
        _fill(img, brow, brow_col)
        _line(img, brow, _c(brow_col, 1.0, 0.15 * (skin.mean() - np.mean(brow_col))), 1, True)


def _draw_eyes(rng: np.random.Generator, img: np.ndarray, face: _Face3D, P: Projection, pts: np.ndarray, skin: np.ndarray,
               iris_col: tuple[float, float, float], makeup: bool, u: float) -> None:
    # ---- eyes: sclera, iris and pupil clipped to the lids, lashes, crease
    if makeup and rng.random() < 0.7:
        shadow_col = _c(rng.uniform(30, 200, 3))
        for cr in face.lid_creases:
            _soft_stroke(img, _spline(P(cr), False, 4), shadow_col, max(1, 0.5 * u), 0.6, 0.3 * u)
    white = _c((215, 225, 235), float(rng.uniform(0.8, 1.05)))
    pupil_k = float(rng.uniform(0.35, 0.5))
    for eye_ids, pupil_i, iris3d, crease in (
        ((60, 61, 62, 63, 64, 65, 66, 67), 96, face.irises[0], face.lid_creases[0]),
        ((68, 69, 70, 71, 72, 73, 74, 75), 97, face.irises[1], face.lid_creases[1]),
    ):
        eye_poly = _spline(pts[list(eye_ids)], True, 5)
        _soft_stroke(img, _spline(P(crease), False, 4), _c(skin, 0.55), 1, 0.55, 0.12 * u)
        iris2 = P(iris3d)
        pc = pts[pupil_i]
        pr = float(np.ptp(iris2[:, 0])) / 2 * pupil_k

        def eyeball(layer: np.ndarray, off: np.ndarray, eye_poly: np.ndarray = eye_poly, iris2: np.ndarray = iris2,
                    pc: np.ndarray = pc, pr: float = pr) -> None:
            _fill(layer, eye_poly - off, white)
            _fill(layer, iris2 - off, iris_col)
            _line(layer, iris2 - off, _c(iris_col, 0.5), 1, True)
            q = np.round((pc - off) * _ONE).astype(int)
            r = max(1, int(pr * _ONE))
            cv2.ellipse(layer, (int(q[0]), int(q[1])), (r, r), 0, 0, 360, (12, 12, 12), -1, cv2.LINE_AA, _SHIFT)
            # catchlight at the pupil's rim, off the landmark itself
            g = np.round((pc - off + np.array([-0.6, -0.65]) * pr) * _ONE).astype(int)
            cv2.circle(layer, (int(g[0]), int(g[1])), max(1, int(0.3 * pr * _ONE)), (245, 245, 245), -1, cv2.LINE_AA, _SHIFT)

        _masked_layer(img, eye_poly, 2, eyeball)
        upper = pts[list(eye_ids[:5])]
        lower = pts[[eye_ids[4], eye_ids[5], eye_ids[6], eye_ids[7], eye_ids[0]]]
        _line(img, _spline(upper, False, 5), (5, 5, 5) if makeup else (20, 20, 25), max(1, round(0.16 * u * (1.6 if makeup else 1))))
        _line(img, _spline(lower, False, 5), _c(skin, 0.55), 1)


def _draw_mouth(img: np.ndarray, pts: np.ndarray, ex: _Expression, lip: tuple[float, float, float], u: float) -> None:
    # ---- mouth: cavity and teeth when open, then both lips through the 20 lip points
    if ex.mouth_open > 0.04:
        inner = _spline(pts[88:96], True, 5)
        tt = pts[[88, 89, 90, 91, 92]]
        band = np.concatenate([tt, (tt + np.array([0.0, 0.75 * ex.mouth_open * u]))[::-1]])

        def cavity(layer: np.ndarray, off: np.ndarray) -> None:
            _fill(layer, inner - off, (25, 20, 45))
            _fill(layer, _spline(band, True, 4) - off, (200, 215, 225))

        _masked_layer(img, inner, 2, cavity)
    upper_lip = np.concatenate([_spline(pts[76:83], False, 5), _spline(pts[[92, 91, 90, 89, 88]], False, 5)])
    lower_lip = np.concatenate([_spline(pts[[82, 83, 84, 85, 86, 87, 76]], False, 5), _spline(pts[[88, 95, 94, 93, 92]], False, 5)])
    _fill(img, upper_lip, _c(lip, 0.86))
    _fill(img, lower_lip, lip)
    _soft_stroke(img, np.stack([pts[94] * 0.6 + pts[85] * 0.4 - (0.5 * u, 0), pts[94] * 0.6 + pts[85] * 0.4 + (0.5 * u, 0)]),
                 _c(lip, 1.3, 15), max(1, 0.2 * u), 0.6, 0.15 * u)
    _line(img, _spline(pts[[76, 88, 89, 90, 91, 92, 82]], False, 5), _c(lip, 0.45), 1)
    if ex.mouth_open > 0.04:
        _line(img, _spline(pts[[76, 88, 95, 94, 93, 92, 82]], False, 5), _c(lip, 0.55), 1)
    _line(img, _spline(pts[list(range(76, 88)) + [76]], False, 5), _c(lip, 0.8), 1)


def _draw_glasses(rng: np.random.Generator, img: np.ndarray, face: _Face3D, P: Projection, u: float,
                  cfg: SyntheticConfig) -> bool:
    """Glasses, maybe; True when they are sunglasses (the eyes are occluded)."""
    # ---- glasses
    if rng.random() < cfg.glasses_prob:
        frame = _c(rng.uniform(0, 120, 3))
        sun = bool(rng.random() < 0.3)
        lenses = [P(g) for g in face.glasses]
        th = max(1, round(float(rng.uniform(0.1, 0.3)) * u))
        for ln in lenses:
            if sun:
                _fill(img, ln, _c(rng.uniform(5, 50, 3)))
            _line(img, ln, frame, th, True)
        _line(img, np.stack([lenses[0][0], lenses[1][12]]), frame, th)
        return sun
    return False


def _occluder(rng: np.random.Generator, img: np.ndarray, pts: np.ndarray, contour: np.ndarray,
              P: Callable[[np.ndarray], np.ndarray], skin: np.ndarray, hair: tuple[float, float, float], fw: float) -> None:
    kind = int(rng.integers(0, 4))
    if kind == 0:  # surgical mask over nose and mouth
        top = P(np.array([[-5.5, -2.8, -6.0], [-2.0, -3.4, -8.0], [0.0, -3.6, -8.4], [2.0, -3.4, -8.0], [5.5, -2.8, -6.0]]))
        m = np.concatenate([_spline(contour[4:29], False, 3), _spline(top[::-1], False, 4)])
        mc = _c(rng.choice(np.array([(220, 200, 170), (240, 240, 240), (40, 40, 40), (200, 170, 120)], np.float64)))
        _fill(img, m, mc)
        for a, b in ((top[0], contour[1]), (top[-1], contour[31])):
            _line(img, np.stack([a, b]), _c(mc, 0.8), max(1, int(0.012 * fw)))
    elif kind == 1:  # hand or skin-coloured blob
        c = pts[int(rng.choice([54, 85, 16, 3, 29, 66, 74]))] + rng.normal(0, 0.08 * fw, 2)
        ax = (int(rng.uniform(0.15, 0.35) * fw), int(rng.uniform(0.12, 0.3) * fw))
        hand = _c(skin, float(rng.uniform(0.8, 1.1)))
        cv2.ellipse(img, (int(c[0]), int(c[1])), ax, float(rng.uniform(0, 180)), 0, 360, hand, -1, cv2.LINE_AA)
        base = float(rng.uniform(0, 2 * math.pi))
        for f in range(4):
            d = np.array([math.cos(base + 0.35 * f), math.sin(base + 0.35 * f)])
            e = c + d * ax[0] * 1.35
            cv2.line(img, (int(c[0]), int(c[1])), (int(e[0]), int(e[1])), hand, max(2, int(0.07 * fw)), cv2.LINE_AA)
    elif kind == 2:  # object: rectangle / ellipse over a random part
        c = pts[int(rng.integers(0, NUM_POINTS))]
        s = rng.uniform(0.15, 0.45, 2) * fw
        col = _c(rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (int(c[0] - s[0] / 2), int(c[1] - s[1] / 2)), (int(c[0] + s[0] / 2), int(c[1] + s[1] / 2)), col, -1, cv2.LINE_AA)
        else:
            cv2.ellipse(img, (int(c[0]), int(c[1])), (int(s[0] / 2), int(s[1] / 2)), float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA)
    else:  # hair strands across an eye / brow
        a = pts[int(rng.choice([33, 46, 60, 72]))]
        for _ in range(int(rng.integers(8, 20))):
            b0 = a + rng.normal(0, 0.1 * fw, 2) + np.array([0, -0.3 * fw])
            b1 = b0 + np.array([rng.normal(0, 0.1 * fw), 0.5 * fw])
            mid = (b0 + b1) / 2 + rng.normal(0, 0.04 * fw, 2)
            _line(img, _spline(np.stack([b0, mid, b1]), False), _c(hair, float(rng.uniform(0.8, 1.2))), max(1, int(0.02 * fw)))


def _camera(rng: np.random.Generator, img: np.ndarray, cfg: SyntheticConfig) -> tuple[np.ndarray, int, int]:
    """Lighting gradient, exposure, white balance, gamma, grey, blur, noise, JPEG. Returns flags."""
    size = img.shape[0]
    strong = bool(rng.random() < 0.18)
    k_ill = rng.uniform(0.6, 1.3) if strong else rng.uniform(0.0, 0.4)
    expo = rng.uniform(0.35, 0.6) if strong and rng.random() < 0.5 else rng.uniform(0.8, 1.2)
    gain = (1.0 + np.float32(k_ill) * _grad(size, float(rng.uniform(0, 2 * math.pi)))) * np.float32(expo)
    f = img.astype(np.float32) * gain[..., None] * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # + white balance
    gamma = float(rng.uniform(0.8, 1.25))
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    img = cv2.LUT(np.clip(f + 0.5, 0, 255).astype(np.uint8), lut)
    if rng.random() < 0.08:
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    blurred = bool(rng.random() < cfg.blur_prob)
    if blurred:
        kind = int(rng.integers(0, 3))
        if kind == 0:
            img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.2, 3.0)))
        elif kind == 1:  # motion blur
            k = int(rng.integers(5, 13))
            kern = np.zeros((k, k), np.float32)
            kern[k // 2] = 1.0 / k
            rmat = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
            kern = cv2.warpAffine(kern, rmat, (k, k))
            img = cv2.filter2D(img, -1, kern / max(1e-6, float(kern.sum())))
        else:  # low resolution
            s = int(size * rng.uniform(0.2, 0.4))
            img = cv2.resize(cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA), (size, size), interpolation=cv2.INTER_LINEAR)
    elif rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 0.8)))
    sigma = float(rng.uniform(0, 7))
    if sigma > 1:  # sensor noise, mostly luminance (one field for all channels is also 3x cheaper)
        noise = rng.standard_normal(img.shape[:2], dtype=np.float32) * np.float32(sigma)
        img = np.clip(img.astype(np.float32) + noise[..., None], 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 95))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return img, int(strong), int(blurred)


# ----------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------


def face_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for face `index` of `seed` (independent of how many faces are made)."""
    return np.random.default_rng([int(seed), int(index)])


def wflw_line(points: np.ndarray, rect: tuple[int, int, int, int], attributes: tuple[int, ...], rel_path: str) -> str:
    """One WFLW annotation line: 196 coordinates, 4 rect values, 6 flags, image path."""
    coords = " ".join(f"{v:.3f}" for v in np.asarray(points, np.float64).reshape(-1))
    return f"{coords} {' '.join(str(int(v)) for v in rect)} {' '.join(str(int(a)) for a in attributes)} {rel_path}"


def _rect(points: np.ndarray, size: int) -> tuple[int, int, int, int]:
    lo, hi = points.min(0), points.max(0)
    pad = 0.06 * (hi - lo)
    x0, y0 = np.floor(np.maximum(0, lo - pad)).astype(int)
    x1, y1 = np.ceil(np.minimum(size - 1, hi + pad)).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def generate(cfg: SyntheticConfig, out_dir: Path, progress: Progress | None = None) -> SyntheticResult:
    """Write `cfg.count` faces as a WFLW-format folder under `out_dir`.

    `out_dir/images/synth_NNNNNN.png`, `out_dir/list_98pt_rect_attr_synthetic.txt` and a
    `synthetic.json` manifest with the config and each face's exact pose. Every file goes
    through io.atomic_*; `progress(done, total)` is called after each face.
    """
    out = Path(out_dir)
    images = out / "images"
    lines: list[str] = []
    records: list[FaceRecord] = []
    poses: dict[str, list[float]] = {}
    ann = out / ANNOTATION_NAME
    for i in range(cfg.count):
        img, pts, pose, attrs = render_face(face_rng(cfg.seed, i), cfg)
        name = f"synth_{i:06d}.png"
        with atomic_path(images / name) as tmp:
            if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_PNG_COMPRESSION, int(cfg.png_compression)]):
                raise UsageError(f"cannot write {images / name}; check free space and permissions of {out}")
        # Round like the text file so the returned records equal what the WFLW loader reads back.
        pts32 = np.asarray([float(f"{v:.3f}") for v in pts.reshape(-1)], np.float32).reshape(-1, 2)
        rect = _rect(pts, cfg.image_size)
        lines.append(wflw_line(pts, rect, attrs, name))
        poses[name] = [float(v) for v in pose]
        records.append(FaceRecord(image_path=images / name, points=pts32, rect=tuple(float(v) for v in rect),  # type: ignore[arg-type]
                                  attributes=attrs, layout="wflw98", pose=pose, source=f"{ann}:{i + 1}"))
        if progress is not None:
            progress(i + 1, cfg.count)
    atomic_write_text(ann, "\n".join(lines) + "\n")
    manifest = {"generator": "pfld_export.data.synthetic", "version": SYNTHETIC_VERSION, "config": asdict(cfg), "poses": poses}
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return SyntheticResult(annotation_file=ann, images_dir=images, records=records)


def read_manifest(folder: Path) -> dict[str, object] | None:
    """The `synthetic.json` of a generated folder, or None if it has none / it is unreadable."""
    p = Path(folder) / MANIFEST_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
