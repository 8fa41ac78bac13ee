"""One writer per run directory: an OS lock (``flock``) on ``<run>/.tmpq.lock``, held for the writer's whole life.

The kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a stale lock file never
blocks a later writer: the file's content (``{"pid", "command", "job", "host", "started"}``, written after locking)
only names the holder in the refusal a second writer gets. The lock is re-entrant within one process (keyed by the
lock file's inode, so it survives the rename that publishes a new run directory): the main job holds it across its
stages while each stage takes it again. Readers never take it and never create the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

from tmpq.core.errors import TmpqError

LOCK_NAME = ".tmpq.lock"

_guard = threading.Lock()
_held: dict[tuple[int, int], list] = {}  # lock file (st_dev, st_ino) -> [fd, count]
_keeping: list[set] = []  # open keep_run_locks() scopes: the locks each one holds an extra count of


def _command() -> str:
    """This process's command line, as the user typed it where it is the CLI."""
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name == "tmpq" or Path(argv[0]).parts[-2:] == ("tmpq", "__main__.py"):
        return shlex.join(["tmpq", *argv[1:]])
    return shlex.join(argv)


def _holder(fd: int) -> dict:
    """The holder's record from the lock file (empty when it has not written it yet or it is damaged)."""
    for _ in range(20):  # the holder writes its record right after locking: give it a moment
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode())
            if isinstance(data, dict) and "pid" in data:
                return data
        except (ValueError, UnicodeDecodeError):
            pass
        time.sleep(0.02)
    return {}


class RunLock:
    """A held run lock (one count of it); :meth:`release` (or leaving a ``with`` block) gives that count back."""

    def __init__(self, path: Path, key: tuple[int, int]):
        self.path, self._key, self._released = path, key, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        _drop(self._key)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _drop(key: tuple[int, int]) -> None:
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.ftruncate(entry[0], 0)  # no holder named: the file is as before the writer came (empty)
            os.close(entry[0])  # closing the only descriptor of the lock file releases the flock


def acquire(run_dir: str | Path, job: str) -> RunLock:
    """Take the writer lock of ``run_dir`` (an existing directory) for ``job``, or raise a one-line TmpqError naming
    the process that holds it. Creates the lock file when missing (a writer may)."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    with _guard:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            raise TmpqError(f"not a tmpq run directory (not found): {run_dir}") from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _held:
            os.close(fd)
            _held[key][1] += 1
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _holder(fd)
                os.close(fd)
                pid = who.get("pid", "unknown")
                what = f" ({who.get('command', '?')}, since {who.get('started', '?')})" if who else ""
                host = f" on {who['host']}" if who.get("host") and who["host"] != socket.gethostname() else ""
                raise TmpqError(f"run directory {run_dir} is in use by another writer: pid {pid}{host}{what}; "
                                "wait for it to finish or stop it") from None
            record = {"pid": os.getpid(), "command": _command(), "job": job, "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            _held[key] = [fd, 1]
        for scope in _keeping:
            if key not in scope:
                scope.add(key)
                _held[key][1] += 1
    return RunLock(path, key)


def lock_inside(target: str | Path, job: str):
    """The run lock for a write to ``target`` when ``target`` is a run directory or lies in one (the nearest
    directory above it with a ``config.resolved.json``), else a no-op context: ``tmpq export --out RUN/export``,
    ``tmpq calibrate --out RUN/supernet.safetensors``."""
    target = Path(target).absolute()
    for d in (target, *target.parents):
        if (d / "config.resolved.json").is_file():
            return acquire(d, job)
    return contextlib.nullcontext()


@contextlib.contextmanager
def keep_run_locks():
    """Run locks this process takes inside the block stay held until the block ends, though the stages that took
    them release theirs: the main job keeps its run from another writer between search, validation, export and
    report."""
    scope: set = set()
    with _guard:
        _keeping.append(scope)
    try:
        yield
    finally:
        with _guard:
            _keeping.remove(scope)
        for key in scope:
            _drop(key)


def held_here(run_dir: str | Path) -> bool:
    """Whether this process holds the writer lock of ``run_dir`` (read-only: never creates the lock file)."""
    try:
        st = os.stat(Path(run_dir) / LOCK_NAME)
    except FileNotFoundError:
        return False
    with _guard:
        return (st.st_dev, st.st_ino) in _held
