"""One writer per run directory: a second writer (search --resume, validate, report, export or calibrate into the run)
is refused with one line naming the holder's pid while a search holds the run, also while it calibrates; the first
search finishes with every key logged once; kill -9 of the holder frees the run; of two creators of one run directory
exactly one wins; readers neither take the lock nor create its file; the main job keeps the lock between its stages;
an Optuna run's study (also in an external storage) is only ever opened by its run's writer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_search_kill import _config, _log

from conftest import REPO, run_cli
from tests.test_search_service import tiny_cfg
from tmpq.core import runlock
from tmpq.core.errors import TmpqError
from tmpq.search.rundir import RunDir

# a process that takes the run lock of argv[1] and reports: "locked" then sleeps (a holder to kill), or one line
# and exit 2 when another process holds it
HOLDER = """
import sys, time
from tmpq.core.errors import TmpqError
from tmpq.core.runlock import acquire
try:
    acquire(sys.argv[1], "probe")
except TmpqError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
print("locked", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


def _probe(run_dir) -> subprocess.CompletedProcess:
    """Another process trying to take the run lock (and giving it back at once)."""
    return subprocess.run([sys.executable, "-c", HOLDER, str(run_dir)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def _holder(run_dir, seconds=600) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def _run_dir(tmp_path, name="run", **search):
    """A run directory as a search creates it (no search needed: the lock is about the directory)."""
    return RunDir.create(tmp_path / name, tiny_cfg(tmp_path / "model", **search).to_dict(), {}, fingerprint="f").path


def _wait(cond, proc, err_file, what, limit=300):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"the search ended before {what}: " + err_file.read_text()[-2000:]
        assert time.monotonic() - t0 < limit, f"no {what} in {limit} s"
        time.sleep(0.02)


def _refused(result, holder_pid, *needles):
    """``run_cli``'s (exit status, stdout, stderr) of a writer refused by the run lock: one line naming the holder."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tmpq: error: "), err
    for needle in ("in use by another writer", f"pid {holder_pid}", *needles):
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_search_holds_the_run_and_kill9_frees_it(tiny_model_dir, tmp_path,
                                                                                      capsys):
    """A real search is frozen (SIGSTOP) while other writers (this process, through the CLI entry) try, so they meet
    it at a known point: calibrating, then between evaluations; unfrozen, it finishes alone, every key logged once.
    Then a holder killed with -9 leaves the run free for a resume."""
    import tmpq

    cfg = _config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    err_file = tmp_path / "search.stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tmpq", "search", "--config", str(cfg), "--run-dir",
                                 str(run_dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # 1. as soon as the run directory appears the search holds it: it calibrates next
        _wait(lambda: (run_dir / "config.resolved.json").is_file(), proc, err_file, "run directory")
        os.kill(proc.pid, signal.SIGSTOP)
        assert not (run_dir / "supernet.safetensors").exists(), "calibration finished: nothing tested while calibrating"
        lock_bytes = (run_dir / runlock.LOCK_NAME).read_bytes()
        record = json.loads(lock_bytes)
        assert record["pid"] == proc.pid and record["command"].startswith("tmpq search --config")
        _refused(run_cli(["search", "--resume", run_dir], capsys), proc.pid, "tmpq search", str(run_dir))
        _refused(run_cli(["report", run_dir, "--no-baselines"], capsys), proc.pid)
        code, out, _ = run_cli(["pareto", run_dir], capsys)  # readers work meanwhile
        assert code == 0 and "no successful evaluations yet" in out
        assert tmpq.load_run(run_dir).evaluations.empty and not runlock.held_here(run_dir)
        assert (run_dir / runlock.LOCK_NAME).read_bytes() == lock_bytes  # refused writers and readers left it as is
        os.kill(proc.pid, signal.SIGCONT)

        # 2. between evaluations: validate, an export into the run and a calibration into the run are refused too
        _wait(lambda: len(_log(run_dir)) >= 2, proc, err_file, "evaluation")
        os.kill(proc.pid, signal.SIGSTOP)
        key = json.loads(_log(run_dir)[0])["key"]
        _refused(run_cli(["validate", run_dir, "--candidate", key, "--n", "4", "--seeds", "1", "--calib-per-step",
                          "2"], capsys), proc.pid)
        _refused(run_cli(["export", run_dir, "--candidate", key, "--out", run_dir / "export"], capsys), proc.pid)
        _refused(run_cli(["calibrate", "--model", tiny_model_dir, "--out", run_dir / "again.safetensors"], capsys),
                 proc.pid)
        code, out, _ = run_cli(["status", run_dir], capsys)
        assert code == 0 and "evaluations" in out
        assert not (run_dir / "export").exists() and not (run_dir / "final").exists()
        assert not list(run_dir.glob("again*")) and not list(run_dir.glob("report"))
        assert proc.poll() is None  # every refusal above met the search holding the run
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(600) == 0, err_file.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(30)
    lines = _log(run_dir)
    logged = [json.loads(ln) for ln in lines]
    keys = [r["key"] for r in logged]
    assert len(keys) >= 12 and len(keys) == len(set(keys)), "a key was evaluated twice"
    assert {r["generation"] for r in logged} == {0, 1, 2}
    assert (run_dir / runlock.LOCK_NAME).read_bytes() == b""  # released: no holder named

    # 3. kill -9 of a holder: the kernel drops its lock; its record stays, stale and harmless
    holder = _holder(run_dir)
    try:
        _refused(run_cli(["search", "--resume", run_dir], capsys), holder.pid)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.kill()
    assert json.loads((run_dir / runlock.LOCK_NAME).read_text())["pid"] == holder.pid
    code, _, err = run_cli(["search", "--resume", run_dir], capsys)
    assert code == 0, err
    assert _log(run_dir) == lines  # everything served from the log


def test_two_concurrent_creators_one_wins_the_other_gets_one_line(tmp_path):
    """Real processes released at one instant, three times over: exactly one creates each run directory."""
    script = """
import sys, time
from pathlib import Path
from tmpq.core.errors import TmpqError
from tmpq.search.rundir import RunDir
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
try:
    RunDir.create(Path(sys.argv[2]), {"seed": 0}, {"format": "x"}, fingerprint=sys.argv[3])
except TmpqError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""
    for round_ in range(3):
        go, target = tmp_path / f"go{round_}", tmp_path / f"run{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(target), f"creator{i}"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both wait for the go
        go.touch()
        errs = [p.communicate(timeout=120)[1] for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 2], (codes, errs)
        loser = errs[codes.index(2)].strip().splitlines()
        assert len(loser) == 1 and "already exists and is not empty" in loser[0] and str(target) in loser[0]
        winner = f"creator{codes.index(0)}"
        assert json.loads((target / "config.resolved.json").read_text())["fingerprint"] == winner
        assert (target / "evaluations.jsonl").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_a_creator_that_loses_the_rename_gets_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """Deterministic: another creator publishes the run between this one's staging and its rename."""
    target = tmp_path / "run"
    real_rename = os.rename
    calls = []

    def rename_after_another_creator(src, dst):
        if not calls:
            calls.append(src)
            monkeypatch.setattr(os, "rename", real_rename)
            RunDir.create(target, {"seed": 1}, {}, fingerprint="other")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_after_another_creator)
    with pytest.raises(TmpqError, match="already exists and is not empty; use --resume") as err:
        RunDir.create(target, {"seed": 0}, {}, fingerprint="mine", writer="search")
    assert len(str(err.value).splitlines()) == 1
    assert json.loads((target / "config.resolved.json").read_text())["fingerprint"] == "other"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the loser's staging is gone
    assert _probe(target).returncode == 0  # and neither creator still holds the lock


def test_creating_over_an_empty_directory_or_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    run_ = RunDir.create(tmp_path / "empty", {}, {}, fingerprint="f")
    assert (run_.path / "config.resolved.json").is_file() and run_.lock is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(TmpqError, match="already exists and is not empty"):
        RunDir.create(tmp_path / "file", {}, {}, fingerprint="f")
    assert (tmp_path / "file").read_text() == "x"
    deep = RunDir.create(tmp_path / "a" / "b" / "run", {}, {}, fingerprint="f", writer="search")
    try:
        res = _probe(deep.path)
        assert res.returncode == 2 and f"pid {os.getpid()}" in res.stderr
    finally:
        deep.lock.release()
    assert _probe(deep.path).returncode == 0


def test_the_lock_is_reentrant_in_a_process_and_exclusive_across_processes(tmp_path):
    run_dir = _run_dir(tmp_path)
    outer = runlock.acquire(run_dir, "outer")
    inner = runlock.acquire(run_dir, "inner")  # the same process: no deadlock
    record = json.loads((run_dir / runlock.LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["job"] == "outer"
    inner.release()
    res = _probe(run_dir)
    assert res.returncode == 2 and f"pid {os.getpid()}" in res.stderr and len(res.stderr.splitlines()) == 1
    outer.release()
    outer.release()  # a second release of one count changes nothing
    assert (run_dir / runlock.LOCK_NAME).read_bytes() == b""
    assert _probe(run_dir).returncode == 0
    with pytest.raises(TmpqError, match="not a tmpq run directory"):
        runlock.acquire(tmp_path / "missing", "x")


def test_a_writer_in_this_process_is_refused_while_another_process_holds_the_run(tmp_path):
    run_dir = _run_dir(tmp_path)
    holder = _holder(run_dir)
    try:
        with pytest.raises(TmpqError, match=rf"in use by another writer: pid {holder.pid} \("):
            RunDir.reopen(run_dir, "f")
        with pytest.raises(TmpqError, match="already exists and is not empty"):
            RunDir.create(run_dir, {}, {}, fingerprint="f")  # exists: refused as before, no lock needed
        from tmpq.jobs.report import write_report

        with pytest.raises(TmpqError, match=f"pid {holder.pid}"):
            write_report(run_dir)
        assert not (run_dir / "report").exists()
    finally:
        holder.kill()
        holder.wait(30)
    assert RunDir.reopen(run_dir, "f").lock is None  # free again; released on return


def test_readers_never_create_the_lock_file(tmp_path, capsys):
    import tmpq

    run_dir = _run_dir(tmp_path)
    (run_dir / runlock.LOCK_NAME).unlink()
    before = sorted(p.name for p in run_dir.iterdir())
    r = tmpq.load_run(run_dir)
    assert r.evaluations.empty and r.pareto().empty
    assert run_cli(["pareto", run_dir], capsys)[0] == 0
    assert run_cli(["status", run_dir], capsys)[0] == 0
    assert not runlock.held_here(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_the_main_job_keeps_the_run_locked_between_its_stages(tmp_path, monkeypatch):
    """Its search stage gives its lock back, yet no other process can take the run before the job ends."""
    import tmpq.jobs.main as mj

    run_dir = tmp_path / "run"
    seen = []

    class Stop(Exception):
        pass

    def search_stage(cfg, path, resume=False, progress=True):
        run_ = RunDir.create(path, cfg.to_dict(), {}, fingerprint="f", writer="search")
        run_.lock.release()  # as run_search does when it returns
        return run_

    def next_stage(path):
        seen.append(_probe(path))
        raise Stop

    monkeypatch.setattr(mj, "run_search", search_stage)
    monkeypatch.setattr(mj, "load_run", next_stage)
    with pytest.raises(Stop):
        mj.main_job(tiny_cfg(tmp_path / "model"), run_dir, mj.MainJobConfig(budget="none"), progress=False)
    assert seen[0].returncode == 2 and f"pid {os.getpid()}" in seen[0].stderr
    assert _probe(run_dir).returncode == 0  # released when the job ended (here: failed)


def test_an_optuna_run_on_an_external_storage_is_opened_only_by_its_writer(tmp_path, capsys):
    """The study of a run is named in the run (optuna.json, unique per run), and only the run's writer opens it: a
    second writer is refused before it touches the storage; two runs sharing one storage get two studies."""
    from tmpq.search.engines import optuna_study_for_run

    url = f"sqlite:///{tmp_path / 'shared' / 'studies.db'}"
    (tmp_path / "shared").mkdir()
    run_dir = _run_dir(tmp_path, engine="optuna", storage=url)
    holder = _holder(run_dir)
    try:
        code, _, err = run_cli(["search", "--resume", run_dir], capsys)
    finally:
        holder.kill()
        holder.wait(30)
    assert code == 2 and f"in use by another writer: pid {holder.pid}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "shared" / "studies.db").exists() and not (run_dir / "optuna.json").exists()
    other = _run_dir(tmp_path, "other", engine="optuna", storage=url)
    (u1, s1), (u2, s2) = optuna_study_for_run(run_dir, url), optuna_study_for_run(other, url)
    assert u1 == u2 == url and s1 != s2
    assert optuna_study_for_run(run_dir, url) == (u1, s1)  # a resume finds its own study again
