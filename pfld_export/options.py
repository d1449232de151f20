"""Option text to typed values: the one parser of comma-separated lists, for every command.

A bad value fails as one line naming the option, what it takes and an example, e.g.
`--threads '1,x' is not comma-separated whole numbers of 1 or more; e.g. --threads 1,2`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

from .errors import UsageError

T = TypeVar("T", int, float, str)

_NOUNS: dict[Callable[..., object], str] = {int: "whole numbers", float: "numbers", str: "names"}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _what(kind: Callable[[str], T], counts: Sequence[int] | None, minimum: float | None) -> str:
    noun = _NOUNS.get(kind, "values")
    if counts:
        single = noun[:-1] if noun.endswith("s") else noun
        parts = [f"{_COUNT_WORDS.get(n, n)} {single if n == 1 else 'comma-separated ' + noun}" for n in counts]
        return " or ".join(parts)
    return f"comma-separated {noun}" + (f" of {minimum:g} or more" if minimum is not None else "")


def parse_list(text: str | None, option: str, kind: Callable[[str], T] = str, *, counts: Sequence[int] | None = None,
               minimum: float | None = None, example: str = "") -> tuple[T, ...] | None:
    """`"a,b,c"` -> (a, b, c) as `kind` (int, float or str); spaces and empty items are ignored;
    None stays None. `counts`: the item counts allowed (any, at least one, when None); `minimum`:
    the smallest number allowed. UsageError naming `option` and showing `example` otherwise."""
    if text is None:
        return None
    items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        values = tuple(kind(t) for t in items)
    except ValueError:
        values = None
    ok = values is not None and (len(values) in counts if counts else len(values) >= 1)
    if ok and kind in (int, float):
        ok = all(math.isfinite(v) and (minimum is None or v >= minimum) for v in values)  # type: ignore[arg-type, union-attr]
    if not ok:
        hint = f"; e.g. {option} {example}" if example else ""
        raise UsageError(f"{option} {text!r} is not {_what(kind, counts, minimum)}{hint}")
    return values


def per_channel(values: Sequence[float] | None, option: str) -> tuple[float, float, float] | None:
    """One value for all three colour channels, or three; None stays None."""
    if values is None:
        return None
    vals = tuple(float(v) for v in values)
    if len(vals) not in (1, 3):
        raise UsageError(f"{option} takes one value or three (one per channel), got {len(vals)}: {list(vals)}; "
                         f"e.g. {option} 0.5 or {option} 0.485,0.456,0.406")
    return (vals * 3)[:3]  # type: ignore[return-value]


def parse_triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    """`0.5` -> (0.5, 0.5, 0.5); `0.485,0.456,0.406` -> that triple; None stays None."""
    return per_channel(parse_list(text, option, float, counts=(1, 3), example="0.5 or 0.485,0.456,0.406"), option)
