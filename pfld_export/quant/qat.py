"""Quantization-aware fine-tuning by self-distillation: `pfld-export qat --init CKPT --data PHOTOS`.

    qat(QATConfig(init=..., data="photos/", out=...)) -> QATResult

Post-training int8 moves a PFLD's landmarks by 1-3 px on a 112 crop (benchmarks/int8_fidelity.md).
This stage fine-tunes the float weights so that *the int8 model the converter will build from
them* reproduces the original float model. It needs no landmark labels: the teacher is the
`--init` checkpoint itself, frozen, and the loss is the distance between the teacher's float
landmarks and the student's simulated-int8 landmarks on real face crops (the same kind of
crops int8 calibration uses). So any checkpoint can be tuned on any folder of face photos,
including a third-party one whose training data is not available.

The simulation mirrors what TFLite's int8 quantizer does to PFLD (`FakeQuantPFLD`):
* BN folded into the conv exactly as the converter folds it (frozen running statistics), then
  per-output-channel symmetric int8 weights (scale max|w|/127, [-127, 127]), for every conv,
  depthwise conv and the FC;
* one asymmetric int8 scale per activation tensor at each point the int8 graph requantizes:
  the input, every conv output after its fused ReLU, every residual ADD, and one shared scale
  for the CONCATENATION of S1/S2/S3 (the converter forces the concat's scale onto its inputs);
  the FC output (the landmarks themselves, dequantized at the end);
* activation ranges are those of the float network over the calibration crops (min/max, the
  converter's own rule, or mse), re-measured every `range_every` steps as the weights move;
  or, with `learn_ranges`, trained (a log-scale factor per range, LSQ-style gradients) and
  carried in the checkpoint (`provenance.qat.ranges`), which `convert` writes into the int8
  model (`quant.fit.with_site_ranges`).
Gradients pass the rounding straight through (STE). Measured (benchmarks/int8_fidelity.md):
learned ranges from equalised weights took the 17-point fixture's real int8 shift from 1.67 to
0.91 px, as good as the best post-training method and no better. Fixed ranges gain little:
simulated and real int8 errors are two draws of the same rounding noise (equal size, unrelated
direction), so only robustness to it carries over. The tuned checkpoint is an ordinary PFLD
checkpoint (same keys: BN is still BN), so `convert` turns it into int8 as usual; its
`provenance.qat` names the teacher, and `convert --reference TEACHER` measures the int8 model
against the original float landmarks, which is what matters to a user.

Held-out photos (whole images, the convert pipeline's split) are never trained on; the shift
figures in the result are measured on them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import auto_threads, check_device, check_threads, resolve_device
from ..distributed import DistContext, all_sum, context_from_env, process_device, process_group, wrap
from ..errors import UsageError
from .equalize import tflite_weight_rounding
from ..export.validate import ShiftStats, shift_stats
from ..io import file_sha256, writable_dir
from ..model import PFLD, ConvUnit, LandmarkModel, conv_units, fold_bn, require_standard
from .options import BATCH, LR, OUT, RANGE_METHODS, STEPS, TRAINABLE
from .ranges import mse_range

Progress = Callable[[int, int, float], None]  # (step, steps, loss px)
ACT_QMIN, ACT_QMAX = -128, 127  # int8 activations, asymmetric
_SAMPLES_PER_CHUNK = 4096  # activation values kept per site and chunk for mse ranges


@dataclass
class QATConfig:
    """What `pfld-export qat` takes."""

    init: Path  # the float checkpoint: starting weights and the frozen teacher
    out: Path = Path(OUT)
    data: str | None = None  # face photos folder or dataset spec (labels unused); None: synthetic
    val_images: str | None = None  # held-out faces for the figures; None: photos held out of `data`
    calib_count: int = 200
    val_count: int = 60
    steps: int = STEPS
    batch: int = BATCH
    lr: float = LR
    range_every: int = 25  # re-measure activation ranges every this many steps
    range_method: str = "mse"  # "minmax" or "mse"; convert's int8 fit calibrates with both and keeps the better
    learn_ranges: bool = False  # learn each activation's clip range (LSQ-style) from `range_method`'s start;
    # the learned ranges travel in the checkpoint and `convert` writes them into the int8 model
    range_lr: float = 1e-2  # Adam step for the log-range factors
    equalize: bool = False  # start from cross-layer-equalised weights (same float function, friendlier ranges)
    trainable: str = "all"  # "all" weights; "affine": BN scales/shifts and biases only (a learned bias correction);
    # "ranges": no weights at all, only the learned ranges (the float model does not move)
    augment: bool = True
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto = CUDA if present (train's --device); the simulation is the same on either
    detector: Any | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        check_threads(self.threads)
        if self.steps < 1:
            raise UsageError(f"--steps {self.steps} must be at least 1")
        if self.batch < 1:
            raise UsageError(f"--batch {self.batch} must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive")
        if self.range_every < 1:
            raise UsageError(f"range_every {self.range_every} must be at least 1")
        if self.trainable not in TRAINABLE:
            raise UsageError(f"QAT trainable set {self.trainable!r} unknown; choose {' or '.join(TRAINABLE)}")
        if self.trainable == "ranges" and not self.learn_ranges:
            raise UsageError("--trainable ranges trains the learned ranges only; add --ranges learned")
        if self.range_method not in RANGE_METHODS:
            raise UsageError(f"QAT range method {self.range_method!r} unknown; choose {' or '.join(RANGE_METHODS)}")
        check_device(self.device)


@dataclass
class QATResult:
    """The tuned checkpoint and what the simulation measured before and after."""

    checkpoint: Path
    teacher: str
    steps: int
    calibration: str
    validation: str
    simulated_int8_before: ShiftStats  # fake-quant student vs teacher, held-out, before tuning (px at 112)
    simulated_int8_after: ShiftStats
    float_drift: ShiftStats  # the tuned float network vs the teacher (it is not what ships)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# --- the simulated int8 network ---------------------------------------------------------------

# The activation each fused conv applies (TFLite fuses ReLU and ReLU6 into the conv alike).
_FUSED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": lambda y: y, "relu": F.relu, "relu6": F.relu6}


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """TFLite's per-channel int8 weight rounding (`equalize.tflite_weight_rounding`) with a
    straight-through gradient."""
    return w + (tflite_weight_rounding(w.detach()) - w).detach()


def act_params(lo: float, hi: float) -> tuple[float, int]:
    """TFLite's asymmetric int8 scale and zero point for the range [lo, hi] (which holds 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / (ACT_QMAX - ACT_QMIN)
    zp = int(np.clip(round(ACT_QMIN - lo / scale), ACT_QMIN, ACT_QMAX))
    return scale, zp


