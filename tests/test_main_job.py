"""tmpq run on a tiny model: every stage, resumable, and it tells where the report and export are."""
import json
import subprocess
import sys


def test_main_job_end_to_end_and_resume(tmp_path):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir

    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), tmp_path / "tiny-ddpm")
    cfg = (tmp_path / "c.toml")
    cfg.write_text(f'''[model]\npath = "{(tmp_path / "tiny-ddpm").as_posix()}"\n[supernet]\nw_bits = [8, 4]
a_bits = [8, 6]\n[calibration]\nsteps = 2\nper_step = 4\nsampler_steps = 4\nbatch_size = 8
[search]\nsteps = 3\npopulation = 6\ngenerations = 2\nbitops_budget = "none"\n[proxy]\nn_images = 4
teacher_steps = 6\n''')
    cmd = [sys.executable, "-m", "tmpq", "run", "--config", str(cfg), "--run-dir", str(tmp_path / "run"),
           "--top-k", "2", "--validate-n", "8", "--budget", "w8a8", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "report: " in r.stdout and "export: " in r.stdout
    summary = json.loads((tmp_path / "run" / "main_job.json").read_text())
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    assert (tmp_path / "run" / "export" / "tmpq_export.json").is_file()
    assert summary["best"]["key"] == json.loads((tmp_path / "run" / "export" / "tmpq_export.json").read_text())[
        "provenance"]["candidate"]
    n_eval = len((tmp_path / "run" / "evaluations.jsonl").read_text().splitlines())
    r2 = subprocess.run(cmd, capture_output=True, text=True)  # a rerun resumes: nothing new is evaluated
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert len((tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()) == n_eval
