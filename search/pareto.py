"""Pareto utilities (minimisation): non-dominated filter, weak / strict dominance by a front, 2-D hypervolume.

Example:
    >>> import numpy as np
    >>> pts = np.array([[1.0, 5.0], [2.0, 2.0], [3.0, 3.0]])
    >>> non_dominated(pts).tolist()
    [True, True, False]
    >>> hypervolume_2d(pts, ref=(4.0, 6.0))
    9.0
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpq.core.errors import TmpqError


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (<= in every objective, < in one). Duplicates of a
    non-dominated point are all kept."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise TmpqError(f"pareto: points must be [N, M], got shape {p.shape}")
    keep = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        dominated = np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep


def hypervolume_2d(points: np.ndarray, ref: Sequence[float]) -> float:
    """Area dominated by ``points`` and bounded by the reference point ``ref`` (both objectives minimised)."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.size == 0:
        return 0.0
    if p.ndim != 2 or p.shape[1] != 2 or r.shape != (2,):
        raise TmpqError("hypervolume_2d: needs [N, 2] points and a 2-D reference point")
    p = p[np.all(p < r, axis=1)]
    if len(p) == 0:
        return 0.0
    p = p[non_dominated(p)]
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    area, prev_y = 0.0, r[1]
    for x, y in p:
        if y < prev_y:
            area += (r[0] - x) * (prev_y - y)
            prev_y = y
    return float(area)


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
    if f.size == 0:
        return np.zeros(len(o), dtype=bool)
    out = []
    for q in o:
        le = np.all(f <= q, axis=1)
        out.append(bool(np.any(le & np.any(f < q, axis=1)) if strict else np.any(le)))
    return np.array(out, dtype=bool)
