"""Compare face detectors on the real fixtures: detections, recall against annotations, time.

    python benchmarks/bench_detectors.py [--fixtures ../shared/fixtures] [--detectors yunet,haar,mtcnn]
                                         [--json benchmarks/results/detectors.json] [--overlays DIR]

Unlabeled (../shared/fixtures/unlabeled, ~150 faces): detections per detector, time per image.
Annotated (wflw98 list file + ibug68 .pts): recall = annotated faces with a detection whose
square box has IoU > 0.5 with the square landmark box (`detect.match_iou`), and how a detector
box relates to the 1.2x landmark-box crop PFLD is trained on (side ratio, centre shift), which
sets the default `--crop-scale`. Results are recorded, with machine and date, in
benchmarks/detectors.md. Timing per image: wall time and process CPU time (the latter is what
to compare on a shared, busy machine), median and mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pfld_export.detect import DETECTORS, Resize, list_images, make_detector, match_iou, read_image  # noqa: E402
from pfld_export.errors import PfldError  # noqa: E402
from pfld_export.io import atomic_write_json  # noqa: E402


def annotated_faces(fixtures: Path) -> list[tuple[Path, np.ndarray]]:
    """(image, points [P, 2]) for every annotated face in wflw98 and ibug68."""
    out: list[tuple[Path, np.ndarray]] = []
    lst = fixtures / "wflw98" / "list_98pt_rect_attr_test.txt"
    if lst.is_file():
        for line in lst.read_text().splitlines():
            v = line.split()
            if len(v) == 207:
                out.append((fixtures / "wflw98" / "images" / v[-1], np.array(v[:196], float).reshape(98, 2)))
    for pts in sorted((fixtures / "ibug68").glob("*.pts")):
        text = pts.read_text()
        body = text[text.index("{") + 1 : text.index("}")].split()
        img = next(p for p in pts.parent.glob(pts.stem + ".*") if p.suffix != ".pts")
        out.append((img, np.array(body, float).reshape(-1, 2)))
    return out


def bench(name: str, fixtures: Path, resize: Resize, overlays: Path | None) -> dict:
    det = make_detector(name, max_side=resize.max_side, min_side=resize.min_side, pad=resize.pad)
    det.resize = resize  # type: ignore[attr-defined]  (every registry detector has one)
    # Warm-up: first call pays library/graph initialisation (TensorFlow especially).
    det.detect(read_image(next(iter(list_images([fixtures / "unlabeled"])))))
    per_image, times, cpu = {}, [], []
    for f in list_images([fixtures / "unlabeled"]):
        img = read_image(f)
        t, c = time.perf_counter(), time.process_time()
        boxes = det.detect(img)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # CPU time of all threads: robust to a busy machine
        per_image[f.name] = len(boxes)
        if overlays is not None:
            from pfld_export.draw import draw_faces, write_image

            write_image(overlays / name / f"{f.stem}.jpg", draw_faces(img, boxes))
    recall_rows = []
    for img_path, pts in annotated_faces(fixtures):
        img = read_image(img_path)
        boxes = det.detect(img)
        ious = [match_iou(b.as_tuple(), pts) for b in boxes]
        best = int(np.argmax(ious)) if ious else -1
        row = {"image": img_path.name, "best_iou": round(max(ious), 3) if ious else 0.0,
               "found": bool(ious) and max(ious) > 0.5}
        if best >= 0:
            b = boxes[best]
            side = max(b.width, b.height)
            lm_side = max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]))
            row["side_ratio"] = round(float(lm_side / side), 3)  # landmark box side / detector box side
            row["centre_dy"] = round(float(((pts[:, 1].min() + pts[:, 1].max()) / 2 - (b.y0 + b.y1) / 2) / side), 3)
            row["calibrated_iou"] = round(match_iou(det.calibration.apply(b), pts), 3)
        recall_rows.append(row)
    found = sum(r["found"] for r in recall_rows)
    matched = [r for r in recall_rows if "side_ratio" in r]
    return {
        "detector": name, "resize": vars(resize), "unlabeled_images": len(per_image),
        "unlabeled_detections": sum(per_image.values()), "images_without_detection": sorted(k for k, v in per_image.items() if v == 0),
        "per_image": per_image, "ms_median": round(1000 * statistics.median(times), 1),
        "ms_mean": round(1000 * statistics.fmean(times), 1), "cpu_ms_median": round(1000 * statistics.median(cpu), 1),
        "cpu_ms_mean": round(1000 * statistics.fmean(cpu), 1), "annotated_faces": len(recall_rows),
        "recall": round(found / max(1, len(recall_rows)), 3),
        "recall_calibrated": round(sum(r.get("calibrated_iou", 0) > 0.5 for r in recall_rows) / max(1, len(recall_rows)), 3),
        "median_calibrated_iou": statistics.median([r.get("calibrated_iou", 0.0) for r in recall_rows]) if recall_rows else 0.0,
        "measured_calibration": {"scale": statistics.median([r["side_ratio"] for r in matched]) if matched else None,
                                 "dy": statistics.median([r["centre_dy"] for r in matched]) if matched else None},
        "annotated": recall_rows,
    }


def stage_timing(model: Path, fixtures: Path, color: str | None, mean: float | None, std: float | None) -> dict:
    """`predict`'s two stages on the unlabeled images, one thread each: detection per image,
    landmarks per face (crop + preprocess + inference + mapping back + pose)."""
    from pfld_export.predict import FaceEngine, model_layout, open_model

    m = (mean,) if mean is not None else None
    s = (std,) if std is not None else None
    pred = open_model(model, color, m, s, threads=1)
    det = make_detector()
    engine = FaceEngine(pred, det, model_layout(pred))
    det_cpu, lm_cpu, faces = [], 0.0, 0
    imgs = [read_image(f) for f in list_images([fixtures / "unlabeled"])]
    engine.run(imgs[0])  # warm-up
    for img in imgs:
        c0 = time.process_time()
        boxes = det.detect(img)
        c1 = time.process_time()
        found, _, _ = engine.run(img)  # detection again + landmarks; subtract the detection part
        c2 = time.process_time()
        det_cpu.append(c1 - c0)
        lm_cpu += max(0.0, (c2 - c1) - (c1 - c0))
        faces += len(boxes)
    return {"model": str(model), "images": len(imgs), "faces": faces,
            "detect_cpu_ms_per_image": round(1000 * statistics.fmean(det_cpu), 1),
            "detect_cpu_ms_median": round(1000 * statistics.median(det_cpu), 1),
            "landmarks_cpu_ms_per_face": round(1000 * lm_cpu / max(1, faces), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    ap.add_argument("--detectors", default=",".join(DETECTORS))
    ap.add_argument("--max-side", type=int, nargs="+", default=[1280])
    ap.add_argument("--min-side", type=int, nargs="+", default=[320])
    ap.add_argument("--refine-above", type=int, nargs="+", default=[300], help="10000 disables the large-face pass")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--overlays", type=Path, default=None)
    ap.add_argument("--predict-model", type=Path, default=None, help="also time predict's stages with this model")
    ap.add_argument("--color", default=None)
    ap.add_argument("--mean", type=float, default=None)
    ap.add_argument("--std", type=float, default=None)
    a = ap.parse_args()
    if not (a.fixtures / "unlabeled").is_dir():
        sys.exit(f"{a.fixtures}/unlabeled not found; pass --fixtures")
    if a.predict_model is not None:
        print(json.dumps(stage_timing(a.predict_model, a.fixtures, a.color, a.mean, a.std)))
        return
    results = []
    for name in a.detectors.split(","):
        for mx, mn, rf in [(mx, mn, rf) for mx in a.max_side for mn in a.min_side for rf in a.refine_above]:
            try:
                r = bench(name, a.fixtures, Resize(max_side=mx, min_side=mn, refine_above=rf), a.overlays)
            except PfldError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
                continue
            results.append(r)
            print(f"{name:6s} max_side={mx:5d} min_side={mn:4d} refine_above={rf:5d}  unlabeled: "
                  f"{r['unlabeled_detections']:4d} detections, {len(r['images_without_detection']):2d} images with none, "
                  f"wall {r['ms_median']:.1f} ms median / {r['ms_mean']:.1f} mean, CPU {r['cpu_ms_median']:.1f} median / "
                  f"{r['cpu_ms_mean']:.1f} mean ms per image;  "
                  f"recall {r['recall']:.3f} (calibrated box {r['recall_calibrated']:.3f}, median IoU "
                  f"{r['median_calibrated_iou']:.3f}) of {r['annotated_faces']} annotated; measured calibration "
                  f"{r['measured_calibration']}", flush=True)
    if a.json:
        atomic_write_json(a.json, {"date": date.today().isoformat(), "machine": platform.platform(),
                                   "processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                   "loadavg_at_end": os.getloadavg(), "results": results})


if __name__ == "__main__":
    main()
