"""The main job (``tmpq run``): calibrate the supernet -> search -> validate the best points under a BitOPs budget ->
export the best validated point (or, with ``pick``, the one a pick rule chooses: :mod:`tmpq.jobs.pick`) -> HTML
report. Every stage is resumable, so rerunning the same command after an
interruption continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes
from tmpq.core.runlock import keep_run_locks
from tmpq.jobs.config import check_budget_options, check_budget_spec
from tmpq.jobs.export import ensure_export
from tmpq.jobs.pick import as_row, front_within, pick_fastest_within
from tmpq.jobs.report import write_report
from tmpq.jobs.run import load_run
from tmpq.jobs.search import run_search
from tmpq.jobs.validate import ValidateConfig, best_validated, validate_run
from tmpq.search.budget import budget_bitops
from tmpq.search.pick import parse_pick


@dataclass(frozen=True)
class MainJobConfig:
    top_k: int = 3                 # validated points (the best proxies under the budget)
    validate_n: int = 2000         # FID images per seed in validation
    seeds: tuple[int, ...] = (1, 2)
    # export budget: BitOPs <= this uniform option at search.steps, a share of the FP model, a number or "none";
    # None = the config's search.bitops_budget (so a config's "none" is not overridden by a default)
    budget: str | None = None
    # which validated point to export: None = the lowest mean FID under the budget (as before); "fastest-within R":
    # the lowest predicted latency per image among those within R x the reference FID (tmpq.search.pick), under
    # the budget too (the run's latency table; a BitOPs run gets one measured)
    pick: str | None = None

    def validate(self) -> ValidateConfig:
        """Refuse bad values of the job's own options (flags of ``tmpq run``) before anything is written; returns the
        validation settings they give (checked as ``tmpq validate`` checks its flags)."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= 1000:
            raise TmpqError(f"--top-k: must be an integer in [1, 1000], got {self.top_k!r}")
        if self.budget is not None:
            check_budget_spec(self.budget, "--budget")
        if self.pick is not None:
            parse_pick(self.pick, "--pick")
        cfg = ValidateConfig(n=self.validate_n, seeds=tuple(self.seeds))
        try:
            cfg.validate()
        except TmpqError as exc:
            raise TmpqError(str(exc).replace("--n:", "--validate-n:", 1)) from None
        return cfg


def export_budget(cfg, job: MainJobConfig) -> str:
    """The export budget of the main job (``job.budget``, else the config's ``search.bitops_budget``), checked against
    the config's supernet options: a ``w6a6`` the supernet cannot run is refused before the search, not after it."""
    budget = cfg.search.bitops_budget if job.budget is None else job.budget
    key = "search.bitops_budget" if job.budget is None else "--budget"
    check_budget_spec(budget, key)
    check_budget_options(budget, cfg.supernet, key)
    return budget


def main_job(cfg, run_path: str | Path, job: MainJobConfig = MainJobConfig(), progress: bool = True) -> dict:
    """Run (or resume) the whole pipeline; returns ``{"run", "report", "export", "best", "timings"}``. One writer
    throughout: the run lock the search takes is kept until the report is written (another writer gets one line)."""
    with keep_run_locks():
        return _main_job(cfg, run_path, job, progress)


def _main_job(cfg, run_path: str | Path, job: MainJobConfig, progress: bool) -> dict:
    """The stages of :func:`main_job`."""

    run_path = Path(run_path)
    validation = job.validate()  # every option and the budget checked before anything is written or computed
    budget = export_budget(cfg, job)
    timings = {}

    def stage(name: str):
        if progress:
            print(f"\n== {name} ==", flush=True)
        return time.perf_counter()

    t0 = stage("search (calibrates the supernet first)")
    resume = (run_path / "config.resolved.json").is_file()
    run_search(cfg, run_path, resume=resume, progress=progress)
    timings["search_s"] = round(time.perf_counter() - t0, 1)

    t0 = stage(f"validate the {job.top_k} best points under the {budget} budget")
    run = load_run(run_path)
    limit = budget_bitops(run.space, budget)
    eligible = front_within(run, limit)
    if eligible.empty:
        raise TmpqError(f"no Pareto point is within the export budget {budget}; lower search budgets or pass "
                        "--budget none")
    keys = tuple(eligible.head(job.top_k)["key"])
    validate_run(run_path, dataclasses.replace(validation, keys=keys), progress=progress)
    timings["validate_s"] = round(time.perf_counter() - t0, 1)

    picked = None
    if job.pick is None:
        t0 = stage("export the best validated point")
        best = best_validated(run_path, limit)
        if best is None:  # pragma: no cover - validate_run wrote at least one row above
            raise TmpqError("validation produced no points")
    else:
        t0 = stage(f"export the {job.pick} point")
        _rule, ratio = parse_pick(job.pick, "--pick")
        picked = pick_fastest_within(run_path, ratio, bitops_limit=limit, progress=progress)
        best = as_row(run_path, picked["key"])
    export_dir = ensure_export(run_path, best["key"], run_path / "export", command="tmpq run", pick=picked)
    timings["export_s"] = round(time.perf_counter() - t0, 1)

    t0 = stage("report")
    report = write_report(run_path, progress=progress)
    timings["report_s"] = round(time.perf_counter() - t0, 1)
    summary = {"run": str(run_path), "budget": budget, "report": str(report), "export": str(export_dir),
               "best": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in best.items()}, "timings": timings,
               **({"pick": picked} if picked is not None else {})}

    atomic_write_bytes(run_path / "main_job.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return summary
