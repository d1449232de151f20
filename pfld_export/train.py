"""Train PFLD: `train(TrainConfig) -> TrainResult`, writing `<out>/best.pth`, `last.pth`, `history.json`.

Adam with the paper's defaults (betas 0.9/0.999, lr 1e-4, weight decay 1e-6, batch 256) on
real data. The synthetic set is a different regime (a few thousand easy faces, a 3-epoch demo on
2 CPU cores), so it gets its own documented defaults in `DEFAULTS` (higher lr, smaller batch,
so that the demo takes a few hundred steps). The lr schedule (`schedule`) is a short linear
warm-up then cosine decay to 1 % per step ("cosine", default), or "constant" (PFLD-pytorch's
ReduceLROnPlateau with patience 40 is effectively constant for runs this short).

Run-defining options left at None take the defaults (or, with `resume`, the resumed run's values;
with `init`, the init checkpoint's width / conv2 / head_bn). Validation NME is measured every epoch
with `evaluate.evaluate` through a `TorchPredictor` around the in-memory network, on a held-out
split (`val_fraction`) or a separate `val_data` spec.

Checkpoints are our format (`checkpoint.save_checkpoint`): metadata carries the resolved config,
data spec, epoch and metrics; `extra` carries what `resume` needs (optimizer state, schedule
position, epoch, RNG state, history) as tensors and plain Python only, so they load with
`torch.load(weights_only=True)`. Every sample is a pure function of (seed, epoch, index) (see
`data/dataset.py`) and the batch order of (seed, epoch), so a run resumed from an epoch boundary
reproduces the uninterrupted run's weights. Ctrl-C saves a resumable `last.pth` (the interrupted
epoch is redone from its start on resume, over the partly-trained weights) and re-raises.
Resuming with a larger `--epochs` re-plans the cosine schedule over the new total.

A fresh FC head (training from scratch, or `--init` with another point count) starts at the mean
training shape (`init_head`), so `initial_val_nme` is the mean-shape baseline, not a random net's.

Under torchrun the same function runs in every process: DDP over each process's share of every
global batch, process 0 writing and validating (`distributed.py` has the decisions and why).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointMeta, LoadedModel, load_checkpoint, save_checkpoint
from .device import Device, auto_threads, check_device, check_threads, resolve_device
from .distributed import (DistContext, ShardedBatches, all_sum, check_global_batch, context_from_env, from_main,
                          process_device, process_group, rank_seed, wrap)
from .errors import CheckpointError, DataError, UsageError
from .io import atomic_write_json
from .layouts import PointLayout, get_layout
from .loss import LossOutput, class_frequencies, get_loss
from .model import ACTIVATIONS, PFLD, WIDTHS, AuxiliaryNet, LandmarkModel, build_model
from .preprocess import Preprocess
from .stage0 import resolve as resolve_checkpoint

# Defaults for run-defining options left at None, by data kind (the spec's prefix). Real data:
# the paper. Synthetic: measured for the 3-epoch demo on 2 CPU cores (benchmarks/training.md).
DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"lr": 2e-3, "batch": 32, "count": 3000},
    "wflw": {"lr": 1e-4, "batch": 256},
    "300w": {"lr": 1e-4, "batch": 256},
}
_FALLBACK = {"lr": 1e-4, "batch": 256}
SCHEDULES = ("cosine", "constant")
ATTRIBUTE_WEIGHTING = ("batch", "dataset")

# Options that define a run: a resumed run keeps them; None means "default / as saved".
_RUN_KEYS = ("data", "val_data", "val_fraction", "width", "points", "conv2", "batch", "lr", "weight_decay",
             "loss", "schedule", "warmup_steps", "seed", "augment", "attribute_weighting", "init", "int8_noise", "activation")


@dataclass
class TrainConfig:
    """Everything `pfld-export train` can set. None = default (see the module docstring)."""

    out: Path = Path("out/train")
    data: str | None = None  # wflw:DIR | 300w:DIR | synthetic[:N[:SEED]]; None: "synthetic"
    val_data: str | None = None  # a separate validation spec; else a held-out split of `data`
    val_fraction: float | None = None  # None: 0.1
    width: float | None = None  # None: 0.25, or the --init checkpoint's (width is a property of weights)
    points: int | None = None  # None: the data layout's point count (must match it)
    conv2: str | None = None  # "full" | "depthwise"; None: "full", or --init's
    epochs: int = 3  # total epochs (with --resume: train until this many are done)
    batch: int | None = None
    lr: float | None = None
    weight_decay: float | None = None  # None: 1e-6
    loss: str | None = None  # pfld | l2 | wing; None: pfld
    schedule: str | None = None  # cosine | constant; None: cosine
    warmup_steps: int | None = None  # None: min(100, 5 % of all steps)
    resume: Path | None = None
    init: Path | None = None
    seed: int | None = None  # None: 0
    device: Device = "auto"
    workers: int = 0  # DataLoader workers: 0 or 1 on a 2-core machine
    threads: int | None = None  # torch threads while training (restored after); None: `auto_threads()`
    augment: bool | None = None  # None: True
    attribute_weighting: str | None = None  # batch (the paper) | dataset; None: batch
    int8_noise: float | None = None  # int8 steps of rounding noise at every requantized tensor (quant.noise.add_int8_noise); None: 0, off
    activation: str | None = None  # relu (PFLD-pytorch) | relu6 (bounded: tighter int8 ranges); None: relu, or --init's
    cache_dir: Path | None = None  # where load_spec keeps generated synthetic sets
    strict: bool = False  # refuse datasets with unusable annotation lines
    eval_initial: bool = True  # measure the untrained network's val NME first (epoch 0)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.width is not None and self.width not in WIDTHS:
            raise UsageError(f"--width {self.width} is not supported; choose one of {', '.join(map(str, WIDTHS))}")
        if self.points is not None and self.points < 1:
            raise UsageError(f"--points must be a positive count, got {self.points}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch is not None and self.batch < 2:
            raise UsageError(f"--batch must be at least 2 (batch norm needs 2 faces per batch), got {self.batch}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise UsageError(f"--lr must be in (0, 1), got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.val_fraction is not None and not (0 <= self.val_fraction < 1):
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        check_threads(self.threads)
        if self.workers not in (0, 1):
            raise UsageError(f"--workers must be 0 or 1 (2-core machines), got {self.workers}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.attribute_weighting is not None and self.attribute_weighting not in ATTRIBUTE_WEIGHTING:
            raise UsageError(f"attribute_weighting must be one of {ATTRIBUTE_WEIGHTING}, got {self.attribute_weighting!r}")
        check_device(self.device)
        if self.resume is not None and self.init is not None:
            raise UsageError("--resume continues a run and --init starts a new one from weights; pass only one")
        if self.loss is not None:
            get_loss(self.loss)  # raises with the list of names
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise UsageError(f"--activation {self.activation!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
        if self.int8_noise is not None and not 0 <= self.int8_noise <= 64:
            raise UsageError(f"--int8-noise must be in [0, 64] int8 steps (8 is the measured choice), got {self.int8_noise}")


@dataclass
class TrainEvent:
    """Progress report: kind is "setup" (message), "preload" (step/steps faces), "step",
    "epoch" (summary in `record`)."""

    kind: str
    epoch: int = 0  # 1-based
    epochs: int = 0
    step: int = 0  # 1-based within the epoch
    steps: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    message: str = ""
    record: dict[str, Any] | None = None


@dataclass
class TrainResult:
    """What `train` made: checkpoint paths, per-epoch history, the best validation NME."""

    best_checkpoint: Path
    last_checkpoint: Path
    history_file: Path
    history: list[dict[str, Any]]
    best_val_nme: float | None
    best_epoch: int
    initial_val_nme: float | None
    wall_s: float
    config: dict[str, Any] = field(default_factory=dict)
    train_faces: int = 0
    val_faces: int = 0
    device: str = "cpu"
    processes: int = 1  # torchrun processes that trained together (the batch is global)


Progress = Callable[[TrainEvent], None]
# One optimisation step: (model, aux, batch, loss name, optimizer, device, class_freq) -> LossOutput.
StepFn = Callable[..., LossOutput]


@dataclass
class PreparedData:
    """Faces made elsewhere (e.g. teacher-labelled by `distil`): `train` uses them instead of
    loading `cfg.data`, which then only names them (metadata, and the --resume consistency check).
    `provenance` goes into the checkpoint metadata of a fresh run."""

    train: list[Any]
    val: list[Any]
    layout: PointLayout
    description: str
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Configuration resolution


def data_kind(spec: str) -> str:
    """"wflw:/data/WFLW" -> "wflw"; "synthetic:500" -> "synthetic"."""
    return spec.split(":", 1)[0].strip().lower()


def _resolve(cfg: TrainConfig, saved: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill None options: from the resumed run (`saved`), else from the defaults table."""
    run = {k: getattr(cfg, k) for k in _RUN_KEYS}
    run["init"] = str(cfg.init) if cfg.init is not None else None
    if saved is not None:
        for k in _RUN_KEYS:
            if k == "init":
                run[k] = saved.get(k)
                continue
            if run[k] is not None and k in saved and saved[k] != run[k]:
                raise UsageError(
                    f"--resume continues the saved run, which has {k}={saved[k]!r}, but {k}={run[k]!r} was given; "
                    "drop that option, or start a new run with --init CKPT to fine-tune from these weights"
                )
            if run[k] is None:
                run[k] = saved.get(k)
        return run
    if run["data"] is None:
        run["data"] = "synthetic"
    kind = data_kind(run["data"])
    d = DEFAULTS.get(kind, _FALLBACK)
    if run["data"] == "synthetic" and "count" in d:
        # The bare spec means "the demo set": sized for the 3-epoch demo, not load_spec's default.
        run["data"] = f"synthetic:{d['count']}"
    run["lr"] = run["lr"] if run["lr"] is not None else d["lr"]
    run["batch"] = run["batch"] if run["batch"] is not None else d["batch"]
    for k, v in (("val_fraction", 0.1), ("weight_decay", 1e-6), ("loss", "pfld"), ("schedule", "cosine"),
                 ("seed", 0), ("augment", True), ("attribute_weighting", "batch"), ("int8_noise", 0.0)):
        if run[k] is None:
            run[k] = v
    return run


