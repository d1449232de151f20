"""Augmentation: image and points move together, mirrors re-index, draws are reproducible."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pfld_export.data.augment import (
    NO_AUGMENT,
    AugmentConfig,
    augment_points,
    augmented_crop,
    can_mirror,
    geometric_matrix,
    identity_params,
    sample_params,
    unaugment_points,
    with_geometry_only,
)
from pfld_export.errors import UsageError
from pfld_export.layouts import IBUG68, WFLW98, custom_layout
from pfld_export.preprocess import crop_box, square_box


def _blob_image(points: np.ndarray, shape: tuple[int, int] = (300, 400), sigma: float = 2.0) -> np.ndarray:
    """Dark image with a bright Gaussian spot centred exactly on each point (sub-pixel)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros(shape, np.float64)
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat((np.clip(img, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(img: np.ndarray, near: np.ndarray, r: int = 5) -> np.ndarray:
    g = img[..., 0].astype(np.float64)
    x0, y0 = int(round(near[0])), int(round(near[1]))
    win = g[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    win = np.clip(win - 20, 0, None)  # ignore the faint tails of neighbouring spots
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return np.array([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])


def test_points_round_trip_within_half_pixel() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(10, 100, (98, 2))
    cfg = AugmentConfig(mirror_p=0.5)
    mirrored = 0
    for _ in range(200):
        p = sample_params(rng, cfg, 112)
        mirrored += p.mirror
        aug = augment_points(pts, p, WFLW98)
        assert np.abs(unaugment_points(aug, p, WFLW98) - pts).max() < 0.5
        assert np.abs(aug - pts).max() > 0.5 or p.is_identity  # the augmentation did move them
        assert abs(p.rotation_deg) <= 30 and 0.9 <= p.scale <= 1.1 and max(map(abs, p.shift)) <= 11.2 + 1e-9
    assert 60 < mirrored < 140, "mirror probability 0.5 not honoured"


def test_image_and_points_move_together() -> None:
    """Bright spots on the points: after a random rotation/scale/shift/mirror crop, each spot's
    centroid sits where the augmented point says, to well under half a pixel."""
    rng = np.random.default_rng(1)
    layout = custom_layout(6)  # no mirror table: use the geometry without re-indexing here
    pts = np.array([[150.3, 120.7], [250.6, 118.2], [200.1, 160.4], [165.8, 200.9], [235.2, 201.5], [200.0, 235.3]])
    img = _blob_image(pts)
    box = square_box(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max(), 1.6)
    cfg = AugmentConfig(mirror_p=0.0)
    for _ in range(10):
        p = with_geometry_only(sample_params(rng, cfg, 112, mirror_ok=False))
        out = augmented_crop(img, box, pts, p, layout)
        for q in out.points:
            if 8 <= q[0] <= 104 and 8 <= q[1] <= 104:
                assert np.linalg.norm(_centroid(out.crop, q) - q) < 0.5
        # The returned transform is the one image -> crop map: it sends image points to crop points.
        assert np.abs(out.transform.to_crop(pts) - out.points).max() < 1e-6
        assert np.abs(out.transform.to_image(out.points) - pts).max() < 1e-6


def test_identity_matches_crop_box() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    box = (40.0, 30.0, 180.0, 170.0)
    plain, t = crop_box(img, box, 112)
    out = augmented_crop(img, box, np.array([[50.0, 60.0]]), identity_params(112))
    assert np.abs(out.crop.astype(int) - plain.astype(int)).max() <= 1
    assert np.allclose(out.points, t.to_crop(np.array([[50.0, 60.0]])))


def test_mirror_is_a_flip_with_reindexing() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    pts = rng.uniform(30, 130, (98, 2))
    box = (20.0, 20.0, 140.0, 140.0)
    plain = augmented_crop(img, box, pts, identity_params(112), WFLW98)
    mp = identity_params(112)
    from dataclasses import replace

    mp = replace(mp, mirror=True, matrix=geometric_matrix(0.0, 1.0, (0.0, 0.0), True, 112))
    flipped = augmented_crop(img, box, pts, mp, WFLW98)
    assert np.array_equal(flipped.crop, cv2.flip(plain.crop, 1))
    perm = np.asarray(WFLW98.mirror)
    # Point i lands at index mirror[i], at x' = 111 - x.
    assert np.allclose(flipped.points[perm, 0], 111 - plain.points[:, 0])
    assert np.allclose(flipped.points[perm, 1], plain.points[:, 1])
    # The subject's right outer eye corner (60) becomes their left one (72) and vice versa.
    assert np.allclose(flipped.points[72], [111 - plain.points[60, 0], plain.points[60, 1]])


def test_mirror_disabled_for_custom_layouts() -> None:
    assert can_mirror(WFLW98) and can_mirror(IBUG68) and not can_mirror(custom_layout(17))
    rng = np.random.default_rng(4)
    cfg = AugmentConfig(mirror_p=1.0)
    assert not any(sample_params(rng, cfg, 112, mirror_ok=False).mirror for _ in range(20))
    p = sample_params(rng, cfg, 112, mirror_ok=True)
    with pytest.raises(UsageError, match="mirror table"):
        augment_points(np.zeros((17, 2)), p, custom_layout(17))


def test_deterministic_given_generator() -> None:
    img = np.random.default_rng(5).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    pts = np.random.default_rng(6).uniform(40, 110, (98, 2))
    box = (25.0, 25.0, 125.0, 125.0)
    cfg = AugmentConfig(occlusion_p=0.5, blur_p=0.5)
    a = [augmented_crop(img, box, pts, sample_params(np.random.default_rng(7), cfg), WFLW98) for _ in range(2)]
    b = augmented_crop(img, box, pts, sample_params(np.random.default_rng(8), cfg), WFLW98)
    assert np.array_equal(a[0].crop, a[1].crop) and np.array_equal(a[0].points, a[1].points)
    assert not np.array_equal(a[0].crop, b.crop)


def test_photometric_leaves_points_and_occludes() -> None:
    rng = np.random.default_rng(9)
    img = np.full((150, 150, 3), 128, np.uint8)
    pts = np.random.default_rng(6).uniform(40, 110, (98, 2))
    box = (25.0, 25.0, 125.0, 125.0)
    cfg = AugmentConfig(occlusion_p=1.0, brightness=0.3)
    p = sample_params(rng, cfg)
    out = augmented_crop(img, box, pts, p, WFLW98)
    geo = augmented_crop(img, box, pts, with_geometry_only(p), WFLW98)
    assert np.array_equal(out.points, geo.points)
    assert p.occlusion is not None
    x0, y0, x1, y1 = p.occlusion
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    assert tuple(out.crop[cy, cx]) == p.occlusion_color
    assert NO_AUGMENT.occlusion_p == 0 and sample_params(rng, NO_AUGMENT).is_identity


def test_bad_config_is_refused() -> None:
    with pytest.raises(UsageError, match="probability"):
        AugmentConfig(mirror_p=1.5)
    with pytest.raises(UsageError, match="scale range"):
        AugmentConfig(scale=(1.2, 0.8))


def _synthetic_face(index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    from pfld_export.data.synthetic import SyntheticConfig, face_rng, render_face

    # Near-frontal, neutral, unoccluded: every feature is visible on both sides.
    cfg = SyntheticConfig(max_yaw=10, max_pitch=10, max_roll=10, expression=0.0, occlusion_prob=0.0, blur_prob=0.0,
                          glasses_prob=0.0, makeup_prob=0.0)
    img, pts, pose, _ = render_face(face_rng(21, index), cfg)
    return img, pts, pose


def _inside(poly: np.ndarray, q: np.ndarray) -> bool:
    return cv2.pointPolygonTest(poly.astype(np.float32).reshape(-1, 1, 2), (float(q[0]), float(q[1])), False) > 0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_mirrored_synthetic_face_points_land_on_mirrored_features(index: int) -> None:
    from dataclasses import replace

    img, pts, _ = _synthetic_face(index)
    box = square_box(*pts.min(0), *pts.max(0), 1.2)
    plain = augmented_crop(img, box, pts, identity_params(112), WFLW98)
    mp = replace(identity_params(112), mirror=True, matrix=geometric_matrix(0.0, 1.0, (0.0, 0.0), True, 112))
    flip = augmented_crop(img, box, pts, mp, WFLW98)
    for out in (plain, flip):
        p = out.points
        # WFLW semantics hold in the flipped face too: the subject's right eye / brow / contour
        # start are on the image left, each pupil inside its own eye, the nose tip between them.
        assert p[60, 0] < p[72, 0] and p[33, 0] < p[46, 0] and p[0, 0] < p[32, 0] and p[76, 0] < p[82, 0]
        assert _inside(p[60:68], p[96]) and _inside(p[68:76], p[97])
    # Pixel check: the iris colour under the flipped face's right pupil is the colour that was
    # under the original left pupil (the same physical eye, now drawn on the other side).
    def colour(crop: np.ndarray, q: np.ndarray) -> np.ndarray:
        x, y = int(round(q[0])), int(round(q[1]))
        return crop[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)

    assert np.abs(colour(flip.crop, flip.points[96]) - colour(plain.crop, plain.points[97])).max() < 12
    assert np.abs(colour(flip.crop, flip.points[97]) - colour(plain.crop, plain.points[96])).max() < 12


def test_pose_label_follows_the_augmentation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A synthetic face's exact pose, adjusted for rotation and mirror, agrees with what
    solvePnP reads off the augmented crop (roll to a few degrees; yaw keeps its sign)."""
    from pfld_export.data.dataset import DatasetConfig, FaceDataset
    from pfld_export.data.records import FaceRecord
    from pfld_export.pose import euler_from_landmarks
    from pfld_export.preprocess import Preprocess
    from pfld_export.data.synthetic import face_rng, render_face

    records = []
    for i in range(8):
        img, pts, pose, attrs = render_face(face_rng(31, i))
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        records.append(FaceRecord(image_path=tmp_path / f"{i}.png", points=pts.astype(np.float32), attributes=attrs, pose=pose))
    ds = FaceDataset(records, WFLW98, Preprocess(), DatasetConfig(augment=AugmentConfig(mirror_p=0.5), seed=2))
    roll_err, rotations, mirrored = [], [], 0
    for i in range(len(records)):
        for epoch in range(4):
            s = ds.sample(i, epoch)
            est = np.asarray(euler_from_landmarks(s.points, WFLW98, (112, 112)))
            roll_err.append(abs(est[2] - s.pose[2]))
            rotations.append(abs(s.params.rotation_deg))
            mirrored += s.params.mirror
            if abs(s.pose[0]) > 15:
                assert np.sign(est[0]) == np.sign(s.pose[0])
    assert mirrored > 0 and max(rotations) > 15
    assert np.mean(roll_err) < 3.0 and max(roll_err) < 10.0
