"""tmpq report: the HTML page renders in headless Chromium and every image on it loads."""
import re
import shutil
import subprocess
import sys

import pytest

from tests.test_search_service import tiny_cfg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("report")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    # with a step-count gene: the report's baselines cover every step choice
    run = run_search(tiny_cfg(root / "tiny-ddpm", generations=1, step_choices=[2, 3]), root / "run",
                     progress=False).path
    r = subprocess.run([sys.executable, "-m", "tmpq", "report", str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return run


def test_report_files(reported):
    from tmpq.jobs.run import load_run

    out = reported / "report"
    page = (out / "report.html").read_text()
    front = load_run(reported).pareto()
    for k in front["key"]:
        assert f"grid_{k}.png" in page and (out / f"grid_{k}.png").is_file()
    assert (out / "pareto.png").is_file() and (out / "grid_fp.png").is_file() and (out / "baselines.json").is_file()
    import json

    names = [b["name"] for b in json.loads((out / "baselines.json").read_text())]
    assert {n.split()[-1] for n in names} == {"2", "3"} and "2/3 steps" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(not s.startswith("/") for s in srcs)  # relative: the folder can be moved or served


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make setup installs it)")
def test_report_renders_in_headless_chromium_with_all_images(reported, tmp_path):
    page = reported / "report" / "report.html"
    n_imgs = page.read_text().count("<img ")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    m = re.search(r'data-images="(\d+)/(\d+)"', r.stdout)
    assert m, "the page's load handler did not run"
    assert int(m.group(2)) == n_imgs and int(m.group(1)) == n_imgs  # every image decoded
