"""Face detection, image reading and folder cropping (pfld_export/detect.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from pfld_export.data.records import LoadProblem
from pfld_export.detect import (DETECTORS, Box, BoxCalibration, Resize, as_bgr8, box_iou, crop_face,
                                detect_resized, faces_in_folder, make_detector, match_iou, read_image, square)
from pfld_export.errors import DataError, UsageError

from .conftest import annotated_faces, fixture_path, synthetic_face


# ------------------------------------------------------------------ helpers shared with other tests


# ------------------------------------------------------------------ geometry


def test_box_geometry_and_iou() -> None:
    a = Box(0, 0, 10, 10, 0.9)
    assert a.area == 100 and a.as_tuple() == (0, 0, 10, 10)
    assert a.iou(Box(5, 0, 15, 10, 0.5)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert square((0, 0, 4, 2)) == (0, -1, 4, 3)
    moved = Box(1, 2, 3, 4, 0.7, np.array([[1.0, 2.0]] * 5)).scaled(2.0, dx=-1, dy=1)
    assert moved.as_tuple() == (1, 5, 5, 9) and moved.keypoints[0].tolist() == [1.0, 5.0]
    assert Box(0, 0, 10, 20, 0.5).to_dict()["box"] == [0, 0, 10, 20]


def test_match_iou_squares_both_boxes() -> None:
    # A narrow landmark box (profile face) inside a wider detector box of the same centre and
    # height matches perfectly once both are squared.
    pts = np.array([[45.0, 0.0], [55.0, 100.0]])
    assert match_iou((0, 0, 100, 100), pts) == pytest.approx(1.0)
    assert box_iou((0, 0, 100, 100), (45, 0, 55, 100)) == pytest.approx(0.1)


def test_calibration_maps_box_to_landmark_box() -> None:
    assert BoxCalibration().apply((10, 20, 30, 40)) == (10, 20, 30, 40)
    x0, y0, x1, y1 = BoxCalibration(scale=0.5, dy=0.25).apply(Box(0, 0, 100, 100, 1.0))
    assert (x1 - x0, y1 - y0) == (50, 50)  # half the side
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == (50, 75)  # centre moved down a quarter side


def test_detect_resized_maps_boxes_back() -> None:
    seen: list[tuple[int, int]] = []

    def raw(img: np.ndarray) -> list[Box]:
        seen.append(img.shape[:2])
        h, w = img.shape[:2]
        return [Box(w * 0.25, h * 0.25, w * 0.75, h * 0.75, 0.9, np.array([[w * 0.5, h * 0.5]] * 5))]

    resize = Resize(max_side=1000, min_side=300, pad=0.0, refine_above=10_000)
    huge = np.zeros((1500, 3000, 3), np.uint8)
    (b,) = detect_resized(huge, resize, raw)
    assert seen[-1] == (500, 1000)
    assert b.as_tuple() == pytest.approx((750, 375, 2250, 1125))
    assert b.keypoints[0] == pytest.approx([1500, 750])
    # Small image: enlarged to 300 and padded; the box still comes back in original pixels.
    padded = Resize(max_side=1000, min_side=300, pad=0.1, refine_above=10_000)

    def raw_padded(img: np.ndarray) -> list[Box]:
        seen.append(img.shape[:2])
        return [Box(30, 30, img.shape[1] - 30, img.shape[0] - 30, 1.0)]

    (s,) = detect_resized(np.zeros((50, 100), np.uint8), padded, raw_padded)
    assert seen[-1] == (150 + 60, 300 + 60)  # 10 % of min_side padded on each side
    assert s.as_tuple() == pytest.approx((0, 0, 100, 50))
    with pytest.raises(UsageError, match="min_side"):
        Resize(max_side=100, min_side=200)


def test_large_faces_are_redetected_smaller() -> None:
    """A detector whose boxes saturate at 350 px (as YuNet's do near 300 px) gets a second pass."""

    def saturating(img: np.ndarray) -> list[Box]:
        h, w = img.shape[:2]
        side = min(0.6 * w, 350.0)  # the true face is 60 % of the width
        return [Box(w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2, 0.9)]

    (b,) = detect_resized(np.zeros((1000, 1000, 3), np.uint8), Resize(), saturating)
    assert b.width == pytest.approx(600, abs=2)
    (b,) = detect_resized(np.zeros((1000, 1000, 3), np.uint8), Resize(refine_above=10_000), saturating)
    assert b.width == pytest.approx(350)


# ------------------------------------------------------------------ image reading


def test_read_image_variants(tmp_path: Path) -> None:
    img, _ = synthetic_face(0, 128)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    g = read_image(tmp_path / "grey.png")
    assert g.shape == (128, 128, 3) and np.array_equal(g[..., 0], grey) and np.array_equal(g[..., 2], grey)

    cv2.imwrite(str(tmp_path / "deep.png"), img.astype(np.uint16) * 257)
    assert np.array_equal(read_image(tmp_path / "deep.png"), img)  # 16-bit scaled to 8-bit exactly

    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent strip over black-ish pixels
    rgba[:10, :, :3] = 0
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)
    a = read_image(tmp_path / "alpha.png")
    assert a.shape == (128, 128, 3)
    assert (a[:10] == 255).all(), "transparent pixels must be composited onto white"
    assert np.array_equal(a[10:], img[10:])

    cv2.imwrite(str(tmp_path / "face.ppm"), img)
    assert np.array_equal(read_image(tmp_path / "face.ppm"), img)


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    wide = np.zeros((60, 120, 3), np.uint8)
    wide[:, :60] = (0, 0, 255)  # left half red (BGR)
    im = pil.fromarray(wide[..., ::-1].copy())
    exif = pil.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (120, 60, 3), "EXIF orientation 6 must turn a 120x60 image upright to 60x120"
    # After a 90 degree clockwise turn the red (left) half is on top.
    assert out[:50, :, 2].mean() > 200 and out[70:, :, 2].mean() < 50


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_read_image_unreadable_names_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_as_bgr8_rejects_odd_shapes() -> None:
    assert as_bgr8(np.zeros((4, 4, 1), np.uint8)).shape == (4, 4, 3)
    assert as_bgr8(np.ones((4, 4), np.float32)).max() == 255
    with pytest.raises(UsageError, match="shaped"):
        as_bgr8(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------ registry


def test_registry_and_factory() -> None:
    assert "yunet" in DETECTORS and make_detector().name == "yunet"
    assert make_detector("yunet", min_score=0.8).min_score == 0.8  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="choose one of yunet"):
        make_detector("retinaface")
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        make_detector("yunet", min_score=1.5)
    assert make_detector("haar").detect(np.zeros((100, 100, 3), np.uint8)) == []


