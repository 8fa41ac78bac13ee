"""Helpers shared by the benchmark scripts (the row log lives in :mod:`tmpq.rowlog`, which the final evaluator uses
too)."""
from pathlib import Path

from tmpq.rowlog import RowLog, command_line, machine

__all__ = ["RowLog", "command_line", "findings", "machine"]


def findings(out: Path) -> list[str]:
    """The hand-written reading of a report's numbers (``OUT/FINDINGS.md``), kept across report rewrites: placed
    under the report's title when present."""
    f = Path(out) / "FINDINGS.md"
    return [f.read_text().strip(), ""] if f.is_file() else []
