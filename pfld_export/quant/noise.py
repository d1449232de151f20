"""int8-robust training: `pfld-export train --int8-noise K` trains under int8-like rounding noise.

    handles = add_int8_noise(pfld, 8.0)   # training mode only; h.remove() for h in handles undoes it
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from ..model import PFLD, conv_units
from .qat import ACT_QMAX, ACT_QMIN


def add_int8_noise(pfld: PFLD, strength: float) -> list[Any]:
    """Make `pfld` train under int8-like rounding noise; returns the hook handles (`.remove()`).

    In training mode, every tensor the TFLite int8 graph requantizes (`FakeQuantPFLD`'s sites:
    each conv output after its fused activation, each projection, each residual ADD, the
    concatenated S1/S2/S3 and the landmarks) gets uniform noise of `strength` int8 steps, one step
    being the batch's own range / 255. A ReLU6 output is clipped back into [0, 6] after it, as
    its fused int8 output cannot leave that range. Evaluation mode is the plain network, and the
    hooks are not part of the weights, so the checkpoint is an ordinary PFLD. Why: post-training
    int8 is saturated on PFLD (its error is rounding noise spread over every layer,
    benchmarks/int8_fidelity.md), and fine-tuning a float-trained network (`qat`) barely moves
    its sensitivity to that noise. Training against it from the first step does: 0.25X at
    strength 8 moves 0.29-0.34 px under int8 instead of 0.49, for a worse float NME (0.089 vs
    0.081 on synthetic faces).
    """
    if not strength >= 0:
        raise UsageError(f"--int8-noise {strength} must be >= 0 (int8 steps of noise; 0 = off)")
    if strength == 0:
        return []
    units = list(conv_units(pfld, "--int8-noise"))  # before any hook goes on: a refusal leaves the model as it was

    def noisy(x: torch.Tensor) -> torch.Tensor:
        step = (x.detach().amax() - x.detach().amin()).clamp_min(1e-12) / (ACT_QMAX - ACT_QMIN)
        return x + (torch.rand_like(x) - 0.5) * (strength * step)

    def after(mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return noisy(out) if mod.training else out

    def after_relu6(mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return noisy(out).clamp(0.0, 6.0) if mod.training else out

    def before(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        return (noisy(args[0]), *args[1:]) if mod.training else None

    # One hook per module, in forward order; the stem convs and conv8 share one activation module,
    # whose every call is a requantized output.
    outputs: dict[int, tuple[nn.Module, Callable[..., Any]]] = {}
    for u in units:
        if u.act is not None:
            outputs.setdefault(id(u.act), (u.act, after_relu6 if u.activation == "relu6" else after))
        else:  # a linear projection (after its BN), or the landmarks
            out_module = u.bn if u.bn is not None else u.conv
            outputs[id(out_module)] = (out_module, after)
        if u.residual:
            block = pfld.get_submodule(u.block)
            outputs[id(block)] = (block, after)  # the residual ADD
    handles = [m.register_forward_hook(hook) for m, hook in outputs.values()]
    for u in units:
        if isinstance(u.conv, nn.Linear):
            handles.append(u.conv.register_forward_pre_hook(before))  # the concat's one scale
    return handles
