"""Mixed precision: the fewest ops kept float for which the int8 model meets a shift budget.

Float ops are added in order of a ranking (the sensitivity sweep's, or the per-op "quantized
alone" shift) until the budget holds on the search crops, then each float op is tried back in
int8 and kept there if the budget still holds. Search crops are the calibration crops:
held-out validation crops stay untouched for the figure that is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..export.validate import ShiftStats, shift_stats
from ..preprocess import Preprocess
from .budget import Int8Budget
from .graph import Calibrated, OpInfo, Progress, latency_ratio, predict_blob


@dataclass
class MixedConfig:
    """The budget the search must meet and how far it may go."""

    budget: Int8Budget  # its mean shift (and p99), float-op, size and latency limits
    io_dtype: str = "float32"
    prune: bool = True  # after meeting the budget, try each float op back in int8

    def __post_init__(self) -> None:
        if self.budget.max_shift_px is None:
            raise UsageError("the mixed-precision search needs a mean shift budget; add --max-shift")


@dataclass
class MixedStep:
    """One candidate the search tried."""

    float_ops: list[str]  # labels
    shift: ShiftStats
    met: bool


@dataclass
class MixedResult:
    """The chosen model, which ops stayed float, and every step of the search."""

    blob: bytes
    float_ops: list[OpInfo]
    shift: ShiftStats  # on the search crops
    met: bool
    steps: list[MixedStep] = field(default_factory=list)


def search_mixed(
    cal: Calibrated, ranking: Sequence[str], reference_points: np.ndarray, crops: np.ndarray, preprocess: Preprocess,
    cfg: MixedConfig, progress: Progress | None = None,
) -> MixedResult:
    """Fewest float ops (greedy along `ranking`, most sensitive first, then pruned) for which
    the int8 model's shift against `reference_points` on `crops` meets `cfg.budget`.

    Returns the best candidate found, with `met` False when even `cfg.budget.max_float_ops` float ops
    do not meet the budget (the caller decides whether that is an error).
    """
    by_tensor = {o.tensor: o for o in cal.ops}
    unknown = [t for t in ranking if t not in by_tensor]
    if unknown:
        raise UsageError(f"ranking names {len(unknown)} tensors the model does not have (e.g. {unknown[0]!r})")
    steps: list[MixedStep] = []

    def trial(float_set: list[str]) -> tuple[bytes, ShiftStats]:
        blob = cal.quantize(float_set, cfg.io_dtype)
        s = shift_stats(reference_points, predict_blob(blob, preprocess, crops))
        steps.append(MixedStep([by_tensor[t].label for t in float_set], s, cfg.budget.meets(s)))
        if progress:
            progress(f"{len(float_set)} float ops: mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px")
        return blob, s

    chosen: list[str] = []
    blob, s = trial(chosen)
    best = (blob, list(chosen), s)
    all_int8 = blob
    for t in ranking:
        if cfg.budget.meets(s):
            break
        # Float the op and its readers, so its output activation stays float (see Calibrated.unit).
        grown = chosen + [u for u in cal.unit(t) if u not in chosen]
        if len(grown) == len(chosen):
            continue
        if len(grown) > cfg.budget.max_float_ops:
            break
        b2, s2 = trial(grown)
        if cfg.budget.max_bytes is not None and len(b2) > cfg.budget.max_bytes:
            continue  # e.g. conv8's 200k weights in float32: over the size budget, try the next unit
        if cfg.budget.max_slowdown is not None and latency_ratio(b2, all_int8, crops[:1], preprocess, runs=30)[0] > cfg.budget.max_slowdown:
            continue  # float convs on 56x56 maps cost more than they buy back; try a cheaper unit
        chosen, blob, s = grown, b2, s2
        if cfg.budget.score(s) < cfg.budget.score(best[2]):
            best = (blob, list(chosen), s)
    met = cfg.budget.meets(best[2])
    if met and cfg.prune:
        blob, chosen, s = best
        for t in list(chosen):  # most sensitive first: the ones most likely needed are tried first
            trial_set = [c for c in chosen if c != t]
            b2, s2 = trial(trial_set)
            if cfg.budget.meets(s2):
                blob, chosen, s = b2, trial_set, s2
        best = (blob, chosen, s)
    return MixedResult(blob=best[0], float_ops=[by_tensor[t] for t in best[1]], shift=best[2], met=met, steps=steps)
