"""Public Python API.

Example:
    >>> import tmpq
    >>> run = tmpq.load_run("results/runs/default")   # doctest: +SKIP
    >>> run.pareto()[["fid_proxy", "bitops", "timesteps"]]   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from tmpq.errors import TmpqError


class Run:
    """A search run directory opened for analysis (read-only)."""

    def __init__(self, path: Path):
        from search.rundir import RunDir

        self.path = Path(path)
        if not (self.path / "config.resolved.json").is_file():
            raise TmpqError(f"not a tmpq run directory (no config.resolved.json): {self.path}")
        self._dir = RunDir(self.path)

    @property
    def config(self) -> dict:
        return self._dir.config()

    @property
    def evaluations(self):
        """Every logged evaluation as a DataFrame (list-valued ``timesteps`` and ``bits``), read from the log."""
        from search.rundir import results_frame

        return results_frame(self._dir.replay())

    def pareto(self, objectives: tuple[str, ...] | None = None):
        """Non-dominated ``ok`` evaluations, sorted by the last objective; ``objectives`` default to the run's own
        (proxy and BitOPs, plus size_mb when it searched with ``search.size_objective``)."""
        from search.rundir import pareto_frame, run_objectives

        return pareto_frame(self.evaluations, objectives or run_objectives(self.config))


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``tmpq search``."""
    return Run(Path(path))