# --------------------------------------------------------------------------------------------
# Data


def _as_layout(layout: Any) -> PointLayout:
    return layout if isinstance(layout, PointLayout) else get_layout(layout)


def load_data(run: Mapping[str, Any], cfg: TrainConfig) -> tuple[list[Any], list[Any], PointLayout, str]:
    """(train records, val records, layout, description) for a resolved run."""
    from .data.specs import load_spec, split

    data = load_spec(run["data"], strict=cfg.strict, cache_dir=cfg.cache_dir)
    layout = _as_layout(data.layout)
    if run["val_data"]:
        val = load_spec(run["val_data"], strict=cfg.strict, cache_dir=cfg.cache_dir)
        if _as_layout(val.layout).num_points != layout.num_points:
            raise UsageError(
                f"--val-data {run['val_data']} has {_as_layout(val.layout).num_points} points but --data has "
                f"{layout.num_points}; validate on the same layout"
            )
        train_records, val_records = list(data.records), list(val.records)
    elif run["val_fraction"] > 0:
        train_records, val_records = split(data.records, run["val_fraction"], run["seed"])
        train_records, val_records = list(train_records), list(val_records)
    else:
        train_records, val_records = list(data.records), []
    if len(train_records) < 2:
        raise DataError(f"--data {run['data']} left {len(train_records)} training faces; training needs at least 2")
    return train_records, val_records, layout, getattr(data, "description", run["data"])


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch). A trailing batch of
    one face is dropped: batch norm cannot normalise a single 1x1 feature (aux net, head)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).tolist()
    out = [order[i : i + batch] for i in range(0, n, batch)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


# --------------------------------------------------------------------------------------------
# The step, the schedule, validation


def lr_at(step: int, total: int, base_lr: float, schedule: str, warmup: int) -> float:
    """Learning rate before optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def batch_loss(
    model: nn.Module,
    aux: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_name: str,
    device: torch.device = torch.device("cpu"),
    class_freq: torch.Tensor | None = None,
) -> LossOutput:
    """The loss of `model` (and `aux`, for losses that use pose) on a batch from `FaceDataset`."""
    fn, uses_pose = get_loss(loss_name)
    x = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device)
    tap, out = model(x)
    angles = aux(tap) if uses_pose else None
    return fn(
        out.reshape(out.shape[0], -1, 2), target, angles, batch["pose"].to(device), batch["attributes"].to(device),
        pose_valid=batch["pose_valid"].to(device), class_freq=class_freq,
    )


def train_step(
    model: nn.Module,
    aux: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_name: str,
    optimizer: torch.optim.Optimizer,
    device: torch.device = torch.device("cpu"),
    class_freq: torch.Tensor | None = None,
) -> LossOutput:
    """One optimisation step on a batch from `FaceDataset` (the networks must be in train mode;
    under DDP they are the wrapped networks, and backward averages the processes' gradients)."""
    lo = batch_loss(model, aux, batch, loss_name, device, class_freq)
    optimizer.zero_grad(set_to_none=True)
    lo.total.backward()
    optimizer.step()
    return lo


class _OnDevice(nn.Module):
    """Feed a CPU batch to a network on another device and bring landmarks back (TorchPredictor
    works in numpy on the CPU)."""

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device = net, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.device)).cpu()


