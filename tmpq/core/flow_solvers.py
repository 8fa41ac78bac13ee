"""Flow-matching samplers ("flow solvers") over any strictly descending subset of a flow model's integer time axis,
built on diffusers' schedulers.

A flow model's time is indexed like a DDPM model's, by integer t in [0, N) (:class:`tmpq.core.timeaxis.TimeAxis`):
t has noise level sigma(t) = s u / (1 + (s - 1) u) with u = (t + 1) / N and the model's shift s, and the denoiser is
called with sigma(t) * N. Every solver here is a diffusers scheduler class with one change, as in
:mod:`tmpq.core.solvers`: ``set_timesteps(timesteps=[...])`` takes an integer schedule (what the search picks) and
installs exactly ``sigmas = [sigma(t) for t in ts] + [0]`` and ``timesteps = sigmas[:-1] * N`` (float32), and a
pinned schedule (:meth:`tmpq.core.solvers.Respaced.pin_timesteps`) is what a stock pipeline installs, whether it calls
``set_timesteps(n)`` or, as ``FluxPipeline`` does through ``retrieve_timesteps``, ``set_timesteps(sigmas=..., mu=...)``
(the pipeline's sigmas and mu are then ignored; their count is checked as ``n`` is). Their maths stay diffusers':

- ``euler``: ``FlowMatchEulerDiscreteScheduler`` (deterministic: no stochastic sampling), x += (sigma' - sigma) v;
- ``heun``: ``FlowMatchHeunDiscreteScheduler`` (2nd order: two denoiser calls per step but the last, which is an
  Euler step onto sigma 0: 2n - 1 in all). Its stock ``set_timesteps`` takes no ``sigmas``: here it does, with
  ``FlowMatchEulerDiscreteScheduler``'s rule (the given, unshifted sigmas are shifted by s);
- ``dpm++``: ``DPMSolverMultistepScheduler`` on flow sigmas (``use_flow_sigmas``, ``flow_prediction``, DPM-Solver++
  multistep orders 1-3, first order on the last step). Its stock ``set_timesteps`` takes no ``sigmas`` either: added
  as for Heun. Stock stores int64 timesteps (sigma * N truncated): a schedule here stores float32 sigma * N, the
  model time diffusers' flow pipelines use;
- ``unipc``: ``UniPCMultistepScheduler`` on flow sigmas (bh2, orders 1-3: predictor order; the corrector adds one).
  As stock does, a first sigma of 1 is lowered by 1e-6 (UniPC's log(alpha) is -inf at sigma 1).

Each lands on sigma 0 (the clean sample) after its last step. Unpinned, ``set_timesteps(n)`` is the stock
scheduler's own spacing, untouched (tested against stock). ``.order`` and ``scale_model_input`` are stock; every
class has ``init_noise_sigma = 1`` (the Euler and Heun flow schedulers define none: flow sampling starts from unit
noise and needs no input scaling, so those two get that value and an identity ``scale_model_input``).

:func:`make_flow_scheduler` builds a solver from a flow model's (resolved, static-shift) scheduler config.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from tmpq.core.errors import TmpqError
from tmpq.core.solverbase import SOLVERS, Respaced, check_solver, solver_config
from tmpq.core.timeaxis import TimeAxis

FLOW_SOLVERS = ("euler", "heun", "dpm++", "unipc")


class FlowRespaced(Respaced):
    """What every flow solver adds to its diffusers scheduler (beyond :class:`~tmpq.core.solvers.Respaced`): integer
    schedules on the flow time axis, and a pinned schedule that ``set_timesteps(sigmas=..., mu=...)`` also installs.

    Subclasses say where their config keeps the shift (``shift_key``) and how a list of sigmas is installed
    (:meth:`_install`); the stock ``set_timesteps`` runs for a count or for sigmas when nothing is pinned.
    """

    shift_key: str = "shift"
    stock_name: str = ""

    @property
    def time_axis(self) -> TimeAxis:
        """The flow axis of this scheduler's config, checked as :meth:`TimeAxis.of` checks a model's (a static shift,
        flow sigmas, no option that changes the sigma rule); one line otherwise."""
        axis = TimeAxis.of({**self.config, "_class_name": self.stock_name}, where=f"{self.solver} scheduler")
        if not axis.flow or self.config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise TmpqError(f"{self.solver} scheduler: not configured for flow matching (use_flow_sigmas = True, "
                            f"prediction_type = 'flow_prediction')")
        return axis

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None, timesteps: Sequence[int] | None = None):
        """Install ``timesteps`` (integer indices) or the pinned schedule; else the stock scheduler's spacing for
        ``num_inference_steps`` or for ``sigmas`` (unshifted, as ``FlowMatchEulerDiscreteScheduler`` takes them)."""
        n = num_inference_steps
        if n is None and sigmas is not None and timesteps is None:
            n = len(sigmas)  # retrieve_timesteps(sigmas=...) passes the pipeline's step count as the sigmas' length
        ts = self._schedule(n, timesteps)
        if ts is not None:
            if self.config.get("final_sigmas_type", "zero") != "zero":
                raise TmpqError(f"{self.solver}: a flow solver lands on sigma 0; final_sigmas_type must be 'zero', "
                                f"got {self.config.final_sigmas_type!r}")
            axis = self.time_axis
            self._install(np.array([axis.sigma(t) for t in ts], dtype=np.float64), device)
        elif sigmas is not None:
            self._stock_sigmas(num_inference_steps, device, sigmas, mu)
        else:
            self._stock(num_inference_steps, device, mu)

    def _stock(self, num_inference_steps, device, mu) -> None:
        """The stock scheduler's own spacing for ``num_inference_steps``."""
        raise NotImplementedError

    def _stock_sigmas(self, num_inference_steps, device, sigmas, mu) -> None:
        """Unpinned ``set_timesteps(sigmas=...)``: ``FlowMatchEulerDiscreteScheduler``'s rule (the sigmas are shifted
        by the static shift, or by exp(mu) / mu under dynamic shifting), for the schedulers whose stock
        ``set_timesteps`` takes no sigmas."""
        if num_inference_steps is not None and int(num_inference_steps) != len(sigmas):
            raise TmpqError(f"{self.solver}: {len(sigmas)} sigmas for num_inference_steps={int(num_inference_steps)}")
        u = np.asarray(sigmas, dtype=np.float64)
        cfg = self.config
        if cfg.get("use_dynamic_shifting"):
            if mu is None:
                raise TmpqError(f"{self.solver}: dynamic shifting needs mu")
            s = float(np.exp(mu)) if cfg.get("time_shift_type", "exponential") == "exponential" else float(mu)
        else:
            s = float(cfg[self.shift_key])
        self._install(s * u / (1.0 + (s - 1.0) * u), device)

    def _install(self, sigmas: np.ndarray, device) -> None:
        """Install the schedule of noise levels ``sigmas`` (float64, descending, without the final 0)."""
        raise NotImplementedError

    @staticmethod
    def _with_zero(sigmas: np.ndarray) -> torch.Tensor:
        """``sigmas`` + [0] as float32 (what every stock flow scheduler stores)."""
        return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))

    def schedule_timesteps(self) -> list[int]:
        """The distinct integer indices installed: the installed sigmas (but the final 0) mapped back onto the axis
        (from the sigmas, not the timesteps, which a stock multistep spacing stores truncated to int64; a stock
        spacing's off-grid sigmas round to the nearest index)."""
        axis, n = self.time_axis, self.config.num_train_timesteps
        return list(dict.fromkeys(axis.index_of(float(s) * n) for s in self.sigmas[:-1]))


