from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pfld_export.data.records import ATTRIBUTES, read_image
from pfld_export.data.synthetic import SyntheticConfig, face_rng, render_face, wflw_line
from pfld_export.data.wflw import load_wflw
from pfld_export.errors import DataError

from .conftest import fixture_path


def test_real_wflw_fixture_loads() -> None:
    ann = fixture_path("wflw98", "list_98pt_rect_attr_test.txt")
    records, problems = load_wflw(ann)
    assert problems == [] and len(records) == 4
    assert len({r.image_path for r in records}) == 2
    for r in records:
        assert r.points.shape == (98, 2) and r.points.dtype == np.float32 and r.layout == "wflw98"
        assert len(r.attributes) == len(ATTRIBUTES) and r.source.startswith(f"{ann}:")
        x0, y0, x1, y1 = r.rect  # WFLW's face rectangle surrounds the landmarks
        assert x0 < r.points[:, 0].mean() < x1 and y0 < r.points[:, 1].mean() < y1
        img = read_image(r.image_path)
        h, w = img.shape[:2]
        assert 0 <= r.points[:, 0].min() and r.points[:, 0].max() < w and r.points[:, 1].max() < h
        # subject's right eye outer corner (60) is on the image left of the left one (72)
        assert r.points[60, 0] < r.points[72, 0]


def _folder(tmp_path: Path) -> tuple[Path, str]:
    """An images/ folder with one synthetic face and a valid WFLW line for it."""
    img, pts, _, attrs = render_face(face_rng(0, 0), SyntheticConfig())
    (tmp_path / "images" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "sub" / "a.png"), img)
    return tmp_path, wflw_line(pts, (1, 2, 200, 210), attrs, "sub/a.png")


def test_bad_lines_become_problems_with_file_and_line(tmp_path: Path) -> None:
    root, good = _folder(tmp_path)
    tokens = good.split()
    nan_line = " ".join(["nan"] + tokens[1:])
    word_line = " ".join(tokens[:10] + ["abc"] + tokens[11:])
    far = np.array(tokens[:196], float).reshape(98, 2) + 5000
    far_line = " ".join([f"{v:.3f}" for v in far.reshape(-1)] + tokens[196:])
    lines = [
        good,                                   # 1 ok
        "",                                     # 2 blank: ignored
        " ".join(tokens[:-2] + tokens[-1:]),    # 3 one field short
        word_line,                              # 4 non-numeric
        nan_line,                               # 5 NaN
        far_line,                               # 6 far outside the image
        " ".join(tokens[:-1] + ["sub/missing.png"]),  # 7 missing image
        " ".join(tokens[:200] + ["2"] + tokens[201:]),  # 8 attribute flag not 0/1
        good,                                   # 9 ok again
    ]
    ann = root / "list_98pt_rect_attr_x.txt"
    ann.write_text("\n".join(lines))  # no trailing newline, like the real files
    records, problems = load_wflw(ann)
    assert [r.source for r in records] == [f"{ann}:1", f"{ann}:9"]
    where = {p.where: p.reason for p in problems}
    assert list(where) == [f"{ann}:{i}" for i in (3, 4, 5, 6, 7, 8)]
    assert "expected 207 fields" in where[f"{ann}:3"]
    assert "'abc'" in where[f"{ann}:4"]
    assert "NaN" in where[f"{ann}:5"]
    assert "far outside" in where[f"{ann}:6"]
    assert "does not exist" in where[f"{ann}:7"]
    assert "0 or 1" in where[f"{ann}:8"]
    with pytest.raises(DataError, match=r":3: expected 207 fields"):
        load_wflw(ann, strict=True)


def test_explicit_images_root_and_unreadable_image(tmp_path: Path) -> None:
    root, good = _folder(tmp_path)
    ann = tmp_path / "elsewhere" / "list.txt"
    ann.parent.mkdir()
    (root / "images" / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    ann.write_text(good + "\n" + good.replace("sub/a.png", "sub/broken.jpg") + "\n")
    records, problems = load_wflw(ann, images_root=root / "images")
    assert len(records) == 1 and len(problems) == 1 and problems[0].where == f"{ann}:2"
    with pytest.raises(DataError, match="not a readable image"):
        read_image(root / "images" / "sub" / "broken.jpg")
    with pytest.raises(DataError, match="cannot read annotation file"):
        load_wflw(tmp_path / "nope.txt")
