"""Calibrating a supernet: every option of every layer once, on (x_t, t) batches captured from the FP sampler,
with the bookkeeping that makes it resumable (per activation option, per timestep group) and BRECQ-style block
reconstruction after AdaRound. The supernet itself only switches options and runs observation passes
(:meth:`QuantSupernet.observe`, :meth:`QuantSupernet.correct_bias`)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tmpq.core.adapters import adapter_for, forward, select, unpack
from tmpq.core.devices import release_freed_memory
from tmpq.core.errors import TmpqError
from tmpq.quant.functional import affine_params
from tmpq.quant.reconstruct import capture_block, reconstruct_block
from tmpq.supernet.calib_data import MODES


@torch.no_grad()
def calibrate(net, data: Iterable[tuple[torch.Tensor, torch.Tensor]], mode: str = "per-option",
              seed: int = 0, progress: bool = True, checkpoint: Path | str | None = None) -> None:
    """Calibrate every option of every layer once.

    Weights: each option observes the FP weight (per-channel MSE search by default).
    Activations, ``per-option``: for each activation option the whole model runs at (w ~ a, a) (the authors'
    code); ``random-path``: each batch runs a random per-gene allocation (the paper text) and each layer's active
    option observes. ``data`` yields (x_t, t) batches captured from the FP sampler. With ``checkpoint``, the
    state is saved after every finished activation option (every finished timestep group with ``time_groups``
    > 1) and a rerun resumes after the last finished one.

    ``time_groups`` G > 1: the distinct calibration timesteps are split into G contiguous groups of equal count
    (fewer if there are fewer timesteps); bias correction and activation ranges run once per group on its data
    and are kept in the layers' banks; afterwards each denoiser call makes its timestep's group live.
    """
    if mode not in MODES:
        raise TmpqError(f"calibration.mode: unknown {mode!r}; choose {' or '.join(MODES)}")
    batches = list(data)
    if not batches:
        raise TmpqError("calibration: no calibration data")
    G = net.config.time_groups  # bank rows per pass; the groups actually formed: len(parts)
    P = getattr(net, "passes", 1)  # 2: the null pass of guidance has its own bank rows (guidance_ranges)
    parts = [np.unique(torch.cat([unpack(b)[1].reshape(-1) for b in batches]).cpu().numpy())]
    if G > 1:  # data with fewer distinct timesteps than groups: one group per timestep (the bank's last rows
        # stay unused)
        parts = np.array_split(parts[0], min(G, len(parts[0])))
    starts = [int(p[0]) for p in parts[1:]]
    nulls = [_null_rows(net, b) for b in batches] if P > 1 else None
    if P > 1 and not any(bool(m.any()) for m in nulls):
        raise TmpqError("supernet.guidance_ranges = separate: the calibration data have no null-pass inputs; "
                        "calibrate with classifier-free guidance (model.guidance_scale != 1; a guidance-distilled "
                        "model, e.g. Flux with guidance_embeds, has no null pass: use shared ranges)")
    # (bank row, pass, timestep part) of every group that gets its own ranges
    jobs = [(p * G + g, p, part) for p in range(P) for g, part in enumerate(parts)]
    progress_meta: dict = {}
    if checkpoint is not None and Path(checkpoint).is_file():
        progress_meta = net.load(checkpoint, allow_partial=True)
        if progress_meta.get("mode") != mode or progress_meta.get("time_starts", []) != starts:
            progress_meta = {}
    done_groups = list(progress_meta.get("done_groups", []))
    done = list(progress_meta.get("done_a_bits", []))
    net.time_starts, net._live_group = [], None  # no routing while calibrating
    net._calibrated = False
    if not done and not done_groups:
        for layer in net.layers.values():
            layer.calibrate_weights()
        check_finite_ranges(net)
    banked = G * P > 1
    for j, (row, p, part) in enumerate(jobs):
        if row in done_groups:
            continue
        if len(jobs) > 1:
            keep = torch.as_tensor(part)
            group = []
            for i, b in enumerate(batches):
                t = unpack(b)[1].reshape(-1)
                m = torch.isin(t.cpu(), keep) if len(parts) > 1 else torch.ones(t.numel(), dtype=torch.bool)
                if P > 1:
                    m = m & (nulls[i] if p else ~nulls[i])
                if bool(m.any()):
                    group.append(select(b, m.to(t.device)))
            for layer in net.layers.values():  # every group observes afresh
                for q in layer.activation_quantizers():
                    q.reset()
        else:
            group = batches
        desc = (f" [time group {row % G + 1}/{len(parts)}{', null pass' if p else ''}]" if len(jobs) > 1 else "")
        _calibrate_activations(net, group, mode, seed, progress, desc, done if j == len(done_groups) else [],
                               checkpoint if not banked else None)
        if net.config.stream_ranges == "shared":
            tie_stream_ranges(net)
        done = []
        if banked:
            for layer in net.layers.values():
                layer.store_time_group(row)
            done_groups.append(row)
            if checkpoint is not None and len(done_groups) < len(jobs):
                net.time_starts = starts
                net.save(checkpoint, progress={"mode": mode, "time_starts": starts, "done_groups": done_groups,
                                                "complete": False})
                net.time_starts = []
    check_finite_winograd(net)
    for layer in net.layers.values():
        layer.invalidate_cache()
    release_freed_memory()  # calibration's transients need not stay resident through the search
    net.time_starts, net._live_group = starts, (jobs[-1][0] if banked else None)
    net._calibrated = True
    net.set_fp()
    if checkpoint is not None:
        net.save(checkpoint, progress={"mode": mode, "done_a_bits": list(net.config.a_bits), "time_starts": starts,
                                        "done_groups": [row for row, _, _ in jobs], "complete": True})


@torch.no_grad()
def tie_stream_ranges(net) -> None:
    """``supernet.stream_ranges = "shared"``: each pair of a joint attention's image- and text-stream projections
    (the adapter's ``stream_pairs``) gets, per activation option, the one range that covers both of the ranges they
    were calibrated to (a symmetric grid: the larger scale; an asymmetric one: the union of the two intervals)."""
    for a, b in adapter_for(net.unet).stream_pairs(net.unet):
        la, lb = net.layers.get(a), net.layers.get(b)
        if la is None or lb is None:
            continue  # a pair with a layer left FP (exclude / include): nothing to share
        for qa, qb in zip(la.activation_quantizers(), lb.activation_quantizers()):
            if qa.symmetric:
                scale, zp = torch.maximum(qa.scale, qb.scale), torch.zeros_like(qa.zero_point)
            else:
                lo = torch.minimum((qa.qmin - qa.zero_point) * qa.scale, (qb.qmin - qb.zero_point) * qb.scale)
                hi = torch.maximum((qa.qmax - qa.zero_point) * qa.scale, (qb.qmax - qb.zero_point) * qb.scale)
                scale, zp = affine_params(lo, hi, qa.bits, qa.symmetric)
            for q in (qa, qb):
                q.scale.data.copy_(scale)
                q.zero_point.copy_(zp)
        la.invalidate_cache()
        lb.invalidate_cache()


def _null_rows(net, batch) -> torch.Tensor:
    """The rows of a calibration batch that are guidance's null pass (by their conditioning)."""
    x, t, cond = unpack(batch)
    return adapter_for(net.unet).null_rows(net.unet, cond, x.shape[0])


def _calibrate_activations(net, batches, mode: str, seed: int, progress: bool, desc: str, done: list[int],
                           checkpoint) -> None:
    """Bias correction and activation ranges of every option on ``batches`` (one timestep group)."""
    if not done and net.config.bias_correction:
        net.correct_bias(batches)
    if mode == "per-option":
        for j, a in enumerate(net.config.a_bits):
            if a in done or (j > 0 and net.num_genes == 0):  # all layers pinned: one pass is all there is
                continue
            w = a if a in net.config.w_bits else max(net.config.w_bits)
            net.set_uniform(w, a)
            net.observe(tqdm(batches, desc=f"calibrate A{a} (W{w}){desc}", disable=not progress, leave=False))
            for name, layer in net.layers.items():
                if name in net._gene_of:
                    layer.freeze_activations(j)
                elif not bool(layer.a_quant[0].frozen):
                    layer.freeze_activations(0)
            check_finite_ranges(net)  # before a checkpoint could keep them
            done.append(a)
            if checkpoint is not None and len(done) < len(net.config.a_bits):
                net.save(checkpoint, progress={"mode": mode, "done_a_bits": done, "complete": False})
    else:
        rng = np.random.default_rng(seed)
        seen: set[tuple[str, int]] = set()
        for batch in tqdm(batches, desc=f"calibrate random-path{desc}", disable=not progress, leave=False):
            alloc = [(int(rng.choice(net.config.w_bits)), int(rng.choice(net.config.a_bits)))
                     for _ in range(net.num_genes)]
            net.set_bits(alloc)
            seen |= {(n, lay.a_index) for n, lay in net.layers.items()}
            net.observe([batch])
        # every option must have seen data: fill gaps with uniform passes at the missing option
        for j, a in enumerate(net.config.a_bits):
            if any((n, j) not in seen for n in net._gene_of):
                net.set_uniform(max(net.config.w_bits), a)
                net.observe(batches[: max(1, len(batches) // 4)])
        for layer in net.layers.values():
            layer.freeze_activations()
        check_finite_ranges(net)


@torch.no_grad()
def check_finite_ranges(net) -> None:
    """Refuse a calibration whose quantizer state is not finite (NaN / inf weights or activations observed): it
    would make every candidate's images NaN and every evaluation fail far from the cause. One line naming the
    layer, the option and the tensor."""
    for name, layer in net.layers.items():
        for kind, quantizers in (("activation", layer.activation_quantizers()), ("weight", layer.w_quant)):
            for q in quantizers:
                for tname, t in (*q.named_parameters(), *q.named_buffers()):
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        what = "range" if tname in ("scale", "zero_point", "tg_scale", "tg_zero_point") else tname
                        raise TmpqError(f"calibration: layer {name}: non-finite {kind} {what} ({tname} of its "
                                        f"{q.bits}-bit option); the model or the calibration data produce NaN or "
                                        f"infinite {kind}s there")


@torch.no_grad()
def check_finite_winograd(net) -> None:
    """Refuse a calibration that left a Winograd option's ``V`` ranges or ``U`` grid non-finite (a layer that never
    observed an activation option, or NaN inputs): one line naming the layer, the tile and the option."""
    for name, layer in net.layers.items():
        for tile in getattr(layer, "wino", ()):
            for j, b in enumerate(layer.a_bits):
                if not bool(torch.isfinite(tile.v_lo[j]).all() and torch.isfinite(tile.v_hi[j]).all()):
                    raise TmpqError(f"calibration: layer {name}: non-finite Winograd F({tile.m}, 3) input-tile ranges "
                                    f"of its {b}-bit activation option (it observed no finite inputs there)")
            for q in tile.u_quant:
                if not bool(torch.isfinite(q.scale).all()):
                    raise TmpqError(f"calibration: layer {name}: non-finite Winograd F({tile.m}, 3) weight grid of "
                                    f"its {q.bits}-bit option; the model's weights hold NaN or infinite values")


def blocks(net) -> list[tuple[str, nn.Module]]:
    """Reconstruction units: outermost modules of a ``block_types`` class, plus each quantized layer that lies
    in none of them."""
    out: list[tuple[str, nn.Module]] = []
    covered: set[str] = set()
    for name, mod in net.unet.named_modules():
        if type(mod).__name__ in net.config.block_types and not any(name.startswith(c + ".") for c in covered):
            out.append((name, mod))
            covered.add(name)
    for name, layer in net.layers.items():
        if not any(name.startswith(c + ".") for c in covered):
            out.append((name, layer))
    return out


def reconstruct(net, data: list[tuple[torch.Tensor, torch.Tensor]], iters: int = 200, lr: float = 1e-3,
                progress: bool = True) -> list[dict]:
    """BRECQ / AdaRound for every weight option, block by block (whole model at that option, as the authors'
    code). Needs ``w_rounding = "adaround"`` and frozen activation quantizers (``calibrate`` first)."""
    if net.config.w_rounding != "adaround":
        raise TmpqError("reconstruction needs supernet.w_rounding = adaround")
    units = blocks(net)
    reports = []
    net.set_fp()
    caches = {}
    for name, block in tqdm(units, desc="cache block I/O", disable=not progress, leave=False):
        caches[name] = capture_block(net.unet, block, lambda: [forward(net.unet, b) for b in data])
    for w in (net.config.w_bits if net.num_genes else net.config.w_bits[:1]):  # all pinned: one pass
        a = w if w in net.config.a_bits else max(net.config.a_bits)
        net.set_uniform(w, a)
        for name, block in tqdm(units, desc=f"reconstruct W{w}A{a}", disable=not progress, leave=False):
            res = reconstruct_block(block, caches[name], iters=iters, lr=lr,
                                    bias_correction=net.config.bias_correction)
            reports.append({"block": name, "w_bits": w, "a_bits": a, **res})
    net.set_fp()
    return reports
