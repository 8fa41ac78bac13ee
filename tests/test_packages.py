"""One installed name: the card's folders quant/, supernet/, search/ and evaluators/ install as tmpq.quant, tmpq.supernet,
tmpq.search and tmpq.evaluators, and a wheel built from the repo works outside the checkout."""
import importlib
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = {"tmpq": "tmpq", "tmpq.core": "tmpq/core", "tmpq.jobs": "tmpq/jobs", "tmpq.deploy": "tmpq/deploy",
           "tmpq.quant": "quant", "tmpq.supernet": "supernet",
           "tmpq.search": "search", "tmpq.evaluators": "evaluators"}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_package_is_imported_from_this_repo(name):
    mod = importlib.import_module(name)
    path = Path(mod.__file__).resolve()
    assert path.parent == REPO / FOLDERS[name], f"{name} imported from {path}, not from {REPO}"


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert eps.get("tmpq") == "tmpq.cli:main"


SMOKE = """
import importlib, sys
for bare in ("quant", "supernet", "search", "evaluators"):
    try:
        importlib.import_module(bare)
    except ModuleNotFoundError:
        continue
    sys.exit(f"a bare top-level {bare!r} is importable")
import tmpq, tmpq.core.model as model, tmpq.search.space, tmpq.quant.functional, tmpq.supernet, tmpq.evaluators.classifier
assert "site-packages" in tmpq.__file__ and "site-packages" in tmpq.search.space.__file__, tmpq.__file__
m = model.load_model()
assert m.sample_shape == (1, 16, 16)
assert (tmpq.evaluators.classifier.CLASSIFIER_DIR / "model.safetensors").is_file()
from tmpq.core.schedules import make_timesteps
from tmpq.core.sampler import sample_images
imgs = sample_images(m.unet, tmpq.core.sampler.make_scheduler(m.scheduler_config), make_timesteps("uniform", 2), 2,
                     seed=0, progress=False)
assert imgs.shape == (2, 1, 16, 16)
from tmpq.jobs.config import presets_dir, preset_names
assert "site-packages" in str(presets_dir()) and {"demo", "tiny", "default"} <= set(preset_names()), presets_dir()
assert tmpq.RunConfig.preset("tiny").search.steps == 3
print("smoke ok")
"""


@pytest.mark.slow
def test_wheel_installs_one_name_and_runs_outside_the_checkout(tmp_path):
    # the working tree's files that git tracks or would (a build writes build/ and *.egg-info next to its sources:
    # never into the checkout)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    src = tmp_path / "src"
    for f in filter(None, files):
        rel = f.decode()
        if rel.startswith(("tests/", "results/", "benchmarks/")) or not (REPO / rel).is_file():
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((REPO / rel).read_bytes())
    wheels = tmp_path / "wheels"
    b = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-2000:]
    (wheel,) = wheels.glob("tmpq-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # the dependencies come from this venv's site-packages, as a plain path (its .pth files, the editable install's
    # import hook among them, are not run)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", SMOKE], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "smoke ok" in r.stdout, r.stderr[-2000:]
    # the main command outside the checkout, on the packaged presets: with no --config it reads the demo preset (a
    # refused override shows it was found), and the tiny job, cut to one generation of four, runs to its export
    tmpq = [str(py), "-m", "tmpq", "run", "--run-dir", "R", "--threads", "1"]
    r = subprocess.run(tmpq + ["--set", "search.population=1"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 2 and r.stderr == "tmpq: error: search.population: must be >= 2, got 1\n", r.stderr
    r = subprocess.run(tmpq + ["--config", "tiny", "--set", "search.population=4", "--set", "search.generations=1",
                               "--top-k", "1", "--validate-n", "8", "--seeds", "1"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "R" / "export" / "tmpq_export.json").is_file() and "export: R/export" in r.stdout
