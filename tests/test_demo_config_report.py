"""results/demo-config (the main job's configuration before and after issue 18) rebuilds from its committed raw rows
alone: what a fresh clone has (rows.jsonl, budget.json, raw/*.jsonl.gz, raw/*.final.jsonl; the run directories are
git-ignored)."""
import shutil

from conftest import REPO


def test_demo_config_report_rebuilds_from_the_committed_rows(tmp_path, capsys):
    from benchmarks.common import RowLog
    from benchmarks.demo_config import part_report

    src = REPO / "results" / "demo-config"
    out = tmp_path / "demo-config"
    out.mkdir()
    for name in ("rows.jsonl", "budget.json", "FINDINGS.md"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    shutil.copytree(src / "raw", out / "raw")
    part_report(out, RowLog(out / "rows.jsonl", ("kind", "name")))
    assert (out / "README.md").read_text() == (src / "README.md").read_text()
    assert "| after-s0 |" in (out / "README.md").read_text()
