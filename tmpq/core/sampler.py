"""Respaced DDIM over any strictly descending subset of the training timesteps, plus a seeded noise bank.

``RespacedDDIMScheduler`` subclasses diffusers' ``DDIMScheduler``: it keeps its alphas, variance and x0 maths and only
replaces the "previous timestep" rule (``t - T // n`` in diffusers, which assumes uniform spacing) with the next entry
of the given schedule; after the last entry it steps to the clean image (``final_alpha_cumprod``), as DDIM does.
On DDIM's own uniform spacing it reproduces ``DDIMScheduler`` (tested to 1e-5). A pinned schedule
(``pin_timesteps``, set by ``tmpq.apply_export``) is what a stock pipeline's ``set_timesteps(n)`` installs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from tmpq.core.adapters import (
    adapter_for,
    decode,
    denoiser_of,
    guided_eps,
    sample_shape,
)
from tmpq.core.errors import TmpqError
from tmpq.core.schedules import validate_timesteps


class RespacedDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` that accepts an arbitrary strictly descending timestep list.

    A pinned schedule (:meth:`pin_timesteps`) makes ``set_timesteps(n)``, what a stock diffusers pipeline calls with
    its ``num_inference_steps``, install that schedule: so ``pipe(...)`` samples the exported timesteps.

    Example:
        >>> s = RespacedDDIMScheduler(num_train_timesteps=1000)
        >>> s.set_timesteps(timesteps=[800, 450, 200, 50, 0])
        >>> s.prev_timestep(450)
        200
        >>> s.pin_timesteps([964, 881, 717, 300], default_steps=1000)
        >>> s.set_timesteps(1000)  # DDPMPipeline's default num_inference_steps: the caller chose no count
        >>> s.timesteps.tolist()
        [964, 881, 717, 300]
    """

    pinned_timesteps: list[int] | None = None
    default_steps: int | None = None

    def pin_timesteps(self, timesteps: Sequence[int] | None, default_steps: int | None = None) -> None:
        """Make ``set_timesteps(n)`` install ``timesteps`` (``None``: unpin, back to DDIM's uniform ``n`` steps).

        With a pinned schedule of k steps, ``n`` = ``None``, k or ``default_steps`` (the pipeline's default
        ``num_inference_steps``, 1000 for ``DDPMPipeline``: the caller chose no count; an explicit 1000 reads the
        same) installs it; any other ``n`` raises a one-line ``TmpqError`` naming both counts, rather than sampling
        a schedule the caller did not ask for. ``set_timesteps(timesteps=[...])`` is always obeyed.
        """
        if timesteps is None:
            self.pinned_timesteps, self.default_steps = None, None
            return
        ts = [int(t) if isinstance(t, torch.Tensor) else t for t in timesteps]
        self.pinned_timesteps = [int(t) for t in validate_timesteps(ts, self.config.num_train_timesteps)]
        self.default_steps = None if default_steps is None else int(default_steps)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: Sequence[int] | None = None):
        if timesteps is None and self.pinned_timesteps is not None:
            k, n = len(self.pinned_timesteps), num_inference_steps
            if n is not None and int(n) not in (k, self.default_steps):
                raise TmpqError(f"num_inference_steps={int(n)}: this scheduler samples the exported {k}-step schedule "
                                f"{self.pinned_timesteps} (tmpq.apply_export); call the pipeline without "
                                f"num_inference_steps (or with {k}), or unpin it first with "
                                f"pipe.scheduler.pin_timesteps(None) to sample {int(n)} uniform DDIM steps")
            timesteps = self.pinned_timesteps
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device=device)
            ts = [int(t) for t in self.timesteps]
            timesteps = ts
        ts = validate_timesteps([int(t) if isinstance(t, torch.Tensor) else t for t in timesteps],
                                self.config.num_train_timesteps)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        self._prev = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}

    def prev_timestep(self, timestep: int) -> int:
        """The timestep the schedule steps to from ``timestep`` (-1: the clean image)."""
        try:
            return self._prev[int(timestep)]
        except (AttributeError, KeyError):
            raise TmpqError(f"timestep {int(timestep)} is not in the schedule set with set_timesteps") from None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        t = int(timestep)
        prev_t = self.prev_timestep(t)
        cfg = self.config
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if cfg.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        elif cfg.prediction_type == "v_prediction":
            x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        else:
            raise TmpqError(f"scheduler.prediction_type: unsupported value {cfg.prediction_type!r}")
        if cfg.thresholding:
            x0 = self._threshold_sample(x0)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        std_dev_t = eta * self._get_variance(t, prev_t) ** 0.5 if eta > 0 else 0.0
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * eps
        prev_sample = alpha_prod_t_prev ** 0.5 * x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return (prev_sample, x0)
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def make_scheduler(scheduler_config: dict) -> RespacedDDIMScheduler:
    """A respaced DDIM built from a DDPM/DDIM scheduler config (unknown keys are ignored, as diffusers does)."""
    return RespacedDDIMScheduler.from_config(dict(scheduler_config))


def _seed_for(seed: int, index: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0] >> 1)


