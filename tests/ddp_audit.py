"""Run `pfld-export train` in one torchrun process and record every file it writes.

Used by test_train_ddp.py as `python -m torch.distributed.run ... tests/ddp_audit.py LOG_DIR WATCH_DIR
-- <train options>`: an audit hook sees each file opened for writing and each rename under
WATCH_DIR (the atomic writers' temp files and their final names), and the list is written to
LOG_DIR/rank<RANK>.json when the command ends, whatever its exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    log_dir, watch = Path(sys.argv[1]), os.path.realpath(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    writes: list[str] = []

    def inside(path: Any) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None  # an open file descriptor
        p = os.path.realpath(os.fsdecode(path))
        return p if p.startswith(watch + os.sep) else None

    def hook(event: str, hargs: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = hargs
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            p = inside(path) if writing else None
        elif event == "os.rename":
            p = inside(hargs[1])
        else:
            return
        if p is not None:
            writes.append(os.path.relpath(p, watch))

    sys.addaudithook(hook)
    from pfld_export.cli import main as cli

    code: Any = 0
    try:
        cli(args, prog_name="pfld-export")
    except SystemExit as e:
        code = e.code
    finally:
        (log_dir / f"rank{os.environ.get('RANK', '?')}.json").write_text(json.dumps({"writes": writes, "exit": code}))
    sys.exit(code)


if __name__ == "__main__":
    main()
