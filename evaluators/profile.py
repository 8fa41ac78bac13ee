"""Probes of the FP model for data-driven time groups and step selection: the part of them that runs the model.

The search library turns what is measured here into decisions without torch: :mod:`tmpq.search.sensitivity` makes
a per-timestep profile of the rates (the module docstring there derives them) and :mod:`tmpq.search.stepsel` picks
a schedule from the transition costs by dynamic programming; the search job (:mod:`tmpq.jobs.search`) joins the
two. Measuring and deciding are split so that only the evaluator touches torch at search time.

- :func:`x0_rates` / :func:`eps_rates`: the FP model along a fine uniform DDIM schedule on a few bank images; the
  mean absolute change of its clean-image prediction x0, or the root mean square change of its noise prediction
  eps, per unit t between neighbouring probe steps.
- :func:`dp_costs`: the FP teacher's DDIM trajectory on ``n`` bank images along a fine grid, and the cost of every
  one-step jump i -> j between its points (mean squared error against the teacher's state at j).
"""
from __future__ import annotations

import numpy as np
import torch

from tmpq.core.adapters import adapter_for, denoiser_of, guided_eps, sample_shape
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import NoiseBank, make_scheduler
from tmpq.core.schedules import make_timesteps, uniform_timesteps


@torch.no_grad()
def _probe(unet: torch.nn.Module, scheduler, n_images: int, probe_steps: int, seed: int):
    """Descending probe timesteps and, at each, the batch's eps and x0 predictions (CPU float tensors)."""

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
    return steps, eps_all, x0_all


def x0_rates(unet: torch.nn.Module, scheduler, n_images: int = 64, probe_steps: int = 100,
             seed: int = 0) -> tuple[list[int], list[float]]:
    """(descending probe timesteps, mean |change of the predicted x0| per unit t between each neighbouring pair)."""
    steps, _, x0s = _probe(unet, scheduler, n_images, probe_steps, seed)
    return steps, [float((x0s[k] - x0s[k + 1]).abs().mean()) / (steps[k] - steps[k + 1])
                   for k in range(len(steps) - 1)]


def eps_rates(unet: torch.nn.Module, scheduler, n_images: int = 64, probe_steps: int = 100,
              seed: int = 0) -> tuple[list[int], list[float]]:
    """(descending probe timesteps, root mean square change of the eps prediction per unit t between each
    neighbouring pair)."""
    steps, eps, _ = _probe(unet, scheduler, n_images, probe_steps, seed)
    return steps, [float((eps[k] - eps[k + 1]).pow(2).mean().sqrt()) / (steps[k] - steps[k + 1])
                   for k in range(len(steps) - 1)]


# grouping kind -> the FP-model rates its profile (tmpq.search.sensitivity.PROFILES) is made from
RATES = {"sensitivity": x0_rates, "error": eps_rates}


@torch.no_grad()
def teacher_trajectory(unet, scheduler_config: dict, grid_steps: int = 100, n: int = 64, seed: int = 20_000,
                       guidance_scale: float = 1.0):
    """(grid timesteps, states [G + 1, n, ...], eps [G, n, ...]) of the FP model's DDIM trajectory (a flow model's:
    Euler, the same step there) on bank images 0..n-1: states[i] is the sample at grid[i], states[G] the clean
    sample."""
    sched = make_scheduler(scheduler_config)
    grid = list(uniform_timesteps(grid_steps, sched.config.num_train_timesteps))
    sched.set_timesteps(timesteps=grid)
    inner = denoiser_of(unet)
    device = next(unet.parameters()).device
    cond = adapter_for(inner).conditions(inner, range(n), device=device)
    x = NoiseBank(seed, sample_shape(unet)).initial(range(n)).to(device)
    states, eps = [x], []
    for k, t in enumerate(grid):
        e = guided_eps(unet, x, torch.full((n,), t, dtype=torch.int64, device=device), cond, guidance_scale)
        x = sched.step(e, sched.timesteps[k], x).prev_sample  # the scheduler's own time (a flow model's: sigma*N)
        eps.append(e)
        states.append(x)
    return grid, torch.stack(states), torch.stack(eps)


def _jump(sched, x: torch.Tensor, eps: torch.Tensor, t: int, t_next: int | None) -> torch.Tensor:
    """One DDIM step from (x, eps) at ``t`` to ``t_next`` (None: the clean sample), clipping x0 as the sampler does."""
    sched.set_timesteps(timesteps=[t] if t_next is None else [t, t_next])
    return sched.step(eps, sched.timesteps[0], x).prev_sample


def transition_costs(scheduler_config: dict, grid, states: torch.Tensor, eps: torch.Tensor) -> np.ndarray:
    """cost[i, j] (j > i, j = len(grid) the clean sample): mean squared error of one DDIM jump from grid point i to j
    against the teacher's state at j; inf elsewhere."""
    sched = make_scheduler(scheduler_config)
    g = len(grid)
    cost = np.full((g, g + 1), np.inf)
    for i in range(g):
        for j in range(i + 1, g + 1):
            x_hat = _jump(sched, states[i], eps[i], grid[i], grid[j] if j < g else None)
            cost[i, j] = float((x_hat - states[j]).pow(2).mean())
    return cost


def dp_costs(unet, scheduler_config: dict, grid_steps: int = 100, n: int = 64, seed: int = 20_000,
             guidance_scale: float = 1.0) -> tuple[list[int], np.ndarray]:
    """(grid timesteps, :func:`transition_costs`) of one teacher run (``seed``: a noise seed apart from the
    evaluation seeds); one run pays for the DP schedule of every step count."""
    grid, states, eps = teacher_trajectory(unet, scheduler_config, grid_steps, n, seed, guidance_scale)
    return grid, transition_costs(scheduler_config, grid, states, eps)
