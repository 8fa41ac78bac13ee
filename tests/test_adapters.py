"""Denoiser adapters (tmpq.core.adapters): each supported class, built tiny from config, runs calibration capture (with
guidance: both passes), the supernet (profiling, pins, time-group routing, options), and guided sampling; a user
registers an adapter for a class of their own; a model without an adapter is refused in one line."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

import tmpq
from tmpq.core.adapters import (
    Conditioning,
    DenoiserAdapter,
    adapter_for,
    bind_conditioning,
    conditioning_of,
    guided_eps,
    register_adapter,
    set_conditioning,
)
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import make_calib_data

TS = [900, 600, 300, 0]


def guided(model, scale: float):
    """``model`` with its bound conditioning guided at ``scale`` (as a run's loader binds model.guidance_scale)."""
    bind_conditioning(model, conditioning_of(model).replace(guidance_scale=scale))
    return model


def class_unet(null: int | None = 4):
    torch.manual_seed(1)
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=4, attention_head_dim=8, num_class_embeds=5).eval()
    if null is not None:
        set_conditioning(m, null_label=null)
    return m


def dit():
    torch.manual_seed(2)  # 3 classes + the null row label dropout trains; out_channels 2: eps and a variance
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3,
                                 norm_num_groups=1).eval()


def text_unet():
    torch.manual_seed(3)
    m = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                             layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                             cross_attention_dim=12, attention_head_dim=4).eval()
    g = torch.Generator().manual_seed(0)
    set_conditioning(m, prompt_embeds=torch.randn(3, 5, 12, generator=g), null_embeds=torch.zeros(1, 5, 12))
    return m