@pytest.mark.skipif(importlib.util.find_spec("mtcnn") is not None, reason="mtcnn is installed here")
def test_optional_mtcnn_says_how_to_install() -> None:
    with pytest.raises(UsageError, match="pip install mtcnn"):
        make_detector("mtcnn")


# ------------------------------------------------------------------ detection quality


def test_synthetic_faces_are_found() -> None:
    det = make_detector()
    hits = []
    for i in range(12):
        img, pts = synthetic_face(i)
        boxes = det.detect(img)
        hits.append(max((match_iou(det.calibration.apply(b), pts) for b in boxes), default=0.0))
    assert sum(h > 0.5 for h in hits) >= 11, f"calibrated IoU per synthetic face: {np.round(hits, 2)}"


def test_blank_image_has_no_face() -> None:
    assert make_detector().detect(np.full((240, 320, 3), 127, np.uint8)) == []


def test_annotated_fixture_faces_are_found() -> None:
    """Every annotated face (wflw98 + ibug68) has a detection matching its landmark box."""
    fixtures = fixture_path()
    fixture_path("wflw98")
    fixture_path("ibug68")
    det = make_detector()
    misses = []
    for img_path, pts in annotated_faces(fixtures):
        boxes = det.detect(read_image(img_path))
        raw = max((match_iou(b.as_tuple(), pts) for b in boxes), default=0.0)
        cal = max((match_iou(det.calibration.apply(b), pts) for b in boxes), default=0.0)
        if raw <= 0.5 or cal <= 0.5:
            misses.append(f"{img_path.name}: raw {raw:.2f} calibrated {cal:.2f}")
    assert not misses, misses


def test_tiny_and_huge_images() -> None:
    det = make_detector()
    img, pts = synthetic_face(3, 256)
    # Tiny: the whole image 64 px, the face ~30 px wide -> found thanks to upscaling.
    tiny = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    boxes = det.detect(tiny)
    assert boxes and max(match_iou(det.calibration.apply(b), pts / 4) for b in boxes) > 0.5
    # Huge: 4608 px; detection runs on a 1280 px copy and boxes come back in full-size pixels.
    huge = cv2.resize(img, (4608, 4608), interpolation=cv2.INTER_LINEAR)
    boxes = det.detect(huge)
    assert boxes and max(match_iou(det.calibration.apply(b), pts * 18) for b in boxes) > 0.5


# ------------------------------------------------------------------ folder -> crops


def test_faces_in_folder_synthetic(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"face{i}.png"), synthetic_face(i)[0])
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((200, 200, 3), 90, np.uint8))
    (tmp_path / "zz_broken.jpg").write_bytes(b"garbage")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    det = make_detector()
    found = faces_in_folder(tmp_path, det, crop_scale=1.2)
    assert found.crops.shape == (3, 112, 112, 3) and found.crops.dtype == np.uint8
    assert [Path(s).name for s in found.sources] == ["face0.png", "face1.png", "face2.png"]
    assert [Path(s).name for s in found.no_face] == ["blank.png"]
    assert len(found.problems) == 1 and isinstance(found.problems[0], LoadProblem)
    assert "zz_broken.jpg" in str(found.problems[0])
    # Crops are exactly crop_face of the detection (the convention predict uses too).
    img = read_image(tmp_path / "face1.png")
    expect, _ = crop_face(img, found.boxes[1], det, 1.2)
    assert np.array_equal(found.crops[1], expect)
    assert len(faces_in_folder(tmp_path, det, limit=2)) == 2
    with pytest.raises(DataError, match="not a folder"):
        faces_in_folder(tmp_path / "nope", det)
    with pytest.raises(UsageError, match="limit"):
        faces_in_folder(tmp_path, det, limit=0)


def test_faces_in_unlabeled_fixtures() -> None:
    d = fixture_path("unlabeled")
    found = faces_in_folder(d, make_detector())
    # ~150 real faces in 47 images; the 4 insightface_mask_* images show masks alone, no face.
    assert len(found) >= 150, len(found)
    assert sorted(Path(p).name for p in found.no_face) == [f"insightface_mask_{c}.jpg" for c in ("black", "blue", "green", "white")]
    assert not found.problems
