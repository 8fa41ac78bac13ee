"""Calibration data: denoiser inputs (x_t, t) captured along the FP sampler's trajectories.

Three strategies (compared in the supernet report):
- ``uniform`` (Q-Diffusion): keep x_t at ``n_steps`` uniformly spaced steps of the trajectory, every sample each time.
- ``ndtc`` (PTQ4DM): per sample, a timestep drawn from N(0.4 T, 0.4 T) (biased to the clean end), snapped to the
  nearest trajectory step.
- ``eda`` (EDA-DM style): per-step sample counts allocated by density + lambda * diversity of the denoiser's
  mid-block features, then the most diverse samples of each step (farthest-point selection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tmpq.core.adapters import (
    adapter_for,
    conditioning_of,
    denoise,
    denoiser_of,
    rows,
    sample_shape,
    with_null,
)
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import NoiseBank, sample_batch
from tmpq.core.schedules import make_timesteps

from tmpq.core.choices import MODES, STRATEGIES 


@dataclass(frozen=True)
class CalibrationConfig:
    """How a supernet is calibrated (a run config's ``[calibration]`` section is this class plus ``supernet_file``;
    ``tmpq calibrate`` fills only the options given on its command line).

    - ``mode``: ``per-option`` (the whole model at option k, as the authors' code) or ``random-path`` (random
      per-layer options per batch, the paper's text; its draws are seeded 0).
    - ``strategy``: the calibration x_t, one of ``STRATEGIES`` (see the module docstring).
    - ``steps`` / ``per_step``: sampler steps that contribute inputs and inputs per step; ``sampler_steps``: the FP
      DDIM trajectory they are captured from; ``seed``: its noise-bank seed (disjoint from the proxy's).
    - ``recon_iters``: BRECQ-style block reconstruction iterations per block and option after AdaRound (0 = none).
    """

    mode: str = "per-option"
    strategy: str = "uniform"
    steps: int = 20
    per_step: int = 32
    sampler_steps: int = 100
    batch_size: int = 64
    recon_iters: int = 0
    seed: int = 10_000

    def __post_init__(self):
        for key, choices in (("mode", MODES), ("strategy", STRATEGIES)):
            if getattr(self, key) not in choices:
                raise TmpqError(f"calibration.{key}: must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key, low in (("steps", 1), ("per_step", 1), ("sampler_steps", 1), ("batch_size", 1), ("recon_iters", 0),
                         ("seed", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TmpqError(f"calibration.{key}: must be an integer >= {low}, got {v!r}")
        if not self.seed < 2**32:  # the noise bank's seed sequence takes 0 <= seed < 2**32
            raise TmpqError(f"calibration.seed: must be < 2**32, got {self.seed}")


@dataclass
class CalibData:
    """Captured denoiser inputs: x [N, C, H, W], integer timesteps t [N] and the conditioning of each row (a dict of
    tensors [N, ...]; empty for unconditional models)."""

    x: torch.Tensor
    t: torch.Tensor
    strategy: str
    cond: dict = field(default_factory=dict)

    def batches(self, batch_size: int = 64):
        """(x, t) batches, or (x, t, cond) for a conditional model."""
        for i in range(0, len(self.t), batch_size):
            sl = slice(i, i + batch_size)
            yield (self.x[sl], self.t[sl], rows(self.cond, sl)) if self.cond else (self.x[sl], self.t[sl])

    def with_null_pass(self, unet) -> "CalibData":
        """Every input twice: with its conditioning and with the null conditioning that classifier-free guidance
        pairs it with (guided sampling runs both passes, so calibration sees both)."""
        return CalibData(torch.cat([self.x, self.x]), torch.cat([self.t, self.t]), self.strategy,
                         with_null(unet, self.cond))

    def __len__(self) -> int:
        return len(self.t)


@torch.no_grad()
def capture_along(unet, scheduler, timesteps, n_samples: int, seed: int = 10_000,
                  batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run the sampler along exactly ``timesteps`` on noise-bank images 0..n_samples-1 (``seed`` distinct from the
    evaluation seeds; conditioned and guided as the model's bound :class:`~tmpq.core.adapters.Conditioning` says),
    ``batch`` trajectories per sampler call (default: all at once), and return every step's
    denoiser input: xs [calls, n, C, H, W], the timestep of each call [calls] (one call per timestep, two for most
    of a 2nd-order solver's) and the images' conditioning (tensors [n, ...])."""
    bank = NoiseBank(seed, sample_shape(unet))
    step = batch or n_samples
    chunks, calls = [], []
    for s in range(0, n_samples, step):
        xs: list[torch.Tensor] = []
        calls = []

        def keep(k, t, x):
            xs.append(x.clone())
            calls.append(int(t))

        sample_batch(unet, scheduler, timesteps, bank, list(range(s, min(s + step, n_samples))), on_step=keep)
        chunks.append(torch.stack(xs))
    inner = denoiser_of(unet)  # the conditioning the sampler gave images 0..n-1 (a function of their indices)
    cond = adapter_for(inner).conditions(inner, range(n_samples), device=chunks[0].device)
    return torch.cat(chunks, dim=1), torch.tensor(calls, dtype=torch.int64), cond


def capture_trajectories(unet, scheduler, n_samples: int, sampler_steps: int, seed: int = 10_000,
                         schedule: str = "uniform"):
    """:func:`capture_along` the ``schedule`` of ``sampler_steps`` steps (the FP sampler's trajectories)."""
    ts = make_timesteps(schedule, sampler_steps, scheduler.config.num_train_timesteps)
    return capture_along(unet, scheduler, ts, n_samples, seed)


def _mid_features(unet, x: torch.Tensor, t: torch.Tensor, cond: dict) -> np.ndarray:
    """Per-sample features of the adapter's middle module (mean over space or tokens)."""
    inner = denoiser_of(unet)
    adapter = adapter_for(inner)
    module = adapter.feature_module(inner)
    if module is None:
        raise TmpqError(f"calibration.strategy eda: the {type(inner).__name__} adapter names no feature module")
    feats = []

    def hook(mod, inp, out):
        out = out[0] if isinstance(out, tuple) else out
        feats.append((out.mean(dim=(2, 3)) if out.dim() == 4 else out.mean(dim=1)).double().cpu())

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(t), 256):
                denoise(unet, x[i:i + 256], t[i:i + 256], rows(cond, slice(i, i + 256)))
    finally:
        h.remove()
    return torch.cat(feats).numpy()


def _farthest_points(f: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(f)))]
    d = np.linalg.norm(f - f[chosen[0]], axis=1)
    while len(chosen) < k:
        nxt = int(d.argmax())
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(f - f[nxt], axis=1))
    return np.array(chosen)


