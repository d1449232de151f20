"""Bring your own network: `--model-class path/to/models.py:ClassName` for backbones outside PFLD.

The user's own code is imported only on that explicit flag, never because a checkpoint asks.
Fork code is usually written to run from its repository root and imports its siblings
package-style (`from models.base_module import ...`): the ancestor directory that holds that
top-level package is made importable while the file is imported. Weights still load with
`torch.load(weights_only=True)` (CUDA-saved tensors mapped to the CPU) and must match the
class's own state dict key for key and shape for shape.

The network may return anything (a tensor, or a tuple with features or pose next to the
landmarks): `UserLandmarkModel` picks the landmark output (the only one holding an even count
of values per face, or `--output-index`) and brings it to [0, 1] of the crop (pixel outputs are
detected on face crops and divided by the input size, or `--output-scale` says).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointMeta, LoadedModel, read_torch_file, unwrap_state_dict
from .errors import ShapeMismatchError, UsageError
from .layouts import get_layout
from .preprocess import Preprocess

SOURCE_FORMAT = "model-class"
_IMPORT = re.compile(r"^\s*(?:from\s+([A-Za-z_][\w]*)(?:\.[\w.]+)?\s+import|import\s+([A-Za-z_][\w]*)\.)", re.M)


@dataclass(frozen=True)
class ModelClassSpec:
    """What `--model-class FILE:Class [--model-args JSON] [--output-index I] [--output-scale S]` says."""

    file: Path
    class_name: str
    args: dict[str, Any] = field(default_factory=dict)
    output_index: int | None = None
    output_scale: float | None = None
    input_size: int = 112

    @classmethod
    def parse(cls, text: str, args: str | None = None, output_index: int | None = None,
              output_scale: float | None = None) -> "ModelClassSpec":
        """Parse the CLI's strings; UsageError naming the expected form."""
        file, sep, name = text.rpartition(":")
        if not sep or not file or not name.isidentifier():
            raise UsageError(f"--model-class {text!r} must be path/to/models.py:ClassName")
        parsed: Any = {}
        if args:
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as e:
                raise UsageError(f"--model-args is not valid JSON ({e.msg} at character {e.pos}); e.g. '{{\"width_factor\": 1}}'") from None
            if not isinstance(parsed, dict):
                raise UsageError(f"--model-args must be a JSON object of constructor arguments, got {type(parsed).__name__}")
        if output_scale is not None and not output_scale > 0:
            raise UsageError(f"--output-scale must be positive, got {output_scale}")
        size = int(parsed.get("input_size", 112)) if isinstance(parsed.get("input_size", 112), int) else 112
        return cls(Path(file), name, parsed, output_index, output_scale, size)


def _import_roots(file: Path) -> list[Path]:
    """The file's folder, plus each ancestor holding a top-level package its imports name."""
    roots = [file.parent]
    try:
        text = file.read_text(errors="replace")
    except OSError:
        return roots
    tops = {a or b for a, b in _IMPORT.findall(text)}
    for top in sorted(tops):
        if top in sys.builtin_module_names:
            continue
        for d in [file.parent, *file.parent.parents]:
            if (d / top).is_dir() or (d / f"{top}.py").is_file():
                if d not in roots:
                    roots.append(d)
                break
    return roots


def import_class(spec: ModelClassSpec) -> type[nn.Module]:
    """Import the user's file (its package-style sibling imports resolved) and return the class."""
    file = spec.file.resolve()
    if not file.is_file():
        raise UsageError(f"--model-class: {spec.file} does not exist; pass the .py file that defines the network")
    roots = _import_roots(file)
    # Import it under its dotted name from the outermost root, so its own package-relative
    # imports resolve the way they do when the fork runs from its repository root.
    root = roots[-1]
    dotted = ".".join(file.relative_to(root).with_suffix("").parts)
    added = [str(r) for r in roots if str(r) not in sys.path]
    sys.path[:0] = added
    # A generic top-level name (`models`, `utils`) may already be imported from elsewhere, even
    # from another fork earlier in this process: the user's own must be the one found.
    top = dotted.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    try:
        try:
            module = importlib.import_module(dotted)
        except Exception as e:  # the user's code may raise anything while importing
            raise UsageError(f"--model-class: importing {spec.file} failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); "
                             "run from the network's repository or fix its imports") from None
    finally:
        for r in added:
            sys.path.remove(r)
    cls = getattr(module, spec.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == module.__name__)
        raise UsageError(f"--model-class: {spec.file} has no nn.Module class {spec.class_name!r}"
                         f" (it defines {', '.join(found) or 'none'}); check the name after the colon")
    return cls


