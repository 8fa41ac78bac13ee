"""Non-uniform timestep groups (TMPQ-DM): the T training timesteps are cut into n half-open groups; a schedule takes
exactly one timestep per group, so it is sorted and covers the trajectory by construction.

Pure Python / NumPy; no torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tmpq.core.errors import TmpqError
from tmpq.core.schedules import quadratic_timesteps, uniform_timesteps

GROUPINGS = ("quad", "uniform", "sensitivity", "error", "dp")


@dataclass(frozen=True)
class TimeGroups:
    """Group i is ``[starts[i], starts[i+1])``; the last group ends at T - 1 inclusive.

    Example:
        >>> g = quadratic_groups(10)
        >>> g.sizes
        (9, 30, 49, 70, 88, 109, 128, 149, 168, 200)
    """

    starts: tuple[int, ...]
    num_train_timesteps: int = 1000
    kind: str = "quad"
    seeds: tuple[int, ...] = ()  # the seed schedule's offset in each group; () = every group's first timestep

    def __post_init__(self):
        s = self.starts
        if not s or s[0] != 0:
            raise TmpqError(f"time groups: the first group must start at 0, got {list(s)[:3]}")
        if any(b <= a for a, b in zip(s, s[1:])) or s[-1] >= self.num_train_timesteps:
            raise TmpqError(f"time groups: starts must increase strictly inside [0, {self.num_train_timesteps}), "
                            f"got {list(s)}")
        if self.seeds and (len(self.seeds) != len(s) or any(not 0 <= o < n for o, n in zip(self.seeds, self.sizes))):
            raise TmpqError(f"time groups: seed offsets {list(self.seeds)} do not fit groups of sizes {list(self.sizes)}")

    @property
    def n(self) -> int:
        return len(self.starts)

    @property
    def sizes(self) -> tuple[int, ...]:
        ends = list(self.starts[1:]) + [self.num_train_timesteps]
        return tuple(e - s for s, e in zip(self.starts, ends))

    def timestep(self, group: int, offset: int) -> int:
        if not 0 <= offset < self.sizes[group]:
            raise TmpqError(f"time gene {group}: offset {offset} outside its group of {self.sizes[group]}")
        return self.starts[group] + offset

    def schedule(self, offsets: Sequence[int]) -> tuple[int, ...]:
        """Strictly descending timesteps, one per group (as the sampler wants them)."""
        if len(offsets) != self.n:
            raise TmpqError(f"time genes: expected {self.n} offsets, got {len(offsets)}")
        return tuple(self.timestep(g, int(o)) for g, o in reversed(list(enumerate(offsets))))

    def offsets(self, timesteps: Sequence[int]) -> tuple[int, ...]:
        """Inverse of :meth:`schedule`: group offsets of a schedule that has one timestep in each group."""
        ts = sorted(int(t) for t in timesteps)
        if len(ts) != self.n:
            raise TmpqError(f"schedule of {len(ts)} steps does not fit {self.n} time groups")
        out = []
        for g, t in enumerate(ts):
            if not self.starts[g] <= t < self.starts[g] + self.sizes[g]:
                raise TmpqError(f"timestep {t} is not in time group {g} [{self.starts[g]}, "
                                f"{self.starts[g] + self.sizes[g]})")
            out.append(t - self.starts[g])
        return tuple(out)

    def seed_offsets(self) -> tuple[int, ...]:
        """The seed schedule's offsets: the first timestep of every group (for quad groups: quadratic DDIM), or the
        groups' own ``seeds`` (``dp`` groups: the DP-optimal timesteps)."""
        return tuple(self.seeds) if self.seeds else (0,) * self.n

    def log10_count(self) -> float:
        return float(np.sum(np.log10(self.sizes)))

    def to_dict(self) -> dict:
        d = {"starts": list(self.starts), "num_train_timesteps": self.num_train_timesteps, "kind": self.kind}
        if self.seeds:  # written only when set: the groups of older runs read and write as before
            d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TimeGroups":
        return cls(tuple(int(s) for s in d["starts"]), int(d["num_train_timesteps"]), str(d["kind"]),
                   tuple(int(o) for o in d.get("seeds", ())))


