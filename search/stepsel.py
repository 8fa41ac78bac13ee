"""Optimal step selection by dynamic programming over an FP teacher trajectory (the step-side baseline of issue 21,
after GITS, Chen et al. 2024, and "Optimal Stepsize for Diffusion Sampling", 2025).

The FP model samples ``n`` bank images along a fine grid (uniform DDIM, ``grid_steps`` steps); its states x_i at the
grid's timesteps and its noise predictions eps_i are kept. Jumping from grid point i straight to a later point j with
one DDIM step (x_i, eps_i) gives x̂_j; its error against the teacher's x_j, mean squared over the images, is the cost
of the edge i -> j (the last point is the clean sample). A schedule of k steps is a path 0 = i_0 < ... < i_k = end; the
dynamic programme finds the path of least total cost, and the schedule is the timesteps of i_0 .. i_(k-1). One teacher
run (``grid_steps`` denoiser calls on ``n`` images) pays for every k. The local cost is DDIM's (first order); other
solvers are sampled on the same schedule (the GITS practice), which is how the baselines use it.

The teacher run and the costs are measured by :func:`tmpq.evaluators.profile.dp_costs` (torch); this module is the
dynamic programme over them (pure NumPy); the search job joins the two (:func:`tmpq.jobs.search.dp_schedules`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tmpq.core.errors import TmpqError


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


def optimal_schedules(grid: Sequence[int], cost: np.ndarray, steps: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """The DP schedule of every step count in ``steps`` from one teacher run's ``grid`` timesteps and transition
    ``cost`` (:func:`tmpq.evaluators.profile.dp_costs`)."""
    return {int(k): tuple(grid[i] for i in dp_path(cost, int(k))) for k in steps}
