"""Sana (a linear-attention DiT on the flow axis, on a deep-compression autoencoder's latents, conditioned by Gemma 2
under its attention mask; tiny random configs, no download) through the service: a directory saved by diffusers' own
``SanaPipeline`` (its stock ``DPMSolverMultistepScheduler`` on flow sigmas, a Gemma 2 encoder and a Gemma tokenizer
built from config, an ``AutoencoderDC``) is loaded with its prompts encoded by the pipeline's own ``encode_prompt``
(with the stock call's complex human instruction), calibrated and searched with guidance (separate null-pass
ranges), validated, exported as a ``SanaPipeline`` directory, and the stock pipeline + ``tmpq.apply_export`` in a
fresh process draws, from the same noise, the images tmpq samples from the export.

``SanaPipeline`` requires height and width divisible by 32: the tiny VAE downsamples 4x (three stages), so 32 x 32
images are 8 x 8 latents. The stock call runs with ``use_resolution_binning=False`` (bins exist for sample sizes
16 / 32 / 64 / 128 only) and ``height=width=32`` (its default is 1024)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_stock
from tests.test_sd3 import rgb_reference
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "A Blue circle ", "three dots"]  # the stock pipeline lower-cases and strips them
GEMMA_DIM = 32  # the Gemma 2 width = the transformer's caption_channels
SANA_LEN = 300  # SanaPipeline's default max_sequence_length
SIZE = 32  # pixels: the smallest SanaPipeline takes (a multiple of 32)


def gemma_tokenizer():
    """A Gemma tokenizer built offline: transformers' own GemmaTokenizer (BPE with byte fallback, spaces as ▁) over
    single characters (no merges), <bos> prepended; characters outside the vocabulary (the instruction's capitals)
    are <unk>."""
    chars = "▁abcdefghijklmnopqrstuvwxyz.,:'-"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, **{c: 5 + i for i, c in enumerate(chars)}}
    return transformers.GemmaTokenizer(vocab=vocab, add_bos_token=True)


def tiny_sana(out, seed: int = 3, timestep_scale: float = 1.0):
    """A tiny Sana pipeline directory written by diffusers' own ``SanaPipeline.save_pretrained``:
    SanaTransformer2DModel (8x8 latents of 4 channels, patch 1, 2 blocks of 2 heads x 8), AutoencoderDC (32x32 RGB,
    three stages: 4x), Gemma2Model + Gemma tokenizer, DPMSolverMultistepScheduler on flow sigmas (shift 3, flow
    prediction: Sana's stock sampler)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tok = gemma_tokenizer()
    te = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=len(tok), hidden_size=GEMMA_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=2048)).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=GEMMA_DIM,
        sample_size=8, patch_size=1, timestep_scale=timestep_scale).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3,
        decoder_norm_types="rms_norm", scaling_factor=0.41407).eval()
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                 scheduler=sched).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    return tiny_sana(tmp_path_factory.mktemp("sana") / "sana")



def run_config(model_dir, reference):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": 2.0, "prompts": PROMPTS},
        # separate null-pass ranges: the stock pipeline's batched [empty prompt; prompts] call runs one call per pass
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "guidance_ranges": "separate"},
        "calibration": {"steps": 2, "per_step": 3, "sampler_steps": 4, "batch_size": 6, "strategy": "eda"},
        # Sana's own DPM-Solver++, UniPC and the two-call Heun, all flow solvers
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none", "solvers": ["dpm++", "unipc", "heun"]},
        "proxy": {"n_images": 3, "teacher_steps": 6, "reference": str(reference)},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


STOCK = """
import json, sys, torch, tmpq
from diffusers import SanaPipeline
from tmpq.core.sampler import noise_generators
args = json.loads(sys.argv[1])
out = {}
for i, exp in enumerate(args["exports"]):
    pipe = SanaPipeline.from_pretrained(exp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tmpq.apply_export(pipe, exp)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    n = len(args["prompts"])
    out[f"img{i}"] = pipe(prompt=args["prompts"], guidance_scale=2.0, generator=noise_generators(n, 0),
                          height=args["size"], width=args["size"], output_type="pt",
                          use_resolution_binning=False).images
    out[f"calls{i}"], out[f"steps{i}"] = torch.tensor(calls), torch.tensor(pipe.tmpq_timesteps)
torch.save(out, args["out"])
"""


