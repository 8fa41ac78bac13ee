"""Data-driven time groups from the FP model's per-timestep sensitivity (rates measured by the evaluators' probe,
the profile made of them by the search library, joined by the search job's ``fp_profile``)."""
import numpy as np
import pytest

from tests.conftest import tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler
from tmpq.evaluators.profile import x0_rates
from tmpq.jobs.search import fp_profile
from tmpq.search.groups import sensitivity_groups


def sensitivity_profile(unet, sched, **probe):
    return fp_profile("sensitivity", unet, sched, **probe)


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
        x0_rates(unet, sched, n_images=2, probe_steps=1)
    with pytest.raises(TmpqError, match="n_images"):
        sensitivity_profile(unet, sched, n_images=0)


def test_step_error_profile_is_deterministic_positive_and_gives_valid_groups():
    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    a = fp_profile("error", unet, sched, n_images=4, probe_steps=20, seed=0)
    np.testing.assert_array_equal(a, fp_profile("error", unet, sched, n_images=4, probe_steps=20, seed=0))
    assert a.shape == (1000,) and np.all(np.isfinite(a)) and np.all(a > 0)
    g = sensitivity_groups(a, 10, "error")
    assert g.n == 10 and sum(g.sizes) == 1000 and g.kind == "error"


def test_error_density_refines_where_eps_moves_and_at_low_noise():
    from tmpq.search.sensitivity import error_density, sigma_of_t

    abar = make_scheduler(embedded_scheduler_config()).alphas_cumprod.numpy()
    flat = error_density(np.ones(1000), abar)
    assert np.all(np.isfinite(flat)) and np.all(flat > 0)
    # with eps changing at the same rate everywhere, the sqrt(abar) weight (errors at high noise shrink on the way to
    # t = 0) nearly cancels sigma's fast growth near t = T: groups within 2x of uniform (sigma alone: 17x finer at T)
    g = sensitivity_groups(flat, 10, "error")
    assert 50 <= min(g.sizes) and max(g.sizes) <= 200
    unweighted = sensitivity_groups(np.sqrt(np.gradient(sigma_of_t(abar))), 10, "error")
    assert max(unweighted.sizes) > 10 * min(unweighted.sizes)
    # scaling |deps/dt| scales the density by its square root (the groups do not move)
    np.testing.assert_allclose(error_density(4 * np.ones(1000), abar), 2 * flat)
    # eps changing 20x faster inside [400, 500) draws more group starts into it
    bump = np.ones(1000)
    bump[400:500] = 20.0
    inside = lambda grp: sum(400 <= s < 500 for s in grp.starts)  # noqa: E731
    assert inside(sensitivity_groups(error_density(bump, abar), 10, "error")) > inside(g) + 1
