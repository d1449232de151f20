"""Speed of the synthetic face generator (goal: ~200 faces in a few seconds on one core).

    python benchmarks/bench_synthetic.py [--count 200] [--size 256] [--json benchmarks/results/synthetic.json]

Single-threaded (OpenCV and numpy pinned to one thread). Reports, per face, the CPU and wall
time of `render_face` alone and of `generate` (render + PNG encode + atomic write), and as the
same-run baseline the time to only PNG-encode and write the same number of already rendered
images, so the ratio says how much of the cost is drawing rather than I/O.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from pfld_export.data.synthetic import SYNTHETIC_VERSION, SyntheticConfig, face_rng, generate, render_face  # noqa: E402
from pfld_export.io import atomic_path, atomic_write_json  # noqa: E402


def _timed(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    cfg = SyntheticConfig(count=args.count, image_size=args.size)
    render_face(face_rng(99, 0), cfg)  # warm-up: imports, OpenCV init

    images = []
    cpu_r, wall_r = _timed(lambda: images.extend(render_face(face_rng(cfg.seed, i), cfg)[0] for i in range(cfg.count)))
    with tempfile.TemporaryDirectory() as tmp:
        def write_only() -> None:
            for i, img in enumerate(images):
                with atomic_path(Path(tmp) / "w" / f"{i:06d}.png") as p:
                    cv2.imwrite(str(p), img, [cv2.IMWRITE_PNG_COMPRESSION, cfg.png_compression])

        cpu_w, wall_w = _timed(write_only)
        cpu_g, wall_g = _timed(lambda: generate(cfg, Path(tmp) / "g"))
        mb = sum(f.stat().st_size for f in (Path(tmp) / "g" / "images").iterdir()) / 1e6
    n = cfg.count
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(), "opencv": cv2.__version__},
        "generator_version": SYNTHETIC_VERSION, "count": n, "image_size": args.size, "threads": 1,
        "ms_per_face": {
            "render_cpu": 1e3 * cpu_r / n, "render_wall": 1e3 * wall_r / n,
            "generate_cpu": 1e3 * cpu_g / n, "generate_wall": 1e3 * wall_g / n,
            "baseline_png_write_cpu": 1e3 * cpu_w / n, "baseline_png_write_wall": 1e3 * wall_w / n,
        },
        "generate_seconds_for_count": wall_g,
        "generate_over_png_write_cpu_ratio": cpu_g / max(cpu_w, 1e-9),
        "dataset_megabytes": mb,
    }
    for k, v in res["ms_per_face"].items():
        print(f"{k:26s} {v:7.2f} ms/face")
    print(f"generate {n} faces: {wall_g:.2f} s wall, {cpu_g:.2f} s CPU; {mb:.1f} MB; "
          f"{res['generate_over_png_write_cpu_ratio']:.1f}x the CPU of only writing the PNGs "
          f"(load average {res['machine']['load_avg_1m']:.1f} on {os.cpu_count()} cores)")
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
