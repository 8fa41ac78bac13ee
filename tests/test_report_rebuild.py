"""A benchmark report rebuilds from a fresh clone: the run directories are git-ignored, so each finished run's
evaluation log is also kept as a committed ``OUT/raw/NAME.jsonl.gz`` and ``--part report`` reads it when the run
is not here."""
import shutil
from types import SimpleNamespace

import pytest

from tests.test_search_service import tiny_cfg


@pytest.mark.slow
def test_search_report_rebuilds_identically_from_the_raw_logs_alone(tiny_model_dir, tmp_path):
    import benchmarks.search as bs
    from benchmarks.common import RowLog, keep_raw, run_evaluations
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search

    out = tmp_path / "bench"
    log = RowLog(out / "rows.jsonl", ("kind", "name"))
    for name, seed in (("pymoo-s0", 1), ("random-s0", 2)):
        engine = name.split("-")[0]
        run = run_search(tiny_cfg(tiny_model_dir, engine=engine, seed=seed), out / "runs" / name, progress=False)
        keep_raw(run.path)
        log.append({"kind": "search", "name": name})
    ev = load_run(out / "runs" / "pymoo-s0").evaluations
    fp = [(r["fid_proxy"], r["bitops"]) for _, r in ev[ev["status"] == "ok"].iterrows()]
    for w, a in ((8, 8), (4, 6)):  # two baselines, in the region the runs span
        log.append({"kind": "baseline", "name": f"W{w}A{a} uniform 3", "schedule": "uniform",
                    "fid_proxy": max(p for p, _ in fp), "gbitops": max(b for _, b in fp) / 1e9})
    args = SimpleNamespace(out=str(out), step_choices=[3], steps=3, grouping="uniform", time_groups=1, proxy="fid",
                           proxy_n=4, seeds=1, seed=0, cmd_doc="python -m benchmarks.search --part report")
    bs.write_report(args, RowLog(out / "rows.jsonl", ("kind", "name")))
    with_runs = (out / "README.md").read_text()
    assert "| pymoo-s0 |" in with_runs and "| random-s0 |" in with_runs

    shutil.rmtree(out / "runs")  # what a fresh clone has: rows.jsonl and raw/*.jsonl.gz
    (out / "README.md").unlink()
    assert run_evaluations(out / "runs" / "pymoo-s0")["key"].tolist() == ev["key"].tolist()
    bs.write_report(args, RowLog(out / "rows.jsonl", ("kind", "name")))
    assert (out / "README.md").read_text() == with_runs
    # the raw log is deterministic: the same run gives the same committed bytes
    raw = (out / "raw" / "pymoo-s0.jsonl.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