class _UnitNoise:
    """What the flow Euler and Heun schedulers lack and a sampler reads: flow sampling starts from unit noise and
    feeds the sample to the model unscaled."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample


class FlowEulerScheduler(_UnitNoise, FlowRespaced, FlowMatchEulerDiscreteScheduler):
    """Euler on flow sigmas (``FlowMatchEulerDiscreteScheduler``, deterministic) on any integer schedule.

    Example:
        >>> s = FlowEulerScheduler(shift=3.0)
        >>> s.set_timesteps(timesteps=[999, 499, 0])
        >>> [round(float(x), 4) for x in s.sigmas], s.schedule_timesteps()
        ([1.0, 0.75, 0.003, 0.0], [999, 499, 0])
    """

    solver = "euler"
    stock_name = "FlowMatchEulerDiscreteScheduler"
    def _stock(self, num_inference_steps, device, mu) -> None:
        FlowMatchEulerDiscreteScheduler.set_timesteps(self, num_inference_steps, device=device, mu=mu)

    def _stock_sigmas(self, num_inference_steps, device, sigmas, mu) -> None:
        FlowMatchEulerDiscreteScheduler.set_timesteps(self, num_inference_steps, device=device, sigmas=sigmas, mu=mu)

    def _install(self, sigmas, device) -> None:
        sig = self._with_zero(sigmas).to(device)
        self.timesteps = sig[:-1] * self.config.num_train_timesteps
        self.sigmas = sig
        self.num_inference_steps = len(sigmas)
        self._step_index = None
        self._begin_index = None


class FlowHeunScheduler(_UnitNoise, FlowRespaced, FlowMatchHeunDiscreteScheduler):
    """Heun's 2nd-order method on flow sigmas (``FlowMatchHeunDiscreteScheduler``) on any integer schedule: every
    timestep but the first is visited twice (2n - 1 denoiser calls)."""

    solver = "heun"
    stock_name = "FlowMatchHeunDiscreteScheduler"
    def _stock(self, num_inference_steps, device, mu) -> None:
        # the stock Heun takes no mu (it has no dynamic shifting): ignored, as the Euler scheduler ignores it unshifted
        FlowMatchHeunDiscreteScheduler.set_timesteps(self, num_inference_steps, device=device)

    def _install(self, sigmas, device) -> None:
        # the stock layout: timesteps [t0, t1, t1, ..., t_{n-1}, t_{n-1}], sigmas [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        sig = self._with_zero(sigmas).to(device)
        ts = sig[:-1] * self.config.num_train_timesteps
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        self.num_inference_steps = len(sigmas)
        self.prev_derivative = None
        self.dt = None
        self._step_index = None
        self._begin_index = None


class FlowDPMSolverScheduler(FlowRespaced, DPMSolverMultistepScheduler):
    """DPM-Solver++ on flow sigmas (``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``) on any integer
    schedule."""

    solver = "dpm++"
    stock_name = "DPMSolverMultistepScheduler"
    shift_key = "flow_shift"

    def _stock(self, num_inference_steps, device, mu) -> None:
        DPMSolverMultistepScheduler.set_timesteps(self, num_inference_steps, device=device, mu=mu)

    def _install(self, sigmas, device) -> None:
        # the stock call resets the multistep state (model outputs, lower-order count, step index) for len(sigmas)
        DPMSolverMultistepScheduler.set_timesteps(self, len(sigmas), device=device)
        sig = self._with_zero(sigmas)
        self.sigmas = sig  # kept on the CPU, as stock
        self.timesteps = (sig[:-1] * self.config.num_train_timesteps).to(device)
        self.num_inference_steps = len(sigmas)


class FlowUniPCScheduler(FlowRespaced, UniPCMultistepScheduler):
    """UniPC on flow sigmas (``UniPCMultistepScheduler`` with ``use_flow_sigmas``) on any integer schedule."""

    solver = "unipc"
    stock_name = "UniPCMultistepScheduler"
    shift_key = "flow_shift"

    def _stock(self, num_inference_steps, device, mu) -> None:
        UniPCMultistepScheduler.set_timesteps(self, num_inference_steps, device=device, mu=mu)

    def _stock_sigmas(self, num_inference_steps, device, sigmas, mu) -> None:
        if num_inference_steps is not None and int(num_inference_steps) != len(sigmas):
            raise TmpqError(f"{self.solver}: {len(sigmas)} sigmas for num_inference_steps={int(num_inference_steps)}")
        # a copy as an array: stock multiplies the sigmas as an array and lowers a first sigma of 1 in place
        UniPCMultistepScheduler.set_timesteps(self, device=device, sigmas=np.array(sigmas), mu=mu)

    def _install(self, sigmas, device) -> None:
        # the stock call resets the multistep state (model outputs, last sample, lower-order count, step index)
        UniPCMultistepScheduler.set_timesteps(self, len(sigmas), device=device)
        sigmas = sigmas.copy()
        if abs(sigmas[0] - 1.0) < 1e-6:  # as stock: log(alpha) = log(1 - sigma) must stay finite
            sigmas[0] -= 1e-6
        sig = self._with_zero(sigmas)
        self.sigmas = sig
        self.timesteps = (sig[:-1] * self.config.num_train_timesteps).to(device)
        self.num_inference_steps = len(sigmas)


FLOW_CLASSES = {"euler": FlowEulerScheduler, "heun": FlowHeunScheduler, "dpm++": FlowDPMSolverScheduler,
                "unipc": FlowUniPCScheduler}
FLOW_STOCK = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler,
              "dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def check_flow_solver(solver: str, order: int | None = None) -> int:
    """The order of flow solver ``solver`` (its default when ``order`` is None); one line for a DDPM-only solver, an
    unknown one or an order it does not take."""
    if solver in SOLVERS and solver not in FLOW_SOLVERS:
        raise TmpqError(f"solver: {solver} is a DDPM solver; a flow model takes {', '.join(FLOW_SOLVERS[:-1])} or "
                        f"{FLOW_SOLVERS[-1]}")
    return check_solver(solver, order)


def flow_solver_config(solver: str, axis: TimeAxis, order: int | None = None) -> dict:
    """The scheduler config of flow solver ``solver`` (at ``order``) on ``axis``."""
    order = check_flow_solver(solver, order)
    n = axis.num_train_timesteps
    if solver in ("euler", "heun"):
        return {"num_train_timesteps": n, "shift": axis.shift}
    return {"num_train_timesteps": n, **solver_config(solver, order), "use_flow_sigmas": True,
            "prediction_type": "flow_prediction", "flow_shift": axis.shift}


def make_flow_scheduler(scheduler_config: dict, solver: str = "euler", order: int | None = None):
    """The flow solver ``solver`` (at ``order``) for a flow model's scheduler config: a
    ``FlowMatchEulerDiscreteScheduler`` config (``shift``) or a DPM-Solver / UniPC one with ``use_flow_sigmas``
    (``flow_shift``). The solver is built from the config's time axis (N and shift) alone: the options that would
    change the sigmas are refused by :meth:`TimeAxis.of`, and dynamic shifting must already be resolved into a static
    shift (:meth:`TimeAxis.resolved_config`).

    Example:
        >>> s = make_flow_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "dpm++", 2)
        >>> s.set_timesteps(timesteps=[999, 600, 200])
        >>> s.schedule_timesteps(), float(s.sigmas[-1])
        ([999, 600, 200], 0.0)
    """
    order = check_flow_solver(solver, order)
    config = dict(scheduler_config)
    if config.get("use_dynamic_shifting"):
        raise TmpqError("scheduler: use_dynamic_shifting = True; a flow solver needs the static shift it amounts to "
                        "at the model's token count (TimeAxis.resolved_config)")
    axis = TimeAxis.of(config)
    if not axis.flow:
        raise TmpqError(f"scheduler: {config.get('_class_name') or 'the config'} is not a flow-matching scheduler "
                        f"config (make_scheduler builds the DDPM solvers)")
    return FLOW_CLASSES[solver].from_config(flow_solver_config(solver, axis, order))
