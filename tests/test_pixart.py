"""PixArt-Sigma (a DiT on the DDPM axis with a learned variance, conditioned by one T5 encoder under its attention
mask; tiny random configs, no download) through the service: a directory saved by diffusers' own
``PixArtSigmaPipeline`` (its stock ``DPMSolverMultistepScheduler``, a T5 encoder and tokenizer built from config, a
VAE) is loaded with its prompts encoded by the pipeline's own ``encode_prompt`` (embeddings and attention masks),
calibrated and searched with guidance (separate null-pass ranges), validated, exported as a ``PixArtSigmaPipeline``
directory, and the stock pipeline + ``tmpq.apply_export`` in a fresh process draws, from the same noise, the images
tmpq samples from the export.

The stock call runs with ``use_resolution_binning=False``: diffusers' aspect-ratio bins exist for sample sizes 32 /
64 / 128 / 256 only (a tiny model's 8 raises "Invalid sample size"). Its ``clean_caption`` is left at the stock
default (True); without ``bs4`` / ``ftfy`` (as here) diffusers falls back to lower-casing and stripping, and tmpq
encodes as the stock call does in the same environment."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_stock
from tests.test_sd3 import rgb_reference, t5_tokenizer
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "A Blue circle ", "three dots"]  # the stock pipeline lower-cases and strips them
T5_DIM = 32  # the T5 width = the transformer's caption_channels
T5_LEN = 300  # PixArtSigmaPipeline's default max_sequence_length


def tiny_pixart(out, seed: int = 3, additional: bool = False):
    """A tiny PixArt pipeline directory written by diffusers' own pipeline ``save_pretrained``:
    PixArtTransformer2DModel (8x8 latents of 4 channels, patch 2, out_channels 8: epsilon and a learned variance),
    AutoencoderKL (16x16 RGB), T5EncoderModel + T5 tokenizer, DPMSolverMultistepScheduler (PixArt's stock sampler).
    ``additional``: a model with resolution / aspect-ratio conditions (PixArt-Alpha 1024's kind: 128x128 latents),
    saved as a ``PixArtAlphaPipeline``."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    te = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32, d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    # inner width 2 x 12 = 24 (a multiple of 3: the additional conditions' embedders take a third each)
    transformer = PixArtTransformer2DModel(
        sample_size=128 if additional else 8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24, caption_channels=T5_DIM,
        use_additional_conditions=additional).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=1.5).eval()
    cls = PixArtAlphaPipeline if additional else PixArtSigmaPipeline
    pipe = cls(transformer=transformer, scheduler=DPMSolverMultistepScheduler(), vae=vae, text_encoder=te,
               tokenizer=t5_tokenizer())
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return tiny_pixart(tmp_path_factory.mktemp("pixart") / "pixart")


def run_config(model_dir, reference):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": 2.0, "prompts": PROMPTS},
        # separate null-pass ranges: the stock pipeline's batched [empty prompt; prompts] call runs one call per pass
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "guidance_ranges": "separate"},
        "calibration": {"steps": 2, "per_step": 3, "sampler_steps": 4, "batch_size": 6, "strategy": "eda"},
        # Euler / Heun sample in sigma space, which apply_export checks PixArtSigmaPipeline's __call__ for: the
        # DDPM-space solvers here
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none", "solvers": ["ddim", "dpm++", "unipc"]},
        "proxy": {"n_images": 3, "teacher_steps": 6, "reference": str(reference)},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


STOCK = """
import json, sys, torch, tmpq
from diffusers import PixArtSigmaPipeline
from tmpq.core.sampler import noise_generators
args = json.loads(sys.argv[1])
out = {}
for i, exp in enumerate(args["exports"]):
    pipe = PixArtSigmaPipeline.from_pretrained(exp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tmpq.apply_export(pipe, exp)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(int(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    n = len(args["prompts"])
    out[f"img{i}"] = pipe(prompt=args["prompts"], guidance_scale=2.0, generator=noise_generators(n, 0),
                          output_type="pt", use_resolution_binning=False).images
    out[f"calls{i}"], out[f"steps{i}"] = torch.tensor(calls), torch.tensor(pipe.tmpq_timesteps)
torch.save(out, args["out"])
"""