def noise_generators(n: int, seed: int = 0, start: int = 0) -> list[torch.Generator]:
    """CPU generators that give a stock diffusers pipeline tmpq's initial noise: ``pipe(batch_size=n,
    generator=noise_generators(n, seed))`` starts image i from the noise of bank index ``start + i`` (diffusers'
    ``randn_tensor`` draws image i from generator i), as ``tmpq sample --seed seed`` does.

    Example:
        >>> bank = NoiseBank(seed=0, shape=(1, 16, 16))
        >>> g = noise_generators(2, seed=0)
        >>> bool(torch.equal(torch.randn(1, 16, 16, generator=g[1]), bank.initial([1])[0]))
        True
    """
    return [torch.Generator().manual_seed(_seed_for(seed, i, 0)) for i in range(start, start + n)]


class NoiseBank:
    """Per-image noise, a pure function of (seed, image index): batch size and order do not change any image.

    Stream 0 is the initial noise x_T; stream k >= 1 is the DDIM eta noise of step k-1.

    Example:
        >>> bank = NoiseBank(seed=0, shape=(1, 16, 16))
        >>> bool(torch.equal(bank.initial(range(4))[2], bank.initial([2])[0]))
        True
    """

    def __init__(self, seed: int, shape: tuple[int, ...]):
        self.seed = int(seed)
        self.shape = tuple(shape)

    def _draw(self, indices: Sequence[int], stream: int) -> torch.Tensor:
        out = torch.empty((len(indices), *self.shape))
        g = torch.Generator()
        for j, i in enumerate(indices):
            g.manual_seed(_seed_for(self.seed, i, stream))
            out[j] = torch.randn(self.shape, generator=g)
        return out

    def initial(self, indices: Sequence[int]) -> torch.Tensor:
        return self._draw(list(indices), 0)

    def eta(self, indices: Sequence[int], step: int) -> torch.Tensor:
        return self._draw(list(indices), step + 1)


@torch.inference_mode()
def sample_batch(unet: torch.nn.Module, scheduler: RespacedDDIMScheduler, timesteps: Sequence[int],
                 bank: NoiseBank, indices: Sequence[int], eta: float = 0.0, on_step=None, labels=None,
                 guidance_scale: float = 1.0) -> torch.Tensor:
    """Denoise the bank's images ``indices`` along ``timesteps``; returns images in [-1, 1] (a latent model's
    latents decoded through its VAE, :func:`tmpq.core.adapters.decode`).

    The denoiser is called through its adapter (:mod:`tmpq.core.adapters`) with the images' conditioning (class
    models: balanced labels ``index % classes`` unless ``labels`` names them; text models: the model's prompts),
    and with classifier-free guidance when ``guidance_scale != 1``. ``on_step(k, t, x_t)``, if given, sees the
    denoiser input of every step (calibration-data capture)."""
    scheduler.set_timesteps(timesteps=timesteps)
    device = next(unet.parameters()).device
    inner = denoiser_of(unet)
    cond = adapter_for(inner).conditions(inner, indices, labels, device=device)
    x = bank.initial(indices).to(device)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        t_in = torch.full((x.shape[0],), t, dtype=torch.int64, device=device)
        if on_step is not None:
            on_step(k, t, x)
        eps = guided_eps(unet, x, t_in, cond, guidance_scale)
        noise = bank.eta(indices, k).to(device) if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return decode(unet, x)


def sample_images(unet: torch.nn.Module, scheduler: RespacedDDIMScheduler, timesteps: Sequence[int], n: int, *,
                  seed: int = 0, batch_size: int = 256, eta: float = 0.0, start: int = 0,
                  progress: bool = True, desc: str = "sample", on_step=None, labels=None,
                  guidance_scale: float = 1.0) -> torch.Tensor:
    """Sample ``n`` images (bank indices ``start .. start+n-1``) in batches, with a progress bar.

    ``labels`` (class-conditional models): None = balanced (image i gets class ``i % classes``), one int for all,
    or one per image; ``guidance_scale``: classifier-free guidance (1 = none). ``on_step(k, t, x_t)`` is
    called before every denoiser call (see :func:`sample_batch`).

    Example:
        >>> from tmpq.core.model import load_model
        >>> m = load_model()
        >>> imgs = sample_images(m.unet, make_scheduler(m.scheduler_config), [800, 450, 200, 50, 0], 4)  # doctest: +SKIP
    """
    if n < 1:
        raise TmpqError(f"n: must be >= 1, got {n}")
    if batch_size < 1:
        raise TmpqError(f"batch_size: must be >= 1, got {batch_size}")
    validate_timesteps(timesteps, scheduler.config.num_train_timesteps)
    if labels is not None and not isinstance(labels, int):
        labels = list(labels)
        if len(labels) != n:
            raise TmpqError(f"labels: {len(labels)} labels for {n} images")
    bank = NoiseBank(seed, sample_shape(unet))
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(start, start + n, batch_size):
            idx = list(range(s, min(s + batch_size, start + n)))
            lab = labels[s - start: s - start + len(idx)] if isinstance(labels, list) else labels
            out.append(sample_batch(unet, scheduler, timesteps, bank, idx, eta=eta, on_step=on_step, labels=lab,
                                    guidance_scale=guidance_scale).cpu())
            bar.update(len(idx))
    return torch.cat(out)
