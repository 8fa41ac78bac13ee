"""The run reader: a search run directory opened read-only (``tmpq.load_run`` re-exports it).

Example:
    >>> import tmpq
    >>> run = tmpq.load_run("results/runs/default")   # doctest: +SKIP
    >>> run.pareto()[["fid_proxy", "bitops", "timesteps"]]   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from tmpq.core.fileio import malformed, read_json
from tmpq.jobs.config import config_from_dict
from tmpq.search.rundir import RunDir, pareto_frame, results_frame, run_objectives
from tmpq.search.space import SearchSpace


class Run:
    """A search run directory opened for analysis, read-only: nothing here opens a run file for writing. A missing,
    unreadable or damaged file is a one-line ``TmpqError`` naming it (and the line, for the evaluation log)."""

    def __init__(self, path: Path):
        self._dir = RunDir.open(path)
        self.path = self._dir.path
        cfg = self._dir.config()
        cfg_file = self.path / "config.resolved.json"
        with malformed(cfg_file, "run config"):
            if not isinstance(cfg["fingerprint"], str):  # written with every run: its absence is damage
                raise TypeError(f"fingerprint: expected a string, got {type(cfg['fingerprint']).__name__}")
            config_from_dict({k: v for k, v in cfg.items() if k != "fingerprint"})
            self._objectives = run_objectives(cfg)
        self._config = cfg

    @property
    def config(self) -> dict:
        return copy.deepcopy(self._config)

    @property
    def space(self):
        """The run's ``SearchSpace`` (``search_space.json``)."""

        path = self.path / "search_space.json"
        with malformed(path, "search space"):
            return SearchSpace.from_dict(read_json(path, "search space"))

    @property
    def evaluations(self):
        """Every logged evaluation as a DataFrame (list-valued ``timesteps`` and ``bits``), read from the log."""

        return results_frame(self._dir.replay())

    def pareto(self, objectives: tuple[str, ...] | None = None):
        """Non-dominated ``ok`` evaluations, sorted by the last objective; ``objectives`` default to the run's own
        (proxy and BitOPs, plus size_mb when it searched with ``search.size_objective``)."""

        return pareto_frame(self.evaluations, objectives or self._objectives)


def run_status(run: Run) -> dict:
    """Where a running or finished search stands (read-only): evaluations done and failed, per generation (count,
    failures, evaluation seconds summed over workers, best proxy so far), the front's best points, and how long ago
    the log was last written."""
    cfg = run.config
    ev = run.evaluations
    gens = int(cfg.get("search", {}).get("generations", 0))
    per_gen = []
    best = float("inf")
    for g in sorted(ev["generation"].unique()) if len(ev) else []:
        rows = ev[ev["generation"] == g]
        ok = rows[rows["status"] == "ok"]
        if len(ok):
            best = min(best, float(ok["fid_proxy"].min()))
        per_gen.append({"generation": int(g), "evaluations": int(len(rows)),
                        "failed": int((rows["status"] != "ok").sum()), "eval_s": round(float(rows["wall_s"].sum()), 1),
                        "best_proxy": best})
    front = run.pareto()
    cols = [c for c in ("key", "fid_proxy", "bitops", "steps", "solver") if c in front]
    log = run.path / "evaluations.jsonl"
    age = time.time() - log.stat().st_mtime if log.is_file() else None
    done = len(per_gen) >= gens > 0 and per_gen[-1]["generation"] == gens - 1
    return {"run": str(run.path), "engine": cfg.get("search", {}).get("engine"), "generations": gens,
            "generations_logged": len(per_gen), "evaluations": int(len(ev)),
            "failed": int((ev["status"] != "ok").sum()) if len(ev) else 0, "per_generation": per_gen,
            "front_size": int(len(front)), "best": front.sort_values("fid_proxy")[cols].head(5).to_dict("records")
            if len(front) else [], "last_write_s_ago": None if age is None else round(age, 1),
            "state": "finished" if done else "running or stopped"}


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``tmpq search`` (read-only)."""
    return Run(Path(path))