def validation_nme(model: PFLD, preprocess: Preprocess, records: Sequence[Any], device: torch.device, path: Path) -> float:
    """Mean NME of the in-memory network on `records` via `evaluate.evaluate` (model left in eval
    mode; the caller switches back)."""
    from .evaluate import EvalConfig, evaluate
    from .runtime import TorchPredictor

    net: nn.Module = LandmarkModel(model).eval()
    if device.type != "cpu":
        net = _OnDevice(net, device)
    pred = TorchPredictor(path=path, preprocess=preprocess, module=net, num_points=model.config.points, name="training")
    return float(evaluate(pred, list(records), EvalConfig(), progress=None).nme_mean)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _plain(v: Any) -> Any:
    """Config values -> plain Python for metadata (Paths become strings)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class _State:
    """The mutable state of a run, in one place (what a checkpoint stores)."""

    model: PFLD
    aux: AuxiliaryNet
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess
    run: dict[str, Any]
    epoch: int = 0  # completed epochs
    global_step: int = 0
    total_steps: int = 0
    warmup: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_nme: float | None = None
    best_epoch: int = 0
    initial_val_nme: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1  # processes training together (a resume needs the same count)


def _meta(st: _State, metrics: dict[str, Any]) -> CheckpointMeta:
    training = {"config": _plain(st.run), "data": st.run["data"], "val_data": st.run["val_data"], "epoch": st.epoch,
                **st.data_info}
    return CheckpointMeta(model=st.model.config, preprocess=st.preprocess, source_format="pfld-export",
                          provenance=dict(st.provenance), metrics=_plain(metrics), training=training)


def _extra(st: _State, interrupted: bool) -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "epoch": st.epoch,
        "optimizer": st.optimizer.state_dict(),
        "scheduler": {"kind": st.run["schedule"], "step": st.global_step, "total": st.total_steps, "warmup": st.warmup},
        "rng": rng,
        "history": _plain(st.history),
        "best_val_nme": st.best_val_nme,
        "best_epoch": st.best_epoch,
        "initial_val_nme": st.initial_val_nme,
        "interrupted": interrupted,
        "world_size": st.world_size,
    }


def _save(st: _State, path: Path, metrics: dict[str, Any], interrupted: bool = False) -> Path:
    # CUDA tensors are fine: load_checkpoint maps everything to the CPU.
    return save_checkpoint(path, st.model, _meta(st, metrics), st.aux, extra=_extra(st, interrupted))


def _write_history(st: _State, path: Path, wall_s: float) -> None:
    atomic_write_json(path, {
        "config": _plain(st.run), "epochs": st.history, "best_val_nme": st.best_val_nme, "best_epoch": st.best_epoch,
        "initial_val_nme": st.initial_val_nme, "wall_s": round(wall_s, 2), **st.data_info,
    })


# --------------------------------------------------------------------------------------------
# Building the networks


def _check_init(init: Path, loaded: LoadedModel, run: Mapping[str, Any]) -> None:
    """Refuse options that contradict the init weights (before any data is loaded)."""
    mc = loaded.meta.model
    if run["width"] is not None and float(run["width"]) != mc.width:
        raise UsageError(
            f"--width {run['width']} contradicts --init {init}, whose weights have width {mc.width}: width is a property "
            "of trained weights; drop --width (it is taken from the init checkpoint) or train from scratch without --init"
        )
    if run.get("activation") is not None and run["activation"] != mc.activation:
        raise UsageError(
            f"--activation {run['activation']} contradicts --init {init}, whose network uses {mc.activation}; drop --activation"
        )
    if run["conv2"] is not None and run["conv2"] != mc.conv2:
        raise UsageError(
            f"--conv2 {run['conv2']} contradicts --init {init}, whose weights have conv2={mc.conv2}; drop --conv2"
        )


def _build_from_init(init: Path, loaded: LoadedModel, run: dict[str, Any], layout: PointLayout) -> tuple[PFLD, AuxiliaryNet, Preprocess, dict[str, Any]]:
    _check_init(init, loaded, run)
    mc = loaded.meta.model
    run["width"], run["conv2"], run["activation"] = mc.width, mc.conv2, mc.activation
    # The init's whole variant (per-layer channels, activation, head) carries over, not only its width.
    model = PFLD(dataclasses.replace(mc, points=layout.num_points))
    aux = loaded.aux if loaded.aux is not None else AuxiliaryNet(model.tap_channels, act=mc.activation)
    sd = loaded.model.state_dict()
    new_head = mc.points != layout.num_points
    if new_head:
        # A different point count: keep the backbone, start a fresh FC (the only point-sized layer).
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise CheckpointError(f"--init {init}: weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # The weights were trained with the init checkpoint's input normalisation: keep it.
    pre = Preprocess.from_dict({**loaded.meta.preprocess.to_dict(), "layout": layout.name})
    info = {"init": str(init), "init_points": mc.points, "new_head": new_head, "init_source_format": loaded.meta.source_format,
            "init_had_aux": loaded.aux is not None}
    return model, aux, pre, info


def mean_shape(records: Sequence[Any], crop_scale: float = 1.2) -> np.ndarray:
    """Mean landmark position [P, 2] in 0..1 crop units over plain 1.2x landmark-box crops."""
    acc = None
    for r in records:
        p = np.asarray(r.points, np.float64)
        lo, hi = p.min(0), p.max(0)
        side = float((hi - lo).max()) * crop_scale
        q = (p - ((lo + hi) / 2.0 - side / 2.0)) / side
        acc = q if acc is None else acc + q
    return acc / max(1, len(records)) if acc is not None else np.full((0, 2), 0.5)


def init_head(model: PFLD, shape01: np.ndarray) -> None:
    """Start a fresh FC head at the mean shape: bias = mean landmarks, weights scaled by 0.1.

    A randomly initialised head starts ~0.5 crop widths off on every point, and the first
    hundreds of steps go into learning the average face; starting there spends them on the
    faces instead (same network, same loss; it matters for short runs such as the demo).
    """
    with torch.no_grad():
        model.fc.bias.copy_(torch.from_numpy(np.asarray(shape01, np.float32).reshape(-1)))
        model.fc.weight.mul_(0.1)


def _build(run: dict[str, Any], layout: PointLayout, init: LoadedModel | None) -> tuple[PFLD, AuxiliaryNet, Preprocess, dict[str, Any]]:
    if run["points"] is not None and int(run["points"]) != layout.num_points:
        raise UsageError(
            f"--points {run['points']} but the data has {layout.num_points} points ({layout.name}); "
            "the point count comes from the data: drop --points or use data with that layout"
        )
    run["points"] = layout.num_points
    if init is not None:
        return _build_from_init(Path(run["init"]), init, run, layout)
    run["width"] = 0.25 if run["width"] is None else float(run["width"])
    run["conv2"] = run["conv2"] or "full"
    run["activation"] = run.get("activation") or "relu"
    model, aux = build_model(run["width"], layout.num_points, run["conv2"], activation=run["activation"])
    return model, aux, Preprocess(layout=layout.name), {}


# --------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, progress: Progress | None = None, step: StepFn | None = None,
          prepared: PreparedData | None = None) -> TrainResult:
    """Train (or resume, or fine-tune) a PFLD network; see the module docstring.

    Writes `<out>/best.pth` (lowest validation NME; lowest training loss without validation),
    `<out>/last.pth` (resumable) and `<out>/history.json`. Raises typed `PfldError`s for bad
    input; re-raises KeyboardInterrupt after saving a resumable `last.pth`.

    Under torchrun (WORLD_SIZE etc. in the environment) every process calls this; they train one
    network with DDP over shards of each global batch (`distributed.py`), and only process 0
    writes files or calls `progress`. `step` replaces `train_step` (same signature; it is given
    the DDP-wrapped networks when several processes train). `prepared` replaces loading
    `cfg.data` (see `PreparedData`).
    """
    prev_threads = torch.get_num_threads()
    threads = cfg.threads or auto_threads()
    if threads:
        # Thread count is process state in torch: set it for the run, give it back afterwards.
        torch.set_num_threads(threads)
    try:
        ctx = context_from_env()
        device = process_device(resolve_device(cfg.device), ctx)
        with process_group(ctx, device):
            return _train(cfg, progress if ctx.is_main else None, step or train_step, ctx, device, prepared)
    finally:
        torch.set_num_threads(prev_threads)


def _load_resume(cfg: TrainConfig, ctx: DistContext) -> LoadedModel | None:
    """The --resume checkpoint, refused unless it holds training state from the same process count."""
    if cfg.resume is None:
        return None
    resumed = load_checkpoint(cfg.resume)
    if "optimizer" not in resumed.extra or not resumed.meta.training.get("config"):
        raise UsageError(
            f"{cfg.resume} holds no training state (not a `pfld-export train` checkpoint); "
            f"use --init {cfg.resume} to fine-tune from its weights instead"
        )
    saved_world = int(resumed.extra.get("world_size", 1))
    if saved_world != ctx.world_size:
        # Each process normalises its own shard of the batch and draws its own noise: another
        # process count is another run, not a continuation of this one.
        raise UsageError(
            f"{cfg.resume} was trained by {saved_world} process(es) and this run has {ctx.world_size}; resume it with "
            f"the same count (torchrun --nproc_per_node/--nnodes giving {saved_world} in all"
            f"{', or no torchrun' if saved_world == 1 else ''}), or start a new run from its weights with --init {cfg.resume}"
        )
    done = int(resumed.extra.get("epoch", 0))
    if done >= cfg.epochs:
        raise UsageError(f"{cfg.resume} has already trained {done} epochs; pass --epochs larger than {done} to continue")
    return resumed


def _networks(run: dict[str, Any], layout: PointLayout, resumed: LoadedModel | None, init_ckpt: LoadedModel | None,
              train_records: Sequence[Any], resume_path: Path | None,
              data_provenance: dict[str, Any]) -> tuple[PFLD, AuxiliaryNet, Preprocess, dict[str, Any]]:
    """(model, aux, preprocess, provenance) for a resumed, fine-tuned or fresh run; `data_provenance`
    (where prepared faces came from) joins a fresh run's provenance."""
    if resumed is not None:
        aux = resumed.aux if resumed.aux is not None else AuxiliaryNet(resumed.model.tap_channels)
        if resumed.meta.model.points != layout.num_points:
            raise UsageError(f"{resume_path} predicts {resumed.meta.model.points} points but the data has {layout.num_points}")
        provenance = dict(resumed.meta.provenance)
        provenance.pop("saved_at", None)
        provenance["resumed_from"] = str(resume_path)
        model, preprocess = resumed.model, resumed.meta.preprocess
    else:
        model, aux, preprocess, init_info = _build(run, layout, init_ckpt)
        provenance = {"trained_by": "pfld-export train", **init_info, **data_provenance}
        if init_info.get("new_head", True):  # from scratch, or --init with another point count
            init_head(model, mean_shape(train_records))
    if run.get("int8_noise"):  # None in runs saved before the option existed: off
        from .quant.noise import add_int8_noise

        add_int8_noise(model, float(run["int8_noise"]))
    return model, aux, preprocess, provenance


