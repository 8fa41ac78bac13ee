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


# -- quantization-aware training (weights trained too): BinaryDM's recipe and its baselines ---------------------------

def _layer_quantizers(layer: QuantLayer) -> list[nn.Module]:
    return list(layer.w_quant) + layer.activation_quantizers()


def _features(out) -> torch.Tensor:
    """A block's output feature: the first element of a tuple output (a UNet down block returns (h, skips))."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _FeatureTap:
    """Forward hooks that keep the outputs of the named sub-modules of a model, in name order."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"lrm_modules: no module named {missing[0]!r}")
        self.names, self.out = list(names), {}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def keep(module, args, output):
            self.out[name] = _features(output)
        return keep

    def take(self) -> list[torch.Tensor]:
        feats = [self.out[n] for n in self.names]
        self.out = {}
        return feats

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _channels_last_rows(f: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial]`` -> ``[B * spatial, C]`` (a token tensor ``[B, T, C]`` -> ``[B * T, C]``)."""
    if f.ndim > 3:
        return f.movedim(1, -1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])


@torch.no_grad()
def pca_bases(teacher_feats: Sequence[torch.Tensor], rank_div: int = 4, min_rank: int = 2, seed: int = 0
              ) -> list[torch.Tensor]:
    """Per-feature low-rank projection ``[C, q]`` (``q = max(C // rank_div, min_rank)``): the top principal directions
    of the teacher's feature channels (``torch.pca_lowrank``, centred) on one calibration batch, as BinaryDM's
    low-rank representation mimicking fixes them once from the FP model."""
    out = []
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # pca_lowrank draws a random sketch
    try:
        for f in teacher_feats:
            rows = _channels_last_rows(f.float())
            q = min(max(rows.shape[1] // rank_div, min_rank), rows.shape[1])
            out.append(torch.pca_lowrank(rows, q=q, center=True, niter=4)[2].detach())
    finally:
        torch.random.set_rng_state(state)
    return out


def lrm_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
             bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Low-rank representation mimicking: mean over features of the MSE between student and teacher features
    projected on the teacher's principal directions, each divided by the teacher's projected mean square (so blocks
    of different magnitude weigh alike). Zero when the student's features equal the teacher's."""
    terms = []
    for s, t, k in zip(student_feats, teacher_feats, bases):
        ps, pt = _channels_last_rows(s) @ k, _channels_last_rows(t) @ k
        terms.append(F.mse_loss(ps, pt) / pt.pow(2).mean().clamp(min=1e-12))
    return torch.stack(terms).mean()


class Progressive:
    """BinaryDM's progressive initialisation: the quantized layers are switched on group by group (the official
    code binarizes the UNet from its middle block outwards, one group per stage); until its stage a layer runs at
    full precision (weights and inputs) and its weights keep training as FP weights. When a group is switched on,
    its binarizers are re-initialised from the layer's current weights (greedy scales, as at the start).

    ``groups``: the layers in switch-on order; ``stage_iters``: iterations per stage (group ``k`` is on from
    iteration ``k * stage_iters``); ``bits``: per layer, the ``(w_index, a_index)`` it takes when switched on.
    """

    def __init__(self, groups: Sequence[Sequence[QuantLayer]], stage_iters: int,
                 bits: dict[QuantLayer, tuple[int | None, int | None]] | None = None):
        self.groups = [list(g) for g in groups]
        self.stage_iters = max(int(stage_iters), 1)
        self.bits = {lay: (bits or {}).get(lay, (0, 0)) for g in self.groups for lay in g}
        self.on = 0  # groups switched on so far

    def start(self) -> None:
        """Every group's layers to full precision (call before training)."""
        for g in self.groups:
            for lay in g:
                lay.set_bits(None, None)
                lay.invalidate_cache()
        self.on = 0

    def groups_on_at(self, it: int) -> int:
        return min(len(self.groups), it // self.stage_iters + 1)

    @torch.no_grad()
    def step(self, it: int) -> None:
        """Switch on every group whose stage has begun by iteration ``it``."""
        while self.on < self.groups_on_at(it):
            for lay in self.groups[self.on]:
                w_index, a_index = self.bits[lay]
                lay.set_bits(w_index, a_index)
                if w_index is not None and isinstance(lay.w_quant[w_index], MultiBasisBinarizer):
                    q = lay.w_quant[w_index]
                    q.observe(lay.module.weight)
                    q.freeze()
                lay.invalidate_cache()
            self.on += 1

    def finish(self) -> None:
        self.step(len(self.groups) * self.stage_iters)


def qat(qmodel: nn.Module, teacher: nn.Module, batch: Callable[[int], tuple], iters: int, lr: float = 2e-4, *,
        eval_data: Sequence[tuple] = (), progressive: Progressive | None = None, lrm_modules: Sequence[str] = (),
        lrm_weight: float = 0.0, lrm_rank_div: int = 4, seed: int = 0, output: Callable = _output,
        on_log: Callable[[int, float, float], None] | None = None, log_every: int = 50) -> dict:
    """Quantization-aware training of a calibrated quantized model against its FP ``teacher``: every parameter
    (weights, biases, norms) trains, with straight-through gradients through the weight quantizers (binarizer
    signs, LSQ rounding) and learnable quantizer scales (binarizer bases, LSQ step sizes, activation step sizes).

    Loss: MSE between the student's and the teacher's outputs on ``batch(i)`` (iteration ``i``'s ``(x_t, t)``), plus
    ``lrm_weight`` x :func:`lrm_loss` on the outputs of ``lrm_modules`` (projections fixed from the teacher's features
    on ``batch(0)``). Adam, cosine learning-rate decay to 0 over ``iters``. ``progressive`` switches quantized layers
    on in stages (:class:`Progressive`); it is finished (every layer on) before the final loss.

    Returns ``{"loss_before", "loss_after", "iters", "params", "curve"}``; the losses are output MSE means over
    ``eval_data`` (no grad, with every layer quantized), ``curve`` the logged ``(iteration, loss, lrm)`` triples.
    """
    teacher = teacher.eval()
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayer)]
    for lay in layers:
        for q in _layer_quantizers(lay):
            if bool(getattr(q, "frozen", True)):
                _make_scale_learnable(q)

    def mean_loss() -> float | None:
        if not eval_data:
            return None
        for lay in layers:
            lay.invalidate_cache()
        with torch.no_grad():
            return float(sum(F.mse_loss(output(qmodel, b), output(teacher, b)) for b in eval_data) / len(eval_data))

    if progressive is not None:  # "before" = the calibrated model with every layer quantized
        progressive.finish()
    before = mean_loss()
    if progressive is not None:
        progressive.start()

    tap_s = _FeatureTap(qmodel, lrm_modules) if lrm_modules and lrm_weight > 0 else None
    tap_t = _FeatureTap(teacher, lrm_modules) if tap_s is not None else None
    bases: list[torch.Tensor] = []
    if tap_t is not None:
        with torch.no_grad():
            output(teacher, batch(0))
        bases = pca_bases(tap_t.take(), lrm_rank_div, seed=seed)
    params = [p for p in qmodel.parameters() if p.requires_grad or p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1))
    curve = []
    torch.manual_seed(seed)
    qmodel.train()
    try:
        for it in range(iters):
            if progressive is not None:
                progressive.step(it)
            b = batch(it)
            with torch.no_grad():
                target = output(teacher, b)
                t_feats = tap_t.take() if tap_t is not None else []
            loss = F.mse_loss(output(qmodel, b), target)
            lrm = torch.zeros(())
            if tap_s is not None:
                lrm = lrm_loss(tap_s.take(), t_feats, bases)
            total = loss + lrm_weight * lrm
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for lay in layers:
                    for q in _layer_quantizers(lay):
                        p = q.alpha if isinstance(q, MultiBasisBinarizer) else q.scale
                        if isinstance(p, nn.Parameter):
                            p.clamp_(min=1e-8)
            if log_every and (it % log_every == 0 or it == iters - 1):
                curve.append((it, float(loss.detach()), float(lrm.detach())))
                if on_log is not None:
                    on_log(it, *curve[-1][1:])
    finally:
        for tap in (tap_s, tap_t):
            if tap is not None:
                tap.close()
        qmodel.eval()
        if progressive is not None:
            progressive.finish()
        for p in qmodel.parameters():
            p.requires_grad_(False)
    after = mean_loss()
    return {"loss_before": before, "loss_after": after, "iters": iters,
            "params": sum(p.numel() for p in params), "curve": curve}
