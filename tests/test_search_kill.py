"""kill -9 of the search driver, then --resume, for every engine that resumes by replaying its log (pymoo, paper-ea,
random): no evaluation lost or repeated, and the same log and front as a run that was never interrupted. Also:
resuming with a changed config is refused with one line (through the CLI)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from test_cli import assert_clean_error, run

from conftest import REPO


def _config(tmp_path, model_dir, name="tiny.toml", **search):
    text = (REPO / "configs" / "tiny.toml").read_text().replace("generations = 2", "generations = 3")
    for k, v in search.items():
        line = f"{k} = {json.dumps(v)}\n"
        text, n = re.subn(rf"^{k} = .*\n", line, text, flags=re.M)
        if not n:
            text = text.replace("[search]\n", f"[search]\n{line}")
    cfg = tmp_path / name
    cfg.write_text(f'[model]\npath = "{model_dir}"\n\n' + text)
    return cfg


def _log(run_dir):
    """The complete lines of the log (a line torn by the kill has no newline yet)."""
    p = run_dir / "evaluations.jsonl"
    return p.read_text().split("\n")[:-1] if p.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pymoo", "paper-ea", "random"])
def test_kill9_then_resume_loses_and_repeats_nothing(engine, tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, engine=engine)
    assert f'engine = "{engine}"' in cfg.read_text()
    killed_dir = tmp_path / "killed"
    err = open(tmp_path / "killed.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tmpq", "search", "--config", str(cfg), "--run-dir",
                             str(killed_dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        t0 = time.monotonic()
        while len(_log(killed_dir)) < 8:  # into generation 2 of 3 (6 candidates a generation)
            assert proc.poll() is None, (tmp_path / "killed.stderr").read_text()[-2000:]
            assert time.monotonic() - t0 < 300, "no evaluation logged in 5 minutes"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        err.close()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _log(killed_dir)
    # the kill may also land inside a write: simulate that torn tail, which resume must drop (and re-evaluate)
    with open(killed_dir / "evaluations.jsonl", "a") as f:
        f.write(at_kill[-1][: len(at_kill[-1]) // 2])

    res = run("search", "--resume", str(killed_dir))
    assert res.returncode == 0, res.stderr
    res = run("search", "--config", str(cfg), "--run-dir", str(tmp_path / "whole"))
    assert res.returncode == 0, res.stderr

    resumed = [json.loads(ln) for ln in _log(killed_dir)]
    whole = [json.loads(ln) for ln in _log(tmp_path / "whole")]
    assert {r["origin"] for r in resumed} == {r["origin"] for r in whole} == {engine}
    assert len(at_kill) < len(whole), "the driver finished before it was killed; nothing was tested"
    assert {json.loads(ln)["generation"] for ln in at_kill} == {0, 1}  # resume replays generation 1 from the log
    keys = [r["key"] for r in resumed]
    assert len(keys) == len(set(keys)), "an evaluation was repeated"
    assert [json.loads(ln)["key"] for ln in at_kill] == keys[: len(at_kill)], "a logged evaluation was lost"
    assert set(keys) == {r["key"] for r in whole}
    by_key = {r["key"]: r for r in whole}
    for r in resumed:
        a = {k: v for k, v in r["objectives"].items() if k != "eval_s"}
        b = {k: v for k, v in by_key[r["key"]]["objectives"].items() if k != "eval_s"}
        assert a == b and r["generation"] == by_key[r["key"]]["generation"], r["key"]
    assert [r["key"] for r in resumed] == [r["key"] for r in whole]  # the same candidates, in the same order
    cols = ["key", "fid_proxy", "bitops"]
    pd.testing.assert_frame_equal(pd.read_parquet(killed_dir / "pareto.parquet")[cols],
                                  pd.read_parquet(tmp_path / "whole" / "pareto.parquet")[cols])
    if engine != "pymoo":
        return
    # not in tests/test_cli_search.py (tests/test_search_service.py checks the API): the CLI refuses, one line
    changed = _config(tmp_path, tiny_model_dir, name="changed.toml", seed=7)
    assert_clean_error(run("search", "--resume", str(killed_dir), "--config", str(changed)),
                       "refusing to resume", str(killed_dir))
    assert [json.loads(ln)["key"] for ln in _log(killed_dir)] == keys  # untouched