def test_pixart_calibrates_searches_validates_exports_and_the_stock_pipeline_reproduces_it(pixart_dir, tmp_path):
    from tmpq.core.adapters import adapter_for, conditioning_of, time_axis_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import sample_images
    from tmpq.core.timeaxis import TimeAxis
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    m = load_model(ModelConfig(path=str(pixart_dir), guidance_scale=2.0, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, 8, 8) and m.image_channels == 3
    assert time_axis_of(m.unet) == TimeAxis("ddpm", 1000)
    assert m.scheduler_config["clip_sample"] is False  # PixArt's DPM-Solver never clips: nor does tmpq's DDIM
    c = conditioning_of(m.unet)  # T5's tokens, padded to 300, with the tokenizer's masks
    assert c.prompt_embeds.shape == (3, T5_LEN, T5_DIM) and c.prompt_mask.shape == (3, T5_LEN)
    assert c.null_embeds.shape == (1, T5_LEN, T5_DIM) and c.null_mask.tolist() == [[1] + [0] * (T5_LEN - 1)]
    assert c.prompt_mask.sum(1).tolist() == [len(p.strip()) + 2 for p in PROMPTS]  # ▁, characters, </s>
    assert c.pooled_embeds is None
    pins = adapter_for(m.unet).default_pins(m.unet)
    assert pins["pos_embed.proj"] == [8, 16] and pins["proj_out"] == [16, 16]
    assert {"adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
            "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_1",
            "caption_projection.linear_2"} == set(pins) - {"pos_embed.proj", "proj_out"}
    del m

    run = run_search(run_config(pixart_dir, rgb_reference(tmp_path / "ref.npz")), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    space = json.loads((run.path / "search_space.json").read_text())["layers"]
    searched = [la["fqn"] for la in space if la["gene"] is not None]
    assert any(".attn2.to_k" in f for f in searched) and any(".ff." in f for f in searched)  # cross-attn, MLP
    assert {la["fqn"]: la["pinned"] for la in space if la["gene"] is None} == pins
    assert not any(la["fqn"].startswith(("vae", "text_encoder")) for la in space)
    final = validate_run(run.path, ValidateConfig(top_k=1, n=3, seeds=(1,), calib_per_step=2, batch_size=6),
                         progress=False)
    key = final["key"].iloc[0]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["conditioning"]["kind"] == "text" and man["conditioning"]["prompts"] == PROMPTS
    assert man["sampler"]["guidance_scale"] == 2.0 and "time_axis" not in man["sampler"]
    assert man["sampler"]["config"]["clip_sample"] is False
    assert man["provenance"]["quantizers"].startswith("validated")
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]

    # and a point sampled with another solver of the search, from the search supernet
    solver = load_run(run.path).candidate(key).solver.name
    other = next((r["key"] for r in rows if load_run(run.path).candidate(r["key"]).solver.name != solver), None)
    assert other is not None, "the search sampled one solver only"
    export_candidate(run.path, other, tmp_path / "exp2")

    exports = [tmp_path / "exp", tmp_path / "exp2"]
    args = {"exports": [str(e) for e in exports], "prompts": PROMPTS[:2], "out": str(tmp_path / "stock.pt")}
    stock = run_stock(STOCK, args)
    for i, (exp, k) in enumerate(zip(exports, (key, other))):
        unet, sched, ts, _ = load_export(exp)
        ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=2.0, progress=False)
        cand = load_run(run.path).candidate(k)
        assert stock[f"steps{i}"].tolist() == ts == list(cand.timesteps)
        assert stock[f"calls{i}"].tolist() == ts  # the exported steps, not the pipeline's default 20
        assert stock[f"img{i}"].shape == ref.shape == (2, 3, 16, 16) and float(ref.std()) > 1e-2
        diff = float((stock[f"img{i}"] * 2 - 1 - ref).abs().max())
        print(f"stock PixArtSigmaPipeline vs tmpq, {cand.solver.name}: max abs difference {diff:.3g}")
        assert diff <= 1e-5

    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_pixart_conditions_as_the_stock_pipeline(pixart_dir, tmp_path):
    """The prompts' embeddings and masks are the stock encode_prompt's (its default 300 tokens), the empty prompt's
    are its negative pair; a live pipeline conditions and samples as its directory does (its scheduler config
    without clip_sample read as not clipping on both paths); the adapter's call is the stock transformer call (mask
    and ``added_cond_kwargs`` included); a directory written by tmpq loads in the stock pipeline."""
    from diffusers import PixArtSigmaPipeline

    from tmpq.core.adapters import adapter_for, conditioning_of
    from tmpq.core.handle import DiffusionModel
    from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir
    from tmpq.core.sampler import make_scheduler, sample_images

    cfg = ModelConfig(path=str(pixart_dir), guidance_scale=2.0, prompts=tuple(PROMPTS))
    m = load_model(cfg)
    pipe = PixArtSigmaPipeline.from_pretrained(str(pixart_dir), local_files_only=True)
    with torch.no_grad():
        e, em, ne, nm = pipe.encode_prompt(PROMPTS, device="cpu")
    c = conditioning_of(m.unet)
    assert torch.equal(c.prompt_embeds, e) and torch.equal(c.prompt_mask, em)
    # the empty prompt, encoded alone here and three times over in the stock call: equal to float rounding
    assert torch.allclose(c.null_embeds, ne[:1], atol=1e-6) and torch.equal(c.null_mask, nm[:1])
    live = DiffusionModel.from_pipeline(pipe)._loaded(cfg, "cpu")
    assert torch.equal(conditioning_of(live.unet).prompt_mask, em)
    assert live.scheduler_config["clip_sample"] is False and live.time_axis.kind == "ddpm"
    a = adapter_for(m.unet)
    imgs = [sample_images(x.unet, make_scheduler(x.scheduler_config), [900, 500, 100], 2, seed=0,
                          guidance_scale=2.0, progress=False) for x in (m, live)]
    assert torch.equal(imgs[0], imgs[1])

    # the guided call's null half is the empty prompt's embedding and mask, told apart by null_rows
    cond = a.conditions(m.unet, [0, 1, 2, 3])
    assert torch.equal(cond["encoder_attention_mask"][3], em[0]) and set(a.null(m.unet, cond)) == set(cond)
    assert a.null_rows(m.unet, a.null(m.unet, cond), 4).all() and not a.null_rows(m.unet, cond, 4).any()
    # the adapter's call is the stock pipeline's transformer call: the learned variance's channels dropped
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 700])
    two = a.conditions(m.unet, [0, 1])
    want = pipe.transformer(x, encoder_hidden_states=e[:2], encoder_attention_mask=em[:2], timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert want.shape[1] == 8 and torch.allclose(a.eps(m.unet, x, t, two), want[:, :4], atol=1e-6)

    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    again = PixArtSigmaPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert again.scheduler.config.clip_sample is False and again.scheduler.config.beta_end == 0.02
    assert load_model(str(tmp_path / "out")).scheduler_config["clip_sample"] is False
    # sampling needs the prompts' masks too: a model without prompts is refused in one line
    bare = load_model(str(pixart_dir))
    with pytest.raises(TmpqError, match="is text-conditional: give prompts"):
        a.conditions(bare.unet, [0])


def test_pixart_additional_conditions_as_the_alpha_pipeline(tmp_path):
    """A model whose config asks for resolution / aspect-ratio conditions (PixArt-Alpha 1024's kind; only
    ``PixArtAlphaPipeline`` passes them, at sample size 128): tmpq encodes its prompts with that pipeline (its default
    120 tokens), calls it with the values that pipeline passes, and indexes its export as that pipeline."""
    from diffusers import PixArtAlphaPipeline

    from tmpq.core.adapters import adapter_for, conditioning_of
    from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir

    tiny_pixart(tmp_path / "alpha", additional=True)
    m = load_model(ModelConfig(path=str(tmp_path / "alpha"), prompts=tuple(PROMPTS[:1])))
    assert m.unet.use_additional_conditions and conditioning_of(m.unet).prompt_embeds.shape == (1, 120, T5_DIM)
    pipe = PixArtAlphaPipeline.from_pretrained(str(tmp_path / "alpha"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_hook(lambda mod, args, kw, out: seen.append((args, kw, out[0])),
                                           with_kwargs=True)
    with torch.no_grad():
        pipe(prompt=PROMPTS[:1], guidance_scale=1.0, num_inference_steps=2, output_type="latent",
             use_resolution_binning=False, generator=torch.Generator().manual_seed(0))
    args, kw, out = seen[-1]
    a = adapter_for(m.unet)
    cond = a.conditions(m.unet, [0])
    assert torch.equal(cond["encoder_hidden_states"], kw["encoder_hidden_states"])
    assert torch.equal(cond["encoder_attention_mask"], kw["encoder_attention_mask"])
    added = a.added_conditions(m.unet, args[0], cond)
    assert added["resolution"].tolist() == kw["added_cond_kwargs"]["resolution"].tolist() == [[256.0, 256.0]]
    assert torch.equal(added["aspect_ratio"], kw["added_cond_kwargs"]["aspect_ratio"])
    assert torch.allclose(a.call(m.unet, args[0], kw["timestep"], cond)[0], out, atol=1e-6)
    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
