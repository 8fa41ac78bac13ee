"""The sampling loop of every solver over any strictly descending subset of the training timesteps, plus a seeded
noise bank.

The solvers (respaced DDIM, DPM-Solver++, UniPC, Euler, Heun) live in :mod:`tmpq.core.solvers`;
``RespacedDDIMScheduler`` and ``make_scheduler`` are re-exported here. On DDIM's own uniform spacing
``RespacedDDIMScheduler`` reproduces ``DDIMScheduler`` (tested to 1e-5). A pinned schedule (``pin_timesteps``, set by
``tmpq.apply_export``) is what a stock pipeline's ``set_timesteps(n)`` installs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tmpq.core.adapters import (
    adapter_for,
    conditioning_of,
    decode,
    denoiser_of,
    guided_eps,
    sample_shape,
    time_axis_of,
)
from tmpq.core.errors import TmpqError
from tmpq.core.schedules import validate_timesteps
from tmpq.core.solvers import RespacedDDIMScheduler, make_scheduler

__all__ = ["NoiseBank", "RespacedDDIMScheduler", "make_scheduler", "model_dtype", "noise_generators", "sample_batch",
           "sample_images"]


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


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the denoiser computes in (``model.dtype``): diffusers' ``dtype`` of the denoiser (which skips modules
    it keeps in fp32), else its first floating-point parameter's."""
    inner = denoiser_of(model)
    dtype = getattr(inner, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)


@torch.inference_mode()
def sample_batch(unet: torch.nn.Module, scheduler: RespacedDDIMScheduler, timesteps: Sequence[int],
                 bank: NoiseBank, indices: Sequence[int], eta: float = 0.0, on_step=None, labels=None,
                 guidance_scale: float | None = None) -> torch.Tensor:
    """Denoise the bank's images ``indices`` along ``timesteps``; returns images in [-1, 1] (a latent model's
    latents decoded through its VAE, :func:`tmpq.core.adapters.decode`).

    The denoiser is called through its adapter (:mod:`tmpq.core.adapters`) with the images' conditioning (class
    models: balanced labels ``index % classes`` unless ``labels`` names them; text models: the model's prompts),
    guided as the model's :class:`~tmpq.core.adapters.Conditioning` says (``guidance_scale``, when given, in place of
    its scale: an export sampled at the caller's scale). ``on_step(k, t, x_t)``, if given, sees the
    denoiser input of every step (calibration-data capture), at tmpq's integer timestep t (the denoiser itself is
    called at its model time: :func:`tmpq.core.adapters.model_time`; a flow model's scheduler steps in sigma).

    Dtypes (``model.dtype``), as diffusers' pipelines that run a bf16 transformer on fp32 latents (e.g. Wan) do: the
    noise is drawn in fp32 on the CPU and moved to the device once; the sample ``x_t`` and every scheduler step stay
    fp32; only the denoiser's input is cast to the model's dtype and its output back to fp32 (a VAE decodes in its
    own dtype). With an fp32 model both casts are no-ops: the fp32 path is the one of before."""
    scheduler.set_timesteps(timesteps=timesteps)
    device = next(unet.parameters()).device
    dtype = model_dtype(unet)
    inner = denoiser_of(unet)
    cond = adapter_for(inner).conditions(inner, indices, labels, device=device)
    if guidance_scale is None:  # the model's own: classifier-free, or a guidance-distilled model's guidance input
        guidance_scale = conditioning_of(inner).sampling_scale
    ddim = isinstance(scheduler, RespacedDDIMScheduler)
    if eta > 0 and not ddim:
        raise TmpqError(f"eta: only the ddim solver takes eta > 0 ({type(scheduler).__name__} is deterministic)")
    x = bank.initial(indices).to(device)
    sigma0 = float(scheduler.init_noise_sigma)
    if sigma0 != 1.0:  # sigma-space solvers (Euler, Heun) start from noise of their first sigma
        x = x * sigma0
    axis = time_axis_of(inner)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        # the schedule's integer timesteps (float32 in the sigma-space schedulers; a flow scheduler holds model times)
        t = axis.index_of(t) if axis.flow else int(round(t))
        t_in = torch.full((x.shape[0],), t, dtype=torch.int64, device=device)
        x_in = (x if ddim else scheduler.scale_model_input(x, scheduler.timesteps[k])).to(dtype)
        if on_step is not None:
            on_step(k, t, x_in)
        eps = guided_eps(unet, x_in, t_in, cond, guidance_scale).float()
        if ddim:
            noise = bank.eta(indices, k).to(device) if eta > 0 else None
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        else:
            x = scheduler.step(eps, scheduler.timesteps[k], x).prev_sample
    return decode(unet, x)


def sample_images(unet: torch.nn.Module, scheduler: RespacedDDIMScheduler, timesteps: Sequence[int], n: int, *,
                  seed: int = 0, batch_size: int = 256, eta: float = 0.0, start: int = 0,
                  progress: bool = True, desc: str = "sample", on_step=None, labels=None,
                  guidance_scale: float | None = None) -> torch.Tensor:
    """Sample ``n`` images (bank indices ``start .. start+n-1``) in batches, with a progress bar.

    ``labels`` (class-conditional models): None = balanced (image i gets class ``i % classes``), one int for all,
    or one per image; ``guidance_scale``: classifier-free guidance (1 = none; None = the model's, as its loader bound
    it, see :func:`sample_batch`). ``on_step(k, t, x_t)`` is
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
