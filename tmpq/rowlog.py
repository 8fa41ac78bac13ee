"""Provenance stamps (machine, command line) and a resumable, fsync'd JSONL row log, shared by the benchmark
scripts and the final evaluator (``tmpq validate``)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"Python {platform.python_version()}"


def command_line() -> str:
    """The command as typed from the repository root (``python -m benchmarks.X ...``), without absolute paths."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else "python " + Path(sys.argv[0]).name
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


class RowLog:
    """Append-only JSONL of finished benchmark rows (flushed and fsync'd); rows already present are skipped."""

    def __init__(self, path: Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[self.key(r)] = r

    def key(self, row: dict) -> tuple:
        return tuple(json.dumps(row.get(k), sort_keys=True) for k in self.key_fields)

    def has(self, **fields) -> bool:
        return self.key(fields) in self.rows

    def append(self, row: dict) -> dict:
        row = dict(row, command=command_line(), machine=machine(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[self.key(row)] = row
        print(json.dumps({k: v for k, v in row.items() if k not in ("timesteps", "command", "machine", "bits")}),
              flush=True)
        return row
