"""Wan (a text-to-video DiT on the flow-matching axis; tiny random configs, no download) through the service: a
directory saved by diffusers' own ``WanPipeline`` (a UMT5 encoder and T5 tokenizer built from config, a video VAE
``AutoencoderKLWan``, Wan's ``UniPCMultistepScheduler`` with flow sigmas) is loaded with its prompts encoded by the
pipeline's own ``encode_prompt``, calibrated and searched with classifier-free guidance (separate null-pass ranges:
the stock pipeline runs the null pass as its own call), validated (videos scored as their frames), exported as a
``WanPipeline`` directory, and the stock pipeline + ``tmpq.apply_export`` in a fresh process draws, from the same
noise, the videos tmpq samples from the export.

Samples are latent videos ``[C, F, H, W]``: 5 frames of 32 x 32 pixels are 2 latent frames of 4 x 4 (the VAE's
temporal 4 and spatial 8), 8 tokens of patch (1, 2, 2). The size is the transformer config's ``sample_size``.

Without the package ``accelerate`` diffusers cannot load a class with ``_keep_in_fp32_modules`` (Wan's transformer)
at all; tmpq's loader then builds it from config (fp32 here: nothing to keep), and the stock subprocess clears the
attribute before ``from_pretrained`` (a no-op in fp32) so that the stock pipeline loads as it would with it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import run_stock
from tests.test_sd3 import rgb_reference, t5_tokenizer
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "three dots"]
GUIDANCE = 2.0
TEXT_DIM, TEXT_LEN = 32, 512  # UMT5 width = text_dim; WanPipeline's default max_sequence_length
LATENT = (2, 4, 4)  # latent frames, height, width: num_frames 5, 32 x 32 pixels
VIDEO = dict(num_frames=5, height=32, width=32)


def tiny_wan(out, **pipeline_config):
    """A tiny Wan pipeline directory written by diffusers' WanPipeline.save_pretrained: WanTransformer3DModel (4
    latent channels, patch (1, 2, 2), one block of 2 heads x 8, ``sample_size`` = :data:`LATENT`), AutoencoderKLWan
    (base width 8, 8x spatial and 4x temporal compression, its own latent means / stds), UMT5EncoderModel + a T5
    tokenizer, UniPCMultistepScheduler with flow sigmas (shift 3, Wan's)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(5)
    te = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=32, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32).eval()
    transformer.register_to_config(sample_size=list(LATENT))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    sched = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=te, vae=vae, scheduler=sched, transformer=transformer,
                       **pipeline_config)
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return tiny_wan(tmp_path_factory.mktemp("wan") / "wan")



def run_config(model_dir, reference):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": GUIDANCE, "prompts": PROMPTS},
        # separate null-pass ranges: WanPipeline runs the null pass as a call of its own, and so does tmpq then
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "guidance_ranges": "separate"},
        "calibration": {"steps": 2, "per_step": 2, "sampler_steps": 4, "batch_size": 4, "strategy": "eda"},
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none", "solvers": ["ddim", "unipc", "heun"]},
        "proxy": {"n_images": 2, "teacher_steps": 6, "reference": str(reference)},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


STOCK = """
import json, sys, torch, tmpq
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.utils import is_accelerate_available
from tmpq.core.sampler import noise_generators
if not is_accelerate_available():  # diffusers loads a class with fp32-kept modules only through accelerate
    WanTransformer3DModel._keep_in_fp32_modules = None
args = json.loads(sys.argv[1])
out = {}
for i, exp in enumerate(args["exports"]):
    pipe = WanPipeline.from_pretrained(exp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tmpq.apply_export(pipe, exp)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    n = len(args["prompts"])
    out[f"pt{i}"] = pipe(prompt=args["prompts"], guidance_scale=args["guidance"], generator=noise_generators(n, 0),
                         output_type="pt", **args["video"]).frames
    out[f"calls{i}"], out[f"steps{i}"] = torch.tensor(calls), torch.tensor(pipe.tmpq_timesteps)
    out[f"np{i}"] = torch.from_numpy(pipe(prompt=args["prompts"], guidance_scale=args["guidance"], output_type="np",
                                          generator=noise_generators(n, 0), **args["video"]).frames)
torch.save(out, args["out"])
"""


