"""Per-timestep profiles of the FP model, for data-driven time groups (beyond the paper). Pure NumPy.

The FP model is run along a fine uniform DDIM schedule on a few bank images, recording at every step its noise
prediction eps and the sampler's prediction of the clean image x0 (:mod:`tmpq.evaluators.profile` runs it and
measures the rates between neighbouring probe steps; the search job joins the two). Two profiles are made of them:

- ``sensitivity`` (grouping ``sensitivity``): the mean absolute change of the predicted x0 per unit of t between
  neighbouring probe steps. Measured worse than uniform groups on the embedded model (results/search): x0 = xbar -
  sigma * eps moves fastest near t = T only because sigma is large there, so it refines high noise levels.
- ``step error`` (grouping ``error``): DDIM is Euler's method on dxbar / dsigma = eps(xbar, sigma), with xbar =
  x / sqrt(abar) and sigma = sqrt((1 - abar) / abar). A step of size h makes a local error of about h^2 / 2 * |deps /
  dsigma|, which reaches the final sample scaled by about 1 / sqrt(1 + sigma^2) = sqrt(abar) (exactly so for unit
  Gaussian data, whose ODE paths are xbar(sigma) = x0 sqrt(1 + sigma^2)). The weighted sum of those errors over a
  fixed number of steps is smallest when the step density in sigma is proportional to sqrt(sqrt(abar) |deps /
  dsigma|); in t that density is sqrt(sqrt(abar) * |deps / dt| * dsigma / dt). Equal shares of it per group put one
  step where each carries the same estimated error. (Without the sqrt(abar) weight the density piles up near t = T,
  as the sensitivity profile does.)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpq.core.errors import TmpqError

VERSION = 2  # 2: the step-error profile (the sensitivity profile is unchanged from 1)


def per_timestep(steps: Sequence[int], values: Sequence[float], T: int, smooth: int, floor: float) -> np.ndarray:
    """Rates between neighbouring probe steps (at their midpoints) interpolated to every training timestep, smoothed
    over ``smooth`` timesteps, then :func:`floored`."""
    mids = [0.5 * (a + b) for a, b in zip(steps, steps[1:])]
    mids, rates = np.array(mids[::-1]), np.array(values[::-1])  # ascending in t for np.interp
    prof = np.interp(np.arange(T), mids, rates)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        prof = np.convolve(np.pad(prof, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), kernel, mode="valid")
    return floored(prof, floor)


def floored(prof: np.ndarray, floor: float) -> np.ndarray:
    """``prof`` plus ``floor`` x its mean (so that no region is left without a group), checked finite."""
    prof = prof + floor * prof.mean() + 1e-12
    if not np.all(np.isfinite(prof)):
        raise TmpqError("sensitivity: the FP model produced non-finite predictions")
    return prof


def sensitivity_profile(steps: Sequence[int], rates: Sequence[float], alphas_cumprod, smooth: int = 25,
                        floor: float = 0.02) -> np.ndarray:
    """Mean |change of the predicted x0| per unit t (``rates``: :func:`tmpq.evaluators.profile.x0_rates` along the
    descending probe ``steps``), for each of the T = len(alphas_cumprod) training timesteps (finite, > 0).

    ``smooth``: width (in timesteps) of the moving average; ``floor``: fraction of the mean added everywhere so no
    region of the trajectory is left without a group.
    """
    return per_timestep(steps, rates, len(alphas_cumprod), smooth, floor)


def sigma_of_t(alphas_cumprod) -> np.ndarray:
    """DDIM's ODE time sigma(t) = sqrt((1 - abar_t) / abar_t) for every training timestep (increasing)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def error_density(deps_dt: np.ndarray, alphas_cumprod) -> np.ndarray:
    """sqrt(sqrt(abar) * |deps/dt| * dsigma/dt) per training timestep: the step density in t that minimises the sum
    of DDIM's local errors weighted by how they reach the final sample (module docstring)."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    dsigma = np.gradient(sigma_of_t(abar))  # per unit t
    return np.sqrt(np.sqrt(abar) * np.asarray(deps_dt, dtype=np.float64) * dsigma)


def step_error_profile(steps: Sequence[int], rates: Sequence[float], alphas_cumprod, smooth: int = 25,
                       floor: float = 0.02) -> np.ndarray:
    """:func:`error_density` for each of the T = len(alphas_cumprod) training timesteps (finite, > 0); |deps/dt| is
    ``rates`` (:func:`tmpq.evaluators.profile.eps_rates`, the root mean square change of the FP model's eps per
    unit t along the descending probe ``steps``). Same settings as :func:`sensitivity_profile`."""
    return floored(error_density(per_timestep(steps, rates, len(alphas_cumprod), smooth, 0.0), alphas_cumprod),
                   floor)


# grouping kind -> the profile its groups are cut from, made of the FP model's rates (tmpq.evaluators.profile.RATES)
PROFILES = {"sensitivity": sensitivity_profile, "error": step_error_profile}
