"""Thin click adapter: each command builds a config, calls one library function, prints a report.

Library functions never print or exit; typed `PfldError`s become one line on stderr and their
exit code here.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

from . import __version__
from .errors import PfldError

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn PfldError into `error: <message>` + its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PfldError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pfld-export")
def main() -> None:
    """PFLD facial landmarks to phones: train, convert (ONNX/TFLite, int8), evaluate, benchmark."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def info(model: str, as_json: bool) -> None:
    """Show a checkpoint's inferred configuration, parameters, MACs and weight bytes."""
    from .checkpoint import model_info
    from .report import format_info, to_json

    result = model_info(model)
    click.echo(to_json(result) if as_json else format_info(result))


# --- commands added by later stages register below; keep each block self-contained ---
# [eval]
# [fidelity]
# [train]
# [convert]
# [bench]
# [bench-arm]
# [check]
# [predict]
# [sensitivity]


if __name__ == "__main__":
    main()
