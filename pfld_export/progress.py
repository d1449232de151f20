"""Progress on stderr for the commands: one tqdm bar, drawn only when stderr is a terminal.

Library functions report progress through plain callbacks (`progress(done, total)`, training
events); the command adapters turn those into a `ProgressBar`. Lines written through the bar
(epoch summaries, stage timings) go to stderr on every kind of output, terminal or pipe, without
tearing a bar that is being drawn. Nothing here goes to stdout, which carries the report.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .train import TrainEvent


class ProgressBar:
    """A tqdm bar on stderr, shown only on a terminal (never in pipes, CI logs or tests).

    Use as a context manager (or call `close`); `show(done, total)` fits the library's
    `progress(done, total)` callbacks."""

    def __init__(self, desc: str = "", unit: str = "it", total: int = 0) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    def show(self, done: int, total: int | None = None, what: str | None = None, **postfix: str) -> None:
        """Move the bar to `done` of `total`, with `what` (the item now running) or named values beside it."""
        if total is not None:
            self.bar.total = total
        if what is not None:
            self.bar.set_postfix_str(what[:40], refresh=False)
        elif postfix:
            self.bar.set_postfix(refresh=False, **postfix)
        self.bar.update(done - self.bar.n)

    def restart(self, total: int, desc: str, unit: str | None = None) -> None:
        """Start over at 0 of `total` under a new description (the next epoch, the next source)."""
        if unit is not None:
            self.bar.unit = unit
        self.bar.reset(total=total)
        self.bar.set_description(desc[:40], refresh=False)

    def note(self, text: str) -> None:
        """Show what is running now beside the bar, without moving it."""
        self.bar.set_postfix_str(text)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def write(self, line: str) -> None:
        """One line on stderr (above the bar when one is drawn)."""
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def training_progress(command: str, bar: ProgressBar) -> Callable[[TrainEvent], None]:
    """The `progress(event)` callback of `train` and `distil`: setup messages as `COMMAND: ...`
    lines, a bar per epoch (and one while faces are cropped) with loss and learning rate, and one
    summary line per finished epoch."""
    from .report import format_train_epoch

    shown = {"phase": ""}  # what the bar counts now: "preload" or "epoch E/N"

    def progress(ev: TrainEvent) -> None:
        if ev.kind == "setup":
            bar.write(f"{command}: {ev.message}")
        elif ev.kind in ("preload", "step"):
            phase = "preload" if ev.kind == "preload" else f"epoch {ev.epoch}/{ev.epochs}"
            if shown["phase"] != phase:
                shown["phase"] = phase
                bar.restart(ev.steps, "cropping" if ev.kind == "preload" else phase,
                            unit="face" if ev.kind == "preload" else "batch")
            postfix = {"loss": f"{ev.loss:.4g}", "lr": f"{ev.lr:.2g}"} if ev.kind == "step" else {}
            bar.show(ev.step, **postfix)
        elif ev.kind == "epoch":
            shown["phase"] = ""
            bar.write(format_train_epoch(ev.record or {}, ev.epochs))

    return progress


def labelling_progress(bar: ProgressBar) -> Callable[[str, int, int], None]:
    """The `label_progress(source, done, total)` callback of `distil`: the bar restarts per source."""
    shown = {"source": ""}

    def progress(source: str, done: int, total: int) -> None:
        if shown["source"] != source:
            shown["source"] = source
            bar.restart(total, f"teacher on {source}", unit="face")
        bar.show(done, total)

    return progress
