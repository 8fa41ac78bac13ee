"""Flux (an MMDiT on the flow-matching axis with packed latents, tiny random configs, no download) through the service:
a directory saved by diffusers' own ``FluxPipeline`` (a CLIP text encoder for the pooled embedding and a T5 encoder
for the tokens, built from config; a VAE with a ``shift_factor``; a ``FlowMatchEulerDiscreteScheduler`` with dynamic
shifting) is loaded with its prompts encoded by the pipeline's own ``encode_prompt`` and its dynamic shift resolved
at its token count, calibrated and searched with the guidance scale as the transformer's ``guidance`` input (a
guidance-distilled model: one pass, no null pass), validated, exported as a ``FluxPipeline`` directory, and the stock
pipeline + ``tmpq.apply_export`` in a fresh process draws, from the same noise, the images tmpq samples from the
export. A model without ``guidance_embeds`` (FLUX.1 schnell's kind) samples unguided, as the stock pipeline does."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_stock
from tests.test_sd3 import rgb_reference, t5_tokenizer
from tests.test_text_pipeline import byte_level_vocab
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "a blue circle", "three dots"]
GUIDANCE = 2.5
HIDDEN, JOINT = 16, 32  # CLIP width = pooled_projection_dim, T5 width = joint_attention_dim
CLIP_LEN, T5_LEN = 16, 512  # CLIP's tokens; T5's: FluxPipeline's default max_sequence_length
# FLUX.1's scheduler: dynamic shifting between 256 tokens (mu 0.5) and 4096 (mu 1.15)
SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                 max_shift=1.15, shift=3.0)


def tiny_flux(out, tmp, guidance: bool = True):
    """A tiny Flux pipeline directory written by diffusers' FluxPipeline.save_pretrained: FluxTransformer2DModel
    (16 packed channels = 4 latent channels x 2 x 2, one double and one single block, 2 heads of 8 = the rope axes
    2 + 2 + 4; ``guidance_embeds`` = ``guidance``), AutoencoderKL (16x16 RGB <-> 4 x 8 x 8 latents, shift_factor
    0.1), a CLIPTextModel + CLIPTokenizer and a T5EncoderModel + T5 tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    vocab = byte_level_vocab()
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(7)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CLIP_LEN, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
        pad_token_id=eos)).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32, d_model=JOINT, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT,
                                         pooled_projection_dim=HIDDEN, guidance_embeds=guidance,
                                         axes_dims_rope=(2, 2, 4)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=1.5, shift_factor=0.1,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                        text_encoder=clip, text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                        tokenizer=transformers.CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"),
                                                             model_max_length=CLIP_LEN))
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    return tiny_flux(tmp / "flux", tmp)


def run_config(model_dir, reference, guidance: float = GUIDANCE):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": guidance, "prompts": PROMPTS},
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6]},
        "calibration": {"steps": 2, "per_step": 3, "sampler_steps": 4, "batch_size": 6, "strategy": "eda"},
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none", "solvers": ["ddim", "heun", "dpm++"]},
        "proxy": {"n_images": 3, "teacher_steps": 6, "reference": str(reference)},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


STOCK = """
import json, sys, torch, tmpq
from diffusers import FluxPipeline
from tmpq.core.sampler import noise_generators
args = json.loads(sys.argv[1])
out = {}
for i, exp in enumerate(args["exports"]):
    pipe = FluxPipeline.from_pretrained(exp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tmpq.apply_export(pipe, exp)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    n = len(args["prompts"])
    out[f"img{i}"] = pipe(prompt=args["prompts"], guidance_scale=args["guidance"], height=16, width=16,
                          generator=noise_generators(n, 0), output_type="pt").images
    out[f"calls{i}"], out[f"steps{i}"] = torch.tensor(calls), torch.tensor(pipe.tmpq_timesteps)
torch.save(out, args["out"])
"""


