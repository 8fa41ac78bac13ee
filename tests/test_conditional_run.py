"""A class-conditional DiT with classifier-free guidance through the service: search (calibration on both passes,
the proxy sampled with guidance), validate, export (the conditioning and the guidance scale recorded), and
``tmpq sample EXPORT`` in a fresh process drawing the same images as the export loaded here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
from tmpq.jobs.validate import ValidateConfig, validate_run


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(2)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def cfg_for(model_dir, guidance: float = 2.0):
    return config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": guidance},
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6]},
        "calibration": {"steps": 2, "per_step": 4, "sampler_steps": 4, "batch_size": 8},
        "search": {"engine": "pymoo", "steps": 3, "population": 4, "generations": 1, "seed": 1,
                   "bitops_budget": "none"},
        "proxy": {"n_images": 4, "teacher_steps": 6},
    })


def latent_dit(out, image_channels: int, latent_channels: int, out_channels: int, classes: int):
    """A tiny latent DiT with its VAE (8x8 images, 4x4 latents), saved as a pipeline directory at ``out``."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from tmpq.core.adapters import set_decoder

    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                        layers_per_block=1).eval()
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=latent_channels,
                                out_channels=out_channels, num_layers=2, sample_size=4, patch_size=2,
                                num_embeds_ada_norm=classes).eval()
    set_decoder(dit, vae)
    save_pipeline_dir(dit, embedded_scheduler_config(), out)
    return dit, vae


def test_a_guided_dit_searches_validates_exports_and_samples_from_the_export(tmp_path):
    save_pipeline_dir(tiny_dit(), embedded_scheduler_config(), tmp_path / "dit")
    run = run_search(cfg_for(tmp_path / "dit"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    resolved = json.loads((run.path / "config.resolved.json").read_text())
    assert resolved["model"] == {"path": str(tmp_path / "dit"), "guidance_scale": 2.0, "null_label": -1, "prompts": [],
                                 "dtype": "fp32"}
    final = validate_run(run.path, ValidateConfig(top_k=1, n=4, seeds=(1,), calib_per_step=2, distill_iters=0,
                                                  batch_size=4), progress=False)
    key = final["key"].iloc[0]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["sampler"]["guidance_scale"] == 2.0
    assert man["conditioning"] == {"kind": "class", "null_label": 10, "classes": list(range(10))}
    assert any(i["kind"] == "Linear" for i in man["layers"].values())

    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export

    unet, sched, ts, manifest = load_export(tmp_path / "exp")
    here = sample_images(unet, sched, ts, 4, seed=0, batch_size=4, labels=[1, 2, 3, 4], guidance_scale=2.0,
                         progress=False)
    code = ("import sys, torch; from tmpq.deploy.bundle import load_export; from tmpq.core.sampler import "
            "sample_images; u, s, ts, m = load_export(sys.argv[1]); torch.save(sample_images(u, s, ts, 4, seed=0, "
            "batch_size=4, labels=[1, 2, 3, 4], guidance_scale=m['sampler']['guidance_scale'], progress=False), "
            "sys.argv[2])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp"), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True), here)
    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(tmp_path / "exp"), "--n", "4", "--label", "3",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr


def test_guidance_on_a_model_that_cannot_guide_is_one_line(tmp_path):
    from tests.conftest import tiny_unet

    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), tmp_path / "m")
    with pytest.raises(TmpqError, match="is unconditional"):
        load_model(ModelConfig(path=str(tmp_path / "m"), guidance_scale=2.0))
    with pytest.raises(TmpqError, match="model.guidance_scale: must be a number >= 0"):
        config_from_dict({"model": {"guidance_scale": -1}})


def test_a_latent_dit_samples_through_its_vae_which_is_never_quantized(tmp_path):
    """A latent pipeline directory (transformer/ + vae/): images reach the metrics decoded by the FP VAE, the
    supernet and its BitOPs hold the denoiser alone, and the export carries the VAE."""

    from tmpq.core.adapters import decoder_of
    from tmpq.core.sampler import make_scheduler, sample_images
    from tmpq.deploy.bundle import load_export

    dit, vae = latent_dit(tmp_path / "latent", image_channels=1, latent_channels=2, out_channels=2, classes=10)
    assert json.loads((tmp_path / "latent" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    m = load_model(ModelConfig(path=str(tmp_path / "latent"), guidance_scale=1.5))
    assert m.sample_shape == (2, 4, 4) and m.image_channels == 1 and decoder_of(m.unet) is not None
    imgs = sample_images(m.unet, make_scheduler(m.scheduler_config), [800, 400, 0], 3, guidance_scale=1.5,
                         progress=False)
    assert imgs.shape == (3, 1, 8, 8) and float(imgs.abs().max()) <= 1.0
    run = run_search(cfg_for(tmp_path / "latent", guidance=1.5), tmp_path / "run", progress=False)
    layers = [la["fqn"] for la in json.loads((run.path / "search_space.json").read_text())["layers"]]
    assert layers and all(f.startswith(("pos_embed", "transformer_blocks", "proj_out")) for f in layers)
    key = json.loads(run.log_path.read_text().splitlines()[0])["key"]
    export_candidate(run.path, key, tmp_path / "exp")
    assert (tmp_path / "exp" / "vae" / "config.json").is_file()
    unet, sched, ts, man = load_export(tmp_path / "exp")
    assert man["decoder"]["class"] == "AutoencoderKL" and man["decoder"]["macs"] > 0
    res = subprocess.run([sys.executable, "-m", "tmpq", "profile", "--model", str(tmp_path / "latent")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"{man['decoder']['macs']:,} MACs per image" in res.stdout, res.stderr
    out = sample_images(unet, sched, ts, 2, guidance_scale=man["sampler"]["guidance_scale"], progress=False)
    assert out.shape == (2, 1, 8, 8)
    assert all(not fqn.startswith(("vae", "encoder", "decoder")) for fqn in man["layers"])


def test_the_stock_dit_pipeline_samples_the_export_after_apply_export(tmp_path):
    """diffusers' own DiTPipeline (1000 classes, null label 1000, a VAE), loaded from the export directory and
    quantized with tmpq.apply_export: its call
    runs the exported timesteps (not its default 250) and draws, with the noise bank's generators, the images tmpq
    samples from the export (up to the float rounding of its [0, 1] output)."""
    import dataclasses

    from diffusers import DiTPipeline

    import tmpq
    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.deploy.bundle import load_export

    latent_dit(tmp_path / "latent", image_channels=3, latent_channels=4, out_channels=8, classes=1000)
    cfg = cfg_for(tmp_path / "latent", guidance=1.5)
    cfg = dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, name="paired-feat"))  # RGB: no digits
    run = run_search(cfg, tmp_path / "run", progress=False)
    key = json.loads(run.log_path.read_text().splitlines()[0])["key"]
    export_candidate(run.path, key, tmp_path / "exp")
    assert json.loads((tmp_path / "exp" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "exp"), local_files_only=True)  # the stock way, one call
    tmpq.apply_export(pipe, tmp_path / "exp")
    img = pipe(class_labels=[1, 2], guidance_scale=1.5, generator=noise_generators(2, 0), output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == pipe.tmpq_timesteps
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    assert ts == pipe.tmpq_timesteps
    ref = sample_images(unet, sched, ts, 2, seed=0, labels=[1, 2], guidance_scale=1.5, progress=False)
    assert float((img * 2 - 1 - ref).abs().max()) < 1e-5
