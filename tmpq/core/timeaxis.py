"""The time axis a model was trained on, read from its scheduler config. Pure Python.

Two axes are served, both indexed by integer timesteps t in [0, N) (N = ``num_train_timesteps``), so that schedules,
time groups, genomes, keys, the supernet's time-group routing, calibration data, reuse plans and exports all keep
integer timesteps whatever the model:

- **ddpm**: noise levels from ``betas`` / ``alphas_cumprod`` (epsilon, v or sample prediction); the denoiser is
  called with t itself. Every scheduler class diffusers derives from that noise schedule names this axis, whatever
  sampler a pipeline holds.
- **flow** (rectified flow / flow matching, velocity prediction): t is the index of diffusers'
  ``FlowMatchEulerDiscreteScheduler`` training grid, unshifted time u = (t + 1) / N in (0, 1], noise level
  sigma = s u / (1 + (s - 1) u) with the model's shift s, and the denoiser is called with sigma * N, as diffusers'
  pipelines call it. Resolution-dependent ("dynamic") shifting is that same map with s = exp(mu) (exponential) or mu
  (linear), mu fixed by the model's token count: it is resolved once, when the model loads
  (:meth:`TimeAxis.resolved_config`).

An unknown scheduler class, an unknown prediction type, or a flow option tmpq does not reproduce is refused in one
line naming where the config came from, before anything samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tmpq.core.errors import TmpqError

# diffusers schedulers that share the DDPM training axis (a pipeline may hold any of them as its sampler)
DDPM_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler", "DDPMParallelScheduler",
    "DDIMParallelScheduler", "SASolverScheduler"})
FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# flow options that change the sigma rule in ways tmpq's solvers do not reproduce
_FLOW_REFUSED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                 "stochastic_sampling", "use_beta_sigmas")


def is_flow(config) -> bool:
    """Whether a scheduler config (a dict, or a scheduler's ``.config``) is of a flow-matching model: a flow class
    named, flow sigmas or flow prediction, or a config of the flow-matching schedulers' shape (a ``shift`` and no
    DDPM ``beta_start``: what a ``FlowMatchEulerDiscreteScheduler``'s own ``.config`` holds, which names no class)."""
    name = config.get("_class_name")
    return bool(name in FLOW_SCHEDULERS or config.get("use_flow_sigmas")
                or config.get("prediction_type") == "flow_prediction"
                or (name is None and "shift" in config and "beta_start" not in config))


@dataclass(frozen=True)
class TimeAxis:
    """A model's time axis: ``kind`` (``ddpm`` / ``flow``), N and, for flow, the effective shift s.

    Example:
        >>> ax = TimeAxis("flow", 1000, 3.0)
        >>> round(ax.sigma(999), 6), round(ax.model_time(499), 3), ax.index_of(ax.model_time(499))
        (1.0, 750.0, 499)
        >>> TimeAxis().model_time(500)
        500
    """

    kind: str = "ddpm"
    num_train_timesteps: int = 1000
    shift: float = 1.0

    @property
    def flow(self) -> bool:
        return self.kind == "flow"

    def sigma(self, t) -> float:
        """Flow: the noise level of index t (x_t = (1 - sigma) x_0 + sigma noise)."""
        u = (float(t) + 1.0) / self.num_train_timesteps
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def model_time(self, t):
        """The timestep the denoiser is called with at index t: t itself (ddpm), sigma * N (flow)."""
        return self.sigma(t) * self.num_train_timesteps if self.flow else t

    def index_of(self, model_time) -> int:
        """The index whose model time is ``model_time`` (the inverse of :meth:`model_time`, rounded to the grid)."""
        if not self.flow:
            return int(model_time)
        s = min(max(float(model_time) / self.num_train_timesteps, 0.0), 1.0)
        u = s / (self.shift - (self.shift - 1.0) * s)
        return int(round(u * self.num_train_timesteps - 1.0))

    @classmethod
    def of(cls, config: dict, where: str = "scheduler") -> "TimeAxis":
        """The axis of a (resolved) scheduler config; one line for anything tmpq does not serve."""
        name = config.get("_class_name")
        n = int(config.get("num_train_timesteps", 1000))
        if is_flow(config):
            bad = next((k for k in _FLOW_REFUSED if config.get(k)), None)
            if bad is not None:
                raise TmpqError(f"{where}: {name or 'the flow scheduler'} sets {bad} = {config[bad]!r}, which tmpq's "
                                f"flow solvers do not reproduce")
            if config.get("use_dynamic_shifting"):
                raise TmpqError(f"{where}: dynamic shifting is resolved when the model loads (no token count here)")
            shift = float(config.get("flow_shift", config.get("shift", 1.0)) if name not in FLOW_SCHEDULERS
                          else config.get("shift", 1.0))
            if not (math.isfinite(shift) and shift > 0):
                raise TmpqError(f"{where}: shift must be a positive number, got {shift!r}")
            return cls("flow", n, shift)
        if name is not None and name not in DDPM_SCHEDULERS:
            raise TmpqError(f"{where}: unknown scheduler class {name!r}; tmpq serves the DDPM-axis schedulers "
                            f"(DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, ...) and flow matching "
                            f"(FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise TmpqError(f"{where}: prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS)}")
        return cls("ddpm", n)

    @staticmethod
    def resolved_config(config: dict, where: str, image_seq_len: int | None = None) -> dict:
        """A model's scheduler config with everything tmpq reads fixed: a flow model's dynamic shifting becomes the
        static shift it amounts to at ``image_seq_len`` tokens (diffusers' ``calculate_shift``: mu linear in the
        token count between ``base_image_seq_len`` / ``base_shift`` and ``max_image_seq_len`` / ``max_shift``), so
        that every solver and the exported scheduler sample the same sigmas. Checked as :meth:`of` checks."""
        cfg = dict(config)
        if is_flow(cfg) and cfg.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise TmpqError(f"{where}: dynamic shifting needs the model's token count")
            base_len, max_len = int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096))
            lo, hi = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
            m = (hi - lo) / (max_len - base_len)  # in diffusers' order of operations, so that mu is its value exactly
            mu = image_seq_len * m + (lo - m * base_len)
            kind = cfg.get("time_shift_type", "exponential")
            if kind not in ("exponential", "linear"):
                raise TmpqError(f"{where}: time_shift_type {kind!r} is not exponential or linear")
            shift = math.exp(mu) if kind == "exponential" else mu
            key = "shift" if cfg.get("_class_name") in FLOW_SCHEDULERS else "flow_shift"
            cfg.update({"use_dynamic_shifting": False, key: shift})
        TimeAxis.of(cfg, where)
        return cfg


def time_axis(config: dict, where: str) -> str:
    """The kind of axis (``ddpm`` / ``flow``) of a scheduler config; one line naming ``where`` for anything tmpq
    does not serve."""
    if is_flow(config) and config.get("use_dynamic_shifting"):
        return "flow"  # resolved when the model loads
    return TimeAxis.of(config, where).kind

