"""The embedded flow model's kind: a class-conditional MMDiT (Stable Diffusion 3's ``SD3Transformer2DModel`` on
pixels) whose digit class is given as its family takes text, learned tokens (``class_tokens.safetensors``). Trained by
``tmpq train --arch mmdit``, loaded with its tokens as class-labelled prompts, sampled by tmpq as the stock
``StableDiffusion3Pipeline`` samples it from those embeddings, measured for class accuracy, and carried by an export."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from tmpq.core.errors import TmpqError
from tmpq.core.model import CLASS_TOKENS_NAME, ModelConfig, load_model
from tmpq.jobs.train import DenoiserTrainConfig, train_denoiser


@pytest.fixture(scope="module")
def mmdit_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mmdit") / "m"
    train_denoiser(DenoiserTrainConfig(arch="mmdit", objective="flow", steps=3, batch_size=8, warmup=1), out)
    return out


def test_mmdit_trains_into_a_transformer_and_its_class_tokens(mmdit_dir):
    from tmpq.core.adapters import adapter_for, image_labels

    index = json.loads((mmdit_dir / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    tok = load_file(str(mmdit_dir / CLASS_TOKENS_NAME))
    assert tok["prompt_embeds"].shape == (11, 4, 64) and tok["pooled_prompt_embeds"].shape == (11, 64)
    m = load_model(str(mmdit_dir))
    assert isinstance(m.unet, SD3Transformer2DModel) and m.sample_shape == (1, 16, 16) and m.time_axis.flow
    c = m.conditioning
    assert c.prompt_labels == tuple(range(10))
    assert torch.equal(c.prompt_embeds, tok["prompt_embeds"][:10]) and torch.equal(c.null_embeds, tok["prompt_embeds"][10:])
    a = adapter_for(m.unet)
    # balanced: image i is digit i % 10; labels pick their class's tokens and pooled vector
    assert image_labels(m.unet, range(12)).tolist() == [*range(10), 0, 1]
    cond = a.conditions(m.unet, range(3), labels=[7, 7, 2])
    assert torch.equal(cond["encoder_hidden_states"], tok["prompt_embeds"][[7, 7, 2]])
    assert torch.equal(cond["pooled_projections"], tok["pooled_prompt_embeds"][[7, 7, 2]])
    null = a.null(m.unet, cond)
    assert torch.equal(null["pooled_projections"], tok["pooled_prompt_embeds"][[10, 10, 10]])
    with pytest.raises(TmpqError, match="labels: 12 is not a class of this model"):
        a.conditions(m.unet, range(1), labels=[12])


def test_tmpq_samples_the_mmdit_as_the_stock_sd3_pipeline_does_from_its_tokens(mmdit_dir):
    """Guided Euler on the same sigmas, noise from noise_generators: the stock pipeline given the class tokens as its
    prompt embeddings (the null row as the negative prompt) makes tmpq's samples; class accuracy is measured."""
    from tmpq.core.sampler import make_scheduler, noise_generators, sample_images
    from tmpq.evaluators.quality import digit_class_accuracy

    m = load_model(ModelConfig(path=str(mmdit_dir), guidance_scale=2.0))
    ts = [999, 700, 420, 150]
    labels = [3, 1, 4]
    ours = sample_images(m.unet, make_scheduler(m.scheduler_config, "euler"), ts, 3, seed=4, labels=labels,
                         progress=False)
    tok = load_file(str(mmdit_dir / CLASS_TOKENS_NAME))
    pipe = StableDiffusion3Pipeline(transformer=m.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(mmdit_dir / "scheduler")), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt_embeds=tok["prompt_embeds"][labels], pooled_prompt_embeds=tok["pooled_prompt_embeds"][labels],
                 negative_prompt_embeds=tok["prompt_embeds"][[10] * 3],
                 negative_pooled_prompt_embeds=tok["pooled_prompt_embeds"][[10] * 3], guidance_scale=2.0,
                 sigmas=[(t + 1) / 1000 for t in ts], height=128, width=128,  # no VAE: 8x latent scale assumed
                 generator=noise_generators(3, seed=4), output_type="latent").images
    assert stock.shape == ours.shape == (3, 1, 16, 16)
    assert float((stock.clamp(-1, 1) - ours).abs().max()) <= 1e-5
    acc = digit_class_accuracy(m.unet, sample_images(m.unet, make_scheduler(m.scheduler_config), ts, 10, seed=0,
                                                     progress=False))
    assert acc is not None and 0.0 <= acc <= 1.0


