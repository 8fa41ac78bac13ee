"""Short real runs of both trainers: they must write loadable, self-describing artefacts."""
import json

import pytest
import torch

from tmpq.core.model import load_model
from tmpq.jobs.train import DenoiserTrainConfig, train_denoiser


def test_train_denoiser_writes_loadable_pipeline(tmp_path):
    man = train_denoiser(DenoiserTrainConfig(steps=3, batch_size=4, warmup=1), tmp_path / "m", command="tmpq train --steps 3")
    m = load_model(tmp_path / "m")
    assert m.sample_shape == (1, 16, 16)
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(man))
    assert saved["data"]["sha256"] and saved["config"]["seed"] == 0 and saved["command"] == "tmpq train --steps 3"


def test_train_denoiser_is_seeded(tmp_path):
    cfg = DenoiserTrainConfig(steps=2, batch_size=4, warmup=1)
    train_denoiser(cfg, tmp_path / "a")
    train_denoiser(cfg, tmp_path / "b")
    a, b = load_model(tmp_path / "a").unet.state_dict(), load_model(tmp_path / "b").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_train_denoiser_resumes_after_a_crash_bit_identically(tmp_path, monkeypatch, arch):
    import tmpq.jobs.train as tr
    from tmpq.core.errors import TmpqError

    cfg = DenoiserTrainConfig(arch=arch, steps=5, batch_size=4, warmup=1)
    train_denoiser(cfg, tmp_path / "ref", ckpt_every=2)
    assert not (tmp_path / "ref" / tr.CKPT_NAME).exists()  # removed once the model is saved

    real_update, calls = tr.EMA.update, []

    def crash_on_fourth(self, model):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_update(self, model)

    monkeypatch.setattr(tr.EMA, "update", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(cfg, tmp_path / "m", ckpt_every=2)
    monkeypatch.setattr(tr.EMA, "update", real_update)
    ckpt = tmp_path / "m" / tr.CKPT_NAME
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    with pytest.raises(TmpqError, match="lr"):  # other settings refuse the checkpoint
        train_denoiser(DenoiserTrainConfig(arch=arch, steps=5, batch_size=4, warmup=1, lr=5e-4), tmp_path / "m",
                       ckpt_every=2)
    man = train_denoiser(cfg, tmp_path / "m", ckpt_every=2)
    a, b = load_model(tmp_path / "ref").unet.state_dict(), load_model(tmp_path / "m").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert man["metrics"]["final_loss_mean_last100"] == pytest.approx(
        json.loads((tmp_path / "ref" / "manifest.json").read_text())["metrics"]["final_loss_mean_last100"])
    ckpt.write_bytes(b"garbage")
    with pytest.raises(TmpqError, match="unreadable training checkpoint"):
        train_denoiser(cfg, tmp_path / "m", ckpt_every=2)


def test_train_classifier_manifest(tmp_path):
    from tmpq.evaluators.classifier import ClassifierTrainConfig, train_classifier
    from tmpq.evaluators.features import DomainExtractor

    man = train_classifier(ClassifierTrainConfig(epochs=1), tmp_path / "c")
    assert 0.0 <= man["metrics"]["heldout_accuracy"] <= 1.0 and man["feature_scale"] > 0
    ext = DomainExtractor(tmp_path / "c")
    assert ext(torch.zeros(2, 1, 16, 16)).shape == (2, 128)


def test_the_dit_trains_loads_and_samples_with_guidance(tmp_path):
    from diffusers import DiTTransformer2DModel

    from tmpq.core.model import embedded_scheduler_config
    from tmpq.core.sampler import make_scheduler, sample_images

    man = train_denoiser(DenoiserTrainConfig(arch="dit", steps=2, batch_size=4, warmup=1), tmp_path / "dit")
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and "unet" not in index
    assert man["data"]["label_dropout"] == 0.1
    m = load_model(tmp_path / "dit")
    assert isinstance(m.unet, DiTTransformer2DModel) and m.sample_shape == (1, 16, 16)
    imgs = sample_images(m.unet, make_scheduler(embedded_scheduler_config()), [800, 400, 0], 3, labels=[1, 2, 3],
                         guidance_scale=2.0, progress=False)
    assert imgs.shape == (3, 1, 16, 16) and torch.isfinite(imgs).all()


def test_a_flow_objective_trains_on_the_velocity_and_saves_a_flow_model(tmp_path, monkeypatch):
    """``objective = "flow"``: the model sees x = (1 - sigma) x0 + sigma noise at model time sigma * 1000 and learns
    noise - x0; the saved directory is a flow-matching model (FlowMatchEulerDiscreteScheduler with the shift)."""
    import torch.nn.functional as F

    import tmpq.jobs.train as tr
    from tmpq.core.timeaxis import TimeAxis

    seen = []
    real = F.mse_loss

    def spy(pred, target):
        seen.append(target.detach().clone())
        return real(pred, target)

    monkeypatch.setattr(tr.F, "mse_loss", spy)
    calls = []
    cfg = DenoiserTrainConfig(steps=2, batch_size=4, warmup=1, objective="flow", shift=3.0)
    real_model = tr._model

    def model(c):
        m = real_model(c)
        m.register_forward_pre_hook(lambda _m, args: calls.append((args[0].detach().clone(), args[1].clone())))
        return m

    monkeypatch.setattr(tr, "_model", model)
    man = train_denoiser(cfg, tmp_path / "m")
    assert man["config"]["objective"] == "flow" and man["config"]["shift"] == 3.0
    # re-draw the first step's batch from the same generator: the target is the velocity, the input the flow mix
    gen = torch.Generator().manual_seed(0)
    x_all, _ = tr.load_digits("all", 16)
    idx = torch.randint(0, len(x_all), (4,), generator=gen)
    x0 = x_all[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    axis = TimeAxis("flow", 1000, 3.0)
    sigma = torch.tensor([axis.sigma(int(v)) for v in t], dtype=torch.float32)
    assert torch.allclose(seen[0], noise - x0)
    assert torch.allclose(calls[0][1], sigma * 1000, atol=1e-3)
    assert torch.allclose(calls[0][0], (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise, atol=1e-6)
    m = load_model(tmp_path / "m")
    assert m.time_axis == axis
    assert json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(tr.TmpqError, match="train.objective: must be one of ddpm, flow"):
        DenoiserTrainConfig(objective="edm").validate()
