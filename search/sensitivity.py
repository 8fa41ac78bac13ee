"""Per-timestep sensitivity of the FP model, for data-driven time groups (beyond the paper).

The FP model is run along a fine uniform DDIM schedule on a few bank images; at every step the sampler's prediction
of the clean image x0 is recorded. Sensitivity at t is the mean absolute change of that prediction per unit of t
between neighbouring probe steps: where x0 moves fast, a coarse step makes a large discretisation error, so
:func:`search.groups.sensitivity_groups` gives those timesteps small groups (finer choice).
"""
from __future__ import annotations

import numpy as np
import torch

from tmpq.errors import TmpqError

VERSION = 1


@torch.no_grad()
def sensitivity_profile(unet: torch.nn.Module, scheduler, n_images: int = 64, probe_steps: int = 100,
                        seed: int = 0, smooth: int = 25, floor: float = 0.02) -> np.ndarray:
    """Sensitivity for each of the T training timesteps (length T, finite, > 0).

    ``smooth``: width (in timesteps) of the moving average; ``floor``: fraction of the mean added everywhere so no
    region of the trajectory is left without a group.
    """
    from tmpq.sampler import NoiseBank
    from tmpq.schedules import make_timesteps

    T = int(scheduler.config.num_train_timesteps)
    if not 2 <= probe_steps <= T:
        raise TmpqError(f"sensitivity.probe_steps: must be in [2, {T}], got {probe_steps}")
    if n_images < 1:
        raise TmpqError(f"sensitivity.n_images: must be >= 1, got {n_images}")
    ts = make_timesteps("uniform", probe_steps, T)
    scheduler.set_timesteps(timesteps=ts)
    size = unet.config.sample_size
    hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    bank = NoiseBank(seed, (unet.config.in_channels, *hw))
    idx = list(range(n_images))
    device = next(unet.parameters()).device
    x = bank.initial(idx).to(device)
    x0s, steps = [], scheduler.timesteps.tolist()
    for t in steps:
        eps = unet(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=device)).sample
        out = scheduler.step(eps, t, x, eta=0.0)
        x0s.append(out.pred_original_sample.clamp(-1, 1).float().cpu())
        x = out.prev_sample
    mids, rates = [], []
    for k in range(len(steps) - 1):
        dt = steps[k] - steps[k + 1]
        rates.append(float((x0s[k] - x0s[k + 1]).abs().mean()) / dt)
        mids.append(0.5 * (steps[k] + steps[k + 1]))
    mids, rates = np.array(mids[::-1]), np.array(rates[::-1])  # ascending in t for np.interp
    prof = np.interp(np.arange(T), mids, rates)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        prof = np.convolve(np.pad(prof, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), kernel, mode="valid")
    prof = prof + floor * prof.mean() + 1e-12
    if not np.all(np.isfinite(prof)):
        raise TmpqError("sensitivity: the FP model produced non-finite predictions")
    return prof
