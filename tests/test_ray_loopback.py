"""A local Ray that tmpq starts, for real: every Ray socket listens on loopback only, token authentication is on with
its token in the run's Ray temp dir (nothing in ``~/.ray``), a worker killed mid-evaluation is retried on a new
actor, and when the node itself dies (its dashboard agent killed: the raylet shares its fate) the executor stops
within seconds with one line, after reporting each finished evaluation once (which the search has logged).

One Ray for the whole test (starting one takes ~5 s and ~1 GB). Processes are found as descendants of this test
process and killed by pid, never by name.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from tmpq.core.candidate import Candidate  # noqa: E402
from tmpq.core.errors import TmpqError  # noqa: E402
from tmpq.search.executors import RayExecutor, Task  # noqa: E402

# Ray workers cannot import this test module; ship its fake evaluator by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Sleepy:
    """A test evaluator (no model) whose evaluations take ``delay`` seconds. ``victim_dir``: the first evaluation
    of the run writes its pid and task there and sleeps, to be killed from outside."""

    victim_dir: str = ""
    delay: float = 0.0

    def __call__(self):
        return SleepyEvaluator(self)


class SleepyEvaluator:
    def __init__(self, spec: Sleepy):
        self.spec = spec

    def evaluate(self, cand):
        timesteps = cand.timesteps
        if self.spec.victim_dir:
            try:
                fd = os.open(os.path.join(self.spec.victim_dir, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                tmp = os.path.join(self.spec.victim_dir, "victim.tmp")
                with open(tmp, "w") as f:
                    json.dump({"pid": os.getpid(), "timesteps": list(timesteps)}, f)
                os.replace(tmp, os.path.join(self.spec.victim_dir, "victim.json"))
                time.sleep(300)  # killed by the test long before this ends
        time.sleep(self.spec.delay)
        return {"fid_proxy": (sum(timesteps) % 97) / 97}


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below ``root`` (from /proc)."""
    parent, cmd = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, frontier = {}, {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in out}
        out.update({p: cmd[p] for p in frontier})
    return out


def _address(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order, little-endian here)."""
    raw = bytes.fromhex(hexaddr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _listeners(pids: set[int]) -> list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(pid, address, port) of every listening TCP socket held by one of ``pids``."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in owner:  # 0A: LISTEN
                addr, port = f[1].split(":")
                out.append((owner[f[9]], _address(addr), int(port, 16)))
    return out


def _is_loopback(a) -> bool:
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_address_decoding():
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("00000000") == ipaddress.ip_address("0.0.0.0")
    mapped = _address("0000000000000000FFFF00000100007F")
    assert str(mapped) == "::ffff:7f00:1" and _is_loopback(mapped)
    assert not _is_loopback(_address("00000000000000000000000000000000"))  # [::]
    assert not _is_loopback(_address("0200000A"))  # 10.0.0.2


@pytest.fixture
def clean_ray_env(tmp_path):
    """No RAY_AUTH_* / RAY_ADDRESS from outside, HOME in a temp dir (so ~/.ray can be watched), Ray's cached auth
    state reloaded before and after."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    home = tmp_path / "home"
    home.mkdir()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
                mp.delenv(k, raising=False)
            mp.setenv("HOME", str(home))
            mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
            reset_auth_token_state()
            try:
                yield home
            finally:
                if ray.is_initialized():
                    ray.shutdown()
    finally:
        reset_auth_token_state()


