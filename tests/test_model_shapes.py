"""Valid but unusual denoiser configs are served correctly or refused in one line (exit 2), never sampled into images
of the wrong shape with exit 0: a non-square sample, output channels that are not the sample's, a size the model's
downsampling does not divide."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from tmpq.core.errors import TmpqError
from tmpq.core.model import ModelConfig, embedded_scheduler_config, load_model, save_pipeline_dir


def _unet(sample_size, in_channels=1, out_channels=1, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_a_non_square_sample_is_sampled_at_its_own_shape_as_the_stock_pipeline_does(tmp_path):
    from tmpq.core.sampler import make_scheduler, noise_generators, sample_images

    save_pipeline_dir(_unet((8, 4)), embedded_scheduler_config(), tmp_path / "m")
    m = load_model(ModelConfig(path=str(tmp_path / "m")))
    assert m.sample_shape == (1, 8, 4)
    sched = make_scheduler(m.scheduler_config)
    ours = sample_images(m.unet, sched, [900, 500, 100], 3, seed=2, batch_size=3, progress=False)
    assert ours.shape == (3, 1, 8, 4)
    sched.pin_timesteps([900, 500, 100], default_steps=1000)
    pipe = DDPMPipeline(unet=m.unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=3, generator=noise_generators(3, seed=2), output_type="np").images
    assert got.shape == (3, 8, 4, 1)
    assert np.array_equal(got, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("unet,match", [
    (lambda: _unet(8, in_channels=2, out_channels=1), "out_channels = 1 with in_channels = 2"),
    (lambda: _unet(8, in_channels=1, out_channels=3), "out_channels = 3 with in_channels = 1"),
    (lambda: _unet((2, 1)), r"sample_size \[2, 1\] is not a multiple of 2"),
    (lambda: _unet(7), "sample_size 7 is not a multiple of 2"),
])
def test_unusual_configs_are_refused_in_one_line(tmp_path, unet, match):
    save_pipeline_dir(unet(), embedded_scheduler_config(), tmp_path / "m")
    with pytest.raises(TmpqError, match=match) as err:
        load_model(ModelConfig(path=str(tmp_path / "m")))
    assert "\n" not in str(err.value)
    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", "--model", str(tmp_path / "m"), "--steps", "3",
                          "--n", "2", "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "UNet2DModel:" in lines[0], res.stderr
    assert not (tmp_path / "g.png").exists()


def test_a_learned_variance_output_is_served(tmp_path):
    """out_channels = 2 x in_channels (DiT's learned variance): the first in_channels channels are the noise."""
    save_pipeline_dir(_unet(8, in_channels=1, out_channels=2), embedded_scheduler_config(), tmp_path / "m")
    m = load_model(ModelConfig(path=str(tmp_path / "m")))
    from tmpq.core.sampler import make_scheduler, sample_images

    assert sample_images(m.unet, make_scheduler(m.scheduler_config), [800, 0], 2, progress=False).shape == (2, 1, 8, 8)