def test_flux_calibrates_searches_validates_exports_and_the_stock_pipeline_reproduces_it(flux_dir, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from tmpq.core.adapters import adapter_for, conditioning_of, time_axis_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    m = load_model(ModelConfig(path=str(flux_dir), guidance_scale=GUIDANCE, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, 8, 8) and m.image_channels == 3  # the unpacked latent of the VAE's 16x16 images
    a = adapter_for(m.unet)
    # the dynamic shift resolved at the packed token count, (8 / 2) * (8 / 2), as FluxPipeline computes its mu
    assert a.tokens(m.unet) == 16
    mu = calculate_shift(16, *(SCHEDULER[k] for k in ("base_image_seq_len", "max_image_seq_len", "base_shift",
                                                       "max_shift")))
    axis = time_axis_of(m.unet)
    assert axis.flow and axis.shift == math.exp(mu) and not m.scheduler_config["use_dynamic_shifting"]
    # the guidance scale is the transformer's input: no classifier-free guidance, no null pass
    c = conditioning_of(m.unet)
    assert a.embeds_guidance(m.unet) and c.guidance_scale == 1.0 and c.embedded_guidance == GUIDANCE
    assert m.guidance_scale == GUIDANCE
    assert c.prompt_embeds.shape == (3, T5_LEN, JOINT) and c.pooled_embeds.shape == (3, HIDDEN)
    cond = a.conditions(m.unet, [0, 1, 2, 3])
    assert cond["guidance"].tolist() == [GUIDANCE] * 4
    assert torch.equal(cond["pooled_projections"][3], c.pooled_embeds[0])
    assert not a.null_rows(m.unet, cond, 4).any()
    with pytest.raises(TmpqError, match="no null pass"):
        a.null(m.unet, cond)
    pins = a.default_pins(m.unet)
    assert pins["x_embedder"] == [8, 16] and pins["proj_out"] == [16, 16] and pins["context_embedder"] == [8, 16]
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
            "single_transformer_blocks.0.norm.linear", "norm_out.linear",
            "time_text_embed.guidance_embedder.linear_1", "time_text_embed.text_embedder.linear_2"} <= set(pins)
    assert "single_transformer_blocks.0.proj_out" not in pins  # only the model's last layer is W16A16
    del m

    run = run_search(run_config(flux_dir, rgb_reference(tmp_path / "ref.npz")), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    space = json.loads((run.path / "search_space.json").read_text())["layers"]
    searched = [la["fqn"] for la in space if la["gene"] is not None]
    assert any(".attn.add_q_proj" in f for f in searched) and any(".ff_context." in f for f in searched)  # both streams
    assert any(f.startswith("single_transformer_blocks.0.proj_mlp") for f in searched)
    assert {la["fqn"]: la["pinned"] for la in space if la["gene"] is None} == pins
    assert not any(la["fqn"].startswith(("vae", "text_encoder")) for la in space)
    final = validate_run(run.path, ValidateConfig(top_k=1, n=3, seeds=(1,), calib_per_step=2, batch_size=6),
                         progress=False)
    key = final["key"].iloc[0]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["conditioning"]["kind"] == "text" and man["conditioning"]["prompts"] == PROMPTS
    assert man["sampler"]["guidance_scale"] == GUIDANCE and man["sampler"]["time_axis"]["shift"] == math.exp(mu)
    assert man["provenance"]["quantizers"].startswith("validated")
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    # and a point sampled with another solver of the search, from the search supernet
    solver = load_run(run.path).candidate(key).solver.name
    other = next(r["key"] for r in rows if load_run(run.path).candidate(r["key"]).solver.name != solver)
    export_candidate(run.path, other, tmp_path / "exp2")

    exports = [tmp_path / "exp", tmp_path / "exp2"]
    args = {"exports": [str(e) for e in exports], "prompts": PROMPTS[:2], "guidance": GUIDANCE,
            "out": str(tmp_path / "stock.pt")}
    stock = run_stock(STOCK, args)
    for i, (exp, k) in enumerate(zip(exports, (key, other))):
        unet, sched, ts, _ = load_export(exp)
        ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=GUIDANCE, progress=False)
        cand = load_run(run.path).candidate(k)
        assert stock[f"steps{i}"].tolist() == ts == list(cand.timesteps)
        assert len(stock[f"calls{i}"]) == cand.calls  # the exported steps, not the pipeline's default 28
        # the transformer is called at sigma (the scheduler's sigma * 1000 / 1000), on tmpq's grid
        axis = time_axis_of(unet)
        assert round(float(stock[f"calls{i}"][0]), 6) == round(axis.sigma(ts[0]), 6)
        assert stock[f"img{i}"].shape == ref.shape == (2, 3, 16, 16)
        assert float(ref.std()) > 1e-3
        diff = float((stock[f"img{i}"] * 2 - 1 - ref).abs().max())
        print(f"stock FluxPipeline vs tmpq, {cand.solver.name}: max abs difference {diff:.3g}")
        assert diff <= 1e-5

    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_flux_packs_conditions_and_decodes_as_the_stock_pipeline(flux_dir, tmp_path):
    """The adapter's packing, position ids and guidance input are FluxPipeline's; a live pipeline conditions as its
    directory does; the guidance scale changes the (one-pass) prediction; a directory written by tmpq loads in the
    stock pipeline; latents decode through the VAE's shift_factor as the stock pipeline decodes them."""
    from diffusers import FluxPipeline

    from tmpq.core.adapters import (
        FluxAdapter,
        adapter_for,
        conditioning_of,
        decode,
        guided_eps,
        index_time,
        model_time,
    )
    from tmpq.core.handle import DiffusionModel
    from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir

    cfg = ModelConfig(path=str(flux_dir), guidance_scale=GUIDANCE, prompts=tuple(PROMPTS))
    m = load_model(cfg)
    pipe = FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    packed = FluxAdapter.pack(z)
    assert torch.equal(packed, pipe._pack_latents(z, 2, 4, 8, 8))
    assert torch.equal(FluxAdapter.unpack(packed, 8, 8), z)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 16, 16, pipe.vae_scale_factor), z)
    assert torch.equal(FluxAdapter.image_ids(8, 8, "cpu", torch.float32),
                       pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    with torch.no_grad():  # as the pipeline's call encodes (with autograd on, T5's kernels round differently)
        e, p, _ = pipe.encode_prompt(PROMPTS, None, device="cpu")
    c = conditioning_of(m.unet)
    assert torch.equal(c.prompt_embeds, e) and torch.equal(c.pooled_embeds, p)
    live = DiffusionModel.from_pipeline(pipe)._loaded(cfg, "cpu")
    assert torch.equal(conditioning_of(live.unet).prompt_embeds, e)
    assert live.time_axis == m.time_axis and conditioning_of(live.unet).embedded_guidance == GUIDANCE
    # the transformer's time is sigma (FluxPipeline's sigma * 1000 / 1000), mapped back onto tmpq's grid exactly
    grid = torch.arange(1000)
    assert torch.equal(index_time(m.unet, model_time(m.unet, grid)), grid)
    assert torch.equal(model_time(m.unet, grid), torch.tensor([m.time_axis.sigma(t) for t in range(1000)],
                                                              dtype=torch.float32) * 1000 / 1000)
    # the prediction is the stock transformer's on the packed latents, at timestep sigma and guidance the scale
    a = adapter_for(m.unet)
    cond = a.conditions(m.unet, [0, 1])
    t = torch.tensor([700, 700])
    sigma = torch.tensor([m.time_axis.sigma(700)] * 2, dtype=torch.float32)
    with torch.no_grad():
        want = m.unet(hidden_states=packed, timestep=sigma * 1000 / 1000, guidance=torch.full((2,), GUIDANCE),
                      pooled_projections=cond["pooled_projections"],
                      encoder_hidden_states=cond["encoder_hidden_states"],
                      txt_ids=torch.zeros(T5_LEN, 3), img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                            torch.float32),
                      return_dict=False)[0]
        got = guided_eps(m.unet, z, t, cond, GUIDANCE)
        assert torch.equal(got, FluxPipeline._unpack_latents(want, 16, 16, pipe.vae_scale_factor))
        assert torch.equal(a.eps(m.unet, z, t, cond), got)  # the conditions carry the bound scale
        assert not torch.allclose(guided_eps(m.unet, z, t, cond, 1.0), got, atol=1e-4)  # another guidance input
    # latents / scaling_factor + shift_factor, as FluxPipeline decodes
    want = pipe.vae.decode(z / 1.5 + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(decode(m.unet, z), want, atol=1e-6)
    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["image_encoder"] == [None, None]
    again = FluxPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert again.vae.config.shift_factor == 0.1 and again.transformer.config.guidance_embeds
    # sampling needs prompts: a model without them is refused in one line
    bare = load_model(str(flux_dir))
    with pytest.raises(TmpqError, match="is text-conditional: give prompts"):
        adapter_for(bare.unet).conditions(bare.unet, [0])


def test_flux_without_guidance_embeds_samples_unguided_as_the_stock_pipeline(tmp_path):
    """FLUX.1 schnell's kind (no ``guidance_embeds``): no guidance input and no null pass (a guidance scale is refused
    in one line); searched, exported from the search supernet, and the stock pipeline + apply_export draws tmpq's
    images."""
    from diffusers import FluxPipeline

    from tmpq.core.adapters import adapter_for, conditioning_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.deploy.bundle import apply_export, load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.search import run_search

    tiny_flux(tmp_path / "schnell", tmp_path, guidance=False)
    with pytest.raises(TmpqError, match="samples unguided"):
        load_model(ModelConfig(path=str(tmp_path / "schnell"), guidance_scale=2.0, prompts=tuple(PROMPTS)))
    m = load_model(ModelConfig(path=str(tmp_path / "schnell"), prompts=tuple(PROMPTS)))
    a = adapter_for(m.unet)
    assert not a.embeds_guidance(m.unet) and conditioning_of(m.unet).embedded_guidance is None
    assert "guidance" not in a.conditions(m.unet, [0])
    del m

    cfg = run_config(tmp_path / "schnell", rgb_reference(tmp_path / "ref.npz"), guidance=1.0)
    run = run_search(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert {r["status"] for r in rows} == {"ok"}
    key = rows[0]["key"]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["sampler"]["guidance_scale"] == 1.0
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    ref = sample_images(unet, sched, ts, 2, seed=0, progress=False)
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "exp"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    apply_export(pipe, tmp_path / "exp")
    img = pipe(prompt=PROMPTS[:2], height=16, width=16, generator=noise_generators(2, 0), output_type="pt").images
    diff = float((img * 2 - 1 - ref).abs().max())
    print(f"stock FluxPipeline (no guidance_embeds) vs tmpq: max abs difference {diff:.3g}")
    assert float(ref.std()) > 1e-3 and diff <= 1e-5
