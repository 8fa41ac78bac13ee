"""Helpers shared by the benchmark scripts (they live in :mod:`tmpq.rowlog`, which the final evaluator uses
too)."""
from tmpq.rowlog import RowLog, command_line, machine

__all__ = ["RowLog", "command_line", "machine"]
