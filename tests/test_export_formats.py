"""The format registry: one table that drives CLI choices, conversion settings and budgets."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pfld_export.cli import main
from pfld_export.errors import UsageError
from pfld_export.export.formats import (
    DEFAULT_FORMATS, FORMATS, INT8_PRESET, format_size, get_format, parse_size, select_formats,
)


def test_registry_rows_are_consistent() -> None:
    assert list(FORMATS) == ["fp32", "fp16", "dynamic", "int8", "full-int8"]
    suffixes = [f.file_suffix for f in FORMATS.values()]
    assert len(set(suffixes)) == len(suffixes), "two formats would write the same file"
    for name, f in FORMATS.items():
        assert f.name == name
        # Phones run builtins only: SELECT_TF_OPS (Flex) must never be a registry setting.
        assert f.ops_set in ("TFLITE_BUILTINS", "TFLITE_BUILTINS_INT8")
        # Integer activations need calibration ranges, and only they do.
        assert f.calibrated == (f.ops_set == "TFLITE_BUILTINS_INT8")
        assert f.per_channel
        b = f.budget
        assert 0 < b.shift_mean_px <= b.shift_max_px and b.nme_increase > 0
    assert FORMATS["fp32"].budget.shift_mean_px <= 0.01
    assert FORMATS["full-int8"].io_dtype == "int8"  # int8 I/O, not uint8: XNNPACK's fast path
    assert {f.io_dtype for n, f in FORMATS.items() if n != "full-int8"} == {"float32"}


def test_select_formats_presets_union_and_order() -> None:
    assert [f.name for f in select_formats(None)] == list(DEFAULT_FORMATS)
    assert [f.name for f in select_formats(None, int8=True)] == list(INT8_PRESET)
    # --int8 adds to --formats; output follows registry order whatever the typed order.
    assert [f.name for f in select_formats("dynamic,fp16", int8=True)] == ["fp32", "fp16", "dynamic", "int8", "full-int8"]
    assert [f.name for f in select_formats("full_int8 , FP16")] == ["fp16", "full-int8"]


def test_unknown_format_lists_the_choices() -> None:
    with pytest.raises(UsageError, match="unknown format 'int4'.*fp32, fp16, dynamic, int8, full-int8"):
        select_formats("fp32,int4")
    with pytest.raises(UsageError, match="names no format"):
        select_formats(" , ")
    assert get_format("Full-Int8") is FORMATS["full-int8"]


@pytest.mark.parametrize(("text", "expected"), [
    ("2MB", 2_000_000), ("1.4MB", 1_400_000), ("200KB", 200_000), ("200 kb", 200_000), ("1MiB", 1_048_576), ("1500000", 1_500_000),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2 parsecs", "MB", "-1MB", ""])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="not understood"):
        parse_size(text)


def test_format_size_round_trips_budget_units() -> None:
    assert format_size(1_400_000) == "1.40 MB"
    assert format_size(199_500) == "199.5 KB"
    assert parse_size(format_size(2_000_000).replace(" ", "")) == 2_000_000


def test_cli_help_lists_every_registry_format() -> None:
    out = CliRunner().invoke(main, ["convert", "--help"]).output
    flat = " ".join(out.split())
    for name in FORMATS:
        assert name in flat
