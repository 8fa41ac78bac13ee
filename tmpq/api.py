"""Public Python API.

Example:
    >>> import tmpq
    >>> run = tmpq.load_run("results/runs/default")   # doctest: +SKIP
    >>> run.pareto()[["fid_proxy", "bitops", "timesteps"]]   # doctest: +SKIP
"""
from tmpq.core.adapters import DenoiserAdapter, register_adapter
from tmpq.deploy.bundle import apply_export, load_export, read_export
from tmpq.jobs.run import Run, load_run

__all__ = ["DenoiserAdapter", "Run", "apply_export", "load_export", "load_run", "read_export", "register_adapter"]
