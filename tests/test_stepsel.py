"""Optimal step selection by dynamic programming over an FP teacher trajectory (issue 21 item 3a)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.conftest import tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.evaluators.profile import teacher_trajectory, transition_costs
from tmpq.jobs.search import dp_schedules
from tmpq.search.stepsel import dp_path


def test_the_dynamic_programme_finds_the_cheapest_path():
    rng = np.random.default_rng(0)
    g = 7
    cost = np.full((g, g + 1), np.inf)
    for i in range(g):
        cost[i, i + 1:] = rng.random(g - i)
    for k in (1, 2, 3, 5, g):
        path = dp_path(cost, k)
        total = sum(cost[a, b] for a, b in zip(path, path[1:] + [g]))
        brute = min(sum(cost[a, b] for a, b in zip((0, *mid), (*mid, g)))
                    for mid in itertools.combinations(range(1, g), k - 1))
        assert path[0] == 0 and len(path) == k and total == pytest.approx(brute)
    with pytest.raises(TmpqError, match="steps: 8 is outside 1..7"):
        dp_path(cost, 8)


def test_optimal_schedules_beat_uniform_subsets_of_the_grid_on_their_own_cost():
    unet, cfg = tiny_unet(), embedded_scheduler_config()
    grid, states, eps = teacher_trajectory(unet, cfg, grid_steps=20, n=8)
    assert len(grid) == 20 and states.shape[0] == 21 and eps.shape[0] == 20
    cost = transition_costs(cfg, grid, states, eps)
    assert cost[0, 1] == pytest.approx(0.0, abs=1e-10)  # one grid step is the teacher's own step
    scheds = dp_schedules(unet, cfg, [3, 5], grid_steps=20, n=8)
    for k, ts in scheds.items():
        assert len(ts) == k and ts[0] == grid[0] and list(ts) == sorted(ts, reverse=True)
        idx = [grid.index(t) for t in ts]
        uniform = list(range(0, 20, 20 // k))[:k]
        path_cost = lambda p: sum(cost[a, b] for a, b in zip(p, p[1:] + [20]))  # noqa: E731
        assert path_cost(idx) <= path_cost(uniform) + 1e-12


def test_tmpq_sample_takes_the_dp_schedule(tmp_path, tiny_model_dir, capsys):
    from tests.conftest import run_cli

    code, out, err = run_cli(["sample", "--model", tiny_model_dir, "--schedule", "dp", "--steps", "4", "--n", "2",
                              "--out", tmp_path / "g.png"], capsys)
    assert code == 0 and "dp schedule, timesteps [990," in out, out + err
