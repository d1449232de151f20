"""Thin click adapter: each command builds a config, calls one library function, prints a report.

Library functions never print or exit; typed `PfldError`s become one line on stderr and their
exit code here.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any, Callable, TypeVar

import click

from . import __version__
from .device import DEVICES
from .errors import OutputError, PfldError
from .quant import options as qat_options  # no torch: the qat command's choices and defaults
from .quant.budget import DEFAULT_MAX_FLOAT_OPS, DEFAULT_MAX_SLOWDOWN, P99_PER_MEAN

F = TypeVar("F", bound=Callable[..., Any])


class RegistryChoice(click.Choice):
    """A choice among the names of a registry (`module:NAME`, a dict or tuple), read when the
    option is first parsed or shown: the registries live beside torch or OpenCV code that a
    command not using them should not import, and the CLI never spells their names again."""

    def __init__(self, where: str, case_sensitive: bool = True) -> None:
        self.where = where  # "module:NAME"
        self._names: tuple[str, ...] | None = None
        super().__init__((), case_sensitive=case_sensitive)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            import importlib

            module, name = self.where.split(":")
            self._names = tuple(getattr(importlib.import_module(module), name))
        return self._names

    @choices.setter
    def choices(self, _value: Any) -> None:  # click's __init__ assigns it; the registry decides
        pass


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
        except OSError as e:
            # Our own outputs already fail as OutputError (io.py); this catches a full or read-only
            # disk met by a third-party writer (onnx2tf's temp files, TensorFlow, caches).
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror}{where}; free space (or check $TMPDIR) and re-run", err=True)
            sys.exit(OutputError.exit_code)

    return wrapper  # type: ignore[return-value]


class OneLineErrors(click.Group):
    """The command group, with click's own usage errors (unknown option, bad choice, missing
    argument) printed as one `error:` line naming the command's --help, like every other error."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)  # a bare command: its help, as click shows it
            sys.exit(e.exit_code)
        except click.exceptions.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pfld-export")
def main() -> None:
    """PFLD facial landmarks to phones: train, convert (ONNX/TFLite, int8), evaluate, benchmark."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", default=None, type=click.Path(file_okay=False), help="Folder of face photos for the stage-0 measurement  [default: synthetic faces]")
@click.option("--activation", type=RegistryChoice("pfld_export.model:ACTIVATIONS"), default=None, help="Activation, instead of measuring it.")
@click.option("--bn8", type=click.Choice(["on", "off"]), default=None, help="bn8 applied or not, instead of reading/measuring it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def info(model: str, as_json: bool, calib: str | None = None, activation: str | None = None, bn8: str | None = None) -> None:
    """Show a checkpoint's configuration (each field read from tensors, metadata, flags or measured), parameters, MACs, bytes."""
    from .report import format_info, to_json
    from .stage0 import model_info

    flags = {k: v for k, v in (("activation", activation), ("head_bn", None if bn8 is None else bn8 == "on")) if v is not None}
    result = model_info(model, calib, flags)
    click.echo(to_json(result) if as_json else format_info(result))


# --- one block per command below; each reads its options into a config and calls the library ---
@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", required=True,
              help="Annotated faces: wflw:DIR, wflw:LIST.txt, 300w:DIR, 300w:LIST.txt, synthetic[:N[:SEED]].")
@click.option("--color", type=click.Choice(["BGR", "RGB"], case_sensitive=False), default=None,
              help="Channel order the model expects (overrides its metadata; a foreign ONNX has none: BGR).")
@click.option("--mean", default=None, help="Input mean after x/255: one value or a,b,c (overrides the model's).")
@click.option("--std", default=None, help="Input std: one value or a,b,c (overrides the model's).")
@click.option("--out", "out_dir", default="eval_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for eval.json and ced.png.")
@click.option("--crop-scale", default=1.2, show_default=True, type=float, help="Crop side / landmark-box side.")
@click.option("--norm", type=click.Choice(["inter-ocular", "inter-pupil", "box"]), default="inter-ocular",
              show_default=True, help="NME normalisation.")
@click.option("--threshold", default=0.1, show_default=True, type=float, help="Failure threshold (and AUC limit).")
@click.option("--strict", is_flag=True, help="Stop at the first bad annotation instead of skipping it.")
@click.option("--threads", type=int, default=None, help="Inference threads (default: the runtime's).")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json's content instead of the table.")
@friendly
def eval_command(model: str, data_spec: str, color: str | None, mean: str | None, std: str | None, out_dir: str,
                 crop_scale: float, norm: str, threshold: float, strict: bool, threads: int | None, as_json: bool) -> None:
    """Accuracy of MODEL (.pth/.onnx/.tflite) on annotated faces: NME, AUC, failure rate, outliers."""
    import json
    from pathlib import Path

    from .evaluate import EvalConfig, EvalRunConfig, eval_json, run_eval
    from .options import parse_triple
    from .progress import ProgressBar
    from .report import format_eval

    cfg = EvalRunConfig(model=Path(model), data=data_spec, out_dir=Path(out_dir), color=color,
                        mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"),
                        eval=EvalConfig(crop_scale=crop_scale, norm=norm, threshold=threshold), strict=strict,
                        threads=threads)
    with ProgressBar("eval", unit="face") as bar:
        report = run_eval(cfg, bar.show)
    click.echo(json.dumps(eval_json(report), indent=2) if as_json else format_eval(report))

