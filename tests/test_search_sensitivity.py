"""Data-driven time groups from the FP model's per-timestep sensitivity."""
import numpy as np
import pytest

from search.groups import sensitivity_groups
from search.sensitivity import sensitivity_profile
from tests.conftest import tiny_unet
from tmpq.errors import TmpqError
from tmpq.model import embedded_scheduler_config
from tmpq.sampler import make_scheduler


def test_profile_is_deterministic_positive_and_gives_valid_groups():
    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    a = sensitivity_profile(unet, sched, n_images=4, probe_steps=20, seed=0)
    b = sensitivity_profile(unet, sched, n_images=4, probe_steps=20, seed=0)
    assert a.shape == (1000,) and np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_array_equal(a, b)
    g = sensitivity_groups(a, 10)
    assert g.n == 10 and sum(g.sizes) == 1000 and g.kind == "sensitivity"
    # equal shares of cumulative sensitivity: every group holds about a tenth of the total
    shares = [a[s:s + n].sum() / a.sum() for s, n in zip(g.starts, g.sizes)]
    assert max(shares) < 0.2 and min(shares) > 0.05


def test_profile_bad_settings():
    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    with pytest.raises(TmpqError, match="probe_steps"):
        sensitivity_profile(unet, sched, n_images=2, probe_steps=1)
    with pytest.raises(TmpqError, match="n_images"):
        sensitivity_profile(unet, sched, n_images=0)
