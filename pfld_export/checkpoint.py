"""Load any PFLD checkpoint safely; save ours atomically.

Accepted: our own format (state dict + metadata), PFLD-pytorch dicts (`pfld_backbone`, or the
older typo `plfd_backbone`, optional `auxiliarynet` / `epoch`), and a bare backbone state dict.
Width, point count and conv2 kind are inferred from tensor shapes. Loading is always
`torch.load(weights_only=True)`: a checkpoint never gets to run code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from . import __version__
from .errors import CheckpointError, PickledModuleError, ShapeMismatchError, UnsupportedArchitectureError
from .io import atomic_path
from .layouts import get_layout
from .model import HEADS, INPUT_SIZE, WIDTHS, AuxiliaryNet, LandmarkModel, ModelConfig, PFLD, fc_inputs, width_channels
from .preprocess import Preprocess

FORMAT_NAME = "pfld-export"
FORMAT_VERSION = 1
_PFLD_KEYS = ("conv1.weight", "conv2.weight", "conv3_1.conv.0.weight", "conv6_1.conv.6.weight", "fc.weight")


@dataclass
class CheckpointMeta:
    """Everything besides weights: what the network is, how to feed it, where it came from."""

    model: ModelConfig | None  # None: a --model-class network (its own code defines it)
    preprocess: Preprocess
    source_format: str = FORMAT_NAME  # pfld-export | pfld-pytorch | bare-state-dict | model-class
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict() if self.model is not None else None,
            "preprocess": self.preprocess.to_dict(),
            "source_format": self.source_format,
            "provenance": self.provenance,
            "metrics": self.metrics,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointMeta":
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            source_format=d.get("source_format", FORMAT_NAME),
            provenance=dict(d.get("provenance", {})),
            metrics=dict(d.get("metrics", {})),
            training=dict(d.get("training", {})),
        )


@dataclass
class LoadedModel:
    """A ready network (eval mode), its auxiliary net if the file had one, and metadata.

    `extra` holds whatever else our format carried (optimizer state, epoch) for `train --resume`.
    """

    model: PFLD
    aux: AuxiliaryNet | None
    meta: CheckpointMeta
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    wrapper: torch.nn.Module | None = None  # a --model-class network's landmarks-only wrapper

    def inference_model(self) -> torch.nn.Module:
        """The export/inference wrapper: auxiliary branch dropped, landmarks [N, 2P] only."""
        if self.wrapper is not None:
            return self.wrapper.eval()
        return LandmarkModel(self.model).eval()

    @property
    def num_points(self) -> int:
        return self.meta.model.points if self.meta.model is not None else int(self.meta.provenance["points"])


def read_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU, every failure a typed one-line error."""
    return _torch_load(path)


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside the usual wrappers (`state_dict`, `pfld_backbone` / `plfd_backbone`,
    `model`, `net`; DataParallel's `module.` prefix)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in ("state_dict", "pfld_backbone", "plfd_backbone", "model", "net", "model_state_dict") if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(f"{path}: no state dict found (keys {list(obj)[:5]}); save it with torch.save(model.state_dict(), path)")
        obj = obj[key]
    return _strip_prefix({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if m:
            raise PickledModuleError(
                f"{path} is a pickled object ({m.group(1)}) from another codebase; only state dicts are "
                "accepted, because unpickling it would run that code. Re-save it where its code lives with "
                "torch.save(model.state_dict(), 'weights.pth')"
            ) from None
        # PyTorch's own text here advises re-running with weights_only=False (unsafe unpickling of an
        # unknown file) and is cut mid-sentence by _first_line: never pass it on.
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save file: truncated, corrupt or "
                              "another format); check the file or re-save it with torch.save") from None
    except Exception as e:  # torch raises many types for truncated/foreign files (struct.error, KeyError…)
        if isinstance(e, FileNotFoundError) or not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; check the path") from None
        detail = "" if "weights_only" in str(e) else f" ({type(e).__name__}: {_first_line(str(e))})"
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint{detail}; is it truncated or another format?"
        ) from None


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0][:200] if s.strip() else "no detail"


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel checkpoints prefix every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _describe_foreign(sd: Mapping[str, Any]) -> str:
    keys = [k for k in sd if isinstance(sd[k], torch.Tensor)]
    first = ", ".join(keys[:2])
    if any(re.match(r"model\d*\.\d+\.", k) for k in keys):
        depthwise = any(v.ndim == 4 and v.shape[1] == 1 for v in sd.values() if isinstance(v, torch.Tensor))
        guess = "a MobileNet-style sequential backbone" if depthwise else "a sequential `model.N` backbone"
    elif any(k.startswith(("layer1.", "layer4.")) for k in keys):
        guess = "a ResNet backbone"
    elif any(k.startswith("features.") for k in keys):
        guess = "a torchvision-style `features` backbone"
    else:
        guess = "a non-PFLD network"
    return f"keys look like {guess} ({first}, … {len(keys)} tensors), not PFLD"


