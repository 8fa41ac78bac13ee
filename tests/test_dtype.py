"""``model.dtype``: the FP model in fp32, bf16 or fp16; the sampler's state and steps stay fp32; fake quantization
computes in fp32 and rounds its result once to the layer's dtype (see ``tmpq.quant.quantizer.fake_quant_in_fp32``);
the fp32 default is the code path of before."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import tmpq.commands
from conftest import run_cli, tiny_unet
from tmpq.core.adapters import decoder_of, text_encoder_of
from tmpq.core.errors import TmpqError
from tmpq.core.model import ModelConfig, load_model
from tmpq.core.sampler import NoiseBank, make_scheduler, model_dtype, sample_images
from tmpq.jobs.config import RunConfig, config_from_dict
from tmpq.jobs.search import run_fingerprint
from tmpq.quant.functional import fake_quant_inference
from tmpq.quant.layers import wrap
from tmpq.quant.quantizer import AffineQuantizer

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
TS = [800, 600, 400, 200, 0]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two spin against each other on a busy 2-core machine, 50x the CPU time)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- config ---------------------------------------------------------------------------------------------------------
def test_dtype_is_validated_in_one_line_and_the_default_keeps_old_fingerprints():
    assert ModelConfig().dtype == "fp32" and ModelConfig(dtype="bf16").torch_dtype == torch.bfloat16
    for bad in ("fp64", "float16", "", 16, None):
        with pytest.raises(TmpqError, match=r"^model\.dtype: must be one of fp32, bf16, fp16, got ") as e:
            ModelConfig(dtype=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(TmpqError, match=r"model\.dtype"):
        config_from_dict({"model": {"dtype": "int8"}})
    # a resolved config written before the key existed loads with the default
    old = RunConfig().to_dict()
    del old["model"]["dtype"]
    assert config_from_dict(old) == RunConfig()
    # the key counts in a run's fingerprint only when it is not the default
    default, bf16 = RunConfig(), dataclasses.replace(RunConfig(), model=ModelConfig(dtype="bf16"))
    assert run_fingerprint(default, "m") != run_fingerprint(bf16, "m")


def test_load_model_puts_every_component_in_the_dtype(tiny_model_dir):
    for name, dt in LOW.items():
        m = load_model(ModelConfig(path=str(tiny_model_dir), dtype=name))
        assert {p.dtype for p in m.unet.parameters()} == {dt} and model_dtype(m.unet) == dt
    assert {p.dtype for p in load_model(str(tiny_model_dir)).unet.parameters()} == {torch.float32}


def test_text_encoder_and_vae_follow_the_dtype(tmp_path):
    pytest.importorskip("transformers", reason="no text encoder without the optional package transformers")
    from test_text_pipeline import tiny_sd

    tiny_sd(tmp_path / "sd", tmp_path)
    imgs = {}
    for name in ("fp32", "bf16", "fp16"):
        m = load_model(ModelConfig(path=str(tmp_path / "sd"), prompts=("a red square",), guidance_scale=2.0,
                                   dtype=name))
        dt = ModelConfig(dtype=name).torch_dtype
        assert model_dtype(m.unet) == dt and next(text_encoder_of(m.unet)[0].parameters()).dtype == dt
        # fp16: a VAE whose config asks for it (force_upcast, diffusers' default) stays fp32, as diffusers upcasts it
        vae_dt = torch.float32 if name == "fp16" else dt
        assert next(decoder_of(m.unet).parameters()).dtype == vae_dt
        imgs[name] = sample_images(m.unet, make_scheduler(m.scheduler_config), [800, 0], 2, progress=False,
                                   guidance_scale=m.guidance_scale)
        assert imgs[name].dtype == torch.float32 and torch.isfinite(imgs[name]).all()
    # measured: bf16 0.03, fp16 0.003 at most from fp32 (random tiny weights, 2 guided steps)
    assert (imgs["bf16"] - imgs["fp32"]).abs().max() < 0.1
    assert (imgs["fp16"] - imgs["fp32"]).abs().max() < 0.01


# -- sampling ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _sample_as_before(unet, scheduler, timesteps, n, seed=0):
    """The fp32 sampling loop before model.dtype existed (DDIM, unconditional), written out."""
    scheduler.set_timesteps(timesteps=timesteps)
    x = NoiseBank(seed, (1, 16, 16)).initial(range(n))
    for t in scheduler.timesteps.tolist():
        eps = unet(x, torch.full((n,), int(t), dtype=torch.int64)).sample
        x = scheduler.step(eps, int(t), x).prev_sample
    return x.clamp(-1.0, 1.0)


def test_the_fp32_default_samples_exactly_as_before_and_low_precision_stays_close():
    m = load_model()
    sched = make_scheduler(m.scheduler_config)
    seen = []
    fp32 = sample_images(m.unet, sched, TS, 16, progress=False, on_step=lambda k, t, x: seen.append(x.dtype))
    assert torch.equal(fp32, _sample_as_before(m.unet, sched, TS, 16)) and set(seen) == {torch.float32}
    # measured on the embedded model, 16 images, 5 DDIM steps (images in [-1, 1]): bf16 max 0.113, mean 0.0036;
    # fp16 max 0.011, mean 0.0005 (fp16 runs on the CPU too)
    for name, (max_tol, mean_tol) in {"bf16": (0.25, 0.01), "fp16": (0.05, 0.002)}.items():
        low = load_model(ModelConfig(dtype=name))
        seen.clear()
        imgs = sample_images(low.unet, sched, TS, 16, progress=False, on_step=lambda k, t, x: seen.append(x.dtype))
        assert set(seen) == {LOW[name]}  # the denoiser's input is in the model's dtype; the state stays fp32
        assert imgs.dtype == torch.float32 and torch.isfinite(imgs).all()
        diff = (imgs - fp32).abs()
        assert diff.max() < max_tol and diff.mean() < mean_tol, (name, diff.max(), diff.mean())


def test_cli_sample_and_fid_take_dtype(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["sample", "--model", tiny_model_dir, "--dtype", "bf16", "--n", "2", "--steps", "2",
                              "--out", tmp_path / "g.png", "--device", "cpu", "--threads", "1"], capsys)
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    loaded = []

    def fake_load(cfg, device):  # fid hands its --dtype to load_model (the rest of fid is dtype-blind)
        loaded.append(cfg)
        raise TmpqError("loaded")

    monkeypatch.setattr(tmpq.commands, "load_model", fake_load)
    code, out, err = run_cli(["fid", "--model", tiny_model_dir, "--dtype", "fp16", "--n", "4"], capsys)
    assert code == 2 and loaded == [ModelConfig(path=str(tiny_model_dir), dtype="fp16")]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        run_cli(["sample", "--dtype", "fp64", "--out", tmp_path / "g.png"], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dtype" in err and err.count("\n") == 1
    code, out, err = run_cli(["sample", str(tmp_path / "an-export"), "--dtype", "bf16", "--out", tmp_path / "g.png"],
                             capsys)
    assert code == 2 and "--dtype bf16 applies to --model sampling" in err and err.count("\n") == 1
    for cmd in (["sample", "--out", tmp_path / "g.png"], ["fid"]):  # the dp profile runs in fp32 only (for now)
        code, out, err = run_cli([*cmd, "--dtype", "fp16", "--schedule", "uniform,dp"], capsys)
        assert code == 2 and "--dtype fp16: --schedule dp profiles the model in fp32 only" in err
        assert err.count("\n") == 1


# -- fake quantization ----------------------------------------------------------------------------------------------
def _frozen(bits, symmetric, granularity, x, channels=1):
    q = AffineQuantizer(bits, symmetric, granularity, channels=channels, observer="minmax")
    q.observe(x)
    q.freeze()
    return q


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_fake_quant_is_the_fp32_result_rounded_once(name):
    """Every output is the fp32 fake quantization of the (exactly upcast) input, rounded once to the dtype."""
    dt = LOW[name]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(16, 8, 3, 3, generator=g) * 0.05).to(dt)
    x = (torch.randn(4, 8, 6, 6, generator=g) * 3 + 1).to(dt)
    for bits in (8, 6, 4):
        for q, v in ((_frozen(bits, True, "channel", w.float(), 16), w), (_frozen(bits, False, "tensor", x.float()), x)):
            out = q(v)
            assert out.dtype == dt and torch.equal(out, q(v.float()).to(dt))
            with torch.enable_grad():  # the training path (straight-through) gives the same values
                v_grad = v.clone().requires_grad_()
                assert torch.equal(q(v_grad), out)
    # ... which native low-precision arithmetic does not: the scaled input rounded to the dtype before its rounding
    # to an integer moves values across rounding boundaries (the old path of a bf16 activation)
    q = _frozen(8, False, "tensor", x.float())
    naive = fake_quant_inference(x, q.scale, q.zero_point, q.qmin, q.qmax)
    codes = torch.round(q(x.float()) / q.scale)
    if name == "bf16":
        assert not torch.equal(torch.round(naive.float() / q.scale), codes)


def test_a_bf16_value_decodes_to_its_code_up_to_128_levels():
    """Exhaustively over the codes |k| <= 128 (every symmetric grid up to 8 bits) and 4096 scales spread over 12
    decades: the bf16 value of the fp32 grid value k * scale decodes back to k; fp16 (11 significant bits) likewise
    for |k| <= 1024 in its normal range. Beyond that bf16 loses codes (shown for 129..255, asymmetric 8-bit's)."""
    g = torch.Generator().manual_seed(0)
    for dt, kmax, (lo, hi) in ((torch.bfloat16, 128, (-9.0, 3.0)), (torch.float16, 1024, (-3.0, 1.0))):
        scale = 10.0 ** (torch.rand(4096, 1, generator=g) * (hi - lo) + lo)
        k = torch.arange(-kmax, kmax + 1, dtype=torch.float32)
        value = (k * scale).to(dt)  # the fp32 grid value rounded once
        assert torch.equal(torch.round(value.float() / scale), k.expand_as(value))
    scale = 10.0 ** (torch.rand(4096, 1, generator=g) * 12 - 9)
    k = torch.arange(129, 256, dtype=torch.float32)
    assert not torch.equal(torch.round((k * scale).to(torch.bfloat16).float() / scale), k.expand(4096, -1))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_a_low_precision_quant_layer_uses_the_fp32_grid(name):
    dt = LOW[name]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 6, 6) * 2
    ref = wrap(conv, w_bits=(8, 4), a_bits=(8,), w_observer="minmax", a_observer="minmax", split=3)
    low = wrap(torch.nn.Conv2d(8, 16, 3, padding=1).to(dt), w_bits=(8, 4), a_bits=(8,), w_observer="minmax",
               a_observer="minmax", split=3)
    low.module.load_state_dict({k: v.to(dt) for k, v in conv.state_dict().items()})
    for layer, xin in ((ref, x), (low, x.to(dt))):
        layer.calibrate_weights()
        layer.set_bits(0, 0)
        layer.observing = True
        layer(xin)
        layer.observing = False
        layer.freeze_activations()
    # the ranges come from fp32 statistics of the (low-precision) weights and inputs; the scales stay fp32
    assert all(q.scale.dtype == torch.float32 for q in low.activation_quantizers())
    for w_index in (0, 1):
        low.set_bits(w_index, 0)
        lw = low.quantized_weight()
        q = low.w_quant[w_index]
        assert lw.dtype == dt and torch.equal(lw, q(low.module.weight.float()).to(dt))
        # the 8-bit weight's codes are those of fp32 fake quantization (|code| <= 128: decodable, see above)
        codes = torch.round(lw.float() / q.scale.reshape(-1, 1, 1, 1))
        assert torch.equal(codes, torch.round(q(low.module.weight.float()) / q.scale.reshape(-1, 1, 1, 1)))
        xl = x.to(dt)
        xq = low.quantized_input(xl)  # the split skip input: two fp32 grids, each rounded once
        halves = [low.a_quant[0](xl[:, :3].float()), low.a_quant_split[0](xl[:, 3:].float())]
        assert xq.dtype == dt and torch.equal(xq, torch.cat(halves, 1).to(dt))
        out = low(xl)
        ref.set_bits(w_index, 0)
        assert out.dtype == dt and torch.isfinite(out).all()
        assert low.active_bias().dtype == dt
        # same grids as the fp32 layer up to the low-precision inputs: close to its output
        assert (out.float() - ref(x)).abs().max() < 0.1 * ref(x).abs().max()


