
import pandas as pd
import pytest

from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError
from tmpq.search.rundir import EvalResult, RunDir, pareto_frame, results_frame


def res(i, proxy, bitops, status="ok"):
    return EvalResult(key=f"k{i}", status=status, candidate=Candidate((800, 50, 0), ((8, 8), (6, 6))),
                      objectives={"fid_proxy": proxy, "bitops": bitops} if status == "ok" else {},
                      proxy={"name": "paired-mse", "version": 1}, n_images=64, seed=0, generation=i // 2,
                      origin="test", error="" if status == "ok" else "worker died")


def test_eval_result_json_round_trip():
    r = res(1, 0.5, 10.0)
    assert EvalResult.from_json(r.to_json()) == r
    with pytest.raises(TmpqError, match="status"):
        EvalResult(key="x", status="weird", candidate=Candidate((1,), ()))


def test_log_append_replay_and_torn_line(tmp_path):
    run = RunDir.create(tmp_path / "run", {"seed": 0}, {"format": "tmpq.search-space"}, fingerprint="f1")
    for i in range(3):
        run.append(res(i, 1.0 / (i + 1), 10.0 * (i + 1)))
    with open(run.log_path, "a") as f:
        f.write('{"key": "k3", "status": "o')  # a crash mid-write
    back = RunDir.reopen(tmp_path / "run", "f1").replay()
    assert [r.key for r in back] == ["k0", "k1", "k2"]
    run.append(res(4, 0.1, 100.0))  # the torn tail was cut, so the log stays parseable
    assert [r.key for r in run.replay()] == ["k0", "k1", "k2", "k4"]


def test_resume_refuses_changed_fingerprint_and_existing_dir(tmp_path):
    RunDir.create(tmp_path / "run", {"seed": 0}, {}, fingerprint="f1")
    with pytest.raises(TmpqError, match="fingerprint"):
        RunDir.reopen(tmp_path / "run", "f2")
    with pytest.raises(TmpqError, match="already exists"):
        RunDir.create(tmp_path / "run", {"seed": 0}, {}, fingerprint="f1")
    with pytest.raises(TmpqError, match="not a tmpq run directory"):
        RunDir.reopen(tmp_path, "f1")


def test_compaction_and_pareto(tmp_path):
    run = RunDir.create(tmp_path / "run", {}, {}, fingerprint="f")
    for r in [res(0, 1.0, 1.0), res(1, 0.5, 2.0), res(2, 0.7, 3.0), res(3, 0, 0, status="failed"), res(1, 0.5, 2.0)]:
        run.append(r)
    run.compact()
    ev = pd.read_parquet(tmp_path / "run" / "evaluations.parquet")
    assert len(ev) == 5 and list(ev.loc[0, "timesteps"]) == [800, 50, 0]
    front = pd.read_parquet(tmp_path / "run" / "pareto.parquet")
    assert sorted(front["key"]) == ["k0", "k1"]
    assert (tmp_path / "run" / "pareto.csv").read_text().startswith("key,")
    assert not list((tmp_path / "run").glob("*.tmp"))
    failed = ev[ev.status == "failed"].iloc[0]
    assert failed["error"] == "worker died"


def test_empty_frames():
    assert pareto_frame(results_frame([])).empty
