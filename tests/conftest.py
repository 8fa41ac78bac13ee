from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process CLI calls (``--threads N``) set torch's global thread count; restore it after every test, since
    float results depend on it (a later test comparing with a fresh process would see other sums)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_unet(sample_size: int = 8, in_channels: int = 1, seed: int = 0):
    """A ~20k-parameter UNet2DModel built from config, with attention, for fast tests."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).eval()


def calib_batches(n: int = 3, seed: int = 0, batch: int = 4, size: int = 8):
    """n seeded (x_t, t) batches shaped for :func:`tiny_unet` (calibration data for supernet tests)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g))
            for _ in range(n)]


def interrupted_then_resumed(cfg, data, ckpt, die_at: int):
    """Calibrate a tiny-UNet supernet of ``cfg`` with ``checkpoint=ckpt``, killed (KeyboardInterrupt) in its
    ``die_at``-th observation pass; check the unfinished checkpoint is refused; resume it in a fresh supernet.
    Returns ``(resumed net, observation passes the resumed run made)``."""
    from tmpq.core.errors import TmpqError
    from tmpq.supernet import QuantSupernet

    first = QuantSupernet(tiny_unet(), cfg)
    calls = {"n": 0}
    real_observe = first.observe

    def dying_observe(batches):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        real_observe(batches)

    first.observe = dying_observe
    with pytest.raises(KeyboardInterrupt):
        first.calibrate(data, progress=False, checkpoint=ckpt)
    with pytest.raises(TmpqError, match="unfinished calibration"):
        QuantSupernet(tiny_unet(), cfg).load(ckpt)

    resumed = QuantSupernet(tiny_unet(), cfg)
    seen = []
    real = resumed.observe
    resumed.observe = lambda b: (seen.append(1), real(b))
    resumed.calibrate(data, progress=False, checkpoint=ckpt)
    return resumed, len(seen)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir

    out = tmp_path / "tiny-ddpm"
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), out)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``tmpq ARGV`` in this process (no interpreter start, no second torch import): (exit status, stdout, stderr).
    The torch thread count the command sets is restored afterwards."""
    import torch

    from tmpq.cli import main

    threads = torch.get_num_threads()
    try:
        code = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_stock(script: str, args: dict) -> dict:
    """Run ``script`` (a stock-pipeline check: ``python -c script ARGS``) in a fresh interpreter with ``args`` as JSON
    and load the tensors it saved to ``args["out"]`` (safely: ``weights_only``)."""
    res = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return torch.load(args["out"], weights_only=True)
