import numpy as np
import pytest

from tmpq.core.errors import TmpqError
from tmpq.core.schedules import (
    make_timesteps,
    quadratic_timesteps,
    trailing_timesteps,
    uniform_timesteps,
    validate_timesteps,
)


def test_quadratic_matches_paper_groups_at_10_steps():
    ts = quadratic_timesteps(10)[::-1]
    edges = list(ts) + [1000]
    edges[-1] = 1000  # the last group is stretched to T-1 inclusive
    sizes = np.diff(edges).tolist()
    assert sizes == [9, 30, 49, 70, 88, 109, 128, 149, 168, 200]


@pytest.mark.parametrize("n", [1, 5, 10, 20, 50, 100, 250])
def test_spacings_are_strictly_descending_and_in_range(n):
    for ts in (uniform_timesteps(n), trailing_timesteps(n), quadratic_timesteps(n)):
        assert len(ts) == n
        assert all(a > b for a, b in zip(ts, ts[1:]))
        assert 0 <= ts[-1] and ts[0] <= 999


def test_uniform_is_ddim_leading_spacing():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, steps_offset=0)
    s.set_timesteps(20)
    assert tuple(int(t) for t in s.timesteps) == uniform_timesteps(20)


@pytest.mark.parametrize("n", [1, 5, 7, 10, 14, 20, 100])
def test_trailing_is_the_diffusers_trailing_spacing(n):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    s.set_timesteps(n)
    assert tuple(int(t) for t in s.timesteps) == trailing_timesteps(n) == make_timesteps("trailing", n)
    assert trailing_timesteps(n)[0] == 999


@pytest.mark.parametrize("bad,match", [
    ([5, 7, 1], "strictly descending"),
    ([5, 5, 1], "strictly descending"),
    ([1000, 3], "out of range"),
    ([10, -1], "out of range"),
    ([], "empty"),
    ([3.5, 1], "not an integer"),
])
def test_bad_timesteps(bad, match):
    with pytest.raises(TmpqError, match=match):
        validate_timesteps(bad)


def test_unknown_schedule_and_bad_n():
    with pytest.raises(TmpqError, match="unknown schedule 'cosine'"):
        make_timesteps("cosine", 10)
    with pytest.raises(TmpqError, match="steps"):
        uniform_timesteps(0)
    with pytest.raises(TmpqError, match="steps"):
        quadratic_timesteps(1001)
    with pytest.raises(TmpqError, match="steps"):
        trailing_timesteps(0)