def _preprocess_options(fn: F) -> F:
    """--color/--mean/--std: preprocessing for foreign models (shared by fidelity and predict)."""
    fn = click.option("--std", default=None, help="Input std, one value or three (e.g. 0.5); overrides the model's.")(fn)
    fn = click.option("--mean", default=None, help="Input mean after x/255, one value or three (e.g. 0.5).")(fn)
    fn = click.option("--color", type=click.Choice(["BGR", "RGB"], case_sensitive=False), default=None,
                      help="Channel order the model expects (overrides its metadata; foreign models default to BGR).")(fn)
    return fn


@main.command()
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.Path(file_okay=False),
              help="Folder of real, unlabeled face photos; faces are found by the detector.")
@_preprocess_options
@click.option("--override-for", "override_for", type=click.Choice(["a", "b", "both"]), default="both", show_default=True,
              help="Which model --color/--mean/--std apply to.")
@click.option("--limit", type=int, default=None, help="Use at most N faces (files in sorted order).")
@click.option("--detector", type=RegistryChoice("pfld_export.detect:DETECTORS"), default="yunet", show_default=True, help="Face detector (mtcnn needs its optional package).")
@click.option("--crop-scale", default=1.2, show_default=True, type=float, help="Crop side / landmark-equivalent box side.")
@click.option("--threads", type=int, default=None, help="Inference threads per model (default: the runtime's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def fidelity(model_a: str, model_b: str, images: str, color: str | None, mean: str | None, std: str | None,
             override_for: str, limit: int | None, detector: str, crop_scale: float, threads: int | None,
             as_json: bool) -> None:
    """Landmark shift of MODEL_B against MODEL_A on the same real face crops (px of the crop, % IOD)."""
    from pathlib import Path

    from .options import parse_triple
    from .predict import FidelityConfig, fidelity_on_folder
    from .report import format_fidelity, to_json

    cfg = FidelityConfig(model_a=Path(model_a), model_b=Path(model_b), images=Path(images),
                         color=color.upper() if color else None, mean=parse_triple(mean, "--mean"),
                         std=parse_triple(std, "--std"), override=override_for, limit=limit, detector=detector,
                         crop_scale=crop_scale, threads=threads)
    report = fidelity_on_folder(cfg)
    click.echo(to_json(report) if as_json else format_fidelity(report))


