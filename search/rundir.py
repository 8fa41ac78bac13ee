"""The run directory: the append-only evaluation log is the truth; Parquet / CSV are compacted from it atomically.

Layout: ``config.resolved.json``, ``search_space.json``, ``evaluations.jsonl`` (one ``EvalResult`` per line, flushed
and fsync'd as each evaluation finishes), ``evaluations.parquet``, ``pareto.parquet`` and ``pareto.csv``.
Resume = replay the log; a run whose fingerprint (config / model / data) changed is refused. One writer at a time:
creating, resuming and every other write hold the run lock (``.tmpq.lock``, :mod:`tmpq.core.runlock`). Reading never
changes a run (nor takes the lock): a torn last line of the log (a crash mid-write) is skipped, and only the resuming
writer moves it into a side file ``evaluations.jsonl.torn-<n>``; a bad line anywhere else is a one-line error naming
the file and line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from tmpq.core.candidate import Candidate
from tmpq.core import runlock
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import (
    atomic_write_bytes,
    lacks_final_newline,
    read_json,
    read_jsonl,
    repair_jsonl_tail,
)
from tmpq.search.pareto import non_dominated

RESULT_VERSION = 1


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: a row of the log, the candidate whole. ``status`` is ``ok`` or ``failed`` (with ``error``),
    never a magic value. The row's fields are the candidate's (:meth:`Candidate.fields`: solver and reuse written
    only when not the defaults, so rows of runs before those genes are as they were) and the evaluation's."""

    key: str
    status: str
    candidate: Candidate
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
    peak_mib: float = 0.0  # the evaluating worker's peak resident memory so far, MiB (0: not recorded)

    def __post_init__(self):
        if self.status not in ("ok", "failed"):
            raise TmpqError(f"evaluation status must be ok or failed, got {self.status!r}")

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "candidate"}
        return json.dumps({**d, **self.candidate.fields()}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "EvalResult":
        """Parse one log line; a line of the wrong shape raises TypeError / KeyError / ValueError naming the field."""
        d = json.loads(line)
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        for name in ("key", "status", "timesteps", "bits"):
            if name not in d:
                raise KeyError(name)
        for name, value in d.items():
            kind = _FIELD_TYPES.get(name)
            if kind is None:
                raise TypeError(f"unknown field {name!r}")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TypeError(f"{name}: expected {kind[0].__name__ if isinstance(kind, tuple) else kind.__name__}, "
                                f"got {type(value).__name__}")
        for name in ("timesteps", "reuse", "algos"):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in d.get(name, ())):
                raise TypeError(f"{name}: expected integers")
        if not all(isinstance(v, (int, float)) or v is None for v in d.get("objectives", {}).values()):
            raise TypeError("objectives: expected numbers")
        cand = Candidate.from_dict(d)
        for name in _CANDIDATE_FIELDS:
            d.pop(name, None)
        return cls(candidate=cand, **d)


_CANDIDATE_FIELDS = ("timesteps", "bits", "solver", "order", "reuse", "algos")
_FIELD_TYPES = {"key": str, "status": str, "timesteps": list, "bits": list, "objectives": dict, "proxy": dict,
                "n_images": int, "seed": int, "wall_s": (float, int), "worker": str, "error": str, "generation": int,
                "origin": str, "version": int, "solver": str, "order": int, "reuse": list,
                "peak_mib": (float, int), "algos": list}


