"""tmpq status RUN: where a search stands, read without changing a byte."""
from __future__ import annotations

import hashlib
import json

from tests.conftest import run_cli
from tests.test_search_service import tiny_cfg
from tmpq.jobs.run import load_run, run_status
from tmpq.jobs.search import run_search


def _digests(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_status_reports_generations_failures_and_best_points_read_only(tiny_model_dir, tmp_path, capsys):
    run = run_search(tiny_cfg(tiny_model_dir, generations=2), tmp_path / "run", progress=False)
    before = _digests(run.path)
    st = run_status(load_run(run.path))
    assert st["state"] == "finished" and st["generations_logged"] == st["generations"] == 2
    assert [g["generation"] for g in st["per_generation"]] == [0, 1] and st["failed"] == 0
    assert sum(g["evaluations"] for g in st["per_generation"]) == st["evaluations"]
    assert st["per_generation"][1]["best_proxy"] <= st["per_generation"][0]["best_proxy"]
    assert st["best"] and st["best"][0]["fid_proxy"] == min(b["fid_proxy"] for b in st["best"])
    # every row logs its worker's peak resident memory: at least the model and torch, at most the machine
    with open("/proc/meminfo") as f:
        total_mib = int(f.readline().split()[1]) / 1024
    assert all(100 < g["peak_mib"] < total_mib for g in st["per_generation"])
    code, out, _ = run_cli(["status", run.path, "--json"], capsys)
    assert code == 0 and json.loads(out)["evaluations"] == st["evaluations"]
    code, out, _ = run_cli(["status", run.path], capsys)
    assert code == 0 and "generation 2/2 logged" in out and "best points" in out
    assert f"worker peak memory {st['per_generation'][1]['peak_mib']:.0f} MiB" in out
    assert _digests(run.path) == before
    code, _, err = run_cli(["status", tmp_path / "nope"], capsys)
    assert code == 2 and err.strip().startswith("tmpq: error:")


def test_status_covers_every_stage_and_answers_without_torch(tiny_model_dir, tmp_path, capsys):
    import shutil
    import subprocess
    import sys

    from tests.conftest import tiny_unet
    from tmpq.supernet import QuantSupernet

    run = run_search(tiny_cfg(tiny_model_dir, generations=1), tmp_path / "run", progress=False).path
    before = _digests(run)
    code, out, _ = run_cli(["status", run], capsys)
    assert code == 0 and "calibration: calibrated (supernet.safetensors)" in out
    assert "validation: none yet" in out and "exports: none yet" in out and "generation 1/1 logged" in out
    # the CLI answers from the run files alone: neither torch nor diffusers is imported (seconds saved)
    probe = ("import sys; from tmpq.cli import main; code = main(['status', sys.argv[1], '--json']); "
             "assert code == 0, code; heavy = {'torch', 'diffusers'} & set(sys.modules); "
             "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["calibration"] == {"state": "calibrated", "file": "supernet.safetensors"}
    assert _digests(run) == before

    # a calibration stopped after its first activation-bit option: the checkpoint calibration writes
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    (stopped / "supernet.safetensors").unlink()
    net = QuantSupernet.from_file(tiny_unet(), run / "supernet.safetensors")
    net.save(stopped / "supernet.partial.safetensors",
             progress={"mode": "per-option", "done_a_bits": [8], "complete": False})
    st = run_status(stopped)
    assert st["calibration"] == {"state": "calibrating", "file": "supernet.partial.safetensors", "a_bits": [8, 6],
                                 "a_bits_done": [8], "groups_done": 0}
    code, out, _ = run_cli(["status", stopped], capsys)
    assert code == 0 and "calibrating (1/2 activation-bit options done" in out
    (stopped / "supernet.partial.safetensors").unlink()
    assert run_status(stopped)["calibration"]["state"] == "not started"
    (stopped / "supernet.safetensors").write_bytes(b"\x08\x00")  # truncated
    code, _, err = run_cli(["status", stopped], capsys)
    assert code == 2 and "supernet.safetensors" in err and len(err.strip().splitlines()) == 1
