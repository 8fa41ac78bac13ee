"""Optimal step selection by dynamic programming over an FP teacher trajectory (the step-side baseline of issue 21,
after GITS, Chen et al. 2024, and "Optimal Stepsize for Diffusion Sampling", 2025).

The FP model samples ``n`` bank images along a fine grid (uniform DDIM, ``grid_steps`` steps); its states x_i at the
grid's timesteps and its noise predictions eps_i are kept. Jumping from grid point i straight to a later point j with
one DDIM step (x_i, eps_i) gives x̂_j; its error against the teacher's x_j, mean squared over the images, is the cost
of the edge i -> j (the last point is the clean sample). A schedule of k steps is a path 0 = i_0 < ... < i_k = end; the
dynamic programme finds the path of least total cost, and the schedule is the timesteps of i_0 .. i_(k-1). One teacher
run (``grid_steps`` denoiser calls on ``n`` images) pays for every k. The local cost is DDIM's (first order); other
solvers are sampled on the same schedule (the GITS practice), which is how the baselines use it.
"""
from __future__ import annotations

import numpy as np
import torch

from tmpq.core.adapters import adapter_for, denoiser_of, guided_eps, sample_shape
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import NoiseBank, make_scheduler
from tmpq.core.schedules import uniform_timesteps


@torch.no_grad()
def teacher_trajectory(unet, scheduler_config: dict, grid_steps: int = 100, n: int = 64, seed: int = 20_000,
                       guidance_scale: float = 1.0):
    """(grid timesteps, states [G + 1, n, ...], eps [G, n, ...]) of the FP model's DDIM trajectory on bank images
    0..n-1: states[i] is the sample at grid[i], states[G] the clean sample."""
    sched = make_scheduler(scheduler_config)
    grid = list(uniform_timesteps(grid_steps, sched.config.num_train_timesteps))
    sched.set_timesteps(timesteps=grid)
    inner = denoiser_of(unet)
    device = next(unet.parameters()).device
    cond = adapter_for(inner).conditions(inner, range(n), device=device)
    x = NoiseBank(seed, sample_shape(unet)).initial(range(n)).to(device)
    states, eps = [x], []
    for t in grid:
        e = guided_eps(unet, x, torch.full((n,), t, dtype=torch.int64, device=device), cond, guidance_scale)
        x = sched.step(e, t, x).prev_sample
        eps.append(e)
        states.append(x)
    return grid, torch.stack(states), torch.stack(eps)


def _jump(sched, x: torch.Tensor, eps: torch.Tensor, t: int, t_next: int | None) -> torch.Tensor:
    """One DDIM step from (x, eps) at ``t`` to ``t_next`` (None: the clean sample), clipping x0 as the sampler does."""
    sched.set_timesteps(timesteps=[t] if t_next is None else [t, t_next])
    return sched.step(eps, t, x).prev_sample


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


def dp_path(cost: np.ndarray, k: int) -> list[int]:
    """The k-jump path 0 -> ... -> end (= cost.shape[1] - 1) of least total cost; returns its k start points."""
    g, end = cost.shape[0], cost.shape[1] - 1
    if not 1 <= k <= g:
        raise TmpqError(f"steps: {k} is outside 1..{g} (the teacher grid's steps)")
    best = np.full((k + 1, end + 1), np.inf)  # best[m, j]: least cost of reaching j in m jumps from 0
    back = np.zeros((k + 1, end + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(1, end + 1):
            cand = best[m - 1, :min(j, g)] + cost[:min(j, g), j]
            i = int(np.argmin(cand))
            best[m, j], back[m, j] = cand[i], i
    path, j = [], end
    for m in range(k, 0, -1):
        j = int(back[m, j])
        path.append(j)
    return path[::-1]


def optimal_schedules(unet, scheduler_config: dict, steps, grid_steps: int = 100, n: int = 64, seed: int = 20_000,
                      guidance_scale: float = 1.0) -> dict[int, tuple[int, ...]]:
    """The DP schedule of every step count in ``steps`` from one teacher run (``seed``: a noise seed apart from the
    evaluation seeds)."""
    grid, states, eps = teacher_trajectory(unet, scheduler_config, grid_steps, n, seed, guidance_scale)
    cost = transition_costs(scheduler_config, grid, states, eps)
    return {int(k): tuple(grid[i] for i in dp_path(cost, int(k))) for k in steps}
