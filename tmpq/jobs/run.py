"""The run reader: a search run directory opened read-only (``tmpq.load_run`` re-exports it).

Example:
    >>> import tmpq
    >>> run = tmpq.load_run("results/runs/default")   # doctest: +SKIP
    >>> run.pareto()[["fid_proxy", "bitops", "timesteps"]]   # doctest: +SKIP
"""
from __future__ import annotations

import copy
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


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``tmpq search`` (read-only)."""
    return Run(Path(path))