def test_wan_calibrates_searches_validates_exports_and_the_stock_pipeline_reproduces_it(wan_dir, tmp_path):
    from tmpq.core.adapters import adapter_for, conditioning_of, decoder_cost, time_axis_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import sample_images
    from tmpq.core.timeaxis import TimeAxis
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    m = load_model(ModelConfig(path=str(wan_dir), guidance_scale=GUIDANCE, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, *LATENT) and m.image_channels == 3
    assert time_axis_of(m.unet) == TimeAxis("flow", 1000, 3.0)  # UniPC with flow sigmas: the flow axis
    c = conditioning_of(m.unet)
    assert c.prompt_embeds.shape == (2, TEXT_LEN, TEXT_DIM) and c.null_embeds.shape == (1, TEXT_LEN, TEXT_DIM)
    assert c.prompt_mask is None and c.pooled_embeds is None
    assert float(c.prompt_embeds[0, 20:].abs().max()) == 0.0  # zeroed past the prompt's tokens, as WanPipeline
    pins = adapter_for(m.unet).default_pins(m.unet)
    assert pins == {**{f"condition_embedder.{n}": [8, 16] for n in (
        "time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1",
        "text_embedder.linear_2")}, "proj_out": [16, 16]}
    cost = decoder_cost(m.unet)  # the video VAE's Conv3d MACs, per video
    assert cost["class"] == "AutoencoderKLWan" and cost["macs"] > 0
    del m

    run = run_search(run_config(wan_dir, rgb_reference(tmp_path / "ref.npz", 32)), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}, rows
    space = json.loads((run.path / "search_space.json").read_text())["layers"]
    assert "patch_embedding" not in {la["fqn"] for la in space}  # a Conv3d: left FP, outside the BitOPs
    assert {la["fqn"]: la["pinned"] for la in space if la["gene"] is None} == pins
    searched = {la["fqn"]: la for la in space if la["gene"] is not None}
    # BitOPs per video: a self-attention projection runs on every token of every frame (8 tokens of width 16)
    assert searched["blocks.0.attn1.to_q"]["macs"] == 8 * 16 * 16
    assert searched["blocks.0.attn2.to_k"]["macs"] == TEXT_LEN * 16 * 16  # cross-attention: the text tokens
    final = validate_run(run.path, ValidateConfig(top_k=1, n=2, seeds=(1,), calib_per_step=2, batch_size=4),
                         progress=False)
    key = final["key"].iloc[0]
    assert float(final["fid_mean"].iloc[0]) > 0
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["conditioning"]["prompts"] == PROMPTS and man["sampler"]["guidance_scale"] == GUIDANCE
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"] and index["transformer_2"] == [None, None]

    # and a point sampled with another solver of the search
    solver = load_run(run.path).candidate(key).solver.name
    other = next((r["key"] for r in rows if load_run(run.path).candidate(r["key"]).solver.name != solver), None)
    assert other is not None, "the search sampled one solver only"
    export_candidate(run.path, other, tmp_path / "exp2")

    exports = [tmp_path / "exp", tmp_path / "exp2"]
    args = {"exports": [str(e) for e in exports], "prompts": PROMPTS, "out": str(tmp_path / "stock.pt"),
            "guidance": GUIDANCE, "video": VIDEO}
    stock = run_stock(STOCK, args)
    for i, (exp, k) in enumerate(zip(exports, (key, other))):
        unet, sched, ts, _ = load_export(exp)
        ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=GUIDANCE, progress=False)
        cand = load_run(run.path).candidate(k)
        assert stock[f"steps{i}"].tolist() == ts == list(cand.timesteps)
        # the exported steps (not the pipeline's default 50), each a conditional and a null call
        assert stock[f"calls{i}"][::2].tolist() == stock[f"calls{i}"][1::2].tolist()
        assert len(stock[f"calls{i}"]) == 2 * cand.calls
        assert ref.shape == (2, 3, 5, 32, 32) and float(ref.std()) > 1e-2
        frames = ref.transpose(1, 2)  # [B, F, C, H, W], as WanPipeline's frames
        assert stock[f"pt{i}"].shape == frames.shape
        diff = float((stock[f"pt{i}"] * 2 - 1 - frames).abs().max())
        diff_np = float((stock[f"np{i}"] * 2 - 1 - frames.permute(0, 1, 3, 4, 2)).abs().max())
        print(f"stock WanPipeline vs tmpq, {cand.solver.name}: max abs difference {diff:.3g} (pt), {diff_np:.3g} (np)")
        assert diff <= 1e-5 and diff_np <= 1e-5


def test_wan_refuses_what_it_would_sample_wrongly(tmp_path):
    """Wan 2.2's two-stage sampling (a boundary_ratio / transformer_2) and per-token timesteps are refused in one line,
    at loading and at apply_export; a sample size that the patch does not divide too."""
    from diffusers import WanTransformer3DModel

    from tmpq.core.adapters import adapter_for
    from tmpq.core.model import load_model, refuse_two_stage

    tiny_wan(tmp_path / "w", boundary_ratio=0.9)
    with pytest.raises(TmpqError, match="two-stage pipeline"):
        load_model(str(tmp_path / "w"))
    with pytest.raises(TmpqError, match="expand_timesteps"):
        refuse_two_stage({"transformer_2": [None, None], "expand_timesteps": True}, "x")
    refuse_two_stage({"transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": False}, "x")
    odd = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=1)
    odd.register_to_config(sample_size=[2, 3, 4])
    with pytest.raises(TmpqError, match="not a multiple of the patch size"):
        adapter_for(odd).check(odd)
    odd.register_to_config(sample_size=[4, 4])
    with pytest.raises(TmpqError, match=r"must be \[frames, height, width\]"):
        adapter_for(odd).check(odd)
