"""BRECQ-style block reconstruction: learn AdaRound rounding of every quantized layer inside a block so that the
quantized block reproduces the FP block's outputs on cached block inputs.

Loss = ||block_q(x) - block_fp(x)||^2 + lam * sum(rounding regulariser), beta annealed from 20 to 2 after a 20 %
warm-up, Adam on the rounding variables only. Inputs and FP outputs are cached once per block (``BlockCache``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from tmpq.quant.adaround import AdaRoundQuantizer
from tmpq.quant.layers import QuantLayer, correct_bias


@dataclass
class BlockCache:
    """Captured (args, kwargs) of a block's forward calls and its FP outputs, on the CPU."""

    inputs: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor]


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block(model: nn.Module, block: nn.Module, run: Callable[[], None]) -> BlockCache:
    """Record every call of ``block`` (inputs and outputs) while ``run()`` drives ``model``."""
    cache = BlockCache([], [])

    def pre(mod, args, kwargs):
        cache.inputs.append((_detach(args), _detach(kwargs)))

    def post(mod, args, kwargs, out):
        cache.outputs.append(_detach(out if isinstance(out, torch.Tensor) else out[0]))

    h1 = block.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = block.register_forward_hook(post, with_kwargs=True)
    try:
        run()
    finally:
        h1.remove()
        h2.remove()
    return cache


def _active_adaround(layers: Iterable[QuantLayer]) -> list[tuple[QuantLayer, AdaRoundQuantizer]]:
    out = []
    for layer in layers:
        if layer.w_index is None:
            continue
        q = layer.w_quant[layer.w_index]
        if isinstance(q, AdaRoundQuantizer):
            out.append((layer, q))
    return out


def reconstruct_block(block: nn.Module, cache: BlockCache, iters: int = 500, lr: float = 1e-3, lam: float = 0.01,
                      warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), batch_calls: int = 1,
                      generator: torch.Generator | None = None, bias_correction: bool = False) -> dict:
    """Optimise the active AdaRound options of every ``QuantLayer`` in ``block``; returns losses before / after.

    The block runs with its current option indices (activation quantizers frozen), so call it once per option.
    The active options' bias corrections are zeroed while the rounding is learned (soft rounding starts at the FP
    weight, which needs none) and, with ``bias_correction``, measured again on the cached FP inputs afterwards.
    """
    layers = [m for m in block.modules() if isinstance(m, QuantLayer)]
    pairs = _active_adaround(layers)
    if not pairs or not cache.inputs:
        return {"layers": 0, "loss_before": None, "loss_after": None}
    g = generator or torch.Generator().manual_seed(0)

    def block_loss(i: int) -> torch.Tensor:
        args, kwargs = cache.inputs[i]
        out = block(*args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        return (out - cache.outputs[i]).pow(2).sum(1).mean()

    with torch.no_grad():
        before = sum(float(block_loss(i)) for i in range(len(cache.inputs))) / len(cache.inputs)
    for layer, q in pairs:
        q.bias_shift.zero_()
        q.hard.fill_(False)
        q.alpha.requires_grad_(True)
        layer.invalidate_cache()
    opt = torch.optim.Adam([q.alpha for _, q in pairs], lr=lr)
    n_warm = int(warmup * iters)
    try:
        for it in range(iters):
            idx = torch.randint(len(cache.inputs), (batch_calls,), generator=g).tolist()
            rec = sum(block_loss(i) for i in idx) / batch_calls
            if it < n_warm:
                reg = torch.zeros(())
            else:
                frac = (it - n_warm) / max(1, iters - n_warm)
                b = beta[1] + (beta[0] - beta[1]) * (1 - frac)
                reg = lam * sum(q.regularizer(b) for _, q in pairs)
            opt.zero_grad(set_to_none=True)
            (rec + reg).backward()
            opt.step()
    finally:
        for layer, q in pairs:
            q.alpha.requires_grad_(False)
            q.hard.fill_(True)
            layer.invalidate_cache()
    if bias_correction:
        correct_bias(layers, lambda: [block(*a, **k) for a, k in cache.inputs])
    with torch.no_grad():
        after = sum(float(block_loss(i)) for i in range(len(cache.inputs))) / len(cache.inputs)
    return {"layers": len(pairs), "loss_before": before, "loss_after": after}
