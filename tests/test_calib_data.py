import pytest
import torch

from conftest import tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler
from tmpq.supernet.calib_data import make_calib_data


@pytest.mark.parametrize("strategy", ["uniform", "ndtc", "eda"])
def test_strategies_give_requested_size(strategy):
    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    data = make_calib_data(unet, sched, strategy, n_steps=4, per_step=3, sampler_steps=10)
    assert len(data) == 12 and data.x.shape == (12, 1, 8, 8)
    assert data.t.min() >= 0 and data.t.max() < 1000
    assert sum(len(t) for _, t in data.batches(5)) == 12


def test_uniform_covers_the_trajectory_and_ndtc_leans_clean():
    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    uni = make_calib_data(unet, sched, "uniform", n_steps=5, per_step=4, sampler_steps=20)
    assert len(set(uni.t.tolist())) == 5 and int(uni.t.max()) >= 900 and int(uni.t.min()) == 0
    nd = make_calib_data(unet, sched, "ndtc", n_steps=10, per_step=20, sampler_steps=20)
    assert nd.t.float().mean() < uni.t.float().mean()


def test_captured_inputs_are_real_trajectory_states():
    """The first captured state of the uniform strategy is the bank's initial noise."""
    from tmpq.core.sampler import NoiseBank

    unet, sched = tiny_unet(), make_scheduler(embedded_scheduler_config())
    data = make_calib_data(unet, sched, "uniform", n_steps=2, per_step=3, sampler_steps=5, seed=123)
    assert torch.equal(data.x[:3], NoiseBank(123, (1, 8, 8)).initial(range(3)))


def test_bad_strategy():
    with pytest.raises(TmpqError, match="calibration.strategy"):
        make_calib_data(tiny_unet(), make_scheduler(embedded_scheduler_config()), "random")
