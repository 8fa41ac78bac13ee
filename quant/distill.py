"""Brief re-training of a calibrated quantized denoiser: distillation from its FP teacher by tuning the quantizers'
step sizes (LSQ-style straight-through gradients) and, for 1- / 2-bit weight options, the per-channel scales of the
multi-basis binarizer (BinaryDM); the weights themselves stay frozen.

The loss is the MSE between the quantized and the FP model's noise predictions on the same (x_t, t) inputs, e.g.
captured along the schedule the quantized model will run.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.quant.binarize import MultiBasisBinarizer
from tmpq.quant.layers import QuantLayer


def _make_scale_learnable(q: nn.Module) -> nn.Parameter:
    if isinstance(q, MultiBasisBinarizer):
        return q.alpha.requires_grad_(True)
    if isinstance(q.scale, nn.Parameter):
        return q.scale
    value = q.scale.detach().clone()
    del q._buffers["scale"]
    q.scale = nn.Parameter(value)
    return q.scale


def _active_quantizers(model: nn.Module) -> list[nn.Module]:
    out = []
    for layer in model.modules():
        if not isinstance(layer, QuantLayer):
            continue
        if layer.w_index is not None:
            out.append(layer.w_quant[layer.w_index])
        if layer.a_index is not None:
            out.append(layer.a_quant[layer.a_index])
            if layer.split is not None:
                out.append(layer.a_quant_split[layer.a_index])
    return out


def _output(model: nn.Module, batch) -> torch.Tensor:
    x, t = batch[0], batch[1]
    return model(x, t).sample


def distill_scales(qmodel: nn.Module, teacher: nn.Module, data: Sequence[tuple], iters: int = 200, lr: float = 1e-4,
                   seed: int = 0, progress: bool = False, output: Callable = _output) -> dict:
    """Tune the active quantizers' scales of ``qmodel`` to match ``teacher``'s outputs on ``data`` batches;
    ``output(model, batch)`` is the model's prediction on one batch (default: ``model(x, t).sample``; a denoiser
    adapter's for conditional models).

    Returns ``{"loss_before", "loss_after", "iters", "params"}`` (losses: mean over all batches, no grad).
    """
    from tqdm.auto import tqdm

    qs = _active_quantizers(qmodel)
    if not qs or iters <= 0:
        return {"loss_before": None, "loss_after": None, "iters": 0, "params": 0}
    params = [_make_scale_learnable(q) for q in qs]
    frozen = [p for p in qmodel.parameters() if all(p is not s for s in params)]
    saved_flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    teacher = teacher.eval()
    with torch.no_grad():
        targets = [output(teacher, b) for b in data]

    def mean_loss() -> float:
        # layers cache their quantized weights for no-grad calls: drop what was cached with other scales first
        for layer in qmodel.modules():
            if isinstance(layer, QuantLayer):
                layer.invalidate_cache()
        with torch.no_grad():
            return float(sum(F.mse_loss(output(qmodel, b), y) for b, y in zip(data, targets)) / len(data))

    before = mean_loss()
    opt = torch.optim.Adam(params, lr=lr)
    best = (before, [p.detach().clone() for p in params])
    g = torch.Generator().manual_seed(seed)
    for it in tqdm(range(iters), desc="distil quantizer scales", disable=not progress, leave=False):
        i = int(torch.randint(len(data), (1,), generator=g))
        loss = F.mse_loss(output(qmodel, data[i]), targets[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min=1e-8)
    after = mean_loss()
    if after > best[0]:  # never return a model worse than the calibrated one on the tuning data
        with torch.no_grad():
            for p, v in zip(params, best[1]):
                p.copy_(v)
        after = best[0]
    for p, flag in zip(frozen, saved_flags):
        p.requires_grad_(flag)
    for p in params:
        p.requires_grad_(False)
    for layer in qmodel.modules():
        if isinstance(layer, QuantLayer):
            layer.invalidate_cache()
    return {"loss_before": before, "loss_after": after, "iters": iters, "params": sum(p.numel() for p in params)}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A no-grad deep copy (e.g. the FP teacher before the model is wrapped)."""
    return copy.deepcopy(model).eval().requires_grad_(False)