@dataclass(frozen=True)
class Inference:
    """What the tensors say about a PFLD network, and which choices they leave open.

    `read` maps each `ModelConfig` field to how it was found ("tensors", or "default" where the
    tensors show nothing either way); `open` names the fields only a measurement can settle
    (`stage0.resolve`): the activation always, bn8 when its statistics are ambiguous.
    """

    config: ModelConfig
    read: dict[str, str]
    open: tuple[str, ...]


def _layout_mismatch(sd: Mapping[str, Any]) -> str:
    """Closest known layout and its first tensor the file lacks or shapes differently."""
    keys = [k for k in sd if isinstance(sd[k], torch.Tensor)]
    ref = PFLD(ModelConfig(width=0.25, points=1)).state_dict()
    expected = [k for k in ref if not k.endswith("num_batches_tracked")]
    hits = sum(k in sd for k in expected)
    first = next((k for k in expected if k not in sd), None)
    detail = f"first missing tensor {first}" if first else "every name present"
    return (f"closest known layout: PFLD-pytorch PFLDInference ({hits} of {len(expected)} tensors by name; {detail}; "
            f"the file starts {', '.join(keys[:2]) or 'with no tensors'})")


def _solve_head(fc_in: int, channels: tuple[int, ...]) -> tuple[str, int] | None:
    # The fc input size fixes the head kind and the input size together: S3 is conv8's whole
    # output (k x k after its 7x7 kernel), S1/S2 are either pooled or flattened feature maps.
    for size in range(INPUT_SIZE, 16 * 40 + 1, 16):
        for head in HEADS:
            if fc_inputs(channels, head, size) == fc_in:
                return head, size
    return None


def infer_variant(sd: Mapping[str, torch.Tensor]) -> Inference:
    """Everything the tensor shapes and statistics can tell; refuse anything that is not PFLD."""
    missing = [k for k in _PFLD_KEYS if k not in sd]
    if missing:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {_describe_foreign(sd)}; {_layout_mismatch(sd)}; "
            f"to convert it, pass its own network class: --model-class path/to/models.py:ClassName"
        )
    taps = ("conv1.weight", "conv3_1.conv.6.weight", "conv4_1.conv.6.weight", "conv5_1.conv.6.weight",
            "conv6_1.conv.6.weight", "conv7.0.weight", "conv8.weight")
    absent = [k for k in taps if k not in sd]
    if absent:
        raise UnsupportedArchitectureError(f"unsupported architecture: PFLD-pytorch names but no {absent[0]}; "
                                           f"{_layout_mismatch(sd)}; pass its network class with --model-class path/to/models.py:ClassName")
    channels = tuple(int(sd[k].shape[0]) for k in taps)
    c1 = channels[0]
    width = next((w for w in WIDTHS if width_channels(w) == channels), c1 / 64.0)
    fc = sd["fc.weight"]
    if fc.ndim != 2 or fc.shape[0] % 2:
        raise UnsupportedArchitectureError(f"unsupported architecture: fc has {tuple(fc.shape)} weights, not [2 x points, features]")
    solved = _solve_head(int(fc.shape[1]), channels)
    if solved is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: fc reads {fc.shape[1]} features, which neither a pooled nor a flattened "
            f"PFLD head gives for channels {channels} at any input size; pass its network class with --model-class path/to/models.py:ClassName")
    head, size = solved
    conv2 = "depthwise" if sd["conv2.weight"].shape[1] == 1 and c1 > 1 else "full"
    # bn8 is applied in older PFLD-pytorch forwards and skipped in current ones; a BN that ran in
    # training has moved its running statistics away from the initial 0 / 1. Untouched statistics
    # with a trained affine part cannot say: that is measured.
    head_bn, opened = False, ["activation"]
    if "bn8.running_mean" in sd and "bn8.running_var" in sd:
        moved = bool(sd["bn8.running_mean"].abs().max() > 0 or (sd["bn8.running_var"] - 1).abs().max() > 0)
        affine = "bn8.weight" in sd and bool((sd["bn8.weight"] - 1).abs().max() > 0 or sd["bn8.bias"].abs().max() > 0)
        head_bn = moved
        if not moved and affine:
            opened.append("head_bn")
    config = ModelConfig(width=width, points=int(fc.shape[0]) // 2, conv2=conv2, head_bn=head_bn, input_size=size,
                         channels=channels, conv_bias="conv1.bias" in sd, head=head)
    read = {f: "tensors" for f in ("channels", "width", "points", "conv2", "head_bn", "input_size", "conv_bias", "head")}
    read.update({f: "measured" for f in opened})
    return Inference(config=config, read=read, open=tuple(opened))