def _key(site: str) -> str:
    return site.replace(".", "__")  # ParameterDict keys cannot hold dots


def _learned_fake_quant(x: torch.Tensor, lo0: float, hi0: float, log_f: torch.Tensor) -> torch.Tensor:
    """int8 rounding on [lo0 e^f0, hi0 e^f1] with gradients to x (straight through inside the
    range) and to the range (LSQ: the rounding error and the clipping both pull on it)."""
    lo = min(lo0, 0.0) * torch.exp(log_f[0])
    hi = max(hi0, 1e-8) * torch.exp(log_f[1])
    s = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    v = (torch.maximum(torch.minimum(x, hi), lo) - lo) / s
    v = v + (torch.round(v) - v).detach()
    return v * s + lo


class FakeQuantPFLD(nn.Module):
    """PFLD's inference forward with int8 rounding where the TFLite int8 graph has it.

    `mode`: "float" (plain forward), "observe" (plain forward, widening each site's min/max),
    "quant" (fake-quantized weights and activations). Parameters are the wrapped PFLD's own,
    so training this trains the checkpoint.
    """

    def __init__(self, pfld: PFLD) -> None:
        super().__init__()
        # ReLU6 only changes the clip each fused conv applies (TFLite fuses ReLU6 the same way).
        require_standard(pfld.config, "the int8 simulator (QAT)", relu6_ok=True)
        self.pfld = pfld
        self.mode = "quant"
        self.ranges: dict[str, tuple[float, float]] = {}
        self._samples: dict[str, list[np.ndarray]] | None = None  # values kept while observing (mse ranges)
        self._rng = np.random.default_rng(0)
        # Learned ranges: site -> log factors (lo, hi) applied to the observed range; None: fixed ranges.
        self.log_factors: nn.ParameterDict | None = None

    def learn_ranges(self) -> nn.ParameterDict:
        """Make every activation range but the input's (exact already: x/255) trainable, starting
        from the observed ranges, and return the new parameters."""
        dev = next(self.pfld.parameters()).device
        self.log_factors = nn.ParameterDict({_key(k): nn.Parameter(torch.zeros(2, device=dev)) for k in self.ranges if k != "input"})
        return self.log_factors

    def effective_ranges(self) -> dict[str, tuple[float, float]]:
        """The ranges the quantizer uses now (observed x learned factors)."""
        out = {}
        for site, (lo, hi) in self.ranges.items():
            f = self.log_factors[_key(site)].detach() if self.log_factors is not None and _key(site) in self.log_factors else None
            out[site] = (lo, hi) if f is None else (float(lo * torch.exp(f[0])), float(hi * torch.exp(f[1])))
        return out

    def _act(self, site: str, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            lo, hi = self.ranges.get(site, (0.0, 0.0))
            self.ranges[site] = (min(lo, float(x.detach().min())), max(hi, float(x.detach().max())))
            if self._samples is not None:
                v = x.detach().flatten().cpu().numpy()
                if v.size > _SAMPLES_PER_CHUNK:
                    v = v[self._rng.choice(v.size, _SAMPLES_PER_CHUNK, replace=False)]
                self._samples.setdefault(site, []).append(v.astype(np.float32))
            return x
        if self.mode != "quant":
            return x
        if site not in self.ranges:
            raise UsageError(f"no activation range for {site}; call observe_ranges() before training")
        if self.log_factors is not None and _key(site) in self.log_factors:
            return _learned_fake_quant(x, *self.ranges[site], self.log_factors[_key(site)])
        scale, zp = act_params(*self.ranges[site])
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, ACT_QMIN, ACT_QMAX)

    def _fused(self, unit: ConvUnit, x: torch.Tensor) -> torch.Tensor:
        w, b = fold_bn(unit.conv, unit.bn)
        if self.mode == "quant":
            w = fake_quant_weight(w)
        if isinstance(unit.conv, nn.Linear):
            return F.linear(x, w, b)
        y = F.conv2d(x, w, b, unit.conv.stride, unit.conv.padding, unit.conv.dilation, unit.conv.groups)
        return _FUSED[unit.activation](y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act("input", x)
        head: list[torch.Tensor] = []  # S1, S2, S3
        block, block_in = "", x
        for unit in conv_units(self.pfld, "the int8 simulator (QAT)"):
            if unit.block != block:
                block, block_in = unit.block, x
            if isinstance(unit.conv, nn.Linear):
                # CONCATENATION: S1, S2 and S3 all take the concat's one scale.
                return self._act(unit.label, self._fused(unit, self._act("concat", torch.cat(head, 1))))
            y = self._fused(unit, x)
            if unit.head_input == "s3":  # flattened into the concat as it is: the concat's scale is its own
                head.append(y.flatten(1))
                continue
            x = self._act(unit.label, y)
            if unit.residual:
                x = self._act(f"{block}.add", block_in + x)
            if unit.head_input is not None:  # S1, S2: pooled from a tensor the next conv reads too
                head.append(x.mean((2, 3)))
        raise UsageError("the int8 simulator found no FC ending PFLD's head")

    @torch.no_grad()
    def observe_ranges(self, x: torch.Tensor, method: str = "minmax", chunk: int = 16) -> dict[str, tuple[float, float]]:
        """Activation ranges of the float network over `x` (NCHW): "minmax" (the converter's
        rule) or "mse" (`quant.graph.calibrate`'s: min/max shrunk to the least int8 error)."""
        if method not in RANGE_METHODS:
            raise UsageError(f"QAT range method {method!r} unknown; choose {' or '.join(RANGE_METHODS)}")
        mode, self.mode, self.ranges = self.mode, "observe", {}
        self._samples = {} if method == "mse" else None
        self._rng = np.random.default_rng(0)  # same subsample every time: ranges move only with the weights
        dev = next(self.pfld.parameters()).device
        try:
            for part in torch.split(x, chunk):
                self(part.to(dev))
            if self._samples is not None:
                self.ranges = {k: mse_range(np.concatenate(self._samples[k]), lo, hi) for k, (lo, hi) in self.ranges.items()}
        finally:
            self.mode, self._samples = mode, None
        return dict(self.ranges)


def site_of_label(op: str, label: str) -> str | None:
    """The FakeQuantPFLD site whose range a TFLite op's output takes, from `quant.graph.list_ops`
    labels (PyTorch layer names): convs and the FC by name, residual ADDs as "<block>.add", and
    everything the concat's one scale covers (the concat, the two MEANs, conv8 and its
    RESHAPE) as "concat". None for ops with no range of their own (PAD...)."""
    if op in ("CONCATENATION", "MEAN") or label == "conv8" or (op == "RESHAPE" and label.endswith("conv8")):
        return "concat"
    if op == "ADD" and label.startswith("add after ") and label.endswith(".project"):
        return label[len("add after "):-len(".project")] + ".add"
    if op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        return label
    return None


# --- training -----------------------------------------------------------------------------------

def _augment(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Face crops as detection jitter and lighting produce them: small rotation, scale and
    shift, mirror, brightness/contrast. Labels are not needed (the teacher labels them)."""
    import cv2

    out = np.empty_like(crops)
    n, h, w = crops.shape[:3]
    for i in range(n):
        a = rng.uniform(-12, 12)
        s = rng.uniform(0.92, 1.08)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), a, s)
        m[:, 2] += rng.uniform(-0.04, 0.04, 2) * (w, h)
        img = cv2.warpAffine(crops[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        g = rng.uniform(0.75, 1.25)
        o = rng.uniform(-20, 20)
        out[i] = np.clip(img.astype(np.float32) * g + o + (1 - g) * 128, 0, 255).astype(np.uint8)
    return out


def _shift(a: torch.Tensor, b: torch.Tensor, size: int) -> ShiftStats:
    """`validate.shift_stats` of two [N, 2P] outputs in crop units, in px."""
    return shift_stats(b.view(b.shape[0], -1, 2).numpy() * size, a.view(a.shape[0], -1, 2).numpy() * size)


def _predict(net: nn.Module, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Outputs of `net` (on whatever device its parameters are) for CPU inputs, back on the CPU."""
    dev = next(net.parameters()).device
    with torch.no_grad():
        return torch.cat([net(part.to(dev)).cpu() for part in torch.split(x, chunk)])


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled batches of indices (all of them when there are fewer than `batch`)."""
    b = min(batch, n)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - b + 1, b):
            yield order[i : i + b]


def qat(cfg: QATConfig, progress: Progress | None = None) -> QATResult:
    """Fine-tune `cfg.init` so its int8 conversion matches its float landmarks; writes
    OUT/qat.pth (our checkpoint format) and returns the held-out figures.

    Under torchrun every process calls this: each takes its share of every batch (`cfg.batch`
    is global; BatchNorm is frozen here, so N processes compute exactly the one-process step),
    DDP averages the gradients, and only process 0 reports progress and writes qat.pth.
    """
    ctx = context_from_env()
    dev = process_device(resolve_device(cfg.device), ctx)  # before minutes of face detection: --device cuda without CUDA is refused here
    if ctx.active and (min(cfg.batch, cfg.calib_count) % ctx.world_size or min(cfg.batch, cfg.calib_count) < ctx.world_size):
        raise UsageError(f"--batch {cfg.batch} is the global batch and must split evenly over {ctx.world_size} processes; "
                         f"use a multiple of {ctx.world_size}")
    with process_group(ctx, dev):
        return _qat(cfg, progress if ctx.is_main else None, ctx, dev)


@dataclass
class _Distillation:
    """The frozen float teacher, the simulated-int8 student and the crops they are compared on."""

    teacher: LandmarkModel
    student: FakeQuantPFLD
    x_cal: torch.Tensor  # calibration crops, preprocessed NCHW (trained on; ranges observed on them)
    x_val: torch.Tensor  # held-out crops, preprocessed NCHW
    y_val: torch.Tensor  # the teacher's landmarks on the held-out crops
    size: int  # crop side: landmark units to px

    def val_shift(self) -> ShiftStats:
        """The student's landmark shift from the teacher's on the held-out crops (in its current mode)."""
        return _shift(_predict(self.student, self.x_val), self.y_val, self.size)


def _qat(cfg: QATConfig, progress: Progress | None, ctx: DistContext, dev: torch.device) -> QATResult:
    from ..checkpoint import save_checkpoint
    from ..export.calibrate import calibration_and_validation

    t0 = time.perf_counter()
    out = writable_dir(Path(cfg.out)) if ctx.is_main else Path(cfg.out)  # process 0 alone writes there
    init = Path(cfg.init)
    loaded = _load_init(init)
    pre = loaded.meta.preprocess
    calib, val = calibration_and_validation(cfg.data or "synthetic", cfg.val_images, pre, cfg.calib_count, cfg.val_count,
                                            cfg.seed, cfg.detector, cfg.cache_dir)
    prev_threads = torch.get_num_threads()
    threads = cfg.threads or (auto_threads() if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        d = _distillation(cfg, loaded, calib, val, dev)
        d.student.observe_ranges(d.x_cal, cfg.range_method)
        before = d.val_shift()
        history = _train(cfg, progress, ctx, dev, d, loaded, calib, rng)
        after = d.val_shift()
        d.student.mode = "float"
        drift = d.val_shift()
    finally:
        torch.set_num_threads(prev_threads)
        loaded.model.cpu()  # checkpoints are saved and loaded on the CPU
    meta = copy.deepcopy(loaded.meta)
    meta.provenance["qat"] = {
        "teacher": str(init), "teacher_sha256": file_sha256(init), "steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch,
        "calibration": calib.description, "validation": val.description,
        "simulated_int8_mean_px": {"before": round(before.mean_px, 4), "after": round(after.mean_px, 4)},
        "range_method": "learned" if cfg.learn_ranges else cfg.range_method, "equalized": cfg.equalize,
        # Activation ranges by site (see `site_of_label`): with learned ranges `convert` writes
        # them into the calibrated model; otherwise they are what its own calibration finds.
        "ranges": {k: [round(float(lo), 6), round(float(hi), 6)] for k, (lo, hi) in d.student.effective_ranges().items()},
    }
    meta.training = dict(meta.training, qat=True)
    path = save_checkpoint(out / "qat.pth", loaded.model, meta, loaded.aux) if ctx.is_main else out / "qat.pth"
    return QATResult(checkpoint=path, teacher=str(init), steps=cfg.steps, calibration=calib.description,
                     validation=val.description, simulated_int8_before=before, simulated_int8_after=after,
                     float_drift=drift, seconds=round(time.perf_counter() - t0, 1), history=history)


def _load_init(init: Path) -> Any:
    """The `--init` checkpoint, a foreign one resolved so that its activation is measured."""
    from ..checkpoint import load_checkpoint

    if not init.is_file():
        raise UsageError(f"--init {init} does not exist; QAT fine-tunes a trained float checkpoint (.pth)")
    loaded = load_checkpoint(init)
    if loaded.meta.source_format != "pfld-export":  # a foreign init's activation is measured, never defaulted
        from ..stage0 import resolve

        loaded = resolve(init)[0]
    return loaded


def _distillation(cfg: QATConfig, loaded: Any, calib: Any, val: Any, dev: torch.device) -> _Distillation:
    """A frozen copy of `loaded` as the teacher and `loaded`'s own weights (equalised first when
    asked) as the simulated-int8 student, both on `dev`, with the teacher's held-out landmarks."""
    pre = loaded.meta.preprocess
    teacher = LandmarkModel(copy.deepcopy(loaded.model)).eval().to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x_cal = torch.from_numpy(pre.apply_nchw(calib.crops))
    if cfg.equalize:  # float-preserving (equalize checks it), so the teacher's landmarks are the target still
        from .equalize import equalize

        loaded.model = equalize(LandmarkModel(loaded.model).eval(), x_cal).model.pfld
    loaded.model.to(dev)
    student = FakeQuantPFLD(loaded.model)
    loaded.model.eval()  # BN frozen: running statistics are what the converter folds
    x_val = torch.from_numpy(pre.apply_nchw(val.crops))
    return _Distillation(teacher=teacher, student=student, x_cal=x_cal, x_val=x_val, y_val=_predict(teacher, x_val),
                         size=pre.input_size)


def _optimizer(
    cfg: QATConfig, model: nn.Module, student: FakeQuantPFLD,
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam over the trainable weights (`cfg.trainable`) and, with learned ranges, the range
    factors at their own step; with its cosine schedule over `cfg.steps`."""
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and (cfg.trainable == "all" or p.dim() == 1)]  # 1-D: BN gamma/beta, biases
    groups: list[dict[str, Any]] = [{"params": params, "lr": cfg.lr}] if cfg.trainable != "ranges" else []
    if cfg.learn_ranges:
        groups.append({"params": list(student.learn_ranges().values()), "lr": cfg.range_lr})
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)


def _train(
    cfg: QATConfig, progress: Progress | None, ctx: DistContext, dev: torch.device, d: _Distillation, loaded: Any,
    calib: Any, rng: np.random.Generator,
) -> list[dict[str, float]]:
    """`cfg.steps` steps pulling the student's simulated-int8 landmarks onto the teacher's;
    returns the loss and held-out int8 shift at every tenth of the run."""
    pre = loaded.meta.preprocess
    opt, sched = _optimizer(cfg, loaded.model, d.student)
    history: list[dict[str, float]] = []
    batches = _batches(len(calib), cfg.batch, rng)
    running = 0.0
    stepped = wrap(d.student, ctx, dev)  # DDP over the processes' shares of each batch (itself in one process)
    for step in range(1, cfg.steps + 1):
        # Every process draws the whole batch (same rng, same augmentation) and keeps its share.
        idx = next(batches)
        crops = _augment(calib.crops[idx], rng) if cfg.augment else calib.crops[idx]
        crops = crops[ctx.rank :: ctx.world_size]
        x = torch.from_numpy(pre.apply_nchw(crops)).to(dev)
        with torch.no_grad():
            target = d.teacher(x)
        pred = stepped(x)
        d2 = ((pred - target).view(len(crops), -1, 2) * d.size).pow(2).sum(-1)
        loss = torch.sqrt(d2 + 1e-4).mean()  # mean landmark distance (px): the figure the budget reads
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = all_sum([loss.item()], ctx, dev)[0] / ctx.world_size
        running = lv if step == 1 else 0.9 * running + 0.1 * lv
        if not cfg.learn_ranges and (step % cfg.range_every == 0 or step == cfg.steps):
            d.student.observe_ranges(d.x_cal, cfg.range_method)  # learned ranges are not re-observed: they are trained
        if progress:
            progress(step, cfg.steps, running)
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            history.append({"step": step, "loss_px": round(running, 4),
                            "val_int8_mean_px": round(d.val_shift().mean_px, 4)})
    return history
