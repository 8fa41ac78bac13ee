"""Executors: one interface, local or Ray. Heavy state (model, supernet, noise bank, teacher images) lives in
long-lived workers built once; tasks are small (a key, a schedule, a bit allocation). Every Ray call has a timeout
and bounded retries; a task that still fails is reported as failed with its error, never dropped.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError

# executor.kind: where a search evaluates (LocalExecutor, RayExecutor)
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Task:
    """One evaluation to run: the candidate, whole, under the key its row is logged by."""

    key: str
    candidate: Candidate


@dataclass
class Outcome:
    status: str
    objectives: dict = field(default_factory=dict)
    wall_s: float = 0.0
    worker: str = ""
    error: str = ""
    peak_mib: float = 0.0  # the worker process's peak resident memory so far (0: not known on this system)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def peak_resident_mib() -> float:
    """This process's peak resident memory in MiB (Linux ``VmHWM``); 0.0 where the system does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_task(evaluator, task: Task) -> Outcome:
    """Evaluate one task on an evaluator, turning any exception into a failed outcome."""
    t0 = time.perf_counter()
    try:
        obj = evaluator.evaluate(task.candidate)
        return Outcome("ok", obj, time.perf_counter() - t0, _worker_name(), peak_mib=peak_resident_mib())
    except Exception as exc:  # a failed evaluation is a row, not a crash of the search
        return Outcome("failed", {}, time.perf_counter() - t0, _worker_name(),
                       f"{type(exc).__name__}: {exc}".splitlines()[0] + " | " + traceback.format_exc(limit=2)[-300:],
                       peak_mib=peak_resident_mib())


class LocalExecutor:
    """Evaluates in this process with one evaluator built by ``factory()`` on first use.

    Evaluations run at the factory's ``threads`` (as a Ray actor would) and the process's torch thread count is
    restored after each one: the driver's later work (calibrating another supernet, say) must not inherit the
    worker's setting, since float reductions, and so calibrated scales, differ between thread counts. The factory
    sets them through its ``torch_threads(n)`` (which returns the count before; this library imports no torch); a
    factory without it is left alone.
    """

    name = "local"

    def __init__(self, factory: Callable[[], object]):
        self.factory = factory
        self.threads = getattr(factory, "threads", None)
        self._evaluator = None

    def _at_worker_threads(self, fn: Callable[[], object]):
        knob = getattr(self.factory, "torch_threads", None)
        if knob is None:
            return fn()
        prev = knob(self.threads)
        try:
            return fn()
        finally:
            knob(prev)

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, Outcome]]:
        if self._evaluator is None:
            self._evaluator = self._at_worker_threads(self.factory)
        for task in tasks:
            yield task, self._at_worker_threads(lambda t=task: run_task(self._evaluator, t))

    def close(self) -> None:
        self._evaluator = None


# Ray's unix sockets live at <temp>/session_<date>_<pid>/sockets/plasma_store(.N); AF_UNIX paths are limited to
# 107 bytes, so a temp dir longer than this is replaced by a short one under /tmp (symlinked from the requested path).
_MAX_RAY_TEMP = 38


