"""Separate activation ranges for the two passes of classifier-free guidance (``supernet.guidance_ranges =
"separate"``): a second bank calibrated on the null pass's inputs, switched by each call's conditioning, and a call
that batches both passes run as one call per pass, its rows back in order."""
from __future__ import annotations

import pytest
import torch

from tests.test_adapters import MODELS, TS, guided
from tmpq.core.adapters import adapter_for, guided_eps
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import make_calib_data

G = 2  # time groups


def calibrated(name: str, ranges: str, guidance: float = 2.0):
    model = guided(MODELS[name](), guidance)
    data = make_calib_data(model, make_scheduler(embedded_scheduler_config()), "uniform", n_steps=2, per_step=4,
                           sampler_steps=4)
    net = QuantSupernet(model, SupernetConfig(w_bits=(8, 4), a_bits=(8, 6), time_groups=G, guidance_ranges=ranges))
    net.calibrate(list(data.batches(8)), progress=False)
    return net, data


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_null_pass_gets_its_own_calibrated_ranges_and_each_call_its_pass(name, tmp_path):
    net, data = calibrated(name, "separate")
    quantizers = [q for layer in net.layers.values() for q in layer.activation_quantizers()]
    assert all(q.tg_scale.shape[0] == 2 * G for q in quantizers)
    # calibrated on the null pass's own inputs: some ranges differ from the conditional pass's
    assert any(not torch.equal(q.tg_scale[:G], q.tg_scale[G:]) for q in quantizers)
    net.set_uniform(8, 6)
    inner, a = net.unet, adapter_for(net.unet)
    x, t = data.x[:3], torch.full((3,), 900)
    cond = a.conditions(inner, range(3))
    g = net.time_group_of(900)
    e_c = a.eps(net, x, t, cond)
    assert {layer.live_group for layer in net.layers.values()} == {g}  # t = 900's group, conditional
    e_u = a.eps(net, x, t, a.null(inner, cond))
    assert {layer.live_group for layer in net.layers.values()} == {G + g}  # the same group of the null bank
    # one batched call of both passes (tmpq's guidance; stock pipelines batch them too) = one call per pass
    assert torch.equal(guided_eps(net, x, t, cond, 2.0), e_u + 2.0 * (e_c - e_u))
    # the rows of a call mixing the passes in any order come back in that order
    mixed = {k: torch.cat([a.null(inner, cond)[k][:1], cond[k][1:]]) for k in cond}
    e_m = a.eps(net, x, t, mixed)
    assert torch.equal(e_m[:1], a.eps(net, x[:1], t[:1], {k: v[:1] for k, v in mixed.items()}))
    assert torch.equal(e_m[1:], a.eps(net, x[1:], t[1:], {k: v[1:] for k, v in mixed.items()}))

    shared, _ = calibrated(name, "shared")
    shared.set_uniform(8, 6)
    sched = make_scheduler(embedded_scheduler_config())
    sep = sample_images(net, sched, TS, 3, progress=False, guidance_scale=2.0)
    assert not torch.equal(sep, sample_images(shared, sched, TS, 3, progress=False, guidance_scale=2.0))
    # saved and loaded over a fresh FP model: the same samples
    net.save(tmp_path / "sn.safetensors")
    again = QuantSupernet.from_file(MODELS[name](), tmp_path / "sn.safetensors")
    again.set_uniform(8, 6)
    assert again.passes == 2
    assert torch.equal(sample_images(again, sched, TS, 3, progress=False, guidance_scale=2.0), sep)


def test_separate_ranges_need_calibration_with_guidance():
    with pytest.raises(TmpqError, match="calibration data have no null-pass inputs; calibrate with classifier-free guidance"):
        calibrated("dit", "separate", guidance=1.0)
    with pytest.raises(TmpqError, match="supernet.guidance_ranges: must be one of shared, separate"):
        SupernetConfig(guidance_ranges="split")
    with pytest.raises(TmpqError, match="separate does not combine with w_rounding = adaround"):
        SupernetConfig(guidance_ranges="separate", w_rounding="adaround", time_groups=1)
