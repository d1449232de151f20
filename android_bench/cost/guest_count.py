"""Runs inside the aarch64 guest (qemu-user with the pfld_count plugin), started by
`pfld_export.bench.cost.arm_instructions_per_invoke`; plain Python 3 + numpy + ai-edge-litert.

    guest_count.py THREADS TOTAL CALIB MODEL...

Makes CALIB empty marker pairs first (the marker's own cost, subtracted by the host), then, per
model, TOTAL invokes each bracketed by two marker calls. The plugin records the instruction
count at every marker; this script prints nothing the host relies on.
"""

import os
import sys

PFLD_MARK = 0x50464C44  # must match pfld_count.c


def mark() -> None:
    # lseek(-1, PFLD_MARK, 0): EBADF in the guest, a recorded count in the plugin.
    try:
        os.lseek(-1, PFLD_MARK, 0)
    except OSError:
        pass


def main(argv: list) -> None:
    threads, total, calib, *paths = argv
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    for _ in range(int(calib)):
        mark()
        mark()
    for p in paths:
        interp = Interpreter(model_path=p, num_threads=int(threads))
        interp.allocate_tensors()
        rng = np.random.default_rng(0)
        for d in interp.get_input_details():
            dt = np.dtype(d["dtype"])
            if np.issubdtype(dt, np.integer):
                info = np.iinfo(dt)
                x = rng.integers(info.min, int(info.max) + 1, size=d["shape"], dtype=dt)
            else:
                x = rng.random(d["shape"]).astype(dt)
            interp.set_tensor(d["index"], x)
        for _ in range(int(total)):
            mark()
            interp.invoke()
            mark()
        del interp


if __name__ == "__main__":
    main(sys.argv[1:])
