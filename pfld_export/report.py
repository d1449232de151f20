"""Tables for people, JSON for machines: the only module that formats results."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy values and paths -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Plain-text table; `align` is one char per column, 'l' or 'r' (numbers right by default)."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
            for i in range(len(headers))
        )

    def fmt(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(list(headers)), sep] + [fmt(r) for r in cells])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_info(info: Any) -> str:
    """`pfld-export info` output."""
    rows = [
        ("file", info.path),
        ("source format", info.source_format),
        ("width", info.width),
        ("points", f"{info.points} ({info.layout})"),
        ("conv2", info.conv2),
        ("bn8 after conv8", "yes (older PFLD-pytorch forward)" if info.head_bn else "no (current PFLD-pytorch forward)"),
        ("parameters", f"{info.parameters:,}"),
        ("MACs @112x112", f"{info.macs:,} ({info.macs / 1e6:.1f} M)"),
        ("float32 weights", f"{info.float32_bytes:,} B ({human_bytes(info.float32_bytes)})"),
        ("int8 weights", f"{info.int8_bytes:,} B ({human_bytes(info.int8_bytes)})"),
        ("auxiliary net", "yes (dropped on export)" if info.has_auxiliary else "no"),
        ("preprocess", f"{info.preprocess['color']}, x*{info.preprocess['scale']:.6g}, mean {info.preprocess['mean']}, std {info.preprocess['std']}"),
    ]
    if info.epoch is not None:
        rows.append(("epoch", str(info.epoch)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


# --- formatters added by later stages go below, one block per stage ---
# [eval]
# [fidelity]
# [train]
# [convert]
# [bench]
# [check]
# [predict]
# [sensitivity]
