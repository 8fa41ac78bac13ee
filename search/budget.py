"""BitOPs budgets: a uniform option (``w6a6``: its BitOPs at the reference step count), a share of the FP model
(``1% fp100``), a number, or ``none``. Pure Python."""
from __future__ import annotations

import re

from tmpq.core.errors import TmpqError

UNIFORM_OPTION = re.compile(r"w(\d+)a(\d+)")
FP_FRACTION = re.compile(r"([0-9]*\.?[0-9]+)\s*%\s*fp(\d+)")


def uniform_option(spec: str, key: str) -> tuple[int, int]:
    m = UNIFORM_OPTION.fullmatch(spec.strip().lower())
    if not m:
        raise TmpqError(f"{key}: expected a uniform option like w6a6, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def fp_bitops(space, steps: int) -> float:
    """BitOPs per image of the FP model (32-bit weights x 32-bit activations) at ``steps`` denoiser calls."""
    return float(sum(lay.macs for lay in space.layers)) * 32 * 32 * steps


def budget_bitops(space, spec: str) -> float | None:
    """The BitOPs limit ``spec`` names on ``space`` (``None``: no budget)."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return None
    m = FP_FRACTION.fullmatch(spec)
    if m:  # a percentage of the FP model (32-bit weights and activations) at N denoising steps
        return float(m.group(1)) / 100.0 * fp_bitops(space, int(m.group(2)))
    if spec.startswith("w"):
        w, a = uniform_option(spec, "search.bitops_budget")
        if w not in space.w_bits or a not in space.a_bits:
            raise TmpqError(f"search.bitops_budget: {spec} is not a uniform option of the supernet")
        return space.bitops(space.uniform_candidate(w, a))
    return float(spec)