def _restore(st: _State, resumed: LoadedModel, steps_per_epoch: int) -> None:
    """Put a resumed run's optimizer, schedule position, history and RNG back into `st`."""
    ex = resumed.extra
    st.epoch = int(ex.get("epoch", 0))
    st.optimizer.load_state_dict(ex["optimizer"])
    sch = ex.get("scheduler", {})
    st.global_step = int(sch.get("step", st.epoch * steps_per_epoch))
    st.warmup = int(sch.get("warmup", st.warmup))
    st.history = [dict(h) for h in ex.get("history", [])]
    st.best_val_nme = ex.get("best_val_nme")
    st.best_epoch = int(ex.get("best_epoch", 0))
    st.initial_val_nme = ex.get("initial_val_nme")
    rng = ex.get("rng", {})
    if "torch" in rng and st.world_size == 1:  # several processes re-seed per epoch (distributed.rank_seed)
        torch.set_rng_state(rng["torch"])


@dataclass
class _Loop:
    """What one epoch needs besides the run state, built once per run."""

    nets: tuple[nn.Module, nn.Module]  # (model, aux) as stepped: DDP-wrapped with several processes
    loader: Any
    sampler: Any  # EpochBatches, or ShardedBatches with several processes
    step: StepFn
    device: torch.device
    class_freq: torch.Tensor | None
    ctx: DistContext
    emit: Callable[[TrainEvent], None]


