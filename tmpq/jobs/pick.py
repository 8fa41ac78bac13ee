"""Which point of a run to export: the main job's budget pick (the validated point of lowest FID under a BitOPs
budget) and the deploy-aware ``fastest-within`` rule (:mod:`tmpq.search.pick`) over the validated points, by the
latency the run's measured table predicts (``RUN/latency.json``; a BitOPs run gets one measured and stored the way
a latency search stores it, so the next pick reuses it)."""
from __future__ import annotations

import pandas as pd

from tmpq.core.cost import LATENCY_FILE
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import read_parquet
from tmpq.core.runlock import acquire
from tmpq.deploy.latency import read_table
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.run import Run, load_run
from tmpq.jobs.search import latency_table
from tmpq.jobs.validate import best_validated
from tmpq.search.budget import budget_bitops
from tmpq.search.pick import fastest_within, within


def front_within(run, limit: float | None):
    """The run's Pareto points within ``limit`` BitOPs (``None``: all), best proxy first: the points the main job
    validates, and the one it exports before any validation exists."""
    front = run.pareto()
    if front.empty:
        return front
    if limit is not None:
        front = front[front["bitops"] <= limit]
    return front.sort_values("fid_proxy")


def pick_key(run, budget: str | None = None, where: str = "budget") -> str:
    """The key the main job exports under ``budget`` (``None``: the run's ``search.bitops_budget``): the validated
    point of lowest mean FID within it, or, before any validation, the point of lowest proxy on the front within it
    (the one the main job validates first). A bad given budget is one line naming ``where``."""
    run = run if isinstance(run, Run) else load_run(run)
    if budget is None:
        budget = run.config["search"]["bitops_budget"]
        limit = budget_bitops(run.space, budget)
    else:
        try:
            limit = budget_bitops(run.space, budget)
        except TmpqError as exc:
            raise TmpqError(str(exc).replace("search.bitops_budget:", f"{where}:", 1)) from None
    best = best_validated(run.path, limit)
    if best is not None:
        return str(best["key"])
    eligible = front_within(run, limit)
    if eligible.empty:
        raise TmpqError(f"export: no Pareto point of {run.path} is within the budget {budget}; pass a candidate key "
                        "or the budget 'none'")
    return str(eligible.iloc[0]["key"])


def validated_points(run: Run, bitops_limit: float | None = None, latency: bool = True) -> pd.DataFrame:
    """The validated points of ``run`` (``final.parquet``; empty before validation), within ``bitops_limit`` when
    given, with ``latency_s``: the seconds per image the run's latency table predicts (NaN without a table or with
    ``latency=False``). Reads only."""
    path = run.path / "final.parquet"
    if not path.is_file():
        return pd.DataFrame(columns=["key", "fid_mean", "bitops", "latency_s"])
    df = read_parquet(path, "validation summary", ("key", "fid_mean", "bitops"))
    if bitops_limit is not None:
        df = df[df["bitops"] <= bitops_limit]
    df = df.reset_index(drop=True)
    space = run.space if latency else None
    if space is not None and space.latency_table is not None:
        df["latency_s"] = [space.latency(run.candidate(str(k))) for k in df["key"]]
    else:
        df["latency_s"] = float("nan")
    return df


def ensure_latency_table(run: Run, progress: bool = False) -> dict:
    """The run's latency table (``RUN/latency.json``), as stored: a latency search's own (whatever machine measured
    it: the run's logged latencies came from it), or, for a BitOPs run without one, measured now on this CPU over
    the run's calibrated supernet (as ``search.cost = "latency"`` measures it) and stored under the run's writer
    lock, so the next pick reuses it."""
    path = run.path / LATENCY_FILE
    if not path.is_file():
        cfg = config_from_dict({k: v for k, v in run.config.items() if k != "fingerprint"})
        with acquire(run.path, "pick"):
            if not path.is_file():  # another writer may have stored one meanwhile
                if progress:
                    print(f"{run.path} has no latency table: measuring one (stored as {path})", flush=True)
                latency_table(cfg, run.path, run.path / "supernet.safetensors", progress)
    return read_table(path)


def pick_fastest_within(run, ratio: float, reference: float | None = None, bitops_limit: float | None = None,
                        progress: bool = False) -> dict:
    """The ``fastest-within`` point of ``run`` (:func:`tmpq.search.pick.fastest_within`) among its validated points
    (within ``bitops_limit`` BitOPs when given: the main job's export budget), and the figures it used, plus the
    latency table's origin (``latency_table``: backend, CPU, threads, batch). The refusals (no validation, no
    reference, no point within) come before a latency table is measured."""
    run = run if isinstance(run, Run) else load_run(run)
    points = validated_points(run, bitops_limit, latency=False)
    if points.empty:
        where = f" within the export budget ({bitops_limit:.4g} BitOPs)" if bitops_limit is not None else ""
        raise TmpqError(f"fastest-within: {run.path} has no validated points{where}; run tmpq validate "
                        f"{run.path} first")
    within(points, ratio, reference)  # the one-line refusals, before any measurement
    table = ensure_latency_table(run, progress)
    fig = fastest_within(validated_points(run, bitops_limit), ratio, reference)
    fp = table["fingerprint"]
    return {**fig, "latency_table": {k: fp.get(k) for k in ("backend", "cpu", "threads", "batch")}}


def as_row(run, key: str) -> dict:
    """The validation row of ``key`` (``final.parquet``) as a plain dict, as the main job reports its point."""
    run = run if isinstance(run, Run) else load_run(run)
    df = read_parquet(run.path / "final.parquet", "validation summary", ("key", "fid_mean", "bitops"))
    return df[df["key"] == key].iloc[0].to_dict()

