"""The issue-5 benchmark script end to end on the tiny config (embedded model, 3 steps, N = 16): search, validation,
export, speed, the FP-on-the-same-schedule gap and the report, then a second invocation that reuses everything."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_final_benchmark_runs_and_resumes_on_the_tiny_config(tmp_path):
    out = tmp_path / "final"
    cmd = [sys.executable, "-m", "benchmarks.final", "--config", "configs/tiny.toml", "--out", str(out), "--n", "16",
           "--seeds", "1", "--top-k", "1", "--spread", "1", "--speed-n", "8", "--speed-fid-n", "0",
           "--budget-frac", "1.0"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    report = (out / "README.md").read_text()
    assert "Best point under the budget" in report and "Where the gap comes from" in report
    gap = json.loads((out / "fp_schedule.json").read_text())
    assert gap["n"] == 16 and gap["fid"] > 0 and len(gap["timesteps"]) == 3
    speed = json.loads((out / "speed.json").read_text())
    assert speed["steps"] == 3 and speed["fp_100_uniform_s"] > 0
    assert (out / "validated.png").stat().st_size > 0
    n_evals = len((out / "run" / "evaluations.jsonl").read_text().splitlines())
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert len((out / "run" / "evaluations.jsonl").read_text().splitlines()) == n_evals  # nothing searched again
    assert "validate point" not in second.stdout  # validation rows reused
    report = (out / "README.md").read_text()

    # a fresh clone has no run directory (git-ignored): the report rebuilds from the kept copies alone, sampling nothing
    (out / "run").rename(tmp_path / "run-away")
    (out / "README.md").unlink()
    third = subprocess.run(cmd + ["--report-only"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-2000:]
    assert (out / "README.md").read_text() == report
    assert "validate point" not in third.stdout and not (out / "run").exists()

    # a kept copy missing: one line naming it, non-zero exit, the report left as it was
    (out / "raw" / "final-rows.jsonl.gz").unlink()
    fourth = subprocess.run(cmd + ["--report-only"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert fourth.returncode != 0 and "final-rows.jsonl.gz" in fourth.stderr.strip().splitlines()[-1]
    assert (out / "README.md").read_text() == report
