"""Pareto utilities (minimisation, any number of objectives): non-dominated filter, weak / strict dominance by a
front, hypervolume. Sorting and hypervolume are pymoo's (its non-dominated sorting and exact hypervolume indicator).

Example:
    >>> import numpy as np
    >>> pts = np.array([[1.0, 5.0], [2.0, 2.0], [3.0, 3.0]])
    >>> non_dominated(pts).tolist()
    [True, True, False]
    >>> hypervolume_2d(pts, ref=(4.0, 6.0))
    9.0
    >>> hypervolume([[1.0, 1.0, 1.0]], ref=(2.0, 3.0, 4.0))
    6.0
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from tmpq.core.errors import TmpqError


def _points(points, what: str = "pareto") -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0:
        return p.reshape(0, p.shape[-1] if p.ndim == 2 else 0)
    if p.ndim != 2:
        raise TmpqError(f"{what}: points must be [N, M], got shape {p.shape}")
    return p


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (<= in every objective, < in one). Duplicates of a
    non-dominated point are all kept; a point with a NaN objective is incomparable (kept, dominating nothing)."""
    p = _points(points)
    keep = np.zeros(len(p), dtype=bool)
    finite = ~np.isnan(p).any(axis=1)
    keep[~finite] = True
    idx = np.flatnonzero(finite)
    if len(idx):
        keep[idx[NonDominatedSorting().do(p[idx], only_non_dominated_front=True)]] = True
    return keep


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded by the reference point ``ref`` (every objective minimised; points
    not strictly better than ``ref`` in every objective add nothing)."""
    p = _points(points, "hypervolume")
    r = np.asarray(ref, dtype=np.float64)
    if r.ndim != 1 or (len(p) and p.shape[1] != len(r)):
        raise TmpqError(f"hypervolume: points [N, {p.shape[1] if p.ndim == 2 else '?'}] and a "
                        f"{r.size}-D reference point do not match")
    p = p[np.all(p < r, axis=1)] if len(p) else p
    if len(p) == 0:
        return 0.0
    return float(HV(ref_point=r)(p))


def hypervolume_2d(points: np.ndarray, ref: Sequence[float]) -> float:
    """Area dominated by ``points`` and bounded by the reference point ``ref`` (both objectives minimised)."""
    p = _points(points, "hypervolume_2d")
    r = np.asarray(ref, dtype=np.float64)
    if p.size == 0:
        return 0.0
    if p.shape[1] != 2 or r.shape != (2,):
        raise TmpqError("hypervolume_2d: needs [N, 2] points and a 2-D reference point")
    return hypervolume(p, r)


def dominates_all(front: np.ndarray, others: np.ndarray, strict: bool = False) -> np.ndarray:
    """For each row of ``others``: is it dominated by some point of ``front``?

    Weakly (default): some front point is <= in every objective, so a point that is itself on the front (e.g. a
    uniform baseline that a search evaluated as one of its seeds) counts as dominated by its own copy. ``strict``:
    Pareto dominance, <= in every objective and < in at least one; a copy of the point does not count.

    Example:
        >>> front = np.array([[1.0, 2.0], [2.0, 1.0]])
        >>> dominates_all(front, [[1.0, 2.0], [3.0, 3.0]]).tolist()
        [True, True]
        >>> dominates_all(front, [[1.0, 2.0], [3.0, 3.0]], strict=True).tolist()
        [False, True]
    """
    f = np.asarray(front, dtype=np.float64)
    o = np.asarray(others, dtype=np.float64)
    if f.size == 0 or o.size == 0:
        return np.zeros(len(o), dtype=bool)
    le = np.all(f[None, :, :] <= o[:, None, :], axis=2)  # [others, front]
    if strict:
        le &= np.any(f[None, :, :] < o[:, None, :], axis=2)
    return le.any(axis=1)
