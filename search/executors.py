"""Executors: one interface, local or Ray. Heavy state (model, supernet, noise bank, teacher images) lives in
long-lived workers built once; tasks are small (a key, a schedule, a bit allocation). Every Ray call has a timeout
and bounded retries; a task that still fails is reported as failed with its error, never dropped.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tmpq.errors import TmpqError


@dataclass(frozen=True)
class Task:
    key: str
    timesteps: tuple[int, ...]
    bits: tuple


@dataclass
class Outcome:
    status: str
    objectives: dict = field(default_factory=dict)
    wall_s: float = 0.0
    worker: str = ""
    error: str = ""


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_task(evaluator, task: Task) -> Outcome:
    """Evaluate one task on an evaluator, turning any exception into a failed outcome."""
    t0 = time.perf_counter()
    try:
        obj = evaluator.evaluate(task.timesteps, task.bits)
        return Outcome("ok", obj, time.perf_counter() - t0, _worker_name())
    except Exception as exc:  # a failed evaluation is a row, not a crash of the search
        return Outcome("failed", {}, time.perf_counter() - t0, _worker_name(),
                       f"{type(exc).__name__}: {exc}".splitlines()[0] + " | " + traceback.format_exc(limit=2)[-300:])


class LocalExecutor:
    """Evaluates in this process with one evaluator built by ``factory()`` on first use."""

    name = "local"

    def __init__(self, factory: Callable[[], object]):
        self.factory = factory
        self._evaluator = None

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, Outcome]]:
        if self._evaluator is None:
            self._evaluator = self.factory()
        for task in tasks:
            yield task, run_task(self._evaluator, task)

    def close(self) -> None:
        self._evaluator = None


class RayExecutor:
    """Long-lived Ray actors, each holding its own evaluator built from ``factory`` (a picklable callable).

    ``address``: ``""`` starts a local Ray (dashboard off, token auth on, temp dir inside ``temp_dir``);
    ``auto`` or ``HOST:PORT`` joins an existing cluster.
    """

    name = "ray"

    def __init__(self, factory: Callable[[], object], workers: int = 2, threads_per_worker: int = 1,
                 timeout_s: float = 600.0, retries: int = 1, address: str = "", temp_dir: str | None = None):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is a dependency
            raise TmpqError(f"executor.kind = ray needs ray ({exc})") from None
        self.ray = ray
        self.factory, self.workers, self.threads = factory, workers, threads_per_worker
        self.timeout_s, self.retries = timeout_s, retries
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = max(workers * threads_per_worker, os.cpu_count() or 1)
                if temp_dir:
                    kwargs["_temp_dir"] = os.path.abspath(temp_dir)
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise TmpqError(f"executor.address: cannot start or join Ray at {address or 'local'}: "
                                f"{str(exc).splitlines()[0]}") from None
            self._owns_ray = True

        @ray.remote(num_cpus=threads_per_worker, max_restarts=0)
        class _Worker:
            def __init__(self, factory, threads):
                import torch

                torch.set_num_threads(threads)
                self.evaluator = factory()

            def run(self, task):
                return run_task(self.evaluator, task)

            def ping(self):
                return _worker_name()

        self._Worker = _Worker
        self.actors = [self._spawn() for _ in range(workers)]

    def _spawn(self):
        return self._Worker.remote(self.factory, self.threads)

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, Outcome]]:
        ray = self.ray
        pending: dict = {}
        queue = [(t, 0) for t in tasks]
        idle = list(range(len(self.actors)))
        while queue or pending:
            while queue and idle:
                i = idle.pop()
                task, attempt = queue.pop(0)
                ref = self.actors[i].run.remote(task)
                pending[ref] = (i, task, attempt, time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            now = time.monotonic()
            for ref in ready:
                i, task, attempt, _t0 = pending.pop(ref)
                try:
                    out = ray.get(ref)
                    idle.append(i)
                    yield task, out
                except Exception as exc:  # actor died or task raised inside Ray
                    self.actors[i] = self._spawn()
                    idle.append(i)
                    yield from self._retry_or_fail(queue, task, attempt, exc)
            for ref, (i, task, attempt, t0) in list(pending.items()):
                if now - t0 > self.timeout_s:
                    pending.pop(ref)
                    ray.kill(self.actors[i])
                    self.actors[i] = self._spawn()
                    idle.append(i)
                    yield from self._retry_or_fail(queue, task, attempt,
                                                   TimeoutError(f"no answer in {self.timeout_s:.0f} s"))

    def _retry_or_fail(self, queue, task, attempt, exc) -> Iterator[tuple[Task, Outcome]]:
        if attempt < self.retries:
            queue.append((task, attempt + 1))
            return
        yield task, Outcome("failed", {}, 0.0, "ray", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                                                       f" (after {attempt + 1} attempts)")

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        if self._owns_ray:
            self.ray.shutdown()