def quadratic_groups(n: int, num_train_timesteps: int = 1000) -> TimeGroups:
    """Edges ``floor(linspace(0, sqrt(0.8 T), n) ** 2)`` (repeats bumped by one, as ``quadratic_timesteps``)."""

    return TimeGroups(tuple(sorted(quadratic_timesteps(n, num_train_timesteps))), num_train_timesteps, "quad")


def uniform_groups(n: int, num_train_timesteps: int = 1000) -> TimeGroups:
    """Edges ``arange(n) * (T // n)``: DDIM's uniform spacing as group starts."""

    return TimeGroups(tuple(sorted(uniform_timesteps(n, num_train_timesteps))), num_train_timesteps, "uniform")


def sensitivity_groups(sensitivity: Sequence[float], n: int, kind: str = "sensitivity") -> TimeGroups:
    """Data-driven groups: equal shares of cumulative per-timestep sensitivity (steps where the FP model's output
    changes fast get small groups, i.e. finer timestep choice).

    ``sensitivity[t] >= 0`` for every training timestep t (e.g. the mean |eps(x_t, t) - eps(x_t, t+1)| of the FP
    model along its trajectories, smoothed), or any step density such as :func:`search.sensitivity.error_density`
    (then ``kind = "error"``).
    """
    s = np.asarray(sensitivity, dtype=np.float64)
    T = len(s)
    if n < 1 or n > T:
        raise TmpqError(f"steps: must be in [1, {T}], got {n}")
    if not np.all(np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
        raise TmpqError("sensitivity: must be finite, non-negative and not all zero")
    cum = np.concatenate([[0.0], np.cumsum(s)])
    targets = np.linspace(0, cum[-1], n + 1)[:-1]
    starts = np.searchsorted(cum, targets, side="right") - 1
    starts = np.clip(starts, 0, T - 1).astype(int)
    starts[0] = 0
    for i in range(1, n):  # keep every group non-empty
        starts[i] = max(starts[i], starts[i - 1] + 1)
    for i in range(n - 1, 0, -1):
        starts[i] = min(starts[i], T - (n - i))
    return TimeGroups(tuple(int(v) for v in starts), T, kind)


def dp_groups(schedule: Sequence[int], num_train_timesteps: int = 1000) -> TimeGroups:
    """Groups around a schedule (the DP-optimal timesteps of :mod:`search.stepsel`): each timestep is the seed of its
    own group, and the groups meet halfway between neighbouring timesteps, so the seed schedule is the given one and
    the time genes move each step at most halfway towards its neighbours.

    Example:
        >>> g = dp_groups((990, 850, 690, 520, 370, 240, 70))
        >>> g.starts, g.schedule(g.seed_offsets())
        ((0, 155, 305, 445, 605, 770, 920), (990, 850, 690, 520, 370, 240, 70))
    """
    ts = sorted(int(t) for t in schedule)
    T = num_train_timesteps
    if not ts or len(set(ts)) != len(ts) or ts[0] < 0 or ts[-1] >= T:
        raise TmpqError(f"dp groups: a schedule of distinct timesteps in [0, {T}) is needed, got {list(schedule)}")
    starts = (0, *((a + b + 1) // 2 for a, b in zip(ts, ts[1:])))
    return TimeGroups(starts, T, "dp", tuple(t - s for t, s in zip(ts, starts)))


def make_groups(kind: str, n: int, num_train_timesteps: int = 1000, profile: Sequence[float] | None = None
                ) -> TimeGroups:
    """Groups of a grouping kind: ``quad`` / ``uniform`` from n alone, the data-driven kinds (``sensitivity``,
    ``error``) cut from their FP-model ``profile`` (:data:`search.sensitivity.PROFILES`)."""
    if kind == "quad":
        return quadratic_groups(n, num_train_timesteps)
    if kind == "uniform":
        return uniform_groups(n, num_train_timesteps)
    if profile is None:
        raise TmpqError(f"time groups {kind!r}: need the FP model's profile")
    return sensitivity_groups(profile, n, kind)
