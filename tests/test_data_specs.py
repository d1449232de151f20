from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pfld_export.data.specs import CACHE_ENV, load_spec, split, synthetic_dir
from pfld_export.data.synthetic import SyntheticConfig, generate
from pfld_export.errors import DataError, UsageError

from .conftest import fixture_path


def test_synthetic_spec_generates_once_and_reads_back_with_poses(tmp_path: Path) -> None:
    ds = load_spec("synthetic:7:11", cache_dir=tmp_path)
    folder = synthetic_dir(7, 11, tmp_path)
    assert len(ds.records) == 7 and ds.problems == [] and ds.layout.name == "wflw98"
    assert str(folder) in ds.description and "7 faces" in ds.description
    stamp = (folder / "images" / "synth_000003.png").stat().st_mtime_ns
    again = load_spec("synthetic:7:11", cache_dir=tmp_path)
    assert (folder / "images" / "synth_000003.png").stat().st_mtime_ns == stamp  # cached, not regenerated
    # Same faces and exact poses as generating directly.
    direct = generate(SyntheticConfig(count=7, seed=11), tmp_path / "direct")
    for a, b in zip(again.records, direct.records):
        assert a.pose == b.pose
        assert np.allclose(a.points, b.points, atol=1e-3)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cache_location_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "envcache"))
    ds = load_spec("synthetic:2")
    assert ds.records[0].image_path.is_relative_to((tmp_path / "envcache").resolve())
    assert "seed 0" in ds.description


@pytest.mark.parametrize("spec,match", [
    ("imagenet:/x", "unknown dataset spec"),
    ("", "empty dataset spec"),
    ("synthetic:ten", "whole numbers"),
    ("synthetic:0", "at least 1"),
    ("synthetic:1:2:3", "synthetic:N:SEED"),
    ("wflw:", "names no path"),
    ("wflw:/definitely/not/here", "does not exist"),
    ("300w:/definitely/not/here", "does not exist"),
])
def test_bad_specs_name_the_accepted_forms(spec: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=match):
        load_spec(spec, cache_dir=tmp_path)


def test_wflw_dir_needs_exactly_one_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no list_"):
        load_spec(f"wflw:{tmp_path}")
    (tmp_path / "list_a.txt").write_text("")
    (tmp_path / "list_b.txt").write_text("")
    with pytest.raises(DataError, match="several annotation lists"):
        load_spec(f"wflw:{tmp_path}")
    with pytest.raises(DataError, match="no usable faces"):
        load_spec(f"wflw:{tmp_path / 'list_a.txt'}")


def test_real_fixture_specs() -> None:
    wflw = load_spec(f"wflw:{fixture_path('wflw98')}")
    assert len(wflw.records) == 4 and wflw.layout.name == "wflw98" and "2 images" in wflw.description
    as_file = load_spec(f"wflw:{fixture_path('wflw98', 'list_98pt_rect_attr_test.txt')}")
    assert [r.source for r in as_file.records] == [r.source for r in wflw.records]
    ibug = load_spec(f"300W:{fixture_path('ibug68')}")
    assert len(ibug.records) == 11 and ibug.layout.name == "ibug68"


def test_split_by_image(tmp_path: Path) -> None:
    recs = load_spec("synthetic:20:1", cache_dir=tmp_path).records
    # Pretend faces come in pairs from the same photo: a split must never separate a pair.
    for i, r in enumerate(recs):
        r.image_path = recs[i - i % 2].image_path
    train, val = split(recs, 0.3, seed=5)
    assert len(train) + len(val) == 20 and len(val) == 6
    assert not {r.image_path for r in train} & {r.image_path for r in val}
    assert [r.source for r in split(recs, 0.3, seed=5)[1]] == [r.source for r in val]
    assert [r.source for r in split(recs, 0.3, seed=6)[1]] != [r.source for r in val]
    assert split(recs, 0.0, seed=5) == (recs, [])
    with pytest.raises(UsageError, match="fraction"):
        split(recs, 1.0, seed=0)
