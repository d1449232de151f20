"""Label-free distillation on real faces: students of a teacher against a student of synthetic labels.

    python benchmarks/bench_distil.py [--epochs 10] [--width 0.25] [--variants mixed,synthetic-labels,distil-synthetic]
                                      [--out out/bench-distil] [--json benchmarks/results/distillation_w025.json]
    python benchmarks/bench_distil.py --measure NAME=CKPT [--measure ...] [--convert CKPT] --json FILE
        (measure / convert checkpoints made otherwise, e.g. runs continued with --resume; merged into FILE)

Needs ../shared/fixtures (the GhostOne 98-point ONNX teacher, `unlabeled/` photos, `wflw98/`,
`ibug68/`). The photos of `unlabeled/` are split by IMAGE (seeded): most are the distillation
photos, the rest are held out for the agreement figure (links to the files are made under
--out; nothing is copied). The labelled fixtures are only ever evaluated on.

Variants (all the same width, loss, lr, batch, seed and the SAME NUMBER OF OPTIMIZER STEPS: the
synthetic-label student gets a synthetic set whose training split has as many faces as the
mixed distillation epoch has samples):
  mixed              distil --data PHOTOS@1 --data synthetic:N@1 (teacher labels on real photos + synthetic faces)
  synthetic-labels   train --data synthetic:M (the generator's exact labels; what `train` does today)
  distil-synthetic   distil --data synthetic:M (teacher labels on the same synthetic faces only)
Each student (and the teacher, as the reference) is measured: NME on wflw98 (1.2x GT crops), NME
on ibug68 through the usual 98->68 point subset, agreement with the teacher on the held-out
photos (mean / p99 px at 112, detector crops), and `convert --int8` on the mixed student.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIX = ROOT.parent / "shared" / "fixtures"
TEACHER = FIX / "checkpoints" / "pfld_ghostone_98pt.onnx"
TEACHER_PRE = {"color": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

import numpy as np  # noqa: E402

from pfld_export.data.specs import load_spec, split  # noqa: E402
from pfld_export.io import atomic_write_json  # noqa: E402
from pfld_export.layouts import get_layout  # noqa: E402
from pfld_export.preprocess import Preprocess  # noqa: E402
from pfld_export.runtime import Predictor, open_predictor  # noqa: E402

# The usual WFLW-98 -> iBUG-68 subset: every other contour point, the upper brow arcs, the nose,
# six points per eye, the whole mouth. WFLW's contour points are denser, not the same anatomical
# points, so contour NME through this map is approximate.
WFLW_TO_IBUG = (list(range(0, 33, 2)) + list(range(33, 38)) + list(range(42, 47)) + list(range(51, 60))
                + [60, 61, 63, 64, 65, 67, 68, 69, 71, 72, 73, 75] + list(range(76, 96)))
assert len(WFLW_TO_IBUG) == 68


@dataclass
class Subset:
    """A 98-point predictor read as 68 iBUG points."""

    base: Predictor
    name: str = "98->68"
    backend: str = "subset"
    num_points: int = 68
    preprocess: Preprocess = field(init=False)

    def __post_init__(self) -> None:
        self.preprocess = replace(self.base.preprocess, layout="ibug68")

    def predict(self, crops: np.ndarray) -> np.ndarray:
        return self.base.predict(crops)[:, WFLW_TO_IBUG]

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "points": 68, "subset": "wflw98->ibug68"}


def split_photos(out: Path, holdout: float, seed: int) -> tuple[Path, Path, list[str]]:
    """Links to the unlabeled photos in out/photos/{train,heldout}, split by image."""
    from pfld_export.detect import list_images

    files = list_images([FIX / "unlabeled"])
    order = np.random.default_rng(seed).permutation(len(files))
    held = {files[i].name for i in order[: max(1, round(holdout * len(files)))]}
    dirs = {"train": out / "photos" / "train", "heldout": out / "photos" / "heldout"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    for f in files:
        (dirs["heldout" if f.name in held else "train"] / f.name).symlink_to(f.resolve())
    return dirs["train"], dirs["heldout"], sorted(held)


def measure(model: Path, heldout: Path, teacher_pre: dict[str, Any] | None = None) -> dict[str, Any]:
    """NME on wflw98 and ibug68 (98->68), agreement with the teacher on held-out photos."""
    from pfld_export.evaluate import EvalConfig, evaluate, with_overrides
    from pfld_export.predict import FidelityConfig, fidelity_on_folder

    pred = open_predictor(model)
    if teacher_pre:
        pred = open_predictor(model, preprocess=with_overrides(pred.preprocess, **teacher_pre))
    out: dict[str, Any] = {"model": str(model)}
    w = evaluate(pred, load_spec(f"wflw:{FIX / 'wflw98'}").records, EvalConfig())
    out["wflw98"] = {"nme": w.nme_mean, "failure_rate": w.failure_rate, "faces": w.count,
                     "per_face": [float(x) for x in w.nme_per_face]}
    i = evaluate(Subset(pred), load_spec(f"300w:{FIX / 'ibug68'}").records, EvalConfig())
    out["ibug68"] = {"nme": i.nme_mean, "failure_rate": i.failure_rate, "faces": i.count,
                     "per_face": dict(zip(i.sources, (float(x) for x in i.nme_per_face)))}
    if teacher_pre is None:
        f = fidelity_on_folder(FidelityConfig(model_a=TEACHER, model_b=model, images=heldout, override="a",
                                              color=TEACHER_PRE["color"], mean=TEACHER_PRE["mean"], std=TEACHER_PRE["std"]))
        out["agreement_heldout"] = {"mean_px": f.result.mean_px, "p99_px": f.result.p99_px, "max_px": f.result.max_px,
                                    "mean_pct_iod": f.result.mean_pct_iod, "faces": f.faces, "images": f.images}
    return out


def convert_int8(ckpt: Path, out: Path, calib: Path, held: Path) -> dict[str, Any]:
    """`pfld-export convert CKPT --int8`, calibrated on the distillation photos, shifts on the held-out ones."""
    cmd = [str(ROOT / ".venv" / "bin" / "pfld-export"), "convert", str(ckpt), "--int8", "--calib", str(calib),
           "--val-images", str(held), "--eval-data", f"wflw:{FIX / 'wflw98'}", "--out", str(out), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {"command": " ".join(cmd[1:]), "rc": p.returncode,
            "report": json.loads(p.stdout) if p.stdout.strip().startswith("{") else p.stdout[-2000:],
            "stderr_tail": p.stderr[-1500:]}


def steps_of(history_file: Path) -> int:
    return int(sum(h["steps"] for h in json.loads(history_file.read_text())["epochs"]))


def synthetic_count_for(train_faces: int, val_fraction: float = 0.1) -> int:
    """The synthetic:N whose training split (one image per face, `split` by image) has `train_faces` faces."""
    n = train_faces
    while n - min(n - 1, max(1, round(val_fraction * n))) < train_faces:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--synthetic", type=int, default=2000, help="synthetic faces in the mixed distillation data")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of unlabeled/ images held out")
    ap.add_argument("--variants", default="mixed,synthetic-labels,distil-synthetic")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-distil")
    ap.add_argument("--no-convert", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_w025.json")
    ap.add_argument("--measure", action="append", default=[], metavar="NAME=CKPT", help="only measure these checkpoints")
    ap.add_argument("--convert", type=Path, default=None, metavar="CKPT", help="with --measure: convert --int8 this one")
    args = ap.parse_args()
    if not TEACHER.is_file():
        sys.exit(f"bench_distil needs the fixtures at {FIX} (project machines only)")
    if args.measure or args.convert:
        train_dir, held_dir, _ = split_photos(args.out, args.holdout, seed=0)
        res = json.loads(args.json.read_text()) if args.json.is_file() else {}
        extra = res.setdefault("measured_later", {})
        for item in args.measure:
            name, _, ckpt = item.partition("=")
            extra[name] = measure(Path(ckpt), held_dir)
            atomic_write_json(args.json, res)
        if args.convert:
            res["convert"] = convert_int8(args.convert, args.out / f"{args.convert.parent.name}_convert", train_dir, held_dir)
        res["measured_later_date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(args.json, res)
        print(f"wrote {args.json}")
        return
    from pfld_export.distil import DistilConfig, distil
    from pfld_export.train import TrainConfig, train

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    train_dir, held_dir, held = split_photos(args.out, args.holdout, seed=0)
    tag = f"w{str(args.width).replace('.', '')}"
    res: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0], "epochs": args.epochs, "width": args.width,
        "teacher": str(TEACHER), "heldout_images": held, "students": {},
    }
    res["teacher_figures"] = measure(TEACHER, held_dir, TEACHER_PRE)
    common = {"width": args.width, "epochs": args.epochs, "seed": 0}

    # 1. Mixed distillation: sets the step count the others match.
    mixed_out = args.out / f"{tag}_mixed"
    t0 = time.perf_counter()
    d = distil(DistilConfig(teacher=TEACHER, data=[f"{train_dir}@1", f"synthetic:{args.synthetic}@1"], out=mixed_out,
                            color="RGB", mean=TEACHER_PRE["mean"], std=TEACHER_PRE["std"], **common))
    wall = time.perf_counter() - t0
    samples = sum(s.samples_per_epoch for s in d.sources)
    res["students"]["mixed"] = {
        "command": f"pfld-export distil --teacher {TEACHER} --color RGB --mean 0.5 --std 0.5 --data {train_dir}@1 "
                   f"--data synthetic:{args.synthetic}@1 --width {args.width} --epochs {args.epochs} --out {mixed_out}",
        "steps": steps_of(d.train.history_file), "wall_s": wall, "samples_per_epoch": samples,
        "sources": [vars(s) | {"skipped": len(s.skipped)} for s in d.sources],
        "val_nme_vs_teacher": d.train.best_val_nme, **measure(d.train.best_checkpoint, held_dir)}
    print(json.dumps({k: v for k, v in res["students"]["mixed"].items() if k != "sources"}, default=str)[:600], flush=True)

    m = synthetic_count_for(samples)
    if "synthetic-labels" in variants:
        o = args.out / f"{tag}_synthetic_labels"
        t0 = time.perf_counter()
        r = train(TrainConfig(out=o, data=f"synthetic:{m}", **common))
        res["students"]["synthetic-labels"] = {
            "command": f"pfld-export train --data synthetic:{m} --width {args.width} --epochs {args.epochs} --out {o}",
            "steps": steps_of(r.history_file), "wall_s": time.perf_counter() - t0, **measure(r.best_checkpoint, held_dir)}
        atomic_write_json(args.json, res)
    if "distil-synthetic" in variants:
        o = args.out / f"{tag}_distil_synthetic"
        t0 = time.perf_counter()
        d2 = distil(DistilConfig(teacher=TEACHER, data=[f"synthetic:{m}"], out=o, color="RGB", mean=TEACHER_PRE["mean"],
                                 std=TEACHER_PRE["std"], **common))
        res["students"]["distil-synthetic"] = {
            "command": f"pfld-export distil --teacher {TEACHER} --color RGB --mean 0.5 --std 0.5 --data synthetic:{m} "
                       f"--width {args.width} --epochs {args.epochs} --out {o}",
            "steps": steps_of(d2.train.history_file), "wall_s": time.perf_counter() - t0,
            "val_nme_vs_teacher": d2.train.best_val_nme, **measure(d2.train.best_checkpoint, held_dir)}
        atomic_write_json(args.json, res)
    if not args.no_convert:
        res["convert"] = convert_int8(mixed_out / "best.pth", args.out / f"{tag}_mixed_convert", train_dir, held_dir)
    res["load_avg_end"] = os.getloadavg()[0]
    atomic_write_json(args.json, res)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
