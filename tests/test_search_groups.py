import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmpq.core.errors import TmpqError
from tmpq.core.schedules import quadratic_timesteps, uniform_timesteps
from tmpq.search.groups import (
    TimeGroups,
    dp_groups,
    quadratic_groups,
    sensitivity_groups,
    uniform_groups,
)


def test_quad_groups_match_the_paper():
    g = quadratic_groups(10)
    assert g.sizes == (9, 30, 49, 70, 88, 109, 128, 149, 168, 200)
    assert g.schedule(g.seed_offsets()) == quadratic_timesteps(10)
    assert 18.7 < g.log10_count() < 18.8  # about 5.7e18 schedules, as PAPERS.md


def test_uniform_groups_seed_is_ddim():
    g = uniform_groups(20)
    assert g.schedule(g.seed_offsets()) == uniform_timesteps(20)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_any_offsets_give_a_valid_schedule(n, data):
    for g in (quadratic_groups(n), uniform_groups(n)):
        offs = [data.draw(st.integers(0, s - 1)) for s in g.sizes]
        ts = g.schedule(offs)
        assert len(ts) == n and all(a > b for a, b in zip(ts, ts[1:]))
        assert 0 <= ts[-1] and ts[0] <= 999
        assert g.offsets(ts) == tuple(offs)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_sensitivity_groups_cover_and_are_non_empty(n, seed):
    s = np.random.default_rng(seed).gamma(0.5, size=1000)
    g = sensitivity_groups(s, n)
    assert g.n == n and sum(g.sizes) == 1000 and min(g.sizes) >= 1


def test_sensitivity_groups_are_finer_where_sensitivity_is_high():
    s = np.ones(1000)
    s[:100] = 20.0  # the clean end changes fast
    g = sensitivity_groups(s, 10)
    assert g.sizes[0] < g.sizes[-1] / 5


def test_json_round_trip_and_bad_groups():
    g = quadratic_groups(7)
    assert TimeGroups.from_dict(g.to_dict()) == g
    with pytest.raises(TmpqError, match="start at 0"):
        TimeGroups((3, 10))
    with pytest.raises(TmpqError, match="increase strictly"):
        TimeGroups((0, 10, 10))
    with pytest.raises(TmpqError, match="outside its group"):
        g.schedule([10_000] * 7)
    with pytest.raises(TmpqError, match="not in time group"):
        g.offsets([999, 998, 997, 996, 995, 994, 993])


def test_make_groups_dispatches_by_kind_and_needs_a_profile_for_data_driven_kinds():
    from tmpq.search.groups import make_groups

    assert make_groups("quad", 10) == quadratic_groups(10)
    assert make_groups("uniform", 7, 1000) == uniform_groups(7, 1000)
    prof = np.linspace(1.0, 2.0, 1000)
    assert make_groups("error", 5, profile=prof) == sensitivity_groups(prof, 5, "error")
    with pytest.raises(TmpqError, match="'sensitivity': need the FP model's profile"):
        make_groups("sensitivity", 5)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 999), min_size=1, max_size=40))
def test_dp_groups_hold_each_timestep_as_its_groups_seed(timesteps):
    """Groups around any schedule: its timesteps are the seed schedule, each in its own group, groups meet halfway
    between neighbours, and the seeds survive the JSON round trip (groups without seeds write no ``seeds`` key)."""
    ts = tuple(sorted(timesteps, reverse=True))
    g = dp_groups(ts)
    assert g.kind == "dp" and g.n == len(ts) and g.schedule(g.seed_offsets()) == ts
    asc = sorted(ts)
    for i in range(1, g.n):  # the boundary lies halfway, rounded up
        assert g.starts[i] == (asc[i - 1] + asc[i] + 1) // 2
    assert TimeGroups.from_dict(g.to_dict()) == g
    assert "seeds" not in uniform_groups(len(ts)).to_dict()


def test_dp_groups_refuse_bad_schedules_and_seeds_outside_their_groups():
    for bad in ((), (5, 5), (-1, 3), (1000,)):
        with pytest.raises(TmpqError, match="dp groups"):
            dp_groups(bad)
    with pytest.raises(TmpqError, match="seed offsets"):
        TimeGroups((0, 10), 20, "dp", (3, 10))  # group 1 is [10, 20): offset 10 is outside it
