"""The run directory: the append-only evaluation log is the truth; Parquet / CSV are compacted from it atomically.

Layout: ``config.resolved.json``, ``search_space.json``, ``evaluations.jsonl`` (one ``EvalResult`` per line, flushed
and fsync'd as each evaluation finishes), ``evaluations.parquet``, ``pareto.parquet`` and ``pareto.csv``.
Resume = replay the log; a run whose fingerprint (config / model / data) changed is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tmpq.errors import TmpqError
from tmpq.fileio import atomic_write_bytes

RESULT_VERSION = 1


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: a row of the log. ``status`` is ``ok`` or ``failed`` (with ``error``), never a magic value."""

    key: str
    status: str
    timesteps: tuple[int, ...]
    bits: tuple
    objectives: dict = field(default_factory=dict)
    proxy: dict = field(default_factory=dict)
    n_images: int = 0
    seed: int = 0
    wall_s: float = 0.0
    worker: str = ""
    error: str = ""
    generation: int = 0
    origin: str = ""
    version: int = RESULT_VERSION

    def __post_init__(self):
        if self.status not in ("ok", "failed"):
            raise TmpqError(f"evaluation status must be ok or failed, got {self.status!r}")

    def to_json(self) -> str:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["bits"] = json.loads(json.dumps(self.bits))
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "EvalResult":
        d = json.loads(line)
        d["timesteps"] = tuple(d["timesteps"])
        d["bits"] = _tuplify(d["bits"])
        return cls(**d)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


class RunDir:
    """Create or reopen a run directory.

    Example:
        >>> run = RunDir.create(Path("/tmp/run"), {"seed": 0}, {"format": "x"}, fingerprint="abc")  # doctest: +SKIP
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.log_path = self.path / "evaluations.jsonl"

    @classmethod
    def create(cls, path: Path, config: dict, space: dict, fingerprint: str) -> "RunDir":
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise TmpqError(f"run directory {path} already exists and is not empty; use --resume {path}")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(path / "config.resolved.json",
                           (json.dumps({"fingerprint": fingerprint, **config}, indent=2, sort_keys=True) + "\n").encode())
        atomic_write_bytes(path / "search_space.json", (json.dumps(space, indent=2) + "\n").encode())
        run.log_path.touch()
        return run

    @classmethod
    def reopen(cls, path: Path, fingerprint: str) -> "RunDir":
        path = Path(path)
        cfg_path = path / "config.resolved.json"
        if not cfg_path.is_file():
            raise TmpqError(f"not a tmpq run directory (no config.resolved.json): {path}")
        old = json.loads(cfg_path.read_text()).get("fingerprint")
        if old != fingerprint:
            raise TmpqError(f"refusing to resume {path}: its config / model / data fingerprint {str(old)[:12]} "
                            f"differs from the current {fingerprint[:12]}")
        return cls(path)

    def config(self) -> dict:
        return json.loads((self.path / "config.resolved.json").read_text())

    def append(self, result: EvalResult) -> None:
        """Append one finished evaluation; durable when this returns."""
        with open(self.log_path, "a") as f:
            f.write(result.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> list[EvalResult]:
        """All complete records of the log; a torn last line (crash mid-write) is dropped and truncated away."""
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        out, good = [], 0
        for line in data.split(b"\n"):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                out.append(EvalResult.from_json(line.decode()))
            except (ValueError, TypeError, KeyError):
                break
            good += len(line) + 1
        if good < len(data):
            with open(self.log_path, "r+b") as f:
                f.truncate(min(good, len(data)))
        return out

    def compact(self, objectives: tuple[str, ...] = ("fid_proxy", "bitops")) -> None:
        """Rewrite evaluations.parquet, pareto.parquet and pareto.csv from the log (write-to-temp + rename)."""
        import io

        df = results_frame(self.replay())
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(self.path / "evaluations.parquet", buf.getvalue())
        front = pareto_frame(df, objectives)
        buf = io.BytesIO()
        front.to_parquet(buf, index=False)
        atomic_write_bytes(self.path / "pareto.parquet", buf.getvalue())
        atomic_write_bytes(self.path / "pareto.csv", front.to_csv(index=False).encode())


def results_frame(results: list[EvalResult]):
    """Evaluations as a DataFrame: list-valued ``timesteps`` / ``bits``, one column per objective."""
    import pandas as pd

    rows = []
    for r in results:
        row = {"key": r.key, "status": r.status, "timesteps": list(r.timesteps),
               "bits": json.loads(json.dumps(r.bits)), "steps": len(r.timesteps),
               "proxy": r.proxy.get("name", ""), "proxy_version": r.proxy.get("version", ""),
               "n_images": r.n_images, "seed": r.seed, "wall_s": r.wall_s, "worker": r.worker, "error": r.error,
               "generation": r.generation, "origin": r.origin}
        row.update(r.objectives)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not rows:
        df = pd.DataFrame(columns=["key", "status", "timesteps", "bits", "steps", "proxy", "generation", "origin"])
    return df


def run_objectives(config: dict) -> tuple[str, ...]:
    """The objectives a run minimises, from its resolved config: the proxy and BitOPs, and the weight size with
    ``search.size_objective``."""
    extra = ("size_mb",) if config.get("search", {}).get("size_objective") else ()
    return ("fid_proxy", "bitops", *extra)


def pareto_frame(df, objectives: tuple[str, ...] = ("fid_proxy", "bitops")):
    """Non-dominated ``ok`` rows (duplicate keys collapsed), sorted by the last objective."""
    from search.pareto import non_dominated

    if df.empty or any(o not in df.columns for o in objectives):
        return df.iloc[0:0]
    ok = df[df["status"] == "ok"].drop_duplicates("key")
    if ok.empty:
        return ok
    mask = non_dominated(ok[list(objectives)].to_numpy(dtype=np.float64))
    return ok[mask].sort_values(list(objectives[::-1])).reset_index(drop=True)
