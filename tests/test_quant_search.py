"""quant/search.py: the mixed-precision search on real TFLite int8 kernels (the tiny network of
conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from pfld_export.errors import UsageError
from pfld_export.export.validate import shift_stats
from pfld_export.quant.budget import Int8Budget
from pfld_export.quant.graph import Calibrated, float_op_count, predict_blob
from pfld_export.quant.search import MixedConfig, search_mixed


def test_mixed_search_meets_a_budget_with_few_float_ops(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    full = shift_stats(tiny["ref"], predict_blob(cal.quantize(), tiny["pre"], tiny["val"]))
    order = [o.tensor for o in cal.quantizable][::-1]  # output side first
    budget = Int8Budget(max_shift_px=full.mean_px / 4, max_float_ops=len(order), max_slowdown=None)
    res = search_mixed(cal, order, tiny["ref"], tiny["val"], tiny["pre"], MixedConfig(budget))
    assert res.met and res.shift.mean_px <= full.mean_px / 4 and res.shift.p99_px <= budget.p99_px
    assert 0 < len(res.float_ops) < len(cal.ops)
    assert sum(float_op_count(res.blob).values()) == len(res.float_ops)
    # an impossible budget is reported as not met, with the best candidate found
    never = MixedConfig(Int8Budget(max_shift_px=1e-9, max_float_ops=1, max_slowdown=None))
    res2 = search_mixed(cal, order[:1], tiny["ref"], tiny["val"], tiny["pre"], never)
    assert not res2.met and len(res2.steps) == 2


def test_the_search_needs_a_mean_shift_budget_and_known_tensors(tiny: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="--max-shift"):
        MixedConfig(Int8Budget())
    with pytest.raises(UsageError, match="ranking names 1 tensors"):
        search_mixed(tiny["cal"], ["nope"], tiny["ref"], tiny["val"], tiny["pre"], MixedConfig(Int8Budget(max_shift_px=1.0)))
