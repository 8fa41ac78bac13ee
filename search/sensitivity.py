"""Per-timestep profiles of the FP model, for data-driven time groups (beyond the paper).

The FP model is run along a fine uniform DDIM schedule on a few bank images, recording at every step its noise
prediction eps and the sampler's prediction of the clean image x0. Two profiles are read off that probe:

- ``sensitivity`` (grouping ``sensitivity``): the mean absolute change of the predicted x0 per unit of t between
  neighbouring probe steps. Measured worse than uniform groups on the embedded model (results/search): x0 = xbar -
  sigma * eps moves fastest near t = T only because sigma is large there, so it refines high noise levels.
- ``step error`` (grouping ``error``): DDIM is Euler's method on dxbar / dsigma = eps(xbar, sigma), with xbar =
  x / sqrt(abar) and sigma = sqrt((1 - abar) / abar). A step of size h makes a local error of about h^2 / 2 * |deps /
  dsigma|, which reaches the final sample scaled by about 1 / sqrt(1 + sigma^2) = sqrt(abar) (exactly so for unit
  Gaussian data, whose ODE paths are xbar(sigma) = x0 sqrt(1 + sigma^2)). The weighted sum of those errors over a
  fixed number of steps is smallest when the step density in sigma is proportional to sqrt(sqrt(abar) |deps /
  dsigma|); in t that density is sqrt(sqrt(abar) * |deps / dt| * dsigma / dt). Equal shares of it per group put one
  step where each carries the same estimated error. (Without the sqrt(abar) weight the density piles up near t = T,
  as the sensitivity profile does.)
"""
from __future__ import annotations

import numpy as np
import torch

from tmpq.core.adapters import adapter_for, denoiser_of, guided_eps, sample_shape
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import NoiseBank
from tmpq.core.schedules import make_timesteps

VERSION = 2  # 2: the step-error profile (the sensitivity profile is unchanged from 1)


@torch.no_grad()
def _probe(unet: torch.nn.Module, scheduler, n_images: int, probe_steps: int, seed: int):
    """Descending probe timesteps and, at each, the batch's eps and x0 predictions (CPU float tensors), and T."""

    T = int(scheduler.config.num_train_timesteps)
    if not 2 <= probe_steps <= T:
        raise TmpqError(f"sensitivity.probe_steps: must be in [2, {T}], got {probe_steps}")
    if n_images < 1:
        raise TmpqError(f"sensitivity.n_images: must be >= 1, got {n_images}")
    ts = make_timesteps("uniform", probe_steps, T)
    scheduler.set_timesteps(timesteps=ts)
    bank = NoiseBank(seed, sample_shape(unet))
    device = next(unet.parameters()).device
    x = bank.initial(list(range(n_images))).to(device)
    inner = denoiser_of(unet)
    cond = adapter_for(inner).conditions(inner, range(n_images), device=device)
    steps, eps_all, x0_all = scheduler.timesteps.tolist(), [], []
    for t in steps:
        eps = guided_eps(unet, x, torch.full((x.shape[0],), t, dtype=torch.int64, device=device), cond)
        out = scheduler.step(eps, t, x, eta=0.0)
        eps_all.append(eps.float().cpu())
        x0_all.append(out.pred_original_sample.clamp(-1, 1).float().cpu())
        x = out.prev_sample
    return steps, eps_all, x0_all, T


def _per_timestep(steps, values, T: int, smooth: int, floor: float) -> np.ndarray:
    """Rates between neighbouring probe steps (at their midpoints) interpolated to every training timestep, smoothed
    over ``smooth`` timesteps, then :func:`_floored`."""
    mids = [0.5 * (a + b) for a, b in zip(steps, steps[1:])]
    mids, rates = np.array(mids[::-1]), np.array(values[::-1])  # ascending in t for np.interp
    prof = np.interp(np.arange(T), mids, rates)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        prof = np.convolve(np.pad(prof, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), kernel, mode="valid")
    return _floored(prof, floor)


def _floored(prof: np.ndarray, floor: float) -> np.ndarray:
    """``prof`` plus ``floor`` x its mean (so that no region is left without a group), checked finite."""
    prof = prof + floor * prof.mean() + 1e-12
    if not np.all(np.isfinite(prof)):
        raise TmpqError("sensitivity: the FP model produced non-finite predictions")
    return prof


def sensitivity_profile(unet: torch.nn.Module, scheduler, n_images: int = 64, probe_steps: int = 100,
                        seed: int = 0, smooth: int = 25, floor: float = 0.02) -> np.ndarray:
    """Mean |change of the predicted x0| per unit t, for each of the T training timesteps (length T, finite, > 0).

    ``smooth``: width (in timesteps) of the moving average; ``floor``: fraction of the mean added everywhere so no
    region of the trajectory is left without a group.
    """
    steps, _, x0s, T = _probe(unet, scheduler, n_images, probe_steps, seed)
    rates = [float((x0s[k] - x0s[k + 1]).abs().mean()) / (steps[k] - steps[k + 1]) for k in range(len(steps) - 1)]
    return _per_timestep(steps, rates, T, smooth, floor)


def sigma_of_t(alphas_cumprod) -> np.ndarray:
    """DDIM's ODE time sigma(t) = sqrt((1 - abar_t) / abar_t) for every training timestep (increasing)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def error_density(deps_dt: np.ndarray, alphas_cumprod) -> np.ndarray:
    """sqrt(sqrt(abar) * |deps/dt| * dsigma/dt) per training timestep: the step density in t that minimises the sum
    of DDIM's local errors weighted by how they reach the final sample (module docstring)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    dsigma = np.gradient(sigma_of_t(abar))  # per unit t
    return np.sqrt(np.sqrt(abar) * np.asarray(deps_dt, dtype=np.float64) * dsigma)


def step_error_profile(unet: torch.nn.Module, scheduler, n_images: int = 64, probe_steps: int = 100,
                       seed: int = 0, smooth: int = 25, floor: float = 0.02) -> np.ndarray:
    """:func:`error_density` of the FP model for each of the T training timesteps (length T, finite, > 0); |deps/dt|
    is the root mean square change of its eps prediction per unit t along the probe. Same settings as
    :func:`sensitivity_profile`."""
    steps, eps, _, T = _probe(unet, scheduler, n_images, probe_steps, seed)
    rates = [float((eps[k] - eps[k + 1]).pow(2).mean().sqrt()) / (steps[k] - steps[k + 1])
             for k in range(len(steps) - 1)]
    return _floored(error_density(_per_timestep(steps, rates, T, smooth, 0.0), scheduler.alphas_cumprod.numpy()),
                    floor)


# grouping kind -> the FP-model profile its groups are cut from
PROFILES = {"sensitivity": sensitivity_profile, "error": step_error_profile}