@pytest.fixture
def short_tmp():
    """A short directory under /tmp: Ray's unix socket paths (inside its temp dir) are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _check_listeners(ex: RayExecutor) -> None:
    ray_procs = _descendants(os.getpid())
    found = _listeners({os.getpid(), *ray_procs})
    pids = {pid for pid, _a, _p in found}
    worker_pids = {int(n.split("@")[0].rsplit(":", 1)[1]) for n in ex.names}
    # the check sees the sockets: GCS, raylet, both workers and this driver listen
    assert worker_pids <= pids and os.getpid() in pids, (worker_pids, found)
    assert any("gcs_server" in ray_procs.get(p, "") for p in pids)
    assert any("raylet" in ray_procs.get(p, "") for p in pids)
    open_ = [(ray_procs.get(pid, "driver")[:60], str(a), port) for pid, a, port in found if not _is_loopback(a)]
    assert not open_, f"Ray sockets listening beyond loopback: {open_}"


def _check_token(short: Path) -> Path:
    """Token mode with a fresh token in <Ray temp>/auth/auth_token (0600, folder 0700), as the raylet sees it."""
    path = short / "auth" / "auth_token"
    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN_PATH") == str(path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    raylet = next(p for p, c in _descendants(os.getpid()).items() if c.split(" ")[0].endswith("/raylet"))
    env = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
    assert b"RAY_AUTH_MODE=token" in env and f"RAY_AUTH_TOKEN_PATH={path}".encode() in env
    return path


def _gcs_wants_the_token(gcs: str, token: str) -> None:
    """Token authentication is really on: the GCS answers a raw gRPC call only with the run's token (Ray sends it
    as ``authorization: Bearer <token>``); without one, or with another, it refuses."""
    import grpc

    with grpc.insecure_channel(gcs) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        for metadata in (None, [("authorization", "Bearer " + secrets.token_hex(32))]):
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(b"", timeout=10, metadata=[("authorization", "Bearer " + token)])  # the node table


def test_local_ray_on_loopback_survives_a_killed_worker_and_stops_when_its_node_dies(clean_ray_env, short_tmp,
                                                                                        tmp_path):
    home = clean_ray_env
    victim = tmp_path / "victim"
    victim.mkdir()
    ex = RayExecutor(Sleepy(victim_dir=str(victim), delay=1.0), workers=2, timeout_s=600, retries=1,
                     temp_dir=str(short_tmp))
    try:
        ex.wait_ready()
        _check_listeners(ex)
        token = _check_token(short_tmp).read_text()
        _gcs_wants_the_token(ray.get_runtime_context().gcs_address, token)

        # a worker SIGKILLed mid-evaluation (as the OOM killer would): its task is retried on a new actor at once,
        # not after timeout_s (600 s)
        killed = []

        def assassin():
            f = victim / "victim.json"
            for _ in range(600):
                if f.exists():
                    killed.append(json.loads(f.read_text())["pid"])
                    os.kill(killed[0], signal.SIGKILL)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=assassin, daemon=True)
        t.start()
        tasks = [Task(f"k{i}", Candidate((i, 0), ((8, 8),))) for i in range(4)]
        t0 = time.monotonic()
        out = [(task.key, o) for task, o in ex.map(tasks)]
        t.join(5)
        assert killed, "the first evaluation was never started"
        assert time.monotonic() - t0 < 30
        assert sorted(k for k, _o in out) == [t.key for t in tasks]  # every key exactly once
        assert all(o.status == "ok" for _k, o in out), [o.error for _k, o in out]
        v = json.loads((victim / "victim.json").read_text())
        hit = next(o for k, o in out if k == f"k{v['timesteps'][0]}")
        assert int(hit.worker.split("@")[0].rsplit(":", 1)[1]) != killed[0]  # evaluated again, elsewhere
        ex.wait_ready()
        _check_listeners(ex)  # the replacement worker listens on loopback too

        # the dashboard agent killed after two answers: the raylet exits with it and the node is marked dead; with
        # ten evaluations of 1 s left, the search stops within seconds with one line, having yielded (so logged)
        # each finished key once and nothing failed for the node's death
        tasks = [Task(f"n{i}", Candidate((i, 1), ((8, 8),))) for i in range(12)]
        got, killed_at = [], []
        with pytest.raises(TmpqError, match=r"the Ray node of this search .* died: no Ray worker can be reached") \
                as err:
            for task, o in ex.map(tasks):
                got.append((task.key, o))
                if len(got) == 2:
                    agent = [p for p, c in _descendants(os.getpid()).items() if c.startswith("ray::DashboardAgent")]
                    assert len(agent) == 1
                    os.kill(agent[0], signal.SIGKILL)
                    killed_at.append(time.monotonic())
        assert killed_at and time.monotonic() - killed_at[0] < 20, "the dead node was not noticed within seconds"
        assert "\n" not in str(err.value) and str(short_tmp) in str(err.value)  # one line, naming Ray's logs
        assert 2 <= len(got) < len(tasks) and len({k for k, _o in got}) == len(got)
        assert all(o.status == "ok" for _k, o in got), [o.error for _k, o in got]
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert not (home / ".ray").exists()  # Ray's default token file was never written
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_MODE" not in os.environ
