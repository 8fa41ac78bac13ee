"""Pick rules: which validated point a run exports when quality is the bound and deployment speed the goal.

``fastest-within RATIO``: among the validated points whose mean FID is within ``RATIO`` x a reference FID, the one
with the lowest predicted latency per image (ties: the lower mean FID, then the key). Pure selection over a frame
(no torch, no files): the jobs give it the validated points with their predicted latencies
(:mod:`tmpq.jobs.pick`).
"""
from __future__ import annotations

import math

from tmpq.core.errors import TmpqError

# the rules tmpq export --pick / tmpq run --pick know
PICK_RULES = ("fastest-within",)
# the ratio the report marks its fastest-within point at
REPORT_RATIO = 1.10
# relative slack of the bound, for float rounding only: 10.8 is within 1.2 x 9.0 (= 10.799999999999999)
_ROUNDING = 1e-9


def _positive(value, where: str, what: str, example: str) -> float:
    """``value`` as a float, refused in one line naming ``where`` and ``what`` it is unless a finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TmpqError(f"{where}: {what} must be a number{example}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise TmpqError(f"{where}: {what} must be a finite number > 0{example}, got {value!r}")
    return number


def check_ratio(ratio, where: str = "--pick") -> float:
    """``ratio`` as a float, refused in one line naming ``where`` unless a finite number > 0."""
    return _positive(ratio, where, "the FID ratio", " (e.g. 1.10)")


def check_rule(rule, where: str = "--pick") -> str:
    if rule not in PICK_RULES:
        raise TmpqError(f"{where}: unknown pick rule {rule!r} (known: {', '.join(PICK_RULES)})")
    return rule


def check_reference(reference, where: str = "--reference") -> float:
    """A given reference FID: a finite number > 0."""
    return _positive(reference, where, "the reference FID", "")


def parse_pick(spec, where: str = "--pick") -> tuple[str, float]:
    """A pick spec as the CLI and ``MainJobConfig.pick`` give it, ``"fastest-within 1.10"`` (or a ``(rule, ratio)``
    pair), as ``(rule, ratio)``, checked."""
    parts = spec.split() if isinstance(spec, str) else list(spec) if isinstance(spec, (tuple, list)) else None
    if parts is None or len(parts) != 2:
        raise TmpqError(f"{where}: expected a rule and a FID ratio, e.g. 'fastest-within 1.10', got {spec!r}")
    return check_rule(parts[0], where), check_ratio(parts[1], where)


def within(points, ratio: float, reference: float | None = None):
    """The points of ``fastest_within`` that are eligible, with the reference it used: ``(frame, reference_fid,
    source)``; the one-line refusals (no points, no reference, none within) are raised here, so a caller can check
    them before it measures latencies."""
    ratio = check_ratio(ratio)
    pts = points[points["fid_mean"].notna()] if len(points) else points
    if len(pts) == 0:
        raise TmpqError("fastest-within: no validated points (run tmpq validate RUN first)")
    if reference is None:
        fp = pts["fp_fid_mean"].dropna() if "fp_fid_mean" in pts else []
        if len(fp) == 0:
            raise TmpqError("fastest-within: the validated points have no FP reference FID (fp_fid_mean; validated "
                            "with --no-fp-reference?); re-validate with it, or pass --reference FID")
        ref, source = float(fp.min()), "fp"
    else:
        ref, source = check_reference(reference), "given"
    fid = pts["fid_mean"].astype(float)
    eligible = pts[fid <= ratio * ref * (1 + _ROUNDING)]
    if eligible.empty:
        best = pts.loc[fid.idxmin()]
        raise TmpqError(f"fastest-within {ratio:g}: no validated point has FID within {ratio:g} x the reference "
                        f"{ref:.4g} ({'the FP model on its best validated schedule' if source == 'fp' else 'given'}); "
                        f"the best reaches {float(best['fid_mean']) / ref:.3f} x ({best['key']})")
    return eligible, ref, source


def fastest_within(points, ratio: float, reference: float | None = None) -> dict:
    """The ``fastest-within`` pick over ``points`` (a DataFrame of validated points: ``key``, ``fid_mean``,
    ``latency_s``, and ``fp_fid_mean`` unless ``reference`` is given).

    Reference FID: ``reference`` when given, else the lowest ``fp_fid_mean`` among the points (the best FP quality
    on any validated schedule: the FP model on each point's own schedule, so the bound is relative to the best the
    unquantized model reached on a searched schedule). Eligible: ``fid_mean <= ratio x reference``. Chosen: the
    lowest ``latency_s``; ties broken by the lower ``fid_mean``, then the key. Returns the figures it used: ``key``,
    ``rule``, ``ratio``, ``reference_fid``, ``reference`` (``"fp"``: from the points, ``"given"``), ``fid_mean``,
    ``fid_ratio`` (its FID / reference) and ``latency_s``. No point within: one line naming the best ratio reached
    (and its key).
    """
    ratio = check_ratio(ratio)
    eligible, ref, source = within(points, ratio, reference)
    missing = eligible[eligible["latency_s"].isna()] if "latency_s" in eligible else eligible
    if len(missing):
        raise TmpqError(f"fastest-within: no predicted latency for the point {missing.iloc[0]['key']}")
    chosen = eligible.sort_values(["latency_s", "fid_mean", "key"], kind="mergesort").iloc[0]
    return {"rule": "fastest-within", "ratio": ratio, "key": str(chosen["key"]), "reference_fid": ref,
            "reference": source, "fid_mean": float(chosen["fid_mean"]), "fid_ratio": float(chosen["fid_mean"]) / ref,
            "latency_s": float(chosen["latency_s"])}
