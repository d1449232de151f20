from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pfld_export.data.ibug import load_300w, load_pfld_list, read_pts
from pfld_export.data.records import image_size, read_image
from pfld_export.errors import DataError

from .conftest import fixture_path


def _pts_text(points: np.ndarray, header: str = "version: 1\nn_points: {n}\n", newline: bool = True) -> str:
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    return header.format(n=len(points)) + "{\n" + body + "\n}" + ("\n" if newline else "")


def _ring(n: int = 68, c: float = 100.0, r: float = 40.0) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c + r * np.cos(a), c + r * np.sin(a)], 1)


def test_real_300w_fixture_all_faces_load() -> None:
    folder = fixture_path("ibug68")
    records, problems = load_300w(folder)
    assert problems == [] and len(records) == 11
    names = {r.image_path.name for r in records}
    assert "300vw_000731.jpg" in names  # the known-bad frame is kept, evaluations name it
    assert {Path(n).suffix for n in names} == {".jpg", ".png", ".ppm"}
    for r in records:
        assert r.points.shape == (68, 2) and r.layout == "ibug68"
        img = read_image(r.image_path)  # .ppm / .png / .jpg all decode to BGR uint8
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        assert image_size(r.image_path) == (img.shape[1], img.shape[0])
        assert r.points[36, 0] < r.points[45, 0]  # subject's right eye on the image left


def test_read_pts_header_variants(tmp_path: Path) -> None:
    pts = _ring()
    variants = {
        "plain.pts": _pts_text(pts),
        "spaces.pts": _pts_text(pts, "version: 1.0\nn_points:  {n}\n", newline=False),
        "crlf.pts": _pts_text(pts).replace("\n", "\r\n"),
    }
    for name, text in variants.items():
        (tmp_path / name).write_text(text)
        assert np.allclose(read_pts(tmp_path / name), pts, atol=1e-3), name


@pytest.mark.parametrize("text,match", [
    ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "n_points 3 but the file lists 2"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 4\n", "not closed"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 x\n}\n", r":5: non-numeric point"),
    ("1 2\n3 4\n", "no '\\{'"),
])
def test_read_pts_errors_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.pts"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_pts(p)


def test_load_300w_skips_and_reports(tmp_path: Path) -> None:
    img = np.full((200, 200, 3), 128, np.uint8)
    for name in ("a", "b", "c", "d"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), img)
    (tmp_path / "a.pts").write_text(_pts_text(_ring()))
    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "e.jpg"), img)
    (tmp_path / "sub" / "e.pts").write_text(_pts_text(_ring()))  # found recursively
    (tmp_path / "b.pts").write_text(_pts_text(_ring() + 1000))  # far outside
    (tmp_path / "c.pts").write_text(_pts_text(_ring(39)))  # minority point count
    (tmp_path / "d.pts").write_text("garbage")
    (tmp_path / "orphan.pts").write_text(_pts_text(_ring()))  # no image
    records, problems = load_300w(tmp_path)
    assert sorted(r.image_path.name for r in records) == ["a.png", "e.jpg"]
    reasons = {Path(p.where.rsplit(":", 1)[0]).name: p.reason for p in problems}
    assert set(reasons) == {"b.pts", "c.pts", "d.pts", "orphan.pts"}
    assert "far outside" in reasons["b.pts"] and "39 points" in reasons["c.pts"] and "no image" in reasons["orphan.pts"]
    shifted, _ = load_300w(tmp_path, offset=-1.0)
    assert np.allclose(shifted[0].points, records[0].points - 1.0)
    with pytest.raises(DataError):
        load_300w(tmp_path, strict=True)
    with pytest.raises(DataError, match="does not exist"):
        load_300w(tmp_path / "nope")


def test_pfld_fork_147_field_list(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "f.jpg"), np.zeros((220, 220, 3), np.uint8))
    pts = _ring()
    line = " ".join(f"{v:.4f}" for v in pts.reshape(-1)) + " 50 50 150 150 0 1 0 0 1 0 f.jpg"
    assert len(line.split()) == 147
    ann = tmp_path / "list_68pt_rect_attr_test.txt"
    ann.write_text(line + "\n" + " ".join(line.split()[:-3]) + "\n")
    records, problems = load_pfld_list(ann)
    assert len(records) == 1 and records[0].layout == "ibug68" and records[0].attributes == (0, 1, 0, 0, 1, 0)
    assert np.allclose(records[0].points, pts, atol=1e-3)
    assert len(problems) == 1 and "expected 147 fields" in problems[0].reason and problems[0].where.endswith(":2")