def _run_epoch(st: _State, loop: _Loop, epoch: int, epochs: int) -> dict[str, Any]:
    """Train one epoch; its history record (losses averaged over every process's faces)."""
    run, ctx = st.run, loop.ctx
    loop.sampler.set_epoch(epoch)
    if ctx.active:
        torch.manual_seed(rank_seed(int(run["seed"]), ctx.rank, epoch))
    n_batches = len(loop.sampler)
    for net in loop.nets:
        net.train()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, l2, angle (each times faces), faces
    for i, batch in enumerate(loop.loader):
        lr = lr_at(st.global_step, st.total_steps, run["lr"], run["schedule"], st.warmup)
        for g in st.optimizer.param_groups:
            g["lr"] = lr
        lo = loop.step(loop.nets[0], loop.nets[1], batch, run["loss"], st.optimizer, loop.device, loop.class_freq)
        # Every process sees the same step loss, so all of them stop together if it diverges.
        v = all_sum([float(lo.total.detach())], ctx, loop.device)[0] / ctx.world_size
        if not math.isfinite(v):
            raise UsageError(f"training diverged at epoch {epoch + 1} step {i + 1} (loss {v}); lower --lr (it is {run['lr']:g})")
        nb = int(batch["image"].shape[0])
        sums[0] += float(lo.total.detach()) * nb
        sums[1] += float(lo.landmark_l2) * nb
        sums[2] += float(lo.angle) * nb if lo.angle is not None else 0.0
        sums[3] += nb
        st.global_step += 1
        loop.emit(TrainEvent("step", epoch=epoch + 1, epochs=epochs, step=i + 1, steps=n_batches, loss=v, lr=lr))
    loss, l2, angle, n_seen = all_sum(sums, ctx, loop.device)
    rec: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": loss / max(1, n_seen),
        "train_l2": l2 / max(1, n_seen),
        "lr": lr_at(st.global_step - 1, st.total_steps, run["lr"], run["schedule"], st.warmup),
        "steps": n_batches,
    }
    if run["loss"] == "pfld":
        rec["train_angle"] = angle / max(1, n_seen)
    return rec