MODELS = {"class-unet": class_unet, "dit": dit, "text-unet": text_unet}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_adapter_calibrates_switches_and_samples_with_guidance(name):
    model = MODELS[name]()
    sched = make_scheduler(embedded_scheduler_config())
    data = make_calib_data(guided(model, 2.0), sched, "uniform", n_steps=2, per_step=4, sampler_steps=4)
    key = "encoder_hidden_states" if name == "text-unet" else "class_labels"
    assert len(data) == 2 * 2 * 4 and len(data.cond[key]) == len(data)  # both passes of guidance, per input
    if key == "class_labels":
        null = adapter_for(model).null_label(model)
        assert (data.cond[key][len(data) // 2:] == null).all() and (data.cond[key][: len(data) // 2] != null).all()
    net = QuantSupernet(model, SupernetConfig(w_bits=(8, 4), a_bits=(8, 16), time_groups=2))
    assert any(i.pinned for i in net.infos) and all(i.macs > 0 for i in net.infos)  # the adapter's pins; profiled
    net.calibrate(list(data.batches(8)), progress=False)
    assert net.time_starts  # routed by the timestep, also when it is passed by keyword (DiT)
    fp_net = sample_images(net, sched, TS, 4, batch_size=4, progress=False, guidance_scale=2.0)
    out = {}
    for w, a in ((8, 8), (8, 16), (4, 16)):
        net.set_uniform(w, a)
        out[w, a] = sample_images(net, sched, TS, 4, batch_size=4, progress=False, guidance_scale=2.0)
        again = sample_images(net, sched, TS, 4, batch_size=2, progress=False, guidance_scale=2.0)
        assert torch.equal(out[w, a], again)  # common noise and conditioning: batch size does not matter
    net.set_fp()
    assert torch.equal(sample_images(net, sched, TS, 4, batch_size=4, progress=False, guidance_scale=2.0), fp_net)
    err = {k: float((v - fp_net).abs().mean()) for k, v in out.items()}
    # 16-bit activations isolate the weights: W8 nearer FP than W4 (with 8-bit activations the tiny random models'
    # activation error can swamp the weights' difference: the DiT's conditioning path is pinned at W8A16)
    assert 0 < err[8, 8] and 0 < err[8, 16] < err[4, 16], err


@pytest.mark.parametrize("name", ["class-unet", "dit"])
def test_labels_and_guidance_change_class_models_samples(name):
    model = MODELS[name]()
    sched = make_scheduler(embedded_scheduler_config())
    a = sample_images(model, sched, TS, 2, labels=0, progress=False)
    b = sample_images(model, sched, TS, 2, labels=1, progress=False)
    assert not torch.equal(a, b)
    g = sample_images(model, sched, TS, 2, labels=0, guidance_scale=3.0, progress=False)
    assert not torch.equal(a, g)
    with pytest.raises(TmpqError, match="labels: 9 is not a class of this model"):
        sample_images(model, sched, TS, 2, labels=9, progress=False)


def test_guided_eps_is_one_batched_pass_of_both_conditionings():
    model = dit()
    a = adapter_for(model)
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 500)
    cond = a.conditions(model, [0, 1, 2])
    e_c, e_u = a.eps(model, x, t, cond), a.eps(model, x, t, a.null(model, cond))
    assert e_c.shape == x.shape  # the variance channel is dropped
    torch.testing.assert_close(guided_eps(model, x, t, cond, 2.5), e_u + 2.5 * (e_c - e_u), rtol=1e-5, atol=1e-5)


def test_a_class_unet_without_a_null_label_refuses_guidance_but_samples_without():
    model = class_unet(null=None)
    sched = make_scheduler(embedded_scheduler_config())
    assert sample_images(model, sched, TS, 5, progress=False).shape == (5, 1, 8, 8)  # all 5 embeddings are classes
    with pytest.raises(TmpqError, match="has no null label"):
        sample_images(model, sched, TS, 2, guidance_scale=2.0, progress=False)


def test_an_unconditional_model_refuses_labels_and_guidance(tmp_path):
    from conftest import tiny_unet

    sched = make_scheduler(embedded_scheduler_config())
    with pytest.raises(TmpqError, match="is not class-conditional"):
        sample_images(tiny_unet(), sched, TS, 2, labels=1, progress=False)
    with pytest.raises(TmpqError, match="is unconditional"):
        sample_images(tiny_unet(), sched, TS, 2, guidance_scale=2.0, progress=False)


def test_eda_strategy_uses_the_adapters_feature_module():
    model = dit()
    sched = make_scheduler(embedded_scheduler_config())
    data = make_calib_data(model, sched, "eda", n_steps=2, per_step=4, sampler_steps=4)
    assert len(data) == 8 and set(data.cond) == {"class_labels"}


class ToyDenoiser(nn.Module):
    """Not a diffusers model: eps = conv(x) + a timestep bias, called as toy(x, t) -> tensor."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(in_channels=1, sample_size=8)
        self.inp = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        h = torch.relu(self.inp(x)) + (t.float() / 1000).view(-1, 1, 1, 1)
        return self.out(torch.relu(self.mid(h)))


class ToyAdapter(DenoiserAdapter):
    cls = ToyDenoiser

    def default_pins(self, model):
        return {"inp": [8, 16], "out": [16, 16]}


def test_a_registered_adapter_serves_a_users_own_class():
    torch.manual_seed(0)
    toy = ToyDenoiser().eval()
    with pytest.raises(TmpqError, match="no denoiser adapter for ToyDenoiser; register one with "
                                        "tmpq.register_adapter"):
        QuantSupernet(toy, SupernetConfig(time_groups=1))
    tmpq.register_adapter(ToyAdapter())  # the public name
    sched = make_scheduler(embedded_scheduler_config())
    data = make_calib_data(toy, sched, "uniform", n_steps=2, per_step=4, sampler_steps=4)
    net = QuantSupernet(toy, SupernetConfig(w_bits=(8, 4), a_bits=(8,), time_groups=1))
    assert [i.fqn for i in net.infos if i.pinned] == ["inp", "out"] and net.num_genes == 1
    net.calibrate(list(data.batches(8)), progress=False)
    net.set_uniform(4, 8)
    assert sample_images(net, sched, TS, 2, progress=False).shape == (2, 1, 8, 8)
    with pytest.raises(TmpqError, match="register_adapter: expected a DenoiserAdapter"):
        register_adapter(ToyDenoiser)


def test_conditioning_lives_in_the_handle_and_one_registry_not_on_the_module():
    """The loader's LoadedModel holds the run's Conditioning and binds it to the denoiser; nothing is set on the
    module, a copy is unbound, and the sampler guides as the bound conditioning says unless told otherwise."""
    import copy

    from tmpq.core.model import ModelConfig, load_model

    m = load_model(ModelConfig(path="embedded-dit", guidance_scale=2.0, null_label=3))
    assert isinstance(m.conditioning, Conditioning) and m.guidance_scale == 2.0
    assert conditioning_of(m.unet) is m.conditioning and adapter_for(m.unet).null_label(m.unet) == 3
    assert not [k for k in vars(m.unet) if "tmpq" in k and "vae" not in k and "text" not in k]
    assert conditioning_of(copy.deepcopy(m.unet)).guidance_scale == 1.0  # a copy is unbound
    sched = make_scheduler(m.scheduler_config)
    bound = sample_images(m.unet, sched, [600, 0], 2, labels=[1, 2], progress=False)
    assert torch.equal(bound, sample_images(m.unet, sched, [600, 0], 2, labels=[1, 2], progress=False,
                                            guidance_scale=2.0))
    assert not torch.equal(bound, sample_images(m.unet, sched, [600, 0], 2, labels=[1, 2], progress=False,
                                                guidance_scale=1.0))
    with pytest.raises(TmpqError, match="expected a Conditioning"):
        bind_conditioning(m.unet, {"guidance_scale": 2.0})
