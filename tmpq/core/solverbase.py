"""What every respaced solver shares, DDPM and flow alike: the solver table, the check of a solver and its order, the
scheduler settings of each solver, and the :class:`Respaced` mixin (arbitrary integer schedules and a pinned
schedule). :mod:`tmpq.core.solvers` (the DDPM solvers) and :mod:`tmpq.core.flow_solvers` build on it."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tmpq.core.candidate import Solver
from tmpq.core.errors import TmpqError
from tmpq.core.schedules import validate_timesteps

# solver -> the orders it takes (the first is its default)
SOLVERS = {"ddim": (1,), "dpm++": (2, 1, 3), "unipc": (2, 1, 3), "euler": (1,), "heun": (2,)}


class Respaced:
    """What every tmpq solver adds to its diffusers scheduler: arbitrary integer schedules and a pinned schedule.

    A pinned schedule of k steps is installed by ``set_timesteps(n)`` for ``n`` = ``None``, k or ``default_steps``
    (the pipeline's default ``num_inference_steps``, e.g. 1000 for ``DDPMPipeline``: the caller chose no count); any
    other ``n`` raises one line naming both counts. ``set_timesteps(timesteps=[...])`` is always obeyed.
    """

    solver: str = ""
    pinned_timesteps: list[int] | None = None
    default_steps: int | None = None

    def pin_timesteps(self, timesteps: Sequence[int] | None, default_steps: int | None = None) -> None:
        """Make ``set_timesteps(n)`` install ``timesteps`` (``None``: unpin, back to the scheduler's own spacing)."""
        if timesteps is None:
            self.pinned_timesteps, self.default_steps = None, None
            return
        ts = [int(t) if isinstance(t, torch.Tensor) else t for t in timesteps]
        self.pinned_timesteps = [int(t) for t in validate_timesteps(ts, self.config.num_train_timesteps)]
        self.default_steps = None if default_steps is None else int(default_steps)

    def _schedule(self, num_inference_steps, timesteps) -> list[int] | None:
        """The integer schedule to install (``None``: the scheduler's own spacing for ``num_inference_steps``)."""
        if timesteps is None and self.pinned_timesteps is not None:
            k, n = len(self.pinned_timesteps), num_inference_steps
            if n is not None and int(n) not in (k, self.default_steps):
                raise TmpqError(f"num_inference_steps={int(n)}: this scheduler samples the exported {k}-step schedule "
                                f"{self.pinned_timesteps} (tmpq.apply_export); call the pipeline without "
                                f"num_inference_steps (or with {k}), or unpin it first with "
                                f"pipe.scheduler.pin_timesteps(None) to sample {int(n)} steps of its own spacing")
            timesteps = self.pinned_timesteps
        if timesteps is None:
            return None
        ts = [int(t) if isinstance(t, torch.Tensor) else t for t in timesteps]
        return list(validate_timesteps(ts, self.config.num_train_timesteps))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: Sequence[int] | None = None,
                      **kwargs):
        """The schedulers with a ``timesteps=`` argument of their own (DPM-Solver++, Euler) take the schedule there;
        the others override this."""
        ts = self._schedule(num_inference_steps, timesteps)
        if ts is None:
            return super().set_timesteps(num_inference_steps, device=device, **kwargs)
        return super().set_timesteps(device=device, timesteps=ts)

    def schedule_timesteps(self) -> list[int]:
        """The distinct timesteps installed (a 2nd-order solver visits most of them twice)."""
        return list(dict.fromkeys(int(round(float(t))) for t in self.timesteps))


def check_solver(solver: str, order: int | None = None) -> int:
    """The order of ``solver`` (its default when ``order`` is None); one line for an unknown solver or order."""
    if solver not in SOLVERS:
        raise TmpqError(f"solver: unknown {solver!r}; choose one of {', '.join(SOLVERS)}")
    if order is None:
        return SOLVERS[solver][0]
    if isinstance(order, bool) or not isinstance(order, int) or order not in SOLVERS[solver]:
        raise TmpqError(f"solver order: {solver} takes order {' or '.join(map(str, sorted(SOLVERS[solver])))}, got "
                        f"{order!r}")
    return order


def parse_solver(text: str) -> Solver:
    """``"ddim"``, ``"heun"``, ``"dpm++-3"``, ``"unipc-1"``...: the :class:`Solver`, at the solver's default order
    when none is given."""
    name, _, order = str(text).strip().lower().rpartition("-")
    if not name or not order.isdigit():
        name, order = str(text).strip().lower(), None
    return Solver(name, check_solver(name, None if order is None else int(order)))


def solver_config(solver: str, order: int | None = None) -> dict:
    """The scheduler settings that make each solver what its name says (added to the model's noise-schedule
    config)."""
    order = check_solver(solver, order)
    if solver == "dpm++":
        return {"algorithm_type": "dpmsolver++", "solver_order": order, "solver_type": "midpoint",
                "lower_order_final": True, "final_sigmas_type": "zero"}
    if solver == "unipc":
        return {"solver_order": order, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                "final_sigmas_type": "zero"}
    return {}
