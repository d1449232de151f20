"""`pfld-export train` under torchrun: 2 gloo processes on the CPU against one process.

What "equal" means here. SyncBatchNorm runs on GPUs only, so with gloo each process normalises
its own half of every global batch, and DDP copies process 0's BatchNorm running statistics to
the other before every forward. A plain one-process run normalises the whole batch at once and
so trains a different network (measured on this setup: weights up to 0.11 apart after the 3
steps, against 0.0 for the reference below): comparing to it would test nothing exact. The
one-process reference here is the library's own `train()` with the same options and global
batch, whose step splits each batch into the same 2 shards (faces 0, 2, ... and 1, 3, ...),
averages their gradients and keeps shard 0's running statistics: everything else (data order,
augmentation, initial weights, mean-shape head, schedule, validation, best choice, files) is the
library's single-process path. The two must agree to float tolerance (gradient averaging order
differs: all-reduce vs accumulation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from pfld_export.checkpoint import load_checkpoint
from pfld_export.errors import UsageError
from pfld_export.loss import LossOutput
from pfld_export.train import TrainConfig, batch_loss, train

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORLD = 2
# 16 faces, 4 held out: 12 training faces = 3 global batches of 4 (2 per process), 1 epoch, 0.25X.
OPTIONS = {"data": "synthetic:16:5", "val_fraction": 0.25, "batch": 4, "epochs": 1, "width": 0.25, "seed": 3,
           "warmup_steps": 0}


def _cli_args(out: Path, cache: Path) -> list[str]:
    return ["train", "--data", OPTIONS["data"], "--val-fraction", str(OPTIONS["val_fraction"]), "--batch", str(OPTIONS["batch"]),
            "--epochs", str(OPTIONS["epochs"]), "--width", str(OPTIONS["width"]), "--seed", str(OPTIONS["seed"]),
            "--device", "cpu", "--threads", "1", "--out", str(out), "--cache-dir", str(cache)]


def _torchrun(args: list[str], log_dir: Path, watch: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2 tests/ddp_audit.py ...`: the real launcher and CLI."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
         str(HERE / "ddp_audit.py"), str(log_dir), str(watch), "--", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


def _sharded_step(world: int) -> Any:
    """One step as DDP on `world` processes takes it, in one process (see the module docstring)."""

    def step(model: torch.nn.Module, aux: torch.nn.Module, batch: Mapping[str, Any], loss_name: str,
             optimizer: torch.optim.Optimizer, device: torch.device, class_freq: torch.Tensor | None) -> LossOutput:
        optimizer.zero_grad(set_to_none=True)
        stats = {n: {k: v.clone() for k, v in net.named_buffers()} for n, net in (("m", model), ("a", aux))}
        parts: dict[int, LossOutput] = {}
        for r in [*range(1, world), 0]:  # shard 0 last, from the saved running statistics: process 0's
            if r == 0:
                for n, net in (("m", model), ("a", aux)):
                    for k, v in net.named_buffers():
                        v.copy_(stats[n][k])
            shard = {k: v[r::world] for k, v in batch.items()}
            lo = batch_loss(model, aux, shard, loss_name, device, class_freq)
            (lo.total / world).backward()
            parts[r] = lo
        optimizer.step()

        def mean(get: Any) -> torch.Tensor:
            return torch.stack([get(p).detach() for p in parts.values()]).mean()

        angle = mean(lambda p: p.angle) if parts[0].angle is not None else None
        return LossOutput(total=mean(lambda p: p.total), landmark_l2=mean(lambda p: p.landmark_l2), angle=angle)

    return step


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process sharded reference (which also fills the data cache), then the torchrun run."""
    tmp = tmp_path_factory.mktemp("ddp")
    cache = tmp / "cache"
    ref = train(TrainConfig(out=tmp / "ref", cache_dir=cache, device="cpu", threads=1, **OPTIONS),  # type: ignore[arg-type]
                step=_sharded_step(WORLD))
    p = _torchrun(_cli_args(tmp / "ddp", cache), tmp / "audit", tmp / "ddp")
    return {"ref": ref, "proc": p, "tmp": tmp, "cache": cache}


def test_two_gloo_processes_complete_and_only_rank0_writes(runs: dict[str, Any]) -> None:
    p, tmp = runs["proc"], runs["tmp"]
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    audit = {r: json.loads((tmp / "audit" / f"rank{r}.json").read_text()) for r in range(WORLD)}
    assert all(a["exit"] in (0, None) for a in audit.values()), audit
    final = {w for w in audit[0]["writes"] if not os.path.basename(w).startswith(".")}
    assert final == {"best.pth", "last.pth", "history.json"}, audit[0]["writes"]
    assert audit[1]["writes"] == [], f"rank 1 wrote {audit[1]['writes']}"
    assert sorted(f.name for f in (tmp / "ddp").iterdir()) == ["best.pth", "history.json", "last.pth"]
    assert p.stdout.count("wall time") == 1 and "2 processes" in p.stdout, p.stdout  # one report, from rank 0
    hist = json.loads((tmp / "ddp" / "history.json").read_text())
    assert hist["processes"] == WORLD and hist["config"]["batch"] == OPTIONS["batch"]
    assert load_checkpoint(tmp / "ddp" / "last.pth").extra["world_size"] == WORLD


