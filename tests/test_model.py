import shutil

import pytest
import torch

from conftest import tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.model import EMBEDDED_MODEL_DIR, WEIGHTS_NAME, load_model


def test_load_pipeline_dir_round_trip(tiny_model_dir):
    m = load_model(tiny_model_dir)
    ref = tiny_unet()
    for (k, a), (_, b) in zip(m.unet.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    assert m.sample_shape == (1, 8, 8) and m.num_train_timesteps == 1000


def test_load_bare_unet_dir(tmp_path):
    tiny_unet().save_pretrained(str(tmp_path / "bare"), safe_serialization=True)
    m = load_model(tmp_path / "bare")
    assert m.scheduler_config["num_train_timesteps"] == 1000  # DDPM defaults when no scheduler config is given


def test_embedded_model_loads():
    m = load_model(None)
    assert m.sample_shape == (1, 16, 16)
    n = sum(p.numel() for p in m.unet.parameters())
    assert 0.8e6 < n < 1.5e6
    assert (EMBEDDED_MODEL_DIR / "unet" / WEIGHTS_NAME).stat().st_size <= 10 * 2**20


def test_missing_dir(tmp_path):
    with pytest.raises(TmpqError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_truncated_weights(tiny_model_dir):
    w = tiny_model_dir / "unet" / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(TmpqError, match="corrupt or truncated weights file"):
        load_model(tiny_model_dir)


def test_corrupt_weights(tiny_model_dir):
    w = tiny_model_dir / "unet" / WEIGHTS_NAME
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(TmpqError, match="corrupt or truncated weights file"):
        load_model(tiny_model_dir)


def test_pickled_weights_refused(tiny_model_dir):
    w = tiny_model_dir / "unet" / WEIGHTS_NAME
    shutil.move(w, w.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(TmpqError, match="pickled .bin"):
        load_model(tiny_model_dir)
