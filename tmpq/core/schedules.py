"""Timestep spacings for DDIM-style sampling: uniform (DDIM "leading"), trailing (diffusers' "trailing": starts at
T - 1 and never spends a step at t = 0, the stock spacing for few steps) and quadratic (DDIM "quad", TMPQ-DM seed).

Every schedule is a strictly descending tuple of ints in [0, T-1].
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpq.core.errors import TmpqError

SCHEDULES = ("uniform", "trailing", "quad")


def uniform_timesteps(n: int, num_train_timesteps: int = 1000, offset: int = 0) -> tuple[int, ...]:
    """DDIM's uniform spacing, as ``DDIMScheduler(timestep_spacing="leading")``: ``(arange(n) * (T // n))[::-1] + offset``.

    Example:
        >>> uniform_timesteps(5)
        (800, 600, 400, 200, 0)
    """
    _check_n(n, num_train_timesteps)
    ts = np.arange(n) * (num_train_timesteps // n) + offset
    return validate_timesteps(tuple(int(t) for t in ts[::-1]), num_train_timesteps)


def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """diffusers' ``timestep_spacing="trailing"``: ``round(arange(T, 0, -T / n)) - 1`` (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed").

    Example:
        >>> trailing_timesteps(5)
        (999, 799, 599, 399, 199)
    """
    _check_n(n, num_train_timesteps)
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1
    return validate_timesteps(tuple(int(t) for t in ts), num_train_timesteps)


def quadratic_timesteps(n: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Quadratic spacing ``floor(linspace(0, sqrt(0.8 T), n) ** 2)`` (DDIM "quad"; the TMPQ-DM group edges).

    Where flooring repeats a timestep (from n of about 35 at T = 1000) the repeat is bumped up by one, so the schedule
    keeps n distinct steps (a repeated step is a no-op in deterministic DDIM).

    Example:
        >>> quadratic_timesteps(5)
        (800, 450, 200, 50, 0)
    """
    _check_n(n, num_train_timesteps)
    ts = np.floor(np.linspace(0.0, np.sqrt(0.8 * num_train_timesteps), n) ** 2).astype(np.int64)
    for i in range(1, n):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    if ts[-1] > num_train_timesteps - 1:
        raise TmpqError(f"steps: {n} quadratic steps do not fit in {num_train_timesteps} train timesteps")
    return validate_timesteps(tuple(int(t) for t in ts[::-1]), num_train_timesteps)


def make_timesteps(schedule: str, n: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Named spacing: ``uniform``, ``trailing`` or ``quad``."""
    if schedule == "uniform":
        return uniform_timesteps(n, num_train_timesteps)
    if schedule == "trailing":
        return trailing_timesteps(n, num_train_timesteps)
    if schedule == "quad":
        return quadratic_timesteps(n, num_train_timesteps)
    raise TmpqError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Check a schedule is non-empty, integral, strictly descending and inside [0, T-1]; return it as a tuple."""
    ts = tuple(timesteps)
    if not ts:
        raise TmpqError("timesteps: the schedule is empty")
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TmpqError(f"timesteps: {t!r} is not an integer")
        if not 0 <= int(t) < num_train_timesteps:
            raise TmpqError(f"timesteps: {int(t)} is out of range [0, {num_train_timesteps - 1}]")
    for a, b in zip(ts, ts[1:]):
        if not a > b:
            raise TmpqError(f"timesteps: must be strictly descending, got {int(a)} then {int(b)}")
    return tuple(int(t) for t in ts)


def _check_n(n: int, num_train_timesteps: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_train_timesteps:
        raise TmpqError(f"steps: must be an integer in [1, {num_train_timesteps}], got {n!r}")