def _short_temp_dir(temp_dir: str) -> str:
    path = os.path.abspath(temp_dir)
    if len(path) <= _MAX_RAY_TEMP:
        os.makedirs(path, exist_ok=True)
        return path
    if os.path.islink(path):
        target = os.readlink(path)
        if os.path.isdir(target) and len(target) <= _MAX_RAY_TEMP:
            return target
        os.unlink(path)
    short = tempfile.mkdtemp(prefix="tmpq-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(short, path)  # the run directory still points at Ray's logs
    return short


def _enable_token_auth_to_join() -> None:
    """Token authentication when joining a cluster by address.

    Ray (2.60 as installed; see ray/_private/authentication/) turns token authentication on by itself for a
    cluster that ``ray.init()`` starts (the token is generated once into ``~/.ray/auth_token``; tmpq's own local Ray
    uses ``_local_token_env`` instead) and for ``address="auto"``, but not for an explicit ``HOST:PORT``:
    there the driver only sends its token if ``RAY_AUTH_MODE=token`` is set, and a token-protected cluster refuses
    it otherwise ("InvalidAuthToken"). So, unless ``RAY_AUTH_MODE`` is set explicitly, tmpq switches token mode on
    whenever a token is available to this process: ``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH``
    (a file) or ``~/.ray/auth_token``; the token must be the one the cluster's nodes were started with.
    (``ray start`` itself turns token mode on only with ``RAY_AUTH_MODE=token`` or an existing token, and never
    generates one: start every node with ``RAY_AUTH_MODE=token`` and the same token; tests/test_search_ray.py.)
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


_LOOPBACK = "127.0.0.1"
# Ray (2.60 as installed) swaps a loopback node address for the machine's reachable one
# (ray/_private/services.py: resolve_ip_for_localhost -> get_node_ip_address) unless clusters are switched off, as
# they are by default on macOS / Windows (ray/_private/ray_constants.py: ENABLE_RAY_CLUSTER, read at import from
# this variable). With the swap, every gRPC server (GCS, raylet, workers, the agents) listens on 0.0.0.0 / [::].
_RAY_CLUSTERS_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only():
    """While a local Ray starts: its node address stays 127.0.0.1, so GCS, raylet, workers, the dashboard agent,
    the runtime-env agent and the metrics servers bind to loopback only (Ray binds its gRPC servers to 127.0.0.1
    when the node address is; checked with the sockets in tests/test_ray_loopback.py). The processes started here
    inherit the variable; this process's copy of Ray's constant is patched because Ray read it at import."""
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_RAY_CLUSTERS_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTERS_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        _restore_env({_RAY_CLUSTERS_VAR: old_env})


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _reload_ray_auth() -> None:
    """Make this process's Ray see the current RAY_AUTH_* variables (it caches its config and token): config
    first, then the token cache, as ray._private.authentication_test_utils.reset_auth_token_state does."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _local_token_env(token_dir: str) -> dict[str, str]:
    """The RAY_AUTH_* variables for a local Ray that tmpq starts: token authentication on, with the token the user
    names (``RAY_AUTH_TOKEN``, or the file ``RAY_AUTH_TOKEN_PATH``), else a fresh one generated into
    ``<token_dir>/auth/auth_token`` (file 0600 in a folder 0700: Ray makes its temp dir world-writable, where another
    user could swap a file, not a folder of ours). Ray itself would write ``~/.ray/auth_token`` (world-readable) and
    reuse it for every later cluster; ``~/.ray`` is neither read nor written here. An explicit ``RAY_AUTH_MODE`` other
    than ``token`` is the user's opt-out and is respected (no variables)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return {}
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        if not os.path.isfile(named):
            raise TmpqError(f"RAY_AUTH_TOKEN_PATH: no token file at {named}")
        return {"RAY_AUTH_MODE": "token"}
    folder = os.path.join(token_dir, "auth")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}


def _job_cluster_address() -> str:
    """The cluster of the Ray job this process runs as (``ray job submit -- tmpq search ...``), else ``""``.

    Ray's job supervisor starts the entrypoint with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and ``RAY_ADDRESS`` (the
    cluster's GCS address) set; inside a job, an empty ``executor.address`` means that cluster, not a new local Ray.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return ""


class _RayWorker:
    """The body of a Ray actor: one evaluator, built once; ``ping`` answers when it is built."""

    def __init__(self, factory, threads: int):
        import ray

        knob = getattr(factory, "torch_threads", None)  # the evaluator's torch threads, set by its factory
        if knob is not None:
            knob(threads)
        self.name = f"{_worker_name()}@{ray.get_runtime_context().get_node_id()[:8]}"
        self.evaluator = factory()

    def ping(self) -> str:
        return self.name

    def run(self, task: Task) -> Outcome:
        out = run_task(self.evaluator, task)
        out.worker = self.name
        return out

    def run_batch(self, tasks: list[Task]) -> list[Outcome]:
        return [self.run(t) for t in tasks]


class RayExecutor:
    """Long-lived Ray actors, each holding its own evaluator built from ``factory`` (a picklable callable).

    ``address``: ``""`` starts a local Ray bound to 127.0.0.1 only (see ``_loopback_only``), dashboard off, token
    auth on (see ``_local_token_env``: the token is the user's or is generated into the temp dir, never ``~/.ray``),
    temp dir inside ``temp_dir``; ``auto`` or ``HOST:PORT`` joins an existing cluster (see
    ``_enable_token_auth_to_join`` for its token).
    A task goes only to an actor whose evaluator is built (within ``start_timeout_s``), and ``timeout_s`` runs
    from then; an actor that dies or times out is killed and replaced, its task retried up to ``retries`` times,
    then reported failed with its error. Ray reports an actor whose process died within about a second; the death
    of this driver's own node (its raylet, or a process the raylet shares its fate with, such as the dashboard
    agent) is checked every ``_HEALTH_S`` and stops the search with one line (``_check_node``).
    An actor that cannot build its evaluator ``retries + 1`` times in a row is given up; when all are, the search
    stops with an error (a broken worker setup must not be logged as failed candidates).
    Worker names are ``host:pid@node`` (the first 8 hex digits of the Ray node id).

    Batching: once evaluations are seen to be short (a GPU evaluates a candidate in well under a second), one
    remote call carries several tasks, enough for ``min_task_s`` of work at the mean evaluation time so far, but
    never more than an even share of what is queued (so every actor keeps getting work). A batch's timeout is
    ``timeout_s`` per task in it. A batch that dies or times out is not held against its tasks: they go back to the
    queue to run one per call, where a failure counts as an attempt as without batching. ``calls`` counts the
    remote calls made.
    """

    name = "ray"
    _HEALTH_S = 1.0

    def __init__(self, factory: Callable[[], object], workers: int = 2, threads_per_worker: int = 1,
                 timeout_s: float = 600.0, retries: int = 1, address: str = "", temp_dir: str | None = None,
                 start_timeout_s: float | None = None, gpus_per_worker: float = 0.0, min_task_s: float = 1.0,
                 max_batch: int = 64):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray is a dependency
            raise TmpqError(f"executor.kind = ray needs ray ({exc})") from None
        self.ray = ray
        self.factory, self.workers, self.threads = factory, workers, threads_per_worker
        self.timeout_s, self.retries = timeout_s, retries
        self.min_task_s, self.max_batch = min_task_s, max(1, int(max_batch))
        self.calls = 0
        self._ok_s = self._ok_n = 0.0  # evaluation seconds and count of the ok outcomes so far (for batching)
        address = address or _job_cluster_address()
        # building an evaluator (model, supernet) may take longer than one evaluation; never less than 10 min
        self.start_timeout_s = max(timeout_s, 600.0) if start_timeout_s is None else start_timeout_s
        self._owns_ray = False
        self._saved_env: dict = {}  # RAY_AUTH_* as they were before a local Ray started here
        self._token_tmp = ""  # a directory made only for the token (no temp_dir given), removed on close
        self._logs = ""
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False)
            if address:
                _enable_token_auth_to_join()
                kwargs["address"] = address
            else:
                # "local", not None: a RAY_ADDRESS in the environment must not turn this into a join
                kwargs["address"] = "local"
                kwargs["num_cpus"] = max(workers * threads_per_worker, os.cpu_count() or 1)
                kwargs["_node_ip_address"] = kwargs["dashboard_host"] = _LOOPBACK
                if temp_dir:
                    kwargs["_temp_dir"] = token_dir = _short_temp_dir(temp_dir)
                    self._logs = os.path.join(token_dir, "session_latest", "logs")
                else:
                    token_dir = self._token_tmp = tempfile.mkdtemp(prefix="tmpq-ray-")
                token_env = _local_token_env(token_dir)
                self._saved_env = {k: os.environ.get(k) for k in token_env}
                os.environ.update(token_env)
                _reload_ray_auth()
            try:
                if address:
                    ray.init(**kwargs)
                else:
                    with _loopback_only():
                        ray.init(**kwargs)
            except Exception as exc:
                self._restore_auth()
                hint = (" (a cluster with token authentication needs its token here: RAY_AUTH_TOKEN, "
                        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") if address else ""
                raise TmpqError(f"executor.address: cannot start or join Ray at {address or 'local'}: "
                                f"{_first_line(exc) or type(exc).__name__}{hint}") from None
            self._owns_ray = True
        self._node_id = ray.get_runtime_context().get_node_id()  # this driver's node
        self._next_health = 0.0
        # GPU actors (gpus_per_worker > 0, fractional shares one GPU between actors): Ray sets each actor's
        # CUDA_VISIBLE_DEVICES, so its evaluator's device "auto" / "cuda" is the GPU it was given
        gpus = {"num_gpus": gpus_per_worker} if gpus_per_worker > 0 else {}
        self._Worker = ray.remote(num_cpus=threads_per_worker, max_restarts=0, max_task_retries=0,
                                  **gpus)(_RayWorker)
        self.actors: list = [None] * workers
        self.names = ["ray"] * workers
        self._starting: dict = {}  # ping ref -> (slot, t0)
        self._idle: list[int] = []
        self._start_failures = [0] * workers
        self._given_up: set[int] = set()
        self._last_start_error = ""
        for i in range(workers):
            self._spawn(i)

    def _spawn(self, i: int, kill: bool = False) -> None:
        if kill and self.actors[i] is not None:
            try:
                self.ray.kill(self.actors[i], no_restart=True)
            except Exception:
                pass
        self.actors[i] = self._Worker.remote(self.factory, self.threads)
        self.names[i] = "ray"
        self._starting[self.actors[i].ping.remote()] = (i, time.monotonic())

    def _start_failed(self, i: int, exc: BaseException) -> None:
        self._start_failures[i] += 1
        self._last_start_error = f"{type(exc).__name__}: {_first_line(exc)}"
        if self._start_failures[i] > self.retries:
            self._given_up.add(i)
            try:
                self.ray.kill(self.actors[i], no_restart=True)
            except Exception:
                pass
            if len(self._given_up) == self.workers:
                raise TmpqError(f"no Ray worker could build its evaluator ({self.retries + 1} tries each); last "
                                f"error: {self._last_start_error}")
        else:
            self._spawn(i, kill=True)

    def _batch_size(self, queued: int) -> int:
        """How many tasks one remote call carries (see the class doc)."""
        if self.min_task_s <= 0 or not self._ok_n or queued <= 1:
            return 1
        mean = self._ok_s / self._ok_n
        want = int(-(-self.min_task_s // max(mean, 1e-6)))  # ceil
        share = -(-queued // max(1, self.workers - len(self._given_up)))
        return max(1, min(want, share, self.max_batch))

    def map(self, tasks: list[Task]) -> Iterator[tuple[Task, Outcome]]:
        ray = self.ray
        queue = [(t, 0, False) for t in tasks]  # (task, attempt, solo: never batched again)
        running: dict = {}  # task ref -> (slot, [(task, attempt, solo)], t0)
        while queue or running:
            while queue and self._idle:
                i = self._idle.pop(0)
                batch = [queue.pop(0)]
                if not batch[0][2]:
                    size = self._batch_size(len(queue) + 1)
                    while len(batch) < size and queue and not queue[0][2]:
                        batch.append(queue.pop(0))
                actor = self.actors[i]
                ref = actor.run.remote(batch[0][0]) if len(batch) == 1 else \
                    actor.run_batch.remote([b[0] for b in batch])
                self.calls += 1
                running[ref] = (i, batch, time.monotonic())
            ready, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in self._starting:
                    self._started(ref)
                    continue
                i, batch, _t0 = running.pop(ref)
                try:
                    got = ray.get(ref)
                except Exception as exc:  # the actor died (or the task could not run) mid-evaluation
                    self._check_node()  # its node with it? then nothing can be retried
                    name = self.names[i]
                    self._spawn(i, kill=True)
                    yield from self._requeue(queue, batch, exc, name)
                    continue
                self._idle.append(i)
                outs = got if isinstance(got, list) else [got]
                for (task, _a, _s), out in zip(batch, outs):
                    if out.status == "ok":
                        self._ok_s += out.wall_s
                        self._ok_n += 1
                    yield task, out
            now = time.monotonic()
            for ref, (i, batch, t0) in list(running.items()):
                if now - t0 > self.timeout_s * len(batch):
                    running.pop(ref)
                    name = self.names[i]
                    self._spawn(i, kill=True)
                    yield from self._requeue(queue, batch, TimeoutError(f"no answer in {self.timeout_s:g} s"),
                                             name)
            self._check_start_timeouts(now)
            self._check_node(now)

    def _requeue(self, queue, batch, exc, worker: str) -> Iterator[tuple[Task, Outcome]]:
        if len(batch) > 1:  # not held against any one task: each runs alone next
            queue.extend((task, attempt, True) for task, attempt, _solo in batch)
            return
        task, attempt, _solo = batch[0]
        if attempt < self.retries:
            queue.append((task, attempt + 1, True))
            return
        yield task, Outcome("failed", {}, 0.0, worker,
                            f"{type(exc).__name__}: {_first_line(exc)} (after {attempt + 1} attempts)")

    def wait_ready(self) -> None:
        """Block until every worker has built its evaluator (or been given up); e.g. before timing ``map``."""
        while self._starting:
            ready, _ = self.ray.wait(list(self._starting), num_returns=1, timeout=0.5)
            for ref in ready:
                self._started(ref)
            self._check_start_timeouts(time.monotonic())
            self._check_node(time.monotonic())

    def _started(self, ref) -> None:
        i, _t0 = self._starting.pop(ref)
        try:
            self.names[i] = self.ray.get(ref)
        except Exception as exc:  # the evaluator could not be built (or the actor died doing so)
            self._check_node()
            self._start_failed(i, exc)
            return
        self._start_failures[i] = 0
        self._idle.append(i)

    def _check_start_timeouts(self, now: float) -> None:
        for ref, (i, t0) in list(self._starting.items()):
            if now - t0 > self.start_timeout_s:
                self._starting.pop(ref)
                self._start_failed(i, TimeoutError(f"evaluator not built in {self.start_timeout_s:g} s"))

    def _check_node(self, now: float | None = None) -> None:
        """Stop with one line once this driver's Ray node is dead: no task can run or be retried then, and the
        actors that would replace the dead ones would wait for a node forever (``start_timeout_s``, 10 min). One GCS
        call, at most every ``_HEALTH_S`` unless ``now`` is None. (If the GCS itself is gone, Ray ends this process
        after its ``gcs_rpc_server_reconnect_timeout_s``, 60 s.)"""
        if now is not None and now < self._next_health:
            return
        self._next_health = time.monotonic() + self._HEALTH_S
        try:
            nodes = self.ray.nodes()
        except Exception:  # the GCS did not answer: see above
            return
        me = next((n for n in nodes if n.get("NodeID") == self._node_id), None)
        if me is None or me.get("Alive", True):
            return
        logs = f"; Ray's logs: {self._logs}" if self._logs else ""
        raise TmpqError(f"executor: the Ray node of this search (node {self._node_id[:8]} at "
                        f"{me.get('NodeManagerAddress', '?')}) died: no Ray worker can be reached (its raylet or an "
                        f"agent it depends on exited{logs}); the finished evaluations are logged, resume the run "
                        f"to evaluate the rest")

    def _restore_auth(self) -> None:
        if self._saved_env:
            _restore_env(self._saved_env)
            self._saved_env = {}
            _reload_ray_auth()

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        self._starting.clear()
        self._idle.clear()
        if self._owns_ray:
            self._owns_ray = False
            self.ray.shutdown()
        self._restore_auth()
        if self._token_tmp:
            shutil.rmtree(self._token_tmp, ignore_errors=True)
            self._token_tmp = ""


def _first_line(exc: BaseException) -> str:
    """One line about ``exc``: for a Ray error that carries a remote traceback, its last line (the original
    ``SomeError: message``), else the first line; terminal colour codes removed."""
    import re

    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:", lines[-1]):
        return lines[-1]
    return lines[0]