class RunDir:
    """Create or reopen a run directory.

    Example:
        >>> run = RunDir.create(Path("/tmp/run"), {"seed": 0}, {"format": "x"}, fingerprint="abc")  # doctest: +SKIP
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.log_path = self.path / "evaluations.jsonl"
        self.lock: runlock.RunLock | None = None  # the writer lock, where this object is the run's writer

    @classmethod
    def create(cls, path: Path, config: dict, space: dict, fingerprint: str, writer: str = "") -> "RunDir":
        """A new run directory, published atomically: written in a sibling temporary directory (its writer lock
        taken there first) and renamed into place, so of two creators of one path exactly one wins and the other
        gets one line. An existing empty directory is replaced. ``writer`` (a job name): the returned run keeps the
        writer lock (``run.lock``); otherwise it is released on return."""
        path = Path(path)
        taken = TmpqError(f"run directory {path} already exists and is not empty; use --resume {path}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise taken
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(tmp)  # honours the umask, as the run directory always did
        lock = None
        try:
            lock = runlock.acquire(tmp, writer or "create")
            atomic_write_bytes(tmp / "config.resolved.json", (json.dumps({"fingerprint": fingerprint, **config},
                                                                         indent=2, sort_keys=True) + "\n").encode())
            atomic_write_bytes(tmp / "search_space.json", (json.dumps(space, indent=2) + "\n").encode())
            (tmp / "evaluations.jsonl").touch()
            try:
                os.rename(tmp, path)  # fails when another creator's run (or any file) is already there
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise taken from None
                raise
        except BaseException:
            if lock is not None:
                lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        run = cls(path)
        lock.path = path / runlock.LOCK_NAME  # the same file (and lock), published
        if writer:
            run.lock = lock
        else:
            lock.release()
        return run

    @classmethod
    def reopen(cls, path: Path, fingerprint: str, writer: str = "") -> "RunDir":
        """Reopen a run to resume it (the writer): takes the writer lock (one line naming the holder when another
        process has it), refuses a changed fingerprint, and moves a torn last line of the log into
        ``evaluations.jsonl.torn-<n>`` (see :meth:`recover`). ``writer`` (a job name): the returned run keeps the
        lock (``run.lock``); otherwise it is released on return."""
        run = cls.open(path)
        lock = runlock.acquire(run.path, writer or "resume")
        try:
            old = run.config().get("fingerprint")
            if old != fingerprint:
                raise TmpqError(f"refusing to resume {run.path}: its config / model / data fingerprint "
                                f"{str(old)[:12]} differs from the current {fingerprint[:12]}")
            run.recover()
        except BaseException:
            lock.release()
            raise
        if writer:
            run.lock = lock
        else:
            lock.release()
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run directory, opened read-only: one line when it is missing, a file, or has no config."""
        path = Path(path)
        if not path.is_dir():
            raise TmpqError(f"not a tmpq run directory ({'a file' if path.exists() else 'not found'}): {path}")
        if not (path / "config.resolved.json").exists():
            raise TmpqError(f"not a tmpq run directory (no config.resolved.json): {path}")
        return cls(path)

    def config(self) -> dict:
        return read_json(self.path / "config.resolved.json", "run config")

    def recover(self) -> Path | None:
        """For the resuming writer only: move a torn last line of the log (a crash mid-write) into a side file and
        cut it off, so appends stay parseable; returns the side file. A bad line elsewhere raises, changing nothing."""
        return repair_jsonl_tail(self.log_path, EvalResult.from_json, "evaluation log")

    def append(self, result: EvalResult) -> None:
        """Append one finished evaluation; durable when this returns. A log that does not end in a newline (torn by
        a crash) is recovered first."""
        if lacks_final_newline(self.log_path):
            self.recover()
        with open(self.log_path, "a") as f:
            f.write(result.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> list[EvalResult]:
        """All complete records of the log, read-only: a torn last line (a crash mid-write, or an append in flight)
        is skipped, not removed; any other bad line is a one-line error naming the file and line."""
        return read_jsonl(self.log_path, EvalResult.from_json, "evaluation log")[0]

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
        c = r.candidate
        f = c.fields()
        row = {"key": r.key, "status": r.status, "timesteps": f["timesteps"], "bits": f["bits"],
               "steps": len(c.timesteps), "proxy": r.proxy.get("name", ""),
               "proxy_version": r.proxy.get("version", ""), "n_images": r.n_images, "seed": r.seed,
               "wall_s": r.wall_s, "worker": r.worker, "error": r.error, "generation": r.generation,
               "origin": r.origin, "peak_mib": r.peak_mib,
               **f}  # its solver / reuse / algos where not the defaults
        row.update(r.objectives)
        rows.append(row)
    df = pd.DataFrame(rows)
    if "solver" in df:  # a run with a solver gene: its DDIM rows name theirs too
        df["solver"] = df["solver"].fillna("ddim")
        df["order"] = df["order"].fillna(1).astype(int)
    if "reuse" in df:  # a run with the reuse gene: rows without reuse say so with an empty list
        df["reuse"] = [v if isinstance(v, list) else [] for v in df["reuse"]]
    if "algos" in df:  # a run with the algorithm gene: all-direct rows say so with an empty list
        df["algos"] = [v if isinstance(v, list) else [] for v in df["algos"]]
    if not rows:
        df = pd.DataFrame(columns=["key", "status", "timesteps", "bits", "steps", "proxy", "generation", "origin"])
    return df


def run_objectives(config: dict) -> tuple[str, ...]:
    """The objectives a run minimises, from its resolved config: the proxy and BitOPs (``latency_s``, the predicted
    seconds per image, with ``search.cost = "latency"``), and the weight size with ``search.size_objective``."""
    search = config.get("search", {})
    extra = ("size_mb",) if search.get("size_objective") else ()
    return ("fid_proxy", "latency_s" if search.get("cost", "bitops") == "latency" else "bitops", *extra)


def pareto_frame(df, objectives: tuple[str, ...] = ("fid_proxy", "bitops")):
    """Non-dominated ``ok`` rows (duplicate keys collapsed), sorted by the last objective."""

    if df.empty or any(o not in df.columns for o in objectives):
        return df.iloc[0:0]
    ok = df[df["status"] == "ok"].drop_duplicates("key")
    if ok.empty:
        return ok
    mask = non_dominated(ok[list(objectives)].to_numpy(dtype=np.float64))
    return ok[mask].sort_values(list(objectives[::-1])).reset_index(drop=True)
