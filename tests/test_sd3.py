"""Stable Diffusion 3 (an MMDiT on the flow-matching axis, tiny random configs, no download) through the service: a
directory saved by diffusers' own ``StableDiffusion3Pipeline`` (two CLIP encoders with projection and a T5 encoder,
built from config; a VAE with a ``shift_factor``) is loaded with its prompts encoded by the pipeline's own
``encode_prompt``, calibrated and searched with guidance (separate null-pass ranges), validated, exported as a
``StableDiffusion3Pipeline`` directory, and the stock pipeline + ``tmpq.apply_export`` in a fresh process draws, from
the same noise, the images tmpq samples from the export."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_stock
from tests.test_text_pipeline import byte_level_vocab
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "a blue circle", "three dots"]
SHIFT = 3.0
HIDDEN, PROJ, JOINT = 16, 8, 32  # CLIP width, CLIP projection, T5 width = joint_attention_dim (>= 2 * HIDDEN)
CLIP_LEN = 16  # CLIP's tokens (T5's: the pipeline's max_sequence_length, 256)


def t5_tokenizer():
    """A T5 tokenizer built offline: a unigram model over single characters (and the word marker), </s> appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_ids=0)


def tiny_sd3(out, tmp, t5: bool = True):
    """A tiny Stable Diffusion 3 pipeline directory written by diffusers' StableDiffusion3Pipeline.save_pretrained:
    SD3Transformer2DModel (8x8 latents, patch 2), AutoencoderKL (16x16 RGB, shift_factor 0.1), two
    CLIPTextModelWithProjection + CLIPTokenizer, a T5EncoderModel + T5 tokenizer (or none: ``t5=False``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    vocab = byte_level_vocab()
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    eos = vocab["<|endoftext|>"]

    def clip():
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=PROJ, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos, pad_token_id=eos)).eval()

    def tokenizer():
        return transformers.CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=CLIP_LEN)

    torch.manual_seed(7)
    te, te2 = clip(), clip()
    te3 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32, d_model=JOINT, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval() if t5 else None
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=JOINT, caption_projection_dim=16,
                                        pooled_projection_dim=2 * PROJ, out_channels=4, pos_embed_max_size=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=1.5,
                        shift_factor=0.1).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                                    vae=vae, text_encoder=te, tokenizer=tokenizer(), text_encoder_2=te2,
                                    tokenizer_2=tokenizer(), text_encoder_3=te3,
                                    tokenizer_3=t5_tokenizer() if t5 else None)
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    return tiny_sd3(tmp / "sd3", tmp)


def run_config(model_dir, reference):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": 2.0, "prompts": PROMPTS},
        # separate null-pass ranges: the stock pipeline's batched [empty prompt; prompts] call runs one call per pass
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "guidance_ranges": "separate"},
        "calibration": {"steps": 2, "per_step": 3, "sampler_steps": 4, "batch_size": 6, "strategy": "eda"},
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none", "solvers": ["ddim", "heun", "dpm++"]},
        "proxy": {"n_images": 3, "teacher_steps": 6, "reference": str(reference)},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


def rgb_reference(path, size: int = 16):
    """Reference statistics of random ``size`` x ``size`` RGB images (or video frames) under the random extractor
    (validation's FID needs one)."""
    from tmpq.evaluators.candidate import scoring_extractor
    from tmpq.evaluators.fid import FeatureStats

    ext = scoring_extractor(3)
    g = torch.Generator().manual_seed(0)
    stats = FeatureStats.from_features(ext(torch.rand(32, 3, size, size, generator=g) * 2 - 1))
    stats.meta["extractor"] = {"name": ext.name, "fingerprint": ext.fingerprint}
    return stats.save(path)


STOCK = """
import json, sys, torch, tmpq
from diffusers import StableDiffusion3Pipeline
from tmpq.core.sampler import noise_generators
args = json.loads(sys.argv[1])
out = {}
for i, exp in enumerate(args["exports"]):
    pipe = StableDiffusion3Pipeline.from_pretrained(exp, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tmpq.apply_export(pipe, exp)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                               with_kwargs=True)
    n = len(args["prompts"])
    out[f"img{i}"] = pipe(prompt=args["prompts"], guidance_scale=2.0, generator=noise_generators(n, 0),
                          output_type="pt").images
    out[f"calls{i}"], out[f"steps{i}"] = torch.tensor(calls), torch.tensor(pipe.tmpq_timesteps)
torch.save(out, args["out"])
"""


def test_sd3_calibrates_searches_validates_exports_and_the_stock_pipeline_reproduces_it(sd3_dir, tmp_path):
    from tmpq.core.adapters import adapter_for, conditioning_of, time_axis_of
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import sample_images
    from tmpq.core.timeaxis import TimeAxis
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    m = load_model(ModelConfig(path=str(sd3_dir), guidance_scale=2.0, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, 8, 8) and m.image_channels == 3
    assert time_axis_of(m.unet) == TimeAxis("flow", 1000, SHIFT)
    c = conditioning_of(m.unet)  # CLIP's tokens then T5's: [P, CLIP_LEN + 256, JOINT]; pooled: both CLIP projections
    assert c.prompt_embeds.shape == (3, CLIP_LEN + 256, JOINT) and c.pooled_embeds.shape == (3, 2 * PROJ)
    assert c.null_embeds.shape == (1, CLIP_LEN + 256, JOINT) and c.null_pooled.shape == (1, 2 * PROJ)
    assert float(c.prompt_embeds[:, CLIP_LEN:].abs().amax()) > 0  # T5 conditions the model
    pins = adapter_for(m.unet).default_pins(m.unet)
    assert pins["pos_embed.proj"] == [8, 16] and pins["proj_out"] == [16, 16] and pins["context_embedder"] == [8, 16]
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear", "norm_out.linear",
            "time_text_embed.text_embedder.linear_1"} <= set(pins)
    del m

    run = run_search(run_config(sd3_dir, rgb_reference(tmp_path / "ref.npz")), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    space = json.loads((run.path / "search_space.json").read_text())["layers"]
    searched = [la["fqn"] for la in space if la["gene"] is not None]
    assert any(".attn.add_q_proj" in f for f in searched) and any(".ff_context." in f for f in searched)  # both streams
    assert {la["fqn"]: la["pinned"] for la in space if la["gene"] is None} == pins
    assert not any(la["fqn"].startswith(("vae", "text_encoder")) for la in space)
    final = validate_run(run.path, ValidateConfig(top_k=1, n=3, seeds=(1,), calib_per_step=2, batch_size=6),
                         progress=False)
    key = final["key"].iloc[0]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["conditioning"]["kind"] == "text" and man["conditioning"]["prompts"] == PROMPTS
    assert man["sampler"]["guidance_scale"] == 2.0 and man["sampler"]["time_axis"]["shift"] == SHIFT
    assert man["provenance"]["quantizers"].startswith("validated")
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][0] == "transformers"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    # and a point sampled with the other solver of the search, from the search supernet
    solver = load_run(run.path).candidate(key).solver.name
    other = next(r["key"] for r in rows if load_run(run.path).candidate(r["key"]).solver.name != solver)
    export_candidate(run.path, other, tmp_path / "exp2")

    exports = [tmp_path / "exp", tmp_path / "exp2"]
    args = {"exports": [str(e) for e in exports], "prompts": PROMPTS[:2], "out": str(tmp_path / "stock.pt")}
    stock = run_stock(STOCK, args)
    for i, (exp, k) in enumerate(zip(exports, (key, other))):
        unet, sched, ts, _ = load_export(exp)
        ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=2.0, progress=False)
        cand = load_run(run.path).candidate(k)
        assert stock[f"steps{i}"].tolist() == ts == list(cand.timesteps)
        assert len(stock[f"calls{i}"]) == cand.calls  # the exported steps, not the pipeline's default 28
        assert stock[f"img{i}"].shape == ref.shape == (2, 3, 16, 16)
        diff = float((stock[f"img{i}"] * 2 - 1 - ref).abs().max())
        print(f"stock StableDiffusion3Pipeline vs tmpq, {cand.solver.name}: max abs difference {diff:.3g}")
        assert diff <= 1e-5

    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_sd3_conditions_and_decodes_as_the_stock_pipeline(tmp_path):
    """Without T5 (the pipeline's text_encoder_3 = None): the prompts' embeddings are the stock encode_prompt's, a
    live pipeline conditions as its directory does, the latents decode through the VAE's shift_factor as the stock
    pipeline decodes them, and a directory written by tmpq loads in the stock pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from tmpq.core.adapters import adapter_for, conditioning_of, decode
    from tmpq.core.handle import DiffusionModel
    from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir

    tiny_sd3(tmp_path / "sd3", tmp_path, t5=False)
    cfg = ModelConfig(path=str(tmp_path / "sd3"), guidance_scale=2.0, prompts=tuple(PROMPTS))
    m = load_model(cfg)
    # a pipeline without T5: diffusers' loader is told so (its model_index.json names the part None, which
    # from_pretrained does not take as given)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd3"), text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    e, ne, p, npool = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)
    c = conditioning_of(m.unet)
    assert torch.equal(c.prompt_embeds, e) and torch.equal(c.pooled_embeds, p)
    # the empty prompt, encoded alone here and three times over in the stock call: equal to float rounding
    assert torch.allclose(c.null_embeds, ne[:1], atol=1e-6) and torch.allclose(c.null_pooled, npool[:1], atol=1e-6)
    live = DiffusionModel.from_pipeline(pipe)._loaded(cfg, "cpu")
    assert torch.equal(conditioning_of(live.unet).prompt_embeds, e) and live.time_axis.shift == SHIFT
    # the guided call's null half is the empty prompt's pair
    a = adapter_for(m.unet)
    cond = a.conditions(m.unet, [0, 1, 2, 3])
    assert torch.equal(cond["pooled_projections"][3], p[0]) and set(a.null(m.unet, cond)) == set(cond)
    assert a.null_rows(m.unet, a.null(m.unet, cond), 4).all() and not a.null_rows(m.unet, cond, 4).any()
    # latents / scaling_factor + shift_factor, as StableDiffusion3Pipeline decodes
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = pipe.vae.decode(z / 1.5 + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(decode(m.unet, z), want, atol=1e-6)
    assert not torch.allclose(decode(m.unet, z), pipe.vae.decode(z / 1.5).sample.clamp(-1, 1), atol=1e-3)
    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    again = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "out"), text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    assert again.text_encoder_3 is None and again.vae.config.shift_factor == 0.1
    # sampling needs the pooled prompts too: a model without prompts is refused in one line
    bare = load_model(str(tmp_path / "sd3"))
    with pytest.raises(TmpqError, match="is text-conditional: give prompts"):
        adapter_for(bare.unet).conditions(bare.unet, [0])