def make_calib_data(unet, scheduler, strategy: str = "uniform", n_steps: int = 20, per_step: int = 32,
                    sampler_steps: int = 100, seed: int = 10_000, lam: float = 1.0) -> CalibData:
    """Build ``n_steps x per_step`` calibration pairs with the named strategy (default 20 x 32 = 640). When the
    model's conditioning guides (``guidance_scale != 1``, bound by its loader) the trajectories are guided and every
    input comes twice: with its conditioning and with the null conditioning (the two passes of classifier-free
    guidance).

    Example:
        >>> data = make_calib_data(unet, sched, "ndtc", n_steps=4, per_step=8)  # doctest: +SKIP
    """
    if strategy not in STRATEGIES:
        raise TmpqError(f"calibration.strategy: unknown {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n_steps < 1 or per_step < 1 or sampler_steps < n_steps:
        raise TmpqError(f"calibration: need 1 <= n_steps <= sampler_steps and per_step >= 1, got n_steps={n_steps}, "
                        f"per_step={per_step}, sampler_steps={sampler_steps}")
    data = _strategy_data(unet, scheduler, strategy, n_steps, per_step, sampler_steps, seed, lam)
    return data.with_null_pass(unet) if conditioning_of(unet).guidance_scale != 1.0 else data


def _strategy_data(unet, scheduler, strategy, n_steps, per_step, sampler_steps, seed, lam):
    rng = np.random.default_rng(seed)
    T = scheduler.config.num_train_timesteps
    if strategy == "uniform":
        xs, ts, cond = capture_trajectories(unet, scheduler, per_step, sampler_steps, seed)
        keep = np.unique(np.linspace(0, sampler_steps - 1, n_steps).round().astype(int))
        x = xs[keep].flatten(0, 1)
        t = ts[keep].repeat_interleave(per_step)
        return CalibData(x, t, strategy, rows(cond, torch.arange(per_step).repeat(len(keep))))
    total = n_steps * per_step
    if strategy == "ndtc":
        xs, ts, cond = capture_trajectories(unet, scheduler, total, sampler_steps, seed)
        want = np.clip(rng.normal(0.4 * T, 0.4 * T, size=total), 0, T - 1)
        step = np.abs(ts.numpy()[None, :] - want[:, None]).argmin(1)  # nearest trajectory step per sample
        x = torch.stack([xs[s, i] for i, s in enumerate(step)])
        return CalibData(x, ts[step], strategy, cond)
    # eda: density + lambda * diversity per step, then farthest-point selection inside each step
    pool = max(per_step * 2, 16)
    xs, ts, cond = capture_trajectories(unet, scheduler, pool, sampler_steps, seed)
    cand = np.unique(np.linspace(0, sampler_steps - 1, min(sampler_steps, 2 * n_steps)).round().astype(int))
    feats = {s: _mid_features(unet, xs[s], ts[s].repeat(pool), cond) for s in cand}
    allf = np.concatenate(list(feats.values()))
    mu, sd = allf.mean(0), allf.std(0) + 1e-8
    centre = ((allf - mu) / sd).mean(0)
    dens = np.array([-np.linalg.norm(((feats[s] - mu) / sd).mean(0) - centre) for s in cand])
    div = np.array([((feats[s] - mu) / sd).std(0).mean() for s in cand])
    z = lambda v: (v - v.mean()) / (v.std() + 1e-12)  # noqa: E731
    score = z(dens) + lam * z(div)
    w = np.exp(score - score.max())
    counts = np.floor(w / w.sum() * total).astype(int)
    counts[np.argsort(-w)[: total - counts.sum()]] += 1
    counts = np.minimum(counts, pool)
    xs_out, ts_out, picked = [], [], []
    for s, c in zip(cand, counts):
        if c == 0:
            continue
        idx = _farthest_points((feats[s] - mu) / sd, int(c), rng)
        xs_out.append(xs[s, idx])
        ts_out.append(ts[s].repeat(int(c)))
        picked.append(torch.as_tensor(idx))
    return CalibData(torch.cat(xs_out), torch.cat(ts_out), strategy, rows(cond, torch.cat(picked)))


def calibrate_to_file(net, scheduler, out: Path | str, cfg: CalibrationConfig | None = None,
                      progress: bool = True) -> dict:
    """Capture calibration data (``cfg.strategy`` along the FP trajectories of ``net``'s own denoiser, passed
    through, guided as its model's conditioning says), calibrate every option of the supernet ``net`` and save it to ``out`` (a ``.safetensors`` file).
    Resumable per option through ``<out stem>.partial.safetensors`` beside it, which is removed once ``out`` is
    written; with AdaRound weights and ``cfg.recon_iters > 0``, BRECQ-style block reconstruction follows. Returns
    ``{"calib_pairs", "reconstruction"}``. The one path of ``tmpq calibrate`` and of a search run's supernet."""
    cfg = cfg or CalibrationConfig()
    out = Path(out)
    partial = out.with_name(out.stem + ".partial.safetensors")
    data = make_calib_data(net.unet, scheduler, cfg.strategy, n_steps=cfg.steps, per_step=cfg.per_step,
                           sampler_steps=cfg.sampler_steps, seed=cfg.seed)
    net.set_fp()
    batches = list(data.batches(cfg.batch_size))
    net.calibrate(batches, mode=cfg.mode, seed=0, progress=progress, checkpoint=partial)
    recon = []
    if net.config.w_rounding == "adaround" and cfg.recon_iters > 0:
        recon = net.reconstruct(batches, iters=cfg.recon_iters, progress=progress)
    net.save(out)
    partial.unlink(missing_ok=True)
    return {"calib_pairs": len(data), "reconstruction": recon}