def build(spec: ModelClassSpec) -> nn.Module:
    """Construct the class with `--model-args`; a failing constructor is one line naming them."""
    cls = import_class(spec)
    try:
        return cls(**spec.args)
    except Exception as e:  # the user's constructor may raise anything
        raise UsageError(f"--model-class: {spec.class_name}({', '.join(f'{k}={v!r}' for k, v in spec.args.items())}) failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); "
                         "pass its constructor arguments with --model-args '{\"name\": value}'") from None


def load_weights(net: nn.Module, path: Path) -> None:
    """Strict key and shape match of the checkpoint's state dict against the class's own."""
    sd = unwrap_state_dict(read_torch_file(path), path)
    own = net.state_dict()
    for k, v in own.items():
        if k not in sd and not k.endswith("num_batches_tracked"):
            raise ShapeMismatchError(f"{path.name} does not fit {type(net).__name__}: the class has {k} {tuple(v.shape)}, "
                                     "the file does not; check --model-class and --model-args")
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ShapeMismatchError(f"{path.name} does not fit {type(net).__name__}: {k} is {tuple(sd[k].shape)} in the file, "
                                     f"{tuple(v.shape)} in the class; check --model-args")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ShapeMismatchError(f"{path.name} does not fit {type(net).__name__}: the file has {extra[0]} (and {len(extra) - 1} more) "
                                 "the class does not; check --model-class and --model-args")
    net.load_state_dict(sd, strict=False)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    raise UsageError(f"--model-class: the network returns a {type(out).__name__}, not tensors")


class UserLandmarkModel(nn.Module):
    """The user's network reduced to PFLD's contract: landmarks [N, 2P] in [0, 1] of the crop."""

    def __init__(self, net: nn.Module, index: int, scale: float) -> None:
        super().__init__()
        self.net = net
        self.index = index
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _outputs(self.net(x))[self.index].reshape(x.shape[0], -1)
        return y * self.scale if self.scale != 1.0 else y


def pick_output(net: nn.Module, spec: ModelClassSpec, crops: np.ndarray, pre: Preprocess) -> tuple[int, float, int]:
    """(output index, scale to [0, 1], points): by size 2N or --output-index; units from face crops."""
    with torch.no_grad():
        outs = _outputs(net(torch.from_numpy(pre.apply_nchw(crops))))
    per = [o.reshape(len(crops), -1).shape[1] for o in outs]
    if spec.output_index is not None:
        if not 0 <= spec.output_index < len(outs):
            raise UsageError(f"--output-index {spec.output_index} is out of range: the network returns {len(outs)} tensor(s)")
        index = spec.output_index
    else:
        even = [i for i, n in enumerate(per) if n % 2 == 0 and n >= 2 and outs[i].dim() in (2, 3)]
        if len(even) != 1:
            shapes = ", ".join(f"[{i}] {tuple(o.shape)}" for i, o in enumerate(outs))
            raise UsageError(f"--model-class: cannot tell which output holds the landmarks ({shapes}); pass --output-index I")
        index = even[0]
    if per[index] % 2:
        raise UsageError(f"--output-index {index} holds {per[index]} values per face, not 2 x points")
    values = outs[index].reshape(-1).numpy()
    if spec.output_scale is not None:
        scale = float(spec.output_scale)
    else:
        hi = float(np.percentile(np.abs(values), 95))
        size = pre.input_size
        if hi <= 1.5:
            scale = 1.0
        elif hi <= 1.5 * size:
            scale = 1.0 / size  # pixel units of the crop, detected: the values run to the crop size
        else:
            raise UsageError(f"--model-class: landmark values reach {hi:.3g}, neither [0, 1] nor pixels of a {size}-px crop; "
                             "pass --output-scale S (the factor that brings them to [0, 1])")
    return index, scale, per[index] // 2


def load_user_model(spec: ModelClassSpec, checkpoint: Path, crops: np.ndarray, preprocess: Preprocess | None) -> LoadedModel:
    """Build, load and wrap the user's network; its preprocessing is `preprocess` or measured later (stage 0)."""
    if not checkpoint.is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist; check the path")
    net = build(spec)
    load_weights(net, checkpoint)
    net.eval()
    pre = preprocess or Preprocess(input_size=spec.input_size)
    index, scale, points = pick_output(net, spec, crops, pre)
    from dataclasses import replace

    pre = replace(pre, layout=get_layout(points).name)
    wrapper = UserLandmarkModel(net, index, scale).eval()
    meta = CheckpointMeta(model=None, preprocess=pre, source_format=SOURCE_FORMAT, provenance={
        "file": checkpoint.name, "model_class": f"{spec.file}:{spec.class_name}", "model_args": spec.args,
        "output_index": index, "output_scale": scale, "points": points,
        "inferred": {"output_index": "flag" if spec.output_index is not None else "measured (size 2N)",
                     "output_scale": "flag" if spec.output_scale is not None else "measured (value range)"},
        "open": [],
    })
    return LoadedModel(model=net, aux=None, meta=meta, path=checkpoint, wrapper=wrapper)