def test_class_tokens_travel_with_the_model_and_are_refused_when_they_do_not_fit(mmdit_dir, tmp_path):
    from tmpq.core.model import save_pipeline_dir

    m = load_model(str(mmdit_dir))
    save_pipeline_dir(m.unet, m.scheduler_config, tmp_path / "copy")  # an export writes the model this way
    a, b = load_file(str(mmdit_dir / CLASS_TOKENS_NAME)), load_file(str(tmp_path / "copy" / CLASS_TOKENS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TmpqError, match="takes no model.prompts"):
        load_model(ModelConfig(path=str(tmp_path / "copy"), prompts=("a digit",)))
    save_file({"prompt_embeds": torch.zeros(11, 4, 32), "pooled_prompt_embeds": torch.zeros(11, 64)},
              str(tmp_path / "copy" / CLASS_TOKENS_NAME))
    with pytest.raises(TmpqError, match=r"class_tokens.safetensors: prompt_embeds \[11, 4, 32\]"):
        load_model(str(tmp_path / "copy"))
    (tmp_path / "copy" / CLASS_TOKENS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(TmpqError, match="corrupt or truncated weights file"):
        load_model(str(tmp_path / "copy"))


def test_labels_are_refused_for_a_model_conditioned_on_prompts():
    from tmpq.core.adapters import Conditioning, adapter_for, bind_conditioning

    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=1,
                              attention_head_dim=8, num_attention_heads=1, joint_attention_dim=8,
                              caption_projection_dim=8, pooled_projection_dim=8, pos_embed_max_size=4)
    bind_conditioning(t, Conditioning(prompt_embeds=torch.zeros(2, 3, 8), pooled_embeds=torch.zeros(2, 8)))
    with pytest.raises(TmpqError, match="labels: SD3Transformer2DModel is conditioned on prompts, not on class labels"):
        adapter_for(t).conditions(t, range(2), labels=[1, 2])


@pytest.mark.parametrize("ranges", ["separate", "shared"])
def test_stream_ranges_tie_each_joint_attention_pair_or_leave_each_stream_its_own(mmdit_dir, ranges):
    """supernet.stream_ranges: "shared" gives each image / text projection pair of a joint attention one range per
    option and time group that covers both streams' calibrated ranges; "separate" (the default) leaves them apart."""
    from tmpq.core.adapters import adapter_for
    from tmpq.core.sampler import make_scheduler
    from tmpq.supernet import QuantSupernet, SupernetConfig
    from tmpq.supernet.calib_data import make_calib_data

    def calibrated(r):
        m = load_model(ModelConfig(path=str(mmdit_dir)))
        data = make_calib_data(m.unet, make_scheduler(m.scheduler_config), "uniform", n_steps=4, per_step=4,
                               sampler_steps=8, seed=0)
        net = QuantSupernet(m.unet, SupernetConfig(w_bits=(8,), a_bits=(8, 6), time_groups=2, stream_ranges=r))
        net.calibrate(list(data.batches(8)), progress=False)
        return net, adapter_for(m.unet).stream_pairs(m.unet)

    net, pairs = calibrated(ranges)
    apart, _ = calibrated("separate")
    assert len(pairs) == 4 * 4 - 1  # 4 blocks x (q, k, v, out), the last block's text stream without its out
    for a, b in pairs:
        for g in range(2):
            for lay in (net.layers[a], net.layers[b], apart.layers[a], apart.layers[b]):
                lay.load_time_group(g)
            for j in range(2):
                qa, qb = net.layers[a].a_quant[j], net.layers[b].a_quant[j]
                pa, pb = apart.layers[a].a_quant[j], apart.layers[b].a_quant[j]
                if ranges == "separate":
                    assert torch.equal(qa.scale, pa.scale) and torch.equal(qb.scale, pb.scale)
                    continue
                assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point)
                lo = lambda q: float((q.qmin - q.zero_point) * q.scale)  # noqa: E731
                hi = lambda q: float((q.qmax - q.zero_point) * q.scale)  # noqa: E731
                tol = 1e-6 + float(qa.scale)  # the union's zero point rounds to the grid
                assert lo(qa) <= min(lo(pa), lo(pb)) + tol and hi(qa) >= max(hi(pa), hi(pb)) - tol
    if ranges == "separate":
        assert any(not torch.equal(apart.layers[a].a_quant[0].scale, apart.layers[b].a_quant[0].scale)
                   for a, b in pairs)
    assert "stream_ranges" not in SupernetConfig().to_json()  # files of the default stay as they were written
    assert SupernetConfig.from_json(SupernetConfig(stream_ranges="shared").to_json()).stream_ranges == "shared"
    with pytest.raises(TmpqError, match="supernet.stream_ranges: must be one of separate, shared"):
        SupernetConfig(stream_ranges="joint")