def _validate(st: _State, records: Sequence[Any], loop: _Loop, path: Path) -> float:
    """Validation NME, measured on process 0 and the same figure on every process."""
    nme = validation_nme(st.model, st.preprocess, records, loop.device, path) if loop.ctx.is_main else None
    st.model.train()
    return float(from_main(nme, loop.ctx))


def _train(cfg: TrainConfig, progress: Progress | None, step: StepFn, ctx: DistContext, device: torch.device,
           prepared: PreparedData | None = None) -> TrainResult:
    from torch.utils.data import DataLoader

    from .data.dataset import worker_init

    t0 = time.perf_counter()

    def emit(ev: TrainEvent) -> None:
        if progress is not None:
            progress(ev)

    resumed, run, init_ckpt = _run_settings(cfg, ctx)
    seed = int(run["seed"])
    torch.manual_seed(seed)  # here, never at import: model init and any torch randomness follow --seed

    emit(TrainEvent("setup", message=f"loading {run['data']}"))
    if prepared is None:
        train_records, val_records, layout, description = load_data(run, cfg)
    else:
        train_records, val_records, layout, description = prepared.train, prepared.val, prepared.layout, prepared.description
    st, ds, sampler, class_freq = _training_state(cfg, run, ctx, device, resumed, init_ckpt, (train_records, val_records),
                                                  layout, description, prepared.provenance if prepared else {}, emit)

    # One loader for the run. A worker is a spawned process that lives for the whole run (forked
    # workers hang in OpenCV once the parent has used its thread pool); it gets the dataset once,
    # and the sampler's (epoch, index) keys tell it which augmentation to draw.
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=cfg.workers, worker_init_fn=worker_init,
                        pin_memory=device.type == "cuda",
                        **({"multiprocessing_context": "spawn", "persistent_workers": True} if cfg.workers else {}))
    loop = _Loop(nets=(wrap(st.model, ctx, device), wrap(st.aux, ctx, device)), loader=loader, sampler=sampler, step=step,
                 device=device, class_freq=class_freq, ctx=ctx, emit=emit)
    out = cfg.out
    best_path, last_path, hist_path = out / "best.pth", out / "last.pth", out / "history.json"
    if val_records and cfg.eval_initial and resumed is None:
        emit(TrainEvent("setup", message=f"validating the initial network on {len(val_records)} faces"))
        st.initial_val_nme = _validate(st, val_records, loop, last_path)
    _run_epochs(st, loop, cfg, val_records, (best_path, last_path, hist_path), t0)
    if ctx.is_main and not best_path.exists():  # e.g. a resumed run whose earlier best lives elsewhere
        _save(st, best_path, {"epoch": st.epoch})
    return TrainResult(
        best_checkpoint=best_path, last_checkpoint=last_path, history_file=hist_path, history=st.history,
        best_val_nme=st.best_val_nme, best_epoch=st.best_epoch, initial_val_nme=st.initial_val_nme,
        wall_s=time.perf_counter() - t0, config=_plain(run), train_faces=len(train_records), val_faces=len(val_records),
        device=str(device), processes=ctx.world_size,
    )