def test_sana_calibrates_searches_validates_exports_and_the_stock_pipeline_reproduces_it(sana_dir, tmp_path):
    from tmpq.core.adapters import adapter_for, conditioning_of, time_axis_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import sample_images
    from tmpq.core.timeaxis import TimeAxis
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    m = load_model(ModelConfig(path=str(sana_dir), guidance_scale=2.0, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, 8, 8) and m.image_channels == 3
    assert time_axis_of(m.unet) == TimeAxis("flow", 1000, 3.0)  # DPM-Solver on flow sigmas, read as flow
    c = conditioning_of(m.unet)  # Gemma's tokens: the first and the last 299, with the tokenizer's masks
    assert c.prompt_embeds.shape == (3, SANA_LEN, GEMMA_DIM) and c.prompt_mask.shape == (3, SANA_LEN)
    assert c.null_embeds.shape == (1, SANA_LEN, GEMMA_DIM) and c.null_mask.tolist() == [[1] + [0] * (SANA_LEN - 1)]
    # <bos>, the instruction's last character (a space), the prompt's characters (spaces as ▁)
    assert c.prompt_mask.sum(1).tolist() == [len(p.strip()) + 2 for p in PROMPTS]
    assert c.pooled_embeds is None
    pins = adapter_for(m.unet).default_pins(m.unet)
    assert pins["patch_embed.proj"] == [8, 16] and pins["proj_out"] == [16, 16]
    assert {"time_embed.linear", "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2", "caption_projection.linear_1",
            "caption_projection.linear_2"} == set(pins) - {"patch_embed.proj", "proj_out"}
    del m

    run = run_search(run_config(sana_dir, rgb_reference(tmp_path / "ref.npz", SIZE)), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    space = json.loads((run.path / "search_space.json").read_text())["layers"]
    searched = [la["fqn"] for la in space if la["gene"] is not None]
    # linear self-attention, cross-attention, the GLUMBConv's depthwise convolution
    assert any(".attn1.to_q" in f for f in searched) and any(".attn2.to_k" in f for f in searched)
    assert any(".ff.conv_depth" in f for f in searched)
    assert {la["fqn"]: la["pinned"] for la in space if la["gene"] is None} == pins
    assert not any(la["fqn"].startswith(("vae", "text_encoder")) for la in space)
    final = validate_run(run.path, ValidateConfig(top_k=1, n=3, seeds=(1,), calib_per_step=2, batch_size=6),
                         progress=False)
    key = final["key"].iloc[0]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["conditioning"]["kind"] == "text" and man["conditioning"]["prompts"] == PROMPTS
    assert man["sampler"]["guidance_scale"] == 2.0 and man["sampler"]["time_axis"]["shift"] == 3.0
    assert man["provenance"]["quantizers"].startswith("validated")
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline" and index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert index["text_encoder"] == ["transformers", "Gemma2Model"] and index["vae"] == ["diffusers", "AutoencoderDC"]
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]

    # and a point sampled with another solver of the search, from the search supernet
    solver = load_run(run.path).candidate(key).solver.name
    other = next((r["key"] for r in rows if load_run(run.path).candidate(r["key"]).solver.name != solver), None)
    assert other is not None, "the search sampled one solver only"
    export_candidate(run.path, other, tmp_path / "exp2")

    exports = [tmp_path / "exp", tmp_path / "exp2"]
    args = {"exports": [str(e) for e in exports], "prompts": PROMPTS[:2], "out": str(tmp_path / "stock.pt"),
            "size": SIZE}
    stock = run_stock(STOCK, args)
    for i, (exp, k) in enumerate(zip(exports, (key, other))):
        unet, sched, ts, _ = load_export(exp)
        ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=2.0, progress=False)
        cand = load_run(run.path).candidate(k)
        assert stock[f"steps{i}"].tolist() == ts == list(cand.timesteps)
        assert len(stock[f"calls{i}"]) == cand.calls  # the exported steps, not the pipeline's default 20
        # the pipeline's timesteps are the flow axis' sigma * 1000, which the supernet routes back to the grid
        axis = time_axis_of(unet)
        assert list(dict.fromkeys(axis.index_of(v) for v in stock[f"calls{i}"].tolist())) == ts
        assert stock[f"img{i}"].shape == ref.shape == (2, 3, SIZE, SIZE) and float(ref.std()) > 1e-2
        diff = float((stock[f"img{i}"] * 2 - 1 - ref).abs().max())
        print(f"stock SanaPipeline vs tmpq, {cand.solver.name}: max abs difference {diff:.3g}")
        assert diff <= 1e-5

    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_sana_conditions_and_calls_as_the_stock_pipeline(sana_dir, tmp_path):
    """The prompts' embeddings and masks are the stock encode_prompt's with the stock call's complex human
    instruction, the empty prompt's are its negative pair (no instruction); the adapter's call is the stock
    transformer call at the stock timestep (sigma * 1000 times ``timestep_scale``); a live pipeline conditions and
    samples as its directory does; a directory written by tmpq loads in the stock pipeline; Sana-Sprint's
    ``guidance_embeds`` is refused in one line."""
    import inspect

    from diffusers import SanaPipeline, SanaTransformer2DModel

    from tmpq.core.adapters import adapter_for, conditioning_of, model_time
    from tmpq.core.handle import DiffusionModel
    from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir
    from tmpq.core.sampler import make_scheduler, sample_images

    cfg = ModelConfig(path=str(sana_dir), guidance_scale=2.0, prompts=tuple(PROMPTS))
    m = load_model(cfg)
    pipe = SanaPipeline.from_pretrained(str(sana_dir), local_files_only=True)
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        e, em, ne, nm = pipe.encode_prompt(PROMPTS, device="cpu", complex_human_instruction=chi)
    c = conditioning_of(m.unet)
    assert torch.equal(c.prompt_embeds, e) and torch.equal(c.prompt_mask, em)
    # the empty prompt, encoded alone here and three times over in the stock call: equal to float rounding
    assert torch.allclose(c.null_embeds, ne[:1], atol=1e-6) and torch.equal(c.null_mask, nm[:1])
    live = DiffusionModel.from_pipeline(pipe)._loaded(cfg, "cpu")
    assert torch.equal(conditioning_of(live.unet).prompt_mask, em) and live.time_axis.flow
    imgs = [sample_images(x.unet, make_scheduler(x.scheduler_config, "dpm++"), [999, 600, 200], 2, seed=0,
                          guidance_scale=2.0, progress=False) for x in (m, live)]
    assert torch.equal(imgs[0], imgs[1])

    a = adapter_for(m.unet)
    cond = a.conditions(m.unet, [0, 1, 2, 3])
    assert torch.equal(cond["encoder_attention_mask"][3], em[0]) and set(a.null(m.unet, cond)) == set(cond)
    assert a.null_rows(m.unet, a.null(m.unet, cond), 4).all() and not a.null_rows(m.unet, cond, 4).any()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 700])
    two = a.conditions(m.unet, [0, 1])
    stock_t = torch.full((2,), 1000 * 3.0 * 0.701 / (1 + 2.0 * 0.701), dtype=torch.float32)  # shift 3, u = 0.701
    assert torch.allclose(model_time(m.unet, t), stock_t)
    with torch.no_grad():  # tmpq's copy computes in channels_last: equal to float rounding
        want = pipe.transformer(x, encoder_hidden_states=e[:2], encoder_attention_mask=em[:2],
                                timestep=model_time(m.unet, t), return_dict=False)[0]
        assert torch.allclose(a.eps(m.unet, x, t, two), want, atol=1e-6)

    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline" and index["tokenizer"] == ["transformers", "GemmaTokenizer"]
    again = SanaPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert again.scheduler.config.use_flow_sigmas and again.scheduler.config.flow_shift == 3.0
    with pytest.raises(TmpqError, match="is text-conditional: give prompts"):
        a.conditions(load_model(str(sana_dir)).unet, [0])

    # a model whose config scales the timestep (SanaPipeline calls it with sigma * 1000 * timestep_scale)
    scaled = load_model(ModelConfig(path=str(tiny_sana(tmp_path / "scaled", timestep_scale=0.5)),
                                    prompts=tuple(PROMPTS)))
    assert torch.allclose(model_time(scaled.unet, t), stock_t * 0.5)
    assert adapter_for(scaled.unet).index_time(scaled.unet, model_time(scaled.unet, t)).tolist() == [700, 700]

    sprint = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                    num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                    cross_attention_dim=16, caption_channels=GEMMA_DIM, sample_size=8,
                                    guidance_embeds=True)
    with pytest.raises(TmpqError, match="guidance_embeds = True .*not served"):
        adapter_for(sprint).check(sprint)