def _refuse_train_qat(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    """`train --qat` (or a train --qat-* option): one line naming the qat command rather than
    click's unknown-option error."""
    if value:
        click.echo("error: QAT is its own command: pfld-export qat --init CKPT --data PHOTOS", err=True)
        ctx.exit(2)


def _train_qat_options(fn: F) -> F:
    """Hidden train options with QAT's train spellings, each answered by `_refuse_train_qat`."""
    for name, flag in (("--qat", True), ("--qat-steps", False), ("--qat-ranges", False), ("--qat-equalize", True),
                       ("--qat-trainable", False), ("--val-images", False)):
        fn = click.option(name, is_flag=flag, hidden=True, expose_value=False, is_eager=True, callback=_refuse_train_qat)(fn)
    return fn


@main.command()
@click.option("--data", default=None, help="Training faces: wflw:DIR, 300w:DIR or synthetic[:N[:SEED]] (default: synthetic, the 3000-face demo set).")
@click.option("--val-data", default=None, help="Separate validation faces (same spec forms); default: hold out --val-fraction of --data.")
@click.option("--val-fraction", type=float, default=None, help="Share of --data held out for validation NME  [default: 0.1]")
@click.option("--width", type=float, default=None, help="Width multiplier 0.25/0.5/0.75/1.0  [default: 0.25, or --init's]")
@click.option("--points", type=int, default=None, help="Landmark count; must match the data layout  [default: the data's]")
@click.option("--conv2", type=RegistryChoice("pfld_export.model:CONV2_KINDS"), default=None, help="conv2 kind  [default: full, or --init's]")
@click.option("--activation", type=RegistryChoice("pfld_export.model:ACTIVATIONS"), default=None, help="Activation: relu (PFLD-pytorch) or relu6 (the paper's MobileNetV2 blocks; bounded, so tighter int8 ranges: at 1X the same float NME and a 13 % lower int8 shift, at 0.25X an 8-11 % worse NME: benchmarks/int8_fidelity.md)  [default: relu, or --init's]")
@click.option("--epochs", type=int, default=3, show_default=True, help="Total epochs (with --resume: train until this many are done).")
@click.option("--batch", type=int, default=None, help="GLOBAL batch size: under torchrun it is split over the processes (batch / N each), so a step averages the same number of faces on any N  [default: 256 on real data, 32 on synthetic]")
@click.option("--lr", type=float, default=None, help="Adam learning rate, never scaled for you: with a bigger --batch raise it yourself  [default: 1e-4 (the paper) on real data, 2e-3 on synthetic]")
@click.option("--weight-decay", type=float, default=None, help="Adam weight decay  [default: 1e-6]")
@click.option("--loss", type=RegistryChoice("pfld_export.loss:LOSSES"), default=None, help="pfld (pose+attribute weighted L2), l2 or wing  [default: pfld]")
@click.option("--schedule", type=RegistryChoice("pfld_export.train:SCHEDULES"), default=None, help="Learning-rate schedule after a short warm-up  [default: cosine]")
@click.option("--out", "out", default="out/train", show_default=True, type=click.Path(file_okay=False), help="Folder for best.pth, last.pth, history.json.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a run from its last.pth (optimizer, schedule, epoch).")
@click.option("--init", type=click.Path(dir_okay=False), default=None, help="Fine-tune from any PFLD checkpoint (new head if the point count differs).")
@click.option("--seed", type=int, default=None, help="Seed for weights, split, order and augmentation  [default: 0]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto = CUDA if present.")
@click.option("--workers", type=click.IntRange(0, 1), default=0, show_default=True, help="DataLoader worker processes (0 or 1 on 2 cores).")
@click.option("--threads", type=int, default=None, help="torch threads while training  [default: 1 on <= 2 cores or a busy machine, else one per core]")
@click.option("--no-augment", is_flag=True, help="Plain 1.2x crops (no rotation/shift/scale/mirror/colour/blur/occlusion).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where generated synthetic sets are kept.")
@click.option("--int8-noise", type=float, default=None, help="Train int8-robust: uniform noise of this many int8 steps on every tensor int8 requantizes (8 measured: 0.25X int8 shift 0.49 -> 0.29-0.34 px, float NME 0.081 -> 0.089). Off (0) by default.")
@_train_qat_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@friendly
def train(data: str | None, val_data: str | None, val_fraction: float | None, width: float | None, points: int | None,
          conv2: str | None, epochs: int, batch: int | None, lr: float | None, weight_decay: float | None, loss: str | None,
          schedule: str | None, out: str, resume: str | None, init: str | None, seed: int | None, device: str,
          workers: int, threads: int | None, no_augment: bool, cache_dir: str | None, as_json: bool,
          int8_noise: float | None = None, activation: str | None = None) -> None:
    """Train PFLD (the paper's loss, fixed) and write OUT/best.pth, OUT/last.pth, OUT/history.json.

    \b
    Several GPUs or machines: run it unchanged under torchrun (DDP; NCCL on GPUs, gloo on CPU):
      torchrun --standalone --nproc_per_node 4 -m pfld_export.cli train --batch 256 ...
    --batch is global; process 0 alone writes files; --resume needs the same process count.
    """
    from pathlib import Path

    from .distributed import context_from_env
    from .progress import ProgressBar, training_progress
    from .report import format_train, to_json
    from .train import TrainConfig, train as run_train

    cfg = TrainConfig(
        out=Path(out), data=data, val_data=val_data, val_fraction=val_fraction, width=width, points=points, conv2=conv2,
        epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay, loss=loss, schedule=schedule,
        resume=Path(resume) if resume else None, init=Path(init) if init else None, seed=seed, device=device,  # type: ignore[arg-type]
        workers=workers, threads=threads, augment=False if no_augment else None, cache_dir=Path(cache_dir) if cache_dir else None,
        int8_noise=int8_noise, activation=activation,
    )
    bar = ProgressBar(unit="batch")
    try:
        result = run_train(cfg, training_progress("train", bar))
    except KeyboardInterrupt:
        bar.close()
        last = Path(out) / "last.pth"
        hint = f"; continue with --resume {last}" if last.exists() else ""
        click.echo(f"interrupted: resumable checkpoint saved at {last}{hint}" if last.exists() else "interrupted", err=True)
        sys.exit(130)
    finally:
        bar.close()
    if result.processes == 1 or context_from_env().is_main:  # under torchrun one report, from process 0
        click.echo(to_json(result) if as_json else format_train(result))

@main.command()
@click.option("--init", required=True, type=click.Path(dir_okay=False), help="The trained float checkpoint to tune; it is also the frozen teacher.")
@click.option("--data", required=True, help="Face photos to tune on (folder or dataset spec; labels are not used).")
@click.option("--steps", type=click.IntRange(1, None), default=qat_options.STEPS, show_default=True, help="Optimizer steps.")
@click.option("--ranges", type=click.Choice(qat_options.RANGE_CHOICES), default=qat_options.RANGE_CHOICES[0], show_default=True, help="Activation ranges: re-measured (mse / minmax) or learned (carried in the checkpoint; convert writes them into the int8 model).")
@click.option("--equalize", is_flag=True, help="Start from cross-layer-equalised weights (same float landmarks).")
@click.option("--trainable", type=click.Choice(qat_options.TRAINABLE), default=qat_options.TRAINABLE[0], show_default=True,
              help="Train all weights, only BN affines and biases, or only the activation ranges (needs --ranges learned; the float model does not move).")
@click.option("--val-images", default=None, help="Held-out faces for the figures (folder or spec)  [default: photos held out of --data]")
@click.option("--batch", type=int, default=qat_options.BATCH, show_default=True, help="GLOBAL batch size: under torchrun it is split over the processes.")
@click.option("--lr", type=float, default=qat_options.LR, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the photo split, batch order and augmentation.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto = CUDA if present.")
@click.option("--threads", type=int, default=None, help="torch threads  [default: 1 on <= 2 cores or a busy machine, else one per core]")
@click.option("--no-augment", is_flag=True, help="Plain face crops (no rotation/scale/shift/mirror/lighting jitter).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where generated synthetic sets are kept.")
@click.option("--out", default=qat_options.OUT, show_default=True, type=click.Path(file_okay=False), help="Folder for qat.pth.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@friendly
def qat(init: str, data: str, steps: int, ranges: str, equalize: bool, trainable: str, val_images: str | None, batch: int,
        lr: float, seed: int, device: str, threads: int | None, no_augment: bool, cache_dir: str | None, out: str,
        as_json: bool) -> None:
    """Quantization-aware fine-tuning of --init: its int8 conversion learns to match its float
    landmarks (self-distillation, no labels needed). Writes OUT/qat.pth; convert it as usual.

    \b
    Runs unchanged under torchrun (DDP, --batch global; process 0 writes).
    """
    from pathlib import Path

    from .progress import ProgressBar
    from .quant.qat import QATConfig, qat as run_qat
    from .report import format_qat, to_json

    range_method, learn_ranges = qat_options.range_fields(ranges)
    cfg = QATConfig(init=Path(init), out=Path(out), data=data, val_images=val_images, steps=steps, range_method=range_method,
                    learn_ranges=learn_ranges, equalize=equalize, trainable=trainable, batch=batch, lr=lr, seed=seed,
                    threads=threads, device=device, augment=not no_augment, cache_dir=Path(cache_dir) if cache_dir else None)
    with ProgressBar("qat", unit="step", total=steps) as bar:
        result = run_qat(cfg, lambda step, total, loss_px: bar.show(step, total, loss_px=f"{loss_px:.3f}"))
    click.echo(to_json(result) if as_json else format_qat(result))


class _Pixels(click.ParamType):
    """A distance in pixels at 112: `0.25` or `0.25px`."""

    name = "PX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower().removesuffix("px").strip()
        try:
            return float(text)
        except ValueError:
            self.fail(f"{value!r} is not a pixel distance; write e.g. 0.25 or 0.25px (px on the 112-px crop)", param, ctx)


PIXELS = _Pixels()


def _format_names() -> str:
    from .export.formats import DEFAULT_FORMATS, FORMATS

    return ", ".join(FORMATS) + f" (default {','.join(DEFAULT_FORMATS)})"


def _recipe_help() -> str:
    from .quant.recipes import INT8_RECIPES, default_recipes

    return (f"Comma-separated int8 recipes: {', '.join(INT8_RECIPES)}  [default: the best of {', '.join(default_recipes(budget=False))} "
            "(each with min/max and mse ranges, 60 s cap); with a budget all of them; plain alone: the converter's own int8]")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--int8", "int8", is_flag=True, help="Add int8 and full-int8 (and fp32, the reference they are read against).")
@click.option("--formats", default=None, help=f"Comma-separated formats: {_format_names()}.")
@click.option("--calib", default=None, help="Calibration faces: a folder of photos (faces detected) or wflw:DIR / 300w:DIR / synthetic[:N[:SEED]]. Default: synthetic.")
@click.option("--calib-count", default=200, show_default=True, type=int, help="Calibration crops to use.")
@click.option("--val-images", default=None, help="Held-out faces for the shift check (folder or spec); default: images held out of --calib.")
@click.option("--eval-data", default=None, help="Annotated faces (wflw:DIR, 300w:DIR, synthetic) for the NME check.")
@click.option("--size-budget", default="2MB", show_default=True, help="Largest allowed .tflite (decimal units: 2MB = 2,000,000 bytes).")
@click.option("--out", "out", default="out/convert", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--name", default=None, help="File name stem (default: the model's).")
@click.option("--width", type=float, default=None, help="Expected width multiplier; refused if the weights say otherwise.")
@click.option("--color", type=click.Choice(["RGB", "BGR"], case_sensitive=False), default=None, help="Colour order the model expects (foreign ONNX).")
@click.option("--mean", default=None, help="Mean subtracted after x/255: one value or three (foreign ONNX).")
@click.option("--std", default=None, help="Std divided by after the mean: one value or three (foreign ONNX).")
@click.option("--keep-onnx", is_flag=True, help="Keep the intermediate .onnx in --out.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for calibration sampling and the hold-out split.")
@click.option("--max-shift", type=PIXELS, default=None, help="int8 budget: mean landmark shift vs float (px at 112, held-out faces). Tries equalised weights, then keeps the fewest sensitive ops float until it holds; exit 7 with the best figure if nothing does. Without it the format's goal (int8 0.25 px, full-int8 0.30 px) is checked and a miss is a WARNING (exit 0).")
@click.option("--max-shift-p99", type=PIXELS, default=None, help=f"int8 budget: 99th-percentile shift (px)  [default: {P99_PER_MEAN:g} x --max-shift]")
@click.option("--max-nme-increase", type=float, default=None, help="int8 budget: NME increase over the float source on --eval-data.")
@click.option("--int8-method", "int8_methods", default=None, metavar="RECIPE[,RECIPE...]", help=_recipe_help())
@click.option("--int8-max-seconds", type=float, default=None, help="Time cap of the int8 fit in CPU seconds (a busy machine's wall clock does not cut candidates): no weight-fix candidate starts after it (plain always runs; 0: no cap)  [default: 60]")
@click.option("--max-float-ops", type=int, default=DEFAULT_MAX_FLOAT_OPS, show_default=True, help="Most ops mixed precision may keep in float.")
@click.option("--max-slowdown", type=float, default=DEFAULT_MAX_SLOWDOWN, show_default=True, help="Latency mixed precision may add, as a ratio to the all-int8 model (XNNPACK, 1 thread).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None, help="Float model to measure shifts and NME increase against instead of MODEL's own float (e.g. the teacher of a `pfld-export qat` checkpoint).")
@click.option("--activation", type=RegistryChoice("pfld_export.model:ACTIVATIONS"), default=None, help="Activation the checkpoint was trained with  [default: measured in stage 0]")
@click.option("--bn8", type=click.Choice(["on", "off"]), default=None, help="Whether the checkpoint's forward applies bn8 after conv8  [default: read from its statistics, measured where they cannot tell]")
@click.option("--reference-onnx", type=click.Path(dir_okay=False), default=None, help="The checkpoint author's own ONNX export: stage 0 refuses to convert unless our network reproduces it (1e-4).")
@click.option("--model-class", default=None, help="Your own network for a checkpoint outside the PFLD family: path/to/models.py:ClassName (its code is imported only with this flag).")
@click.option("--model-args", default=None, help="--model-class constructor arguments as a JSON object, e.g. '{\"width_factor\": 1, \"landmark_number\": 98}'.")
@click.option("--output-index", type=int, default=None, help="--model-class: which returned tensor holds the landmarks  [default: the one with 2N values]")
@click.option("--output-scale", type=float, default=None, help="--model-class: factor bringing the landmarks to [0, 1] of the crop  [default: detected; pixels -> 1/size]")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@friendly
def convert(model: str, int8: bool, formats: str | None, calib: str | None, calib_count: int, val_images: str | None,
            eval_data: str | None, size_budget: str, out: str, name: str | None, width: float | None, color: str | None,
            mean: str | None, std: str | None, keep_onnx: bool, seed: int, as_json: bool, max_shift: float | None = None,
            max_shift_p99: float | None = None, max_nme_increase: float | None = None, int8_methods: str | None = None,
            max_float_ops: int = DEFAULT_MAX_FLOAT_OPS, max_slowdown: float | None = DEFAULT_MAX_SLOWDOWN, reference: str | None = None,
            activation: str | None = None, bn8: str | None = None, reference_onnx: str | None = None,
            model_class: str | None = None, model_args: str | None = None, output_index: int | None = None,
            output_scale: float | None = None, int8_max_seconds: float | None = None) -> None:
    """Convert a checkpoint or ONNX to TFLite (fp32/fp16/dynamic/int8/full-int8) and prove the landmarks did not move."""
    import os
    from pathlib import Path

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info lines are not for users
    from .export.pipeline import ConvertConfig, convert as run_convert
    from .options import parse_list, parse_triple
    from .progress import ProgressBar
    from .quant.budget import Int8Budget
    from .quant.recipes import parse_recipes
    from .report import format_convert, to_json

    budget = Int8Budget(max_shift_px=max_shift, max_p99_px=max_shift_p99, max_nme_increase=max_nme_increase,
                        max_float_ops=max_float_ops, max_slowdown=max_slowdown)
    cfg = ConvertConfig(
        model=Path(model), out_dir=Path(out), formats=formats, int8=int8, calib=calib, calib_count=calib_count,
        val_images=val_images, eval_data=eval_data, size_budget=size_budget, name=name, width=width,
        color=color.upper() if color else None, mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"),
        keep_onnx=keep_onnx, seed=seed, budget=budget, int8_methods=parse_recipes(int8_methods) if int8_methods else None,
        int8_max_seconds=int8_max_seconds, reference=Path(reference) if reference else None,
        activation=activation, bn8=None if bn8 is None else bn8 == "on", reference_onnx=Path(reference_onnx) if reference_onnx else None,
        model_class=model_class, model_args=model_args, output_index=output_index, output_scale=output_scale,
    )
    with ProgressBar("convert", total=7 if eval_data else 6) as bar:
        def progress(stage: str, seconds: float | None) -> None:
            if seconds is None:
                bar.note(stage)
                return
            if not stage.startswith("tflite "):
                bar.advance()
            bar.write(f"convert: {stage} {seconds:.1f} s")

        report = run_convert(cfg, progress)
    click.echo(to_json(report) if as_json else format_convert(report))
    report.raise_for_budgets()


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts to measure.")
@click.option("--runs", default=100, show_default=True, type=int, help="Timed single-face runs per model, thread count and round.")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed runs before each round.")
@click.option("--repeats", default=3, show_default=True, type=int, help="Interleaved rounds (ratios are their median).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="PyTorch checkpoint to compare against (default: a checkpoint among MODELS, or the one the sidecar names).")
@click.option("--in-process", is_flag=True, help="Run every model in this process (faster start, no per-model RSS).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the input crop and of a built reference.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON result to this file.")
@friendly
def bench(models: tuple[str, ...], threads: str, runs: int, warmup: int, repeats: int, reference: str | None,
          in_process: bool, seed: int, as_json: bool, out: str | None) -> None:
    """Host latency of MODEL... (.pth/.onnx/.tflite), with ratios to the same-run PyTorch reference."""
    from pathlib import Path

    from .bench.host import BenchConfig, benchmark
    from .io import atomic_write_text
    from .options import parse_list
    from .progress import ProgressBar
    from .report import format_bench, to_json

    cfg = BenchConfig(threads=parse_list(threads, "--threads", int, example="1,2") or (), runs=runs, warmup=warmup, repeats=repeats,
                      reference=Path(reference) if reference else None, isolate=not in_process, seed=seed)
    with ProgressBar("bench") as bar:
        result = benchmark(list(models), cfg, progress=lambda done, total, what: bar.show(done, total, what))
    text = to_json(result)
    if out:
        atomic_write_text(out, text + "\n")
    click.echo(text if as_json else format_bench(result))


@main.command("bench-arm")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--serial", envvar="ANDROID_SERIAL",
              help="adb serial, or several as a,b,c to measure those devices in parallel (default: the only device attached; env ANDROID_SERIAL).")
@click.option("--all-devices", is_flag=True, help="Measure on every attached adb device in parallel (each device's runs in turn).")
@click.option("--benchmark-model", "benchmark_model", envvar="BENCHMARK_MODEL", type=click.Path(dir_okay=False),
              help="TFLite benchmark_model binary for the device's ABI (env BENCHMARK_MODEL); see android_bench/README.md.")
@click.option("--threads", default="1,4", show_default=True, help="Comma-separated thread counts, each a separate run.")
@click.option("--runs", default=50, show_default=True, type=int, help="Timed runs (benchmark_model --num_runs).")
@click.option("--warmup", default=5, show_default=True, type=int, help="Warm-up runs (--warmup_runs).")
@click.option("--op-profiling", is_flag=True, help="Also pass --enable_op_profiling=true.")
@click.option("--no-xnnpack", is_flag=True, help="Run without the XNNPACK delegate.")
@click.option("--no-taskset", is_flag=True, help="Do not pin benchmark_model to the big cores.")
@click.option("--out", "out_dir", default="out/bench-arm", show_default=True, type=click.Path(file_okay=False),
              help="Folder for one JSON result per model (and device).")
@click.option("--adb", envvar="ADB", help="adb executable (default: adb on PATH; env ADB).")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds allowed per benchmark_model run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def bench_arm_command(models: tuple[str, ...], serial: str | None, all_devices: bool, benchmark_model: str | None, threads: str,
                      runs: int, warmup: int, op_profiling: bool, no_xnnpack: bool, no_taskset: bool, out_dir: str,
                      adb: str | None, timeout: float, as_json: bool) -> None:
    """Latency of .tflite MODELs on ARM phones over adb with TFLite's benchmark_model (big cores).

    With several devices (--serial a,b,c or --all-devices) they run in parallel and one table
    shows device x model x threads; a device that fails is reported in its row, the others
    finish, and the exit status is 8 if any device failed.
    """
    from pathlib import Path

    from .bench.adb import BENCHMARK_MODEL_HINT, BenchArmConfig, BenchFarmConfig, DeviceBenchConfig, bench_arm, bench_arm_devices
    from click.core import ParameterSource

    from .errors import DeviceError, UsageError
    from .options import parse_list
    from .report import format_bench_arm, format_bench_arm_devices, to_json

    if not benchmark_model:
        raise UsageError(f"no benchmark_model binary given: {BENCHMARK_MODEL_HINT}")
    serials = parse_list(serial or None, "--serial", example="emulator-5554,R58M123") or ()
    bench = DeviceBenchConfig(benchmark_model=Path(benchmark_model),
                              threads=parse_list(threads, "--threads", int, minimum=1, example="1,4") or (),
                              warmup_runs=warmup, num_runs=runs, use_xnnpack=not no_xnnpack,
                              op_profiling=op_profiling, taskset=not no_taskset, timeout_s=timeout)
    common = {"models": tuple(Path(m) for m in models), "adb": adb, "out_dir": Path(out_dir), "bench": bench}
    if all_devices and serials and click.get_current_context().get_parameter_source("serial") == ParameterSource.COMMANDLINE:
        raise UsageError("pass either --serial a,b,c or --all-devices, not both")  # ANDROID_SERIAL alone is overridden
    if all_devices or len(serials) > 1:
        farm = bench_arm_devices(BenchFarmConfig(serials=() if all_devices else serials, all_devices=all_devices, **common),
                                 progress=lambda msg: click.echo(msg, err=True))
        click.echo(to_json(farm) if as_json else format_bench_arm_devices(farm))
        if farm.failed:
            raise DeviceError(f"{len(farm.failed)} of {len(farm.devices)} devices failed: "
                              + "; ".join(f"{o.serial}: {o.error or 'a benchmark_model run failed (see its row)'}" for o in farm.failed))
        return
    result = bench_arm(BenchArmConfig(serial=serials[0] if serials else None, **common),
                       progress=lambda msg: click.echo(msg, err=True))
    click.echo(to_json(result) if as_json else format_bench_arm(result))
    failed = [(Path(r.model).name, t) for r in result.results for t in r.runs if not t.ok]
    if failed:
        name, t = failed[0]
        raise DeviceError(f"benchmark_model failed for {name} at {t.threads} thread(s): {t.parsed.failure_reason}")


@main.command()
@click.option("--baseline", default="models/baselines.json", show_default=True, type=click.Path(dir_okay=False),
              help="Committed baselines to compare against (or to rewrite with --update).")
@click.option("--update", is_flag=True, help="Rewrite the baselines from this run (deliberately; review the diff).")
@click.option("--reuse", is_flag=True, help="Reuse a previous conversion of the same checkpoints (skip convert).")
@click.option("--work-dir", default="out/check", show_default=True, type=click.Path(file_okay=False), help="Where conversions go.")
@click.option("--cache-dir", default="out/reference", show_default=True, type=click.Path(file_okay=False),
              help="Where the seeded reference checkpoints are cached.")
@click.option("--retrain", is_flag=True,
              help="Train the trained references from their seed instead of reading their committed weights "
                   "(models/reference/); with --update, write the new weights there.")
@click.option("--runs", default=40, show_default=True, type=int, help="Timed runs per model and round.")
@click.option("--repeats", default=7, show_default=True, type=int, help="Interleaved benchmark rounds (median of ratios).")
@click.option("--verbose", "-v", is_flag=True, help="List every check, not only those that moved.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly
def check(baseline: str, update: bool, reuse: bool, work_dir: str, cache_dir: str, retrain: bool, runs: int, repeats: int,
          verbose: bool, as_json: bool) -> None:
    """CI gate: size, instructions per inference and accuracy of the reference models vs committed baselines."""
    from pathlib import Path

    from .bench.host import BenchConfig
    from .check import CheckConfig, run_check
    from .report import format_check, to_json

    cfg = CheckConfig(baseline=Path(baseline), update=update, work_dir=Path(work_dir), cache_dir=Path(cache_dir),
                      retrain=retrain, reuse_conversion=reuse, bench=BenchConfig(threads=(1,), runs=runs, warmup=10, repeats=repeats))
    result = run_check(cfg, progress=lambda msg: click.echo(f"[check] {msg}", err=True))
    click.echo(to_json(result) if as_json else format_check(result, verbose=verbose))
    result.raise_for_failures()


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for overlays, predictions.json, output videos and the grid.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions JSON instead of a summary table.")
@click.option("--crop-scale", default=1.2, show_default=True, type=float, help="Crop side / landmark-equivalent box side.")
@click.option("--detector", type=RegistryChoice("pfld_export.detect:DETECTORS"), default="yunet", show_default=True, help="Face detector (mtcnn needs its optional package).")
@click.option("--min-score", type=float, default=None, help="Detector score threshold (default: the detector's own).")
@click.option("--grid", is_flag=True, help="Also write a contact sheet of all overlays (needs --out).")
@click.option("--frame-step", default=1, show_default=True, type=int, help="Videos: predict every N-th frame.")
@click.option("--max-frames", type=int, default=None, help="Videos: stop after predicting N frames.")
@click.option("--threads", type=int, default=None, help="Landmark-model threads (default: the runtime's).")
@_preprocess_options
@friendly
def predict(model: str, inputs: tuple[str, ...], out: str | None, as_json: bool, crop_scale: float, detector: str,
            min_score: float | None, grid: bool, frame_step: int, max_frames: int | None, threads: int | None,
            color: str | None, mean: str | None, std: str | None) -> None:
    """Faces, landmarks and head pose with MODEL (.pth/.onnx/.tflite) on images, folders or videos."""
    import json as _json
    from pathlib import Path

    from .options import parse_triple
    from .predict import PredictConfig
    from .predict import predict as run_predict
    from .report import format_predict

    cfg = PredictConfig(model=Path(model), inputs=tuple(Path(i) for i in inputs), out=Path(out) if out else None,
                        crop_scale=crop_scale, detector=detector, min_score=min_score, grid=grid,
                        frame_step=frame_step, max_frames=max_frames, color=color.upper() if color else None,
                        mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"), threads=threads)
    result = run_predict(cfg)
    if as_json:
        click.echo(_json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(format_predict(result))
    for p in result.problems:
        click.echo(f"skipped {p.where}: {p.reason}", err=True)

@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", default=None, help="Calibration faces: a folder of photos (faces detected) or wflw:DIR / 300w:DIR / synthetic[:N[:SEED]]. Default: synthetic.")
@click.option("--images", default=None, help="Held-out faces the shifts are measured on (folder or spec); default: images held out of --calib.")
@click.option("--calib-count", default=200, show_default=True, type=int, help="Calibration crops to use.")
@click.option("--val-count", default=60, show_default=True, type=int, help="Held-out crops to measure on.")
@click.option("--full-int8", is_flag=True, help="Measure with int8 input/output (the full-int8 format) instead of float I/O.")
@click.option("--leave-one-out", is_flag=True, help="Also measure the full int8 model with each op alone kept float (twice the time).")
@click.option("--equalize", is_flag=True, help="Measure the network after cross-layer equalisation (checkpoints only).")
@click.option("--ranges", "range_method", default="minmax", show_default=True, help="Activation ranges: minmax, mse or percentile:P (e.g. percentile:99.99).")
@click.option("--top", default=20, show_default=True, type=int, help="Ops shown in the table and the chart.")
@click.option("--out", "out", default="out/sensitivity", show_default=True, type=click.Path(file_okay=False), help="Folder for sensitivity.json and sensitivity.png.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for calibration sampling and the hold-out split.")
@click.option("--json", "as_json", is_flag=True, help="Print sensitivity.json's content instead of the table.")
@friendly
def sensitivity(model: str, calib: str | None, images: str | None, calib_count: int, val_count: int, full_int8: bool,
                leave_one_out: bool, equalize: bool, range_method: str, top: int, out: str, seed: int, as_json: bool) -> None:
    """Rank the ops of an int8 conversion by the landmark shift each causes when quantized alone."""
    import os
    from pathlib import Path

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .export.pipeline import sensitivity_inputs
    from .quant.sensitivity import SensitivityConfig, sensitivity as run_sensitivity
    from .progress import ProgressBar
    from .report import format_sensitivity, to_json

    cfg = SensitivityConfig(model=Path(model), out_dir=Path(out), calib=calib, images=images, calib_count=calib_count,
                            val_count=val_count, io_dtype="int8" if full_int8 else "float32", range_method=range_method,
                            leave_one_out=leave_one_out, equalize=equalize, top=top, seed=seed)
    with ProgressBar("sensitivity", unit="model") as bar:
        report = run_sensitivity(cfg, sensitivity_inputs(cfg), lambda done, total, what: bar.show(done, total, what))
    click.echo(to_json(report) if as_json else format_sensitivity(report, top))


@main.command()
@click.option("--teacher", required=True, type=click.Path(dir_okay=False),
              help="The model to imitate: our checkpoint, a PFLD-pytorch checkpoint, .onnx or .tflite (anything eval accepts).")
@click.option("--data", "data", multiple=True,
              help="SPEC[@WEIGHT], repeatable: a folder of face photos (faces found by --detector) or a dataset spec "
                   "(synthetic[:N[:SEED]], wflw:DIR, 300w:DIR; their labels are not used). WEIGHT = share of the "
                   "training samples (default 1)  [default: synthetic:2000]")
@_preprocess_options
@click.option("--width", type=float, default=None, help="Student width multiplier 0.25/0.5/0.75/1.0  [default: 0.25]")
@click.option("--epochs", type=int, default=3, show_default=True, help="Total epochs (with --resume: train until this many are done).")
@click.option("--batch", type=int, default=None, help="Batch size  [default: 32]")
@click.option("--lr", type=float, default=None, help="Adam learning rate  [default: 2e-3]")
@click.option("--loss", type=RegistryChoice("pfld_export.loss:LOSSES"), default=None, help="pfld weights by the teacher-derived pose  [default: pfld]")
@click.option("--schedule", type=RegistryChoice("pfld_export.train:SCHEDULES"), default=None, help="Learning-rate schedule  [default: cosine]")
@click.option("--val-fraction", type=float, default=None, help="Share of each source's images held out; val NME = agreement with the teacher  [default: 0.1]")
@click.option("--detector", type=RegistryChoice("pfld_export.detect:DETECTORS"), default="yunet", show_default=True, help="Face detector for photo folders.")
@click.option("--crop-scale", default=1.2, show_default=True, type=float, help="Teacher crop side / the detector's landmark-equivalent box.")
@click.option("--no-refine", is_flag=True, help="Label from the detector crop alone (default: a second teacher look at the box of its own points).")
@click.option("--no-augment", is_flag=True, help="Plain crops (no rotation/shift/scale/mirror/colour/blur/occlusion).")
@click.option("--out", default="out/distil", show_default=True, type=click.Path(file_okay=False),
              help="Folder for best.pth, last.pth, history.json and the cached teacher labels.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue a distil run from its last.pth.")
@click.option("--seed", type=int, default=None, help="Seed for weights, split, mixing, order and augmentation  [default: 0]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto = CUDA if present.")
@click.option("--workers", type=click.IntRange(0, 1), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="torch threads while training  [default: as train]")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where generated synthetic sets are kept.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@friendly
def distil(teacher: str, data: tuple[str, ...], color: str | None, mean: str | None, std: str | None, width: float | None,
           epochs: int, batch: int | None, lr: float | None, loss: str | None, schedule: str | None, val_fraction: float | None,
           detector: str, crop_scale: float, no_refine: bool, no_augment: bool, out: str, resume: str | None,
           seed: int | None, device: str, workers: int, threads: int | None, cache_dir: str | None, as_json: bool) -> None:
    """Train a PFLD student to reproduce TEACHER's landmarks on unlabelled faces (no annotations needed)."""
    from pathlib import Path

    from .distil import DEFAULT_DATA, DistilConfig, distil as run_distil
    from .options import parse_triple
    from .progress import ProgressBar, labelling_progress, training_progress
    from .report import format_distil, to_json

    cfg = DistilConfig(
        teacher=Path(teacher), data=data or DEFAULT_DATA, out=Path(out), width=width, color=color.upper() if color else None,
        mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"), epochs=epochs, batch=batch, lr=lr, loss=loss,
        schedule=schedule, seed=seed, val_fraction=val_fraction, detector=detector, crop_scale=crop_scale,
        refine=not no_refine, augment=False if no_augment else None, resume=Path(resume) if resume else None,
        device=device, workers=workers, threads=threads, cache_dir=Path(cache_dir) if cache_dir else None,
    )
    bar = ProgressBar()
    try:
        result = run_distil(cfg, training_progress("distil", bar), labelling_progress(bar))
    except KeyboardInterrupt:
        last = Path(out) / "last.pth"
        click.echo(f"interrupted: resumable checkpoint saved at {last}; continue with --resume {last}"
                   if last.exists() else "interrupted", err=True)
        sys.exit(130)
    finally:
        bar.close()
    click.echo(to_json(result) if as_json else format_distil(result))
@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--invokes", default=3, show_default=True, type=click.IntRange(1, None), help="Counted invokes per model (median reported).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0, None), help="Invokes run first and not counted.")
@click.option("--arm", is_flag=True, help="Count aarch64 instructions on the ARM cost kit (qemu, a core without dot-product) instead of x86.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def cost(models: tuple[str, ...], invokes: int, warmup: int, arm: bool, out_file: str | None, as_json: bool) -> None:
    """Instructions per invoke() of .tflite models (callgrind on x86, or the ARM cost kit; 1 thread): a load-independent cost figure."""
    from .bench.cost import CostConfig, arm_instructions_per_invoke, instructions_per_invoke
    from .io import atomic_write_text
    from .report import format_cost, to_json

    count = arm_instructions_per_invoke if arm else instructions_per_invoke
    result = count(models, CostConfig(invokes=invokes, warmup=warmup))
    if out_file:
        atomic_write_text(out_file, to_json(result) + "\n")
    click.echo(to_json(result) if as_json else format_cost(result))


if __name__ == "__main__":
    main()