def test_fp32_layers_quantize_exactly_as_before():
    """The fp32 layer's quantized weight, input and bias are those of the quantizers' functions called directly."""
    torch.manual_seed(1)
    layer = wrap(tiny_unet().conv_in, w_bits=(8,), a_bits=(8,), w_observer="minmax", a_observer="minmax")
    x = torch.randn(2, 1, 8, 8)
    layer.calibrate_weights()
    layer.set_bits(0, 0)
    layer.observing = True
    layer(x)
    layer.observing = False
    layer.freeze_activations()
    q, a = layer.w_quant[0], layer.a_quant[0]
    assert torch.equal(layer.quantized_weight(), q._fake_quant(layer.module.weight))
    assert torch.equal(layer.quantized_input(x), fake_quant_inference(x, a.scale, a.zero_point, a.qmin, a.qmax))
    assert torch.equal(layer.active_bias(), layer.module.bias + q.bias_shift)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_search_runs_with_a_low_precision_model(tiny_model_dir, tmp_path, dtype):
    """A search on a bf16 / fp16 model: the supernet profiles, calibrates and evaluates in the model's dtype."""
    from tests.test_search_service import tiny_cfg
    from tmpq.jobs.search import run_search

    cfg = tiny_cfg(tiny_model_dir, population=4, generations=1)
    cfg = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "dtype": dtype}})
    run = run_search(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(ln) for ln in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" and np.isfinite(r["objectives"]["fid_proxy"]) for r in rows)
    assert json.loads((run.path / "config.resolved.json").read_text())["model"]["dtype"] == dtype


def test_fp32_only_groupings_are_refused_for_low_precision_models():
    with pytest.raises(TmpqError, match="search.grouping: sensitivity groups are profiled in fp32 only"):
        config_from_dict({"model": {"dtype": "bf16"}, "search": {"grouping": "sensitivity"}})
