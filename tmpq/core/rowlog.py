"""Provenance stamps (machine, command line) and a resumable, fsync'd JSONL row log, shared by the benchmark
scripts and the final evaluator (``tmpq validate``)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tmpq.core.fileio import lacks_final_newline, parse_row, read_jsonl, repair_jsonl_tail


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags, from ``/proc/cpuinfo`` (``"unknown CPU"`` and none elsewhere)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return model, flags


def machine() -> str:
    cpu = cpu_info()[0]
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"Python {platform.python_version()}"


def command_line() -> str:
    """The command as typed from the repository root (``python -m benchmarks.X ...``), without absolute paths."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else "python " + Path(sys.argv[0]).name
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


class RowLog:
    """Append-only JSONL of finished benchmark rows (flushed and fsync'd); rows already present are skipped.

    Opening reads the file without changing it: a torn last line (a crash mid-write) is skipped, any other bad line
    is a one-line ``TmpqError`` naming the file and line. The first :meth:`append` moves a torn last line into a side
    file ``<name>.torn-<n>`` before writing. ``parse`` (a line to a row dict) may check the rows' fields: its
    TypeError / KeyError / ValueError is the same one-line error."""

    def __init__(self, path: Path, key_fields: tuple[str, ...], parse: Callable[[str], dict] = parse_row):
        self.path = Path(path)
        self.key_fields = key_fields
        self.parse = parse
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            for r in read_jsonl(self.path, parse, "row log")[0]:
                self.rows[self.key(r)] = r

    def key(self, row: dict) -> tuple:
        return tuple(json.dumps(row.get(k), sort_keys=True) for k in self.key_fields)

    def has(self, **fields) -> bool:
        return self.key(fields) in self.rows

    def append(self, row: dict) -> dict:
        row = dict(row, command=command_line(), machine=machine(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if lacks_final_newline(self.path):
            repair_jsonl_tail(self.path, self.parse, "row log")
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[self.key(row)] = row
        print(json.dumps({k: v for k, v in row.items() if k not in ("timesteps", "command", "machine", "bits")}),
              flush=True)
        return row