def _run_settings(cfg: TrainConfig, ctx: DistContext) -> tuple[Any, dict[str, Any], Any]:
    """The checkpoint resumed from (or None), the run's settings, and the --init checkpoint (or None)."""
    resumed = _load_resume(cfg, ctx)
    run = _resolve(cfg, dict(resumed.meta.training["config"]) if resumed is not None else None)
    check_global_batch(int(run["batch"]), ctx)
    init_ckpt = None
    if resumed is None and run["init"]:
        # A foreign init's open choices (activation...) are measured, as for convert and eval.
        init_ckpt = resolve_checkpoint(run["init"])[0]
        _check_init(Path(run["init"]), init_ckpt, run)
    return resumed, run, init_ckpt


def _training_state(cfg: TrainConfig, run: dict[str, Any], ctx: DistContext, device: torch.device, resumed: Any, init_ckpt: Any,
                    records: tuple[Sequence[Any], Sequence[Any]], layout: Any, description: str, provenance_in: dict[str, Any],
                    emit: Callable[[TrainEvent], None]) -> tuple[_State, Any, Any, torch.Tensor | None]:
    """Networks, optimizer, the cropped training set and its batch order, restored when resuming;
    returns the state, the dataset, the batch sampler and the attribute class frequencies."""
    from .data.augment import AugmentConfig
    from .data.dataset import DatasetConfig, EpochBatches, FaceDataset

    train_records, val_records = records
    seed = int(run["seed"])
    model, aux, preprocess, provenance = _networks(run, layout, resumed, init_ckpt, train_records, cfg.resume,
                                                   provenance_in)
    model.to(device).train()
    aux.to(device).train()

    optimizer = torch.optim.Adam(list(model.parameters()) + list(aux.parameters()), lr=run["lr"],
                                 betas=(0.9, 0.999), weight_decay=run["weight_decay"])
    aug = AugmentConfig() if run["augment"] else None
    emit(TrainEvent("setup", message=f"cropping {len(train_records)} training faces"))
    ds = FaceDataset(train_records, layout, preprocess, DatasetConfig(augment=aug, seed=seed),
                     progress=lambda i, n: emit(TrainEvent("preload", step=i, steps=n)))
    class_freq = (class_frequencies(torch.from_numpy(ds.attribute_matrix())).to(device)
                  if run["attribute_weighting"] == "dataset" else None)

    def batches(e: int) -> list[list[int]]:
        return epoch_batches(len(ds), int(run["batch"]), seed, e)

    sampler = ShardedBatches(batches, len(ds), ctx) if ctx.active else EpochBatches(batches)
    steps_per_epoch = len(sampler)
    data_info = {"train_faces": len(train_records), "val_faces": len(val_records), "layout": layout.name,
                 "data_description": description, "processes": ctx.world_size}
    st = _State(model=model, aux=aux, optimizer=optimizer, preprocess=preprocess, run=run, provenance=provenance,
                data_info=data_info, world_size=ctx.world_size)
    st.total_steps = steps_per_epoch * cfg.epochs
    st.warmup = int(run["warmup_steps"]) if run["warmup_steps"] is not None else min(100, st.total_steps // 20)
    if resumed is not None:
        _restore(st, resumed, steps_per_epoch)
    return st, ds, sampler, class_freq


def _run_epochs(st: _State, loop: _Loop, cfg: TrainConfig, val_records: Sequence[Any], paths: tuple[Path, Path, Path],
                t0: float) -> None:
    """Epochs from `st.epoch` to `cfg.epochs`: train, validate, keep the best, write last.pth and
    the history after each; an interrupt leaves a resumable last.pth."""
    ctx = loop.ctx
    best_path, last_path, hist_path = paths
    best_loss = min(h["train_loss"] for h in st.history) if st.best_val_nme is None and st.history else math.inf
    try:
        for epoch in range(st.epoch, cfg.epochs):
            te = time.perf_counter()
            rec = _run_epoch(st, loop, epoch, cfg.epochs)
            st.epoch = epoch + 1
            if val_records:
                rec["val_nme"] = _validate(st, val_records, loop, last_path)
            rec["seconds"] = round(time.perf_counter() - te, 2)
            st.history.append(rec)
            # Best = lowest validation NME; without a validation set, lowest training loss. Both
            # figures are the same on every process (reduced / broadcast), so is the decision.
            if val_records:
                improved = st.best_val_nme is None or rec["val_nme"] < st.best_val_nme
                if improved:
                    st.best_val_nme = rec["val_nme"]
            else:
                improved = rec["train_loss"] < best_loss
                if improved:
                    best_loss = rec["train_loss"]
            if improved:
                st.best_epoch = st.epoch
            if ctx.is_main:
                metrics = {k: rec[k] for k in ("train_loss", "val_nme") if k in rec} | {"epoch": st.epoch}
                _save(st, last_path, metrics)
                if improved:
                    _save(st, best_path, metrics)
                _write_history(st, hist_path, time.perf_counter() - t0)
            loop.emit(TrainEvent("epoch", epoch=st.epoch, epochs=cfg.epochs, loss=rec["train_loss"], lr=rec["lr"], record=dict(rec)))
    except KeyboardInterrupt:
        # Resumable: weights and optimizer as they are now; `epoch` counts only completed epochs,
        # so --resume redoes the interrupted one.
        if ctx.is_main:
            _save(st, last_path, {"epoch": st.epoch, "interrupted": True}, interrupted=True)
            _write_history(st, hist_path, time.perf_counter() - t0)
        raise


__all__ = [
    "DEFAULTS", "TrainConfig", "TrainEvent", "TrainResult", "StepFn", "PreparedData", "train", "train_step", "batch_loss", "lr_at", "epoch_batches",
    "validation_nme", "data_kind", "load_data",
]
