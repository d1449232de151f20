"""Calibration crops and the held-out validation set: real folders, dataset specs, disjointness."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pfld_export.errors import DataError
from pfld_export.export.calibrate import (
    CalibrationSet, calibration_and_validation, calibration_crops, is_synthetic, split_holdout,
)
from pfld_export.preprocess import Preprocess

from .conftest import fixture_path


def _fake_set(faces_per_image: dict[str, int]) -> CalibrationSet:
    sources = [f"/imgs/{img}#{k}" for img, n in faces_per_image.items() for k in range(n)]
    crops = np.arange(len(sources), dtype=np.uint8)[:, None, None, None] * np.ones((1, 112, 112, 3), np.uint8)
    return CalibrationSet(crops, sources, f"{len(sources)} crops: test faces")


def _image(source: str) -> str:
    return source.split("#")[0]


def test_split_holds_out_whole_images() -> None:
    cs = _fake_set({f"im{i}.jpg": 1 + i % 4 for i in range(30)})  # 30 images, 73 faces
    cal, val = split_holdout(cs, val_faces=15, seed=3, count=40)
    assert len(val) >= 15 and len(cal) == 40
    assert not {_image(s) for s in cal.sources} & {_image(s) for s in val.sources}
    # The crops travel with their sources (crop value = original index).
    assert [int(c[0, 0, 0]) for c in val.crops] == [cs.sources.index(s) for s in val.sources]
    assert val.description.startswith("held-out") and "test faces" in val.description
    # Deterministic for a seed, different for another.
    assert split_holdout(cs, 15, seed=3, count=40)[1].sources == val.sources
    assert split_holdout(cs, 15, seed=4, count=40)[1].sources != val.sources


def test_split_refuses_single_image_and_starved_calibration() -> None:
    with pytest.raises(DataError, match="one image"):
        split_holdout(_fake_set({"crowd.jpg": 50}), val_faces=10)
    with pytest.raises(DataError, match="only 10 calibration faces remain"):
        split_holdout(_fake_set({"a.jpg": 10, "b.jpg": 10}), val_faces=1, seed=0)


def test_synthetic_calibration_and_validation_use_different_seeds(tmp_path: Path) -> None:
    pre = Preprocess()
    cal, val = calibration_and_validation("synthetic", None, pre, count=20, val_count=8, seed=2, cache_dir=tmp_path)
    assert cal.crops.shape == (20, 112, 112, 3) and cal.crops.dtype == np.uint8 and len(val) == 8
    assert "seed 3" in val.description and "seed 2" in val.description
    assert not {_image(s) for s in cal.sources} & {_image(s) for s in val.sources}
    # Different faces, not the same faces twice: no validation crop equals any calibration crop.
    assert all(not np.array_equal(v, c) for v in val.crops for c in cal.crops)
    # The explicit form gives the same calibration crops.
    again = calibration_crops("synthetic:20:2", pre, count=20, seed=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.crops, cal.crops)


def test_calibration_crops_are_landmark_box_crops(tmp_path: Path) -> None:
    cs = calibration_crops("synthetic:20:0", Preprocess(), count=20, cache_dir=tmp_path)
    assert "1.2x landmark-box crops" in cs.description
    # A face crop is not a flat image: the drawn face gives contrast in the middle of the crop.
    centre = cs.crops[:, 28:84, 28:84].astype(np.float32)
    assert float(centre.std(axis=(1, 2, 3)).min()) > 5.0


def test_val_images_must_not_overlap_calibration(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="shares 20 images with --calib"):
        calibration_and_validation("synthetic:20:0", "synthetic:20:0", Preprocess(), count=20, val_count=20, cache_dir=tmp_path)
    cal, val = calibration_and_validation("synthetic:20:0", "synthetic:10:5", Preprocess(), count=20, val_count=10, cache_dir=tmp_path)
    assert len(cal) == 20 and len(val) == 10 and val.description.startswith("held-out")


@pytest.mark.parametrize("spec", ["/no/such/folder", "faces.zip"])
def test_unknown_spec_is_refused(spec: str) -> None:
    with pytest.raises(DataError, match="neither an existing folder"):
        calibration_crops(spec, Preprocess())


def test_is_synthetic() -> None:
    assert is_synthetic("synthetic") and is_synthetic("synthetic:50") and is_synthetic("synthetic:50:3")
    assert not is_synthetic("synthetic:x") and not is_synthetic("wflw:synthetic")


def test_real_folder_split_by_photo(tmp_path: Path) -> None:
    src = fixture_path("unlabeled")
    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("dlib_2008_002079.jpg", "dlib_2008_004176.jpg", "luffy_test1.jpg", "dlib_2007_007763.jpg",
                 "dlib_2008_007676.jpg", "ghostone_persons.jpg"):
        os.symlink(src / name, folder / name)  # referenced in place, never copied
    cal, val = calibration_and_validation(str(folder), None, Preprocess(), count=25, val_count=8, seed=0)
    assert len(cal) >= 20 and len(val) >= 8
    assert not {_image(s) for s in cal.sources} & {_image(s) for s in val.sources}
    assert "real faces found by yunet" in cal.description
    # Crops are faces: the detector-centred crop is not a flat patch.
    assert float(cal.crops.astype(np.float32).std(axis=(1, 2, 3)).min()) > 5.0
