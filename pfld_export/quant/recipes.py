"""INT8_RECIPES: the ways `convert` may build an int8 model, as data (like export.formats.FORMATS).

A recipe names a fix to the float weights, the activation range methods each of its candidates
is calibrated with, and whether ops may be kept float to meet a budget ("mixed"). The registry
drives `convert --int8-method`, the int8 fitter and benchmarks/int8_ablation.py. Each recipe
was kept because it measured better than plain int8 (benchmarks/int8_fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import UsageError
from .ranges import DEFAULT_RANGES


@dataclass(frozen=True)
class WeightFix:
    """A rewrite of the float weights before conversion (quant/equalize.py does both)."""

    name: str
    equalize: bool  # cross-layer equalisation: same float function, friendlier ranges
    bias: bool  # bias correction of the weight rounding: moves the float function on purpose

    @property
    def rewrites(self) -> bool:
        """Whether the weights change at all (a candidate of its own, re-exported)."""
        return self.equalize or self.bias


NO_FIX = WeightFix("none", equalize=False, bias=False)
WEIGHT_FIXES: dict[str, WeightFix] = {f.name: f for f in (
    NO_FIX,
    WeightFix("equalize", equalize=True, bias=False),
    WeightFix("equalize+bias", equalize=True, bias=True),
    # Bias correction of the weights as they are: for checkpoints whose ranges were learned (QAT),
    # where equalising would rescale channels under those ranges. Not a recipe of its own.
    WeightFix("bias", equalize=False, bias=True),
)}


@dataclass(frozen=True)
class Int8Recipe:
    """One `--int8-method` choice."""

    name: str
    fix: WeightFix | None  # None: no candidate of its own (mixed searches from the best candidate)
    ranges: tuple[str, ...]  # range methods each of its candidates is calibrated with
    mixed: bool  # ops may stay float until the shift budget holds
    default_rank: int | None  # place in `convert --int8`'s default fit (no budget); None: not in it
    summary: str


# Registry order is the order under a budget (every recipe); `default_rank` orders the default
# fit best first, so its time cap cuts the least useful candidate.
INT8_RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    Int8Recipe("plain", NO_FIX, DEFAULT_RANGES, mixed=False, default_rank=0,
               summary="the weights as trained"),
    Int8Recipe("equalize", WEIGHT_FIXES["equalize"], DEFAULT_RANGES, mixed=False, default_rank=2,
               summary="cross-layer equalised weights (same float landmarks)"),
    Int8Recipe("equalize+bias", WEIGHT_FIXES["equalize+bias"], DEFAULT_RANGES, mixed=False, default_rank=1,
               summary="equalised, then bias-corrected for the weight rounding"),
    Int8Recipe("mixed", None, (), mixed=True, default_rank=None,
               summary="with a budget: the fewest sensitive ops kept float until it holds"),
)}
MIXED_SUFFIX = "+mixed"  # a candidate searched for float ops is named "<base candidate>+mixed"
RESIDUAL_SUFFIX = "+residual"  # a candidate whose FC predicts the residual from the mean shape (quant.residual)


def default_recipes(budget: bool) -> tuple[str, ...]:
    """Recipes `convert --int8` tries when --int8-method is not given: every one under a budget,
    else those of the default fit, best first."""
    if budget:
        return tuple(INT8_RECIPES)
    ranked = [r for r in INT8_RECIPES.values() if r.default_rank is not None]
    return tuple(r.name for r in sorted(ranked, key=lambda r: r.default_rank or 0))


def check_recipes(names: Sequence[str]) -> tuple[str, ...]:
    """`names` when every one is a recipe, else one UsageError naming the choices."""
    bad = [m for m in names if m not in INT8_RECIPES]
    if bad:
        raise UsageError(f"int8 method(s) {bad} unknown; choose from {', '.join(INT8_RECIPES)}")
    return tuple(names)


def parse_recipes(text: str) -> tuple[str, ...]:
    """`plain,equalize` -> ("plain", "equalize"), each checked against INT8_RECIPES."""
    return check_recipes([m for m in text.replace(" ", "").split(",") if m])


def weight_fix_of(candidate: str) -> WeightFix:
    """The weight fix a fitted candidate was built with, from its name ("equalize+bias/mse",
    "bias/qat-ranges", "equalize+mixed"...): the part before the range method names it."""
    base = candidate.split("/")[0].removesuffix(MIXED_SUFFIX).removesuffix(RESIDUAL_SUFFIX)
    recipe = INT8_RECIPES.get(base)
    if recipe is not None:
        return recipe.fix or NO_FIX
    return WEIGHT_FIXES.get(base, NO_FIX)
