"""A text-conditional latent pipeline (Stable Diffusion's layout, tiny random configs, no download) through the
service: the run's prompts encoded by the directory's own FP text encoder, calibration and search with guidance (and
separate activation ranges for the null pass),
export as a ``StableDiffusionPipeline`` directory, and diffusers' stock ``StableDiffusionPipeline`` after
``tmpq.apply_export`` drawing, from the same noise, the images tmpq samples from the export."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tmpq.core.adapters import set_decoder, set_text_encoder
from tmpq.core.errors import TmpqError
from tmpq.core.model import (
    ModelConfig,
    embedded_scheduler_config,
    load_model,
    save_pipeline_dir,
)
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.export import export_candidate
from tmpq.jobs.search import run_search

transformers = pytest.importorskip("transformers", reason="the optional package transformers (pip install "
                                   "'tmpq[text]') is not installed: no text encoder to build")

PROMPTS = ["a red square", "a blue circle", "three dots"]


def byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level BPE vocabulary without merges: every byte's character, alone and word-final."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_sd(out, tmp):
    """A tiny Stable Diffusion pipeline directory: UNet2DConditionModel (4x4 latents), AutoencoderKL (8x8 RGB),
    CLIPTextModel and CLIPTokenizer built from config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vocab = byte_level_vocab()
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=8)
    torch.manual_seed(5)
    eos = vocab["<|endoftext|>"]
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)).eval()
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=8, layers_per_block=1).eval()
    set_decoder(unet, vae)
    set_text_encoder(unet, encoder, tokenizer)
    save_pipeline_dir(unet, embedded_scheduler_config(), out)


def run_config(model_dir, guidance: float = 2.0):
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": guidance, "prompts": PROMPTS},
        # separate null-pass ranges: the stock pipeline's batched [empty prompt; prompts] call runs one call per pass
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "guidance_ranges": "separate"},
        "calibration": {"steps": 2, "per_step": 3, "sampler_steps": 4, "batch_size": 6},
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none"},
        "proxy": {"n_images": 3, "teacher_steps": 6},
    })
    return dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits


def test_a_text_pipeline_calibrates_searches_exports_and_the_stock_pipeline_reproduces_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    import tmpq
    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.deploy.bundle import load_export

    tiny_sd(tmp_path / "sd", tmp_path)
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"][0] == "transformers"
    m = load_model(ModelConfig(path=str(tmp_path / "sd"), guidance_scale=2.0, prompts=tuple(PROMPTS)))
    assert m.sample_shape == (4, 4, 4) and m.image_channels == 3

    run = run_search(run_config(tmp_path / "sd"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    layers = [la["fqn"] for la in json.loads((run.path / "search_space.json").read_text())["layers"]]
    assert any(".attn2." in f for f in layers)  # cross-attention is searched
    assert not any(f.startswith(("vae", "text_encoder", "decoder", "encoder.")) for f in layers)

    man = export_candidate(run.path, rows[0]["key"], tmp_path / "exp")
    assert man["conditioning"]["kind"] == "text" and man["conditioning"]["prompts"] == PROMPTS
    assert man["sampler"]["guidance_scale"] == 2.0 and man["supernet_config"]["guidance_ranges"] == "separate"
    assert json.loads((tmp_path / "exp" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exp"), local_files_only=True)
    tmpq.apply_export(pipe, tmp_path / "exp")
    img = pipe(prompt=PROMPTS[:2], guidance_scale=2.0, generator=noise_generators(2, 0), output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == pipe.tmpq_timesteps  # the exported steps, not its default 50
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    ref = sample_images(unet, sched, ts, 2, seed=0, guidance_scale=2.0, progress=False)
    assert img.shape == ref.shape == (2, 3, 8, 8)
    assert float((img * 2 - 1 - ref).abs().max()) < 1e-5

    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_prompts_are_checked_in_one_line(tmp_path):
    from tests.conftest import tiny_unet

    with pytest.raises(TmpqError, match="model.prompts: must be a list, got 'a cat'"):
        config_from_dict({"model": {"prompts": "a cat"}})
    with pytest.raises(TmpqError, match="model.prompts: must be a list of non-empty strings"):
        config_from_dict({"model": {"prompts": ["a cat", ""]}})
    with pytest.raises(TmpqError, match="model.prompts: must be a list of non-empty strings"):
        ModelConfig(prompts=("a cat", " "))
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), tmp_path / "m")
    with pytest.raises(TmpqError, match="model.prompts: UNet2DModel is not text-conditional"):
        load_model(ModelConfig(path=str(tmp_path / "m"), prompts=("a cat",)))
    tiny_sd(tmp_path / "sd", tmp_path)
    for f in (tmp_path / "sd" / "text_encoder").iterdir():
        f.unlink()
    (tmp_path / "sd" / "text_encoder").rmdir()
    with pytest.raises(TmpqError, match="has no text_encoder/ \\+ tokenizer/ to encode them"):
        load_model(ModelConfig(path=str(tmp_path / "sd"), prompts=("a cat",)))
    m = load_model(str(tmp_path / "sd"))  # without prompts it loads; sampling then asks for them
    from tmpq.core.sampler import make_scheduler, sample_images

    with pytest.raises(TmpqError, match="is text-conditional: give prompts"):
        sample_images(m.unet, make_scheduler(m.scheduler_config), [500, 0], 1, progress=False)


def test_tmpq_calibrate_takes_prompts_and_guidance(tmp_path, capsys):
    """``tmpq calibrate`` conditions a text model on the given prompts and, with guidance, calibrates both passes
    (every captured input twice: with its prompt and with the empty prompt)."""
    from tests.conftest import run_cli

    tiny_sd(tmp_path / "sd", tmp_path)
    out = tmp_path / "sn.safetensors"
    code, _, err = run_cli(["calibrate", "--model", tmp_path / "sd", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                            "--guidance", "2", "--w-bits", "8", "--a-bits", "8", "--calib-steps", "2",
                            "--calib-per-step", "2", "--sampler-steps", "4", "--out", out], capsys)
    assert code == 0, err
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["model"]["prompts"] == PROMPTS[:2] and side["model"]["guidance_scale"] == 2.0
    assert side["calib_pairs"] == 2 * 2 * 2
    code, _, err = run_cli(["calibrate", "--model", tmp_path / "sd", "--guidance", "2", "--out",
                            tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "is text-conditional: give prompts" in err.strip().splitlines()[-1]