def test_two_processes_equal_one_process_same_global_batch(runs: dict[str, Any]) -> None:
    p, tmp, ref = runs["proc"], runs["tmp"], runs["ref"]
    assert p.returncode == 0, p.stderr[-4000:]
    got, want = load_checkpoint(tmp / "ddp" / "last.pth"), load_checkpoint(ref.last_checkpoint)
    for name, (a, b) in {"model": (got.model, want.model), "aux": (got.aux, want.aux)}.items():
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if sa[k].is_floating_point():
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{name}.{k}: {m}")
            else:
                assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    hist = json.loads((tmp / "ddp" / "history.json").read_text())
    ref_hist = json.loads(ref.history_file.read_text())
    assert [e["steps"] for e in hist["epochs"]] == [e["steps"] for e in ref_hist["epochs"]] == [3]
    for a, b in zip(hist["epochs"], ref_hist["epochs"]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_nme"] == pytest.approx(b["val_nme"], rel=1e-4)
    assert hist["initial_val_nme"] == pytest.approx(ref_hist["initial_val_nme"], rel=1e-6)
    assert hist["best_epoch"] == ref_hist["best_epoch"]
    assert hist["epochs"][0]["val_nme"] != hist["initial_val_nme"]  # the steps moved the weights


def test_resume_with_another_process_count_is_refused(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    assert runs["proc"].returncode == 0
    with pytest.raises(UsageError, match=r"trained by 2 process\(es\) and this run has 1.*--nproc_per_node"):
        train(TrainConfig(out=tmp / "again", resume=tmp / "ddp" / "last.pth", epochs=2, cache_dir=runs["cache"], device="cpu"))


def _qat_args(init: Path, out: Path, cache: Path) -> list[str]:
    return ["qat", "--init", str(init), "--data", "synthetic:30:5", "--steps", "3", "--batch", "4",
            "--seed", "1", "--device", "cpu", "--threads", "1", "--out", str(out), "--cache-dir", str(cache)]


@pytest.mark.slow
def test_qat_under_torchrun_equals_one_process(runs: dict[str, Any]) -> None:
    """`pfld-export qat` on 2 gloo processes: BatchNorm is frozen in QAT, so the shards' averaged
    gradient is the one-process gradient and qat.pth must match the one-process run's; process
    1 writes nothing."""
    from click.testing import CliRunner

    from pfld_export.cli import main

    tmp, init = runs["tmp"], runs["ref"].last_checkpoint
    one = CliRunner().invoke(main, _qat_args(init, tmp / "qat1", runs["cache"]))
    assert one.exit_code == 0, one.output
    p = _torchrun(_qat_args(init, tmp / "qat2", runs["cache"]), tmp / "audit_qat", tmp / "qat2")
    assert p.returncode == 0, p.stderr[-4000:]
    audit = {r: json.loads((tmp / "audit_qat" / f"rank{r}.json").read_text()) for r in range(WORLD)}
    assert audit[1]["writes"] == [] and "qat.pth" in audit[0]["writes"]
    a, b = load_checkpoint(tmp / "qat2" / "qat.pth").model.state_dict(), load_checkpoint(tmp / "qat1" / "qat.pth").model.state_dict()
    moved = max(float((a[k] - load_checkpoint(init).model.state_dict()[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_resume_under_torchrun_with_int8_noise_reproduces_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    """2 processes with --int8-noise (torch randomness on every process): 2 epochs straight equal
    1 epoch + --resume to 2 (each process re-seeds per epoch from seed, rank and epoch). A constant
    lr, because resuming with more epochs re-plans a cosine schedule."""
    tmp, cache = runs["tmp"], runs["cache"]
    noise = ["--int8-noise", "4", "--schedule", "constant"]

    def launch(name: str, *extra: str) -> None:
        args = [a if a != str(tmp / "ddp") else str(tmp / name) for a in _cli_args(tmp / "ddp", cache)]
        p = _torchrun([*args, *noise, *extra], tmp / f"audit_{name}", tmp / name)
        assert p.returncode == 0, p.stderr[-4000:]

    launch("straight", "--epochs", "2")
    launch("first")
    launch("resumed", "--epochs", "2", "--resume", str(tmp / "first" / "last.pth"))
    a = load_checkpoint(tmp / "straight" / "last.pth")
    b = load_checkpoint(tmp / "resumed" / "last.pth")
    assert a.extra["epoch"] == b.extra["epoch"] == 2 and b.extra["world_size"] == WORLD
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    first = load_checkpoint(tmp / "first" / "last.pth").model.state_dict()
    assert any(not torch.equal(first[k], v) for k, v in a.model.state_dict().items())  # epoch 2 trained
