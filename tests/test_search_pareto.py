import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tmpq.search.pareto import dominates_all, hypervolume_2d, non_dominated


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
