"""tmpq status RUN: where a search stands, read without changing a byte."""
from __future__ import annotations

import hashlib
import json

from tests.conftest import run_cli
from tests.test_search_service import tiny_cfg
from tmpq.jobs.run import load_run, run_status
from tmpq.jobs.search import run_search


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_status_reports_generations_failures_and_best_points_read_only(tiny_model_dir, tmp_path, capsys):
    run = run_search(tiny_cfg(tiny_model_dir, generations=2), tmp_path / "run", progress=False)
    before = _digests(run.path)
    st = run_status(load_run(run.path))
    assert st["state"] == "finished" and st["generations_logged"] == st["generations"] == 2
    assert [g["generation"] for g in st["per_generation"]] == [0, 1] and st["failed"] == 0
    assert sum(g["evaluations"] for g in st["per_generation"]) == st["evaluations"]
    assert st["per_generation"][1]["best_proxy"] <= st["per_generation"][0]["best_proxy"]
    assert st["best"] and st["best"][0]["fid_proxy"] == min(b["fid_proxy"] for b in st["best"])
    code, out, _ = run_cli(["status", run.path, "--json"], capsys)
    assert code == 0 and json.loads(out)["evaluations"] == st["evaluations"]
    code, out, _ = run_cli(["status", run.path], capsys)
    assert code == 0 and "generation 2/2 logged" in out and "best points" in out
    assert _digests(run.path) == before
    code, _, err = run_cli(["status", tmp_path / "nope"], capsys)
    assert code == 2 and err.strip().startswith("tmpq: error:")
