"""Helpers shared by the benchmark scripts (the row log lives in :mod:`tmpq.rowlog`, which the final evaluator uses
too)."""
import json
from pathlib import Path

from tmpq.rowlog import RowLog, command_line, machine

__all__ = ["RowLog", "baseline_fp_row", "command_line", "findings", "machine"]


def findings(out: Path) -> list[str]:
    """The hand-written reading of a report's numbers (``OUT/FINDINGS.md``), kept across report rewrites: placed
    under the report's title when present."""
    f = Path(out) / "FINDINGS.md"
    return [f.read_text().strip(), ""] if f.is_file() else []


def baseline_fp_row(rows: Path, steps: int, n: int | None = None, seed: int | None = None) -> dict:
    """The FP uniform DDIM FID row at ``steps`` of ``benchmarks.baseline`` (the first one, or the one at ``n`` /
    ``seed`` when given); exits naming the file when there is none."""
    for line in Path(rows).read_text().splitlines():
        r = json.loads(line)
        if (r.get("kind"), r.get("schedule"), r.get("steps")) == ("fid", "uniform", steps) and \
                (n is None or r.get("n") == n) and (seed is None or r.get("seed") == seed):
            return r
    raise SystemExit(f"{rows}: no FP uniform {steps}-step row" + (f" at N = {n}" if n else "")
                     + (f", seed {seed}" if seed is not None else "") + " (run python -m benchmarks.baseline first)")