def infer_config(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The configuration the tensors give (open choices at PFLD-pytorch's defaults: see `infer_variant`)."""
    return infer_variant(sd).config


def _aux_channels(sd: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int] | None:
    keys = [f"conv{i}.0.weight" for i in range(1, 5)]
    if not all(k in sd for k in keys):
        return None
    a, b, c, d = (int(sd[k].shape[0]) for k in keys)
    return a, b, c, d


def _load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ShapeMismatchError(
                f"{path}: {what} key {k} has shape {tuple(sd[k].shape)} in the file but {tuple(v.shape)} in the model; "
                "the checkpoint does not match the inferred configuration"
            )
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ShapeMismatchError(f"{path}: {what} keys do not match PFLD ({detail}); a modified architecture converts "
                                 "with its own class: --model-class path/to/models.py:ClassName")
    module.load_state_dict(sd, strict=False)


def load_checkpoint(path: str | os.PathLike[str], preprocess: Preprocess | None = None,
                    overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a PFLD checkpoint of any supported layout; returns the model in eval mode.

    `preprocess` overrides what the file says; `overrides` sets `ModelConfig` fields of a foreign
    checkpoint (explicit flags, or what `stage0` measured). A foreign checkpoint leaves the
    choices its tensors cannot tell in `meta.provenance["open"]`: load it through
    `stage0.load_resolved` to have them measured rather than left at PFLD-pytorch's defaults.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; check the path")
    if p.suffix.lower() in (".onnx", ".tflite"):
        raise CheckpointError(f"{p} is a {p.suffix} model, not a PyTorch checkpoint; pass it where models are accepted (eval, predict, convert)")
    obj = _torch_load(p)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict or checkpoint dict")

    extra: dict[str, Any] = {}
    aux_sd: Mapping[str, torch.Tensor] | None
    if obj.get("format") == FORMAT_NAME:
        meta = CheckpointMeta.from_dict(obj["meta"])
        sd, aux_sd = obj["state_dict"], obj.get("aux_state_dict")
        extra = {k: v for k, v in obj.items() if k not in ("format", "format_version", "meta", "state_dict", "aux_state_dict")}
        inf = infer_variant(sd)
        shapes = ("channels", "points", "conv2", "input_size", "conv_bias", "head")
        if any(getattr(inf.config, f) != getattr(meta.model, f) for f in shapes):
            raise ShapeMismatchError(f"{p}: metadata says {meta.model} but the weights are {inf.config}; the file is inconsistent")
        meta.provenance.setdefault("inferred", {f: "metadata" for f in inf.read})
        if overrides:
            meta.model = dataclasses.replace(meta.model, **overrides)
            meta.provenance["inferred"].update({k: "flag" for k in overrides})
    else:
        backbone_key = next((k for k in ("pfld_backbone", "plfd_backbone", "state_dict") if k in obj), None)
        if backbone_key is not None:
            sd, aux_sd, source = obj[backbone_key], obj.get("auxiliarynet"), "pfld-pytorch"
            if "epoch" in obj:
                extra["epoch"] = obj["epoch"]
        elif all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd, aux_sd, source = obj, None, "bare-state-dict"
        else:
            raise UnsupportedArchitectureError(
                f"unsupported architecture: {p} is a dict with keys {list(obj)[:5]}, but none of "
                "pfld_backbone / plfd_backbone / state_dict, nor a bare state dict"
            )
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{p}: '{backbone_key}' holds a {type(sd).__name__}, not a state dict")
        sd = _strip_prefix(sd)
        inf = infer_variant(sd)
        cfg = inf.config
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        pre = Preprocess(layout=get_layout(cfg.points).name, input_size=cfg.input_size)
        read = {**inf.read, **{k: "flag" for k in overrides or {}}}
        meta = CheckpointMeta(model=cfg, preprocess=pre, source_format=source, provenance={
            "file": p.name, "inferred": read, "open": [f for f in inf.open if f not in (overrides or {})]})

    sd = _strip_prefix(sd)
    model = PFLD(meta.model)
    _load_into(model, sd, "backbone", p)
    aux = None
    if aux_sd:
        aux_sd = _strip_prefix(aux_sd)
        aux = AuxiliaryNet(model.tap_channels, _aux_channels(aux_sd) or (128, 128, 32, 128), meta.model.activation)
        _load_into(aux, aux_sd, "auxiliarynet", p)
        aux.eval()
    if preprocess is not None:
        meta.preprocess = preprocess
    return LoadedModel(model=model.eval(), aux=aux, meta=meta, path=p, extra=extra)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: PFLD,
    meta: CheckpointMeta,
    aux: AuxiliaryNet | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write our format atomically: state dicts, metadata, and `extra` (optimizer state, epoch…).

    Everything stored is tensors and plain Python, so it loads back with weights_only=True.
    """
    meta.provenance.setdefault("tool_version", __version__)
    meta.provenance.setdefault("saved_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "state_dict": model.state_dict(),
        "aux_state_dict": aux.state_dict() if aux is not None else None,
    }
    payload.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)
