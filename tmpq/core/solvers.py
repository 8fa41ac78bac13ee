"""Samplers ("solvers") over any strictly descending subset of the training timesteps, built on diffusers' schedulers.

Every solver is a diffusers scheduler class with one change: ``set_timesteps(timesteps=[...])`` takes an arbitrary
integer schedule (what the search picks), and a pinned schedule (:meth:`Respaced.pin_timesteps`, set by
``tmpq.apply_export``) is what a stock pipeline's ``set_timesteps(n)`` installs. Their maths stay diffusers':

- ``ddim``: ``DDIMScheduler`` (eta = 0 deterministic; eta > 0 with the noise bank's per-step noise), the "previous
  timestep" rule replaced by the next entry of the schedule (diffusers' ``t - T // n`` assumes uniform spacing);
- ``dpm++``: ``DPMSolverMultistepScheduler``, DPM-Solver++ (data prediction), multistep orders 1-3 (order 1 is DDIM),
  lower orders on the last steps as diffusers does for few steps;
- ``unipc``: ``UniPCMultistepScheduler`` (bh2), orders 1-3 (predictor order; the corrector adds one);
- ``euler``: ``EulerDiscreteScheduler`` (Karras et al.'s Euler step in sigma);
- ``heun``: ``HeunDiscreteScheduler`` (2nd order: two denoiser calls per step but the last, 2n - 1 in all).
  These two sample in sigma space: a pipeline must scale its initial noise (``init_noise_sigma``) and every model
  input (``scale_model_input``), as Stable Diffusion's do; ``DDPMPipeline`` and ``DiTPipeline`` do not
  (:func:`needs_scaling`).

Each lands on the clean image after its last timestep (final sigma 0 / DDIM's final alpha), so the same schedule
means the same start and end for every solver. :meth:`tmpq.core.candidate.Solver.calls` counts a schedule's denoiser
calls (the cost model's multiplier). Each solver reproduces its stock diffusers scheduler on that scheduler's own spacing (tested).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from tmpq.core.errors import TmpqError
from tmpq.core.flow_solvers import make_flow_scheduler
from tmpq.core.schedules import validate_timesteps
from tmpq.core.solverbase import (  # noqa: F401 - re-exported: the solvers' public names
    SOLVERS,
    Respaced,
    check_solver,
    parse_solver,
    solver_config,
)
from tmpq.core.timeaxis import is_flow

class RespacedDDIMScheduler(Respaced, DDIMScheduler):
    """``DDIMScheduler`` that accepts an arbitrary strictly descending timestep list.

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

    solver = "ddim"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: Sequence[int] | None = None):
        ts = self._schedule(num_inference_steps, timesteps)
        if ts is None:
            DDIMScheduler.set_timesteps(self, num_inference_steps, device=device)
            ts = list(validate_timesteps([int(t) for t in self.timesteps], self.config.num_train_timesteps))
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
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class RespacedDPMSolverScheduler(Respaced, DPMSolverMultistepScheduler):
    """DPM-Solver++ (``DPMSolverMultistepScheduler``, ``algorithm_type = "dpmsolver++"``) on any schedule."""

    solver = "dpm++"


class RespacedUniPCScheduler(Respaced, UniPCMultistepScheduler):
    """UniPC (``UniPCMultistepScheduler``) on any schedule: diffusers' UniPC takes no custom timesteps, so the
    scheduler's own state is set up for that many steps and its timesteps / sigmas are then replaced by the
    schedule's, with the same sigma rule as its default spacing (interpolated at each timestep, final sigma as
    configured)."""

    solver = "unipc"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: Sequence[int] | None = None,
                      **kwargs):
        ts = self._schedule(num_inference_steps, timesteps)
        if ts is None:
            return UniPCMultistepScheduler.set_timesteps(self, num_inference_steps, device=device, **kwargs)
        cfg = self.config
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas or cfg.use_flow_sigmas:
            raise TmpqError("unipc: a custom schedule needs the scheduler's plain sigmas (no karras / exponential / "
                            "beta / flow sigmas)")
        UniPCMultistepScheduler.set_timesteps(self, len(ts), device=device)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(np.array(ts, dtype=np.float64), np.arange(0, len(sigmas)), sigmas)
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(((1 - self.alphas_cumprod[0])
                                                                   / self.alphas_cumprod[0]) ** 0.5)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        self.num_inference_steps = len(ts)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None, **kwargs):
        """UniPC's step; ``generator`` (which ``DDPMPipeline`` passes to every scheduler) is not used."""
        return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)


class RespacedEulerScheduler(Respaced, EulerDiscreteScheduler):
    """Euler in sigma (``EulerDiscreteScheduler``, deterministic: no churn) on any schedule."""

    solver = "euler"


class RespacedHeunScheduler(Respaced, HeunDiscreteScheduler):
    """Heun's 2nd-order method in sigma (``HeunDiscreteScheduler``) on any schedule."""

    solver = "heun"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps: int | None = None,
                      timesteps: Sequence[int] | None = None):
        ts = self._schedule(num_inference_steps, timesteps)
        if ts is None:
            return HeunDiscreteScheduler.set_timesteps(self, num_inference_steps, device=device,
                                                       num_train_timesteps=num_train_timesteps)
        return HeunDiscreteScheduler.set_timesteps(self, device=device, timesteps=ts)


CLASSES = {"ddim": RespacedDDIMScheduler, "dpm++": RespacedDPMSolverScheduler, "unipc": RespacedUniPCScheduler,
           "euler": RespacedEulerScheduler, "heun": RespacedHeunScheduler}
STOCK = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
         "euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}


def make_scheduler(scheduler_config: dict, solver: str = "ddim", order: int | None = None):
    """The respaced scheduler of ``solver`` (at ``order``) for a model's DDPM/DDIM noise-schedule config (unknown
    keys are ignored, as diffusers does), or, for a flow model's config, its flow solver
    (:func:`tmpq.core.flow_solvers.make_flow_scheduler`; ``ddim`` is Euler there: DDIM's update on the path
    x = (1 - sigma) x0 + sigma noise is x + (sigma' - sigma) v, Euler's).

    Example:
        >>> s = make_scheduler({"num_train_timesteps": 1000}, "dpm++", order=2)
        >>> s.set_timesteps(timesteps=[900, 500, 100])
        >>> s.timesteps.tolist()
        [900, 500, 100]
    """
    if is_flow(scheduler_config):  # a flow model: its own solvers; DDIM on the flow path is exactly Euler's step
        return make_flow_scheduler(scheduler_config, "euler" if solver == "ddim" else solver, order)
    config = solver_config(solver, order)  # checks solver and order first
    return CLASSES[solver].from_config({**dict(scheduler_config), **config})


SIGMA_SPACE = ("euler", "heun")


def needs_scaling(solver: str, flow: bool = False) -> bool:
    """Whether ``solver`` samples in sigma space (a pipeline must apply ``init_noise_sigma`` and
    ``scale_model_input``): Euler and Heun on the DDPM axis; no flow solver (unit noise, unscaled inputs)."""
    return solver in SIGMA_SPACE and not flow


def sched_order(scheduler) -> int | None:
    """The order of a multistep solver (DPM-Solver++, UniPC), else None."""
    return int(scheduler.config.solver_order) if isinstance(scheduler, (DPMSolverMultistepScheduler,
                                                                        UniPCMultistepScheduler)) else None
