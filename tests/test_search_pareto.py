import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmpq.core.errors import TmpqError
from tmpq.search.pareto import dominates_all, hypervolume, hypervolume_2d, non_dominated


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_non_dominated_matches_brute_force(pts):
    p = np.array(pts, dtype=float)
    mask = non_dominated(p)
    for i, q in enumerate(p):
        dom = any(np.all(r <= q) and np.any(r < q) for r in p)
        assert mask[i] == (not dom)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=20))
def test_hypervolume_matches_grid_count(pts):
    p = np.array(pts, dtype=float)
    ref = (10.0, 10.0)
    grid = sum(1 for x in range(10) for y in range(10) if any(a <= x and b <= y for a, b in p))
    assert hypervolume_2d(p, ref) == grid


def test_dominance_and_monotonicity():
    front = np.array([[1.0, 4.0], [3.0, 1.0]])
    assert dominates_all(front, np.array([[2.0, 5.0], [0.5, 5.0], [3.0, 1.0]])).tolist() == [True, False, True]
    assert hypervolume_2d(np.vstack([front, [[0.5, 0.5]]]), (5, 5)) > hypervolume_2d(front, (5, 5))
    assert hypervolume_2d(np.zeros((0, 2)), (1, 1)) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_three_objectives_front_and_hypervolume_match_brute_force(pts):
    p = np.array(pts, dtype=float)
    mask = non_dominated(p)
    for i, q in enumerate(p):
        assert mask[i] == (not any(np.all(r <= q) and np.any(r < q) for r in p))
    cells = sum(1 for x in range(7) for y in range(7) for z in range(7)
                if any(a <= x and b <= y and c <= z for a, b, c in p))
    assert hypervolume(p, (7.0, 7.0, 7.0)) == cells
    assert hypervolume(p[mask], (7.0, 7.0, 7.0)) == cells  # dominated points add nothing


def test_the_committed_run_keeps_its_front_and_hypervolume():
    """The old O(n^2) filter and the 2-D sweep gave these on the committed run (tests/data/run-3f4b168)."""
    import json

    from conftest import REPO

    rows = [json.loads(line) for line in (REPO / "tests/data/run-3f4b168/evaluations.jsonl").read_text().splitlines()]
    pts = np.array([[r["objectives"]["fid_proxy"], r["objectives"]["bitops"]] for r in rows])
    old = _old_non_dominated(pts)
    assert non_dominated(pts).tolist() == old.tolist() and 1 <= old.sum() < len(pts)
    ref = pts.max(axis=0) * 1.1
    assert np.isclose(hypervolume_2d(pts, ref), _old_hypervolume_2d(pts, ref), rtol=1e-12)
    assert hypervolume_2d(pts, ref) == hypervolume(pts, ref)


def test_nan_points_are_incomparable_and_shapes_are_checked():
    p = np.array([[1.0, np.nan], [2.0, 2.0], [0.0, 3.0], [3.0, 3.0]])
    assert non_dominated(p).tolist() == _old_non_dominated(p).tolist() == [True, True, True, False]
    assert non_dominated(np.zeros((0, 3))).tolist() == []
    assert hypervolume(np.zeros((0, 3)), (1, 1, 1)) == 0.0
    with pytest.raises(TmpqError, match="do not match"):
        hypervolume([[1.0, 2.0]], (3.0, 3.0, 3.0))
    with pytest.raises(TmpqError, match=r"\[N, 2\]"):
        hypervolume_2d([[1.0, 2.0, 3.0]], (3.0, 3.0, 3.0))


def _old_non_dominated(p):
    """The filter this module had before it used pymoo (the reference the new one must reproduce)."""
    keep = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        if (np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1)).any():
            keep[i] = False
    return keep


def _old_hypervolume_2d(p, r):
    p = p[np.all(p < r, axis=1)]
    p = p[_old_non_dominated(p)]
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    area, prev_y = 0.0, r[1]
    for x, y in p:
        if y < prev_y:
            area += (r[0] - x) * (prev_y - y)
            prev_y = y
    return float(area)
