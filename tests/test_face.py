"""The Python face: a cheap ``import tmpq`` naming every public name, presets and key overrides, the model handle (a
live pipeline, a directory, a ``DiffusionModel``) routed into the jobs, and the quick start from a ``DDPMPipeline``
object to the deployed pipeline."""
import json
import subprocess
import sys

import pytest
from diffusers import DDPMPipeline, DDPMScheduler

import tmpq
from conftest import REPO, run_cli, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.handle import weights_fingerprint
from tmpq.core.model import embedded_scheduler_config
from tmpq.jobs.config import load_config, parse_override, preset_names, resolve_config
from tmpq.supernet.store import read_supernet_file

SMALL = {"search.population": 4, "search.generations": 1}  # the tiny preset, one generation of four


def test_import_tmpq_is_cheap_and_lists_its_face():
    code = ("import json, sys, tmpq\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'pandas') if m in sys.modules)\n"
            "print(heavy); print(json.dumps(tmpq.__all__)); print(json.dumps(dir(tmpq)))\n"
            "import tmpq.search.space\n"
            "print(callable(tmpq.search), tmpq.search.space.__name__, tmpq.RunConfig.__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    heavy, names, listed, last = r.stdout.splitlines()
    assert heavy == "[]"  # import tmpq loads no torch, diffusers or pandas
    face = {"RunConfig", "DiffusionModel", "search", "validate", "export", "run", "apply_export", "load_run",
            "register_adapter", "DenoiserAdapter"}
    assert face <= set(json.loads(names)) <= set(json.loads(listed))
    assert last == "True tmpq.search.space tmpq.jobs.config"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tmpq.nope  # noqa: B018


def test_presets_by_name_and_validated_overrides(tmp_path):
    assert preset_names() == sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert {"default", "demo", "dit", "final", "solvers", "solvers-dp", "tiny"} <= set(preset_names())
    for name in preset_names():
        assert tmpq.RunConfig.preset(name) == load_config(REPO / "configs" / f"{name}.toml") == resolve_config(name)
    with pytest.raises(TmpqError, match="no preset 'nope' \\(presets: default, demo"):
        tmpq.RunConfig.preset("nope")
    cfg = tmpq.RunConfig.preset("tiny").with_(**{"search.population": 8, "supernet.w_bits": [8, 6],
                                                  "model.guidance_scale": 2})
    assert (cfg.search.population, cfg.supernet.w_bits, cfg.model.guidance_scale) == (8, (8, 6), 2.0)
    with pytest.raises(TmpqError, match="^search.populaton: unknown key"):
        cfg.with_(**{"search.populaton": 8})
    with pytest.raises(TmpqError, match="^search.population: must be >= 2, got 0"):
        cfg.with_(**{"search.population": 0})
    assert resolve_config({"search": {"steps": 4}}).search.steps == 4
    (tmp_path / "tiny").write_text("[search]\nsteps = 5\n")  # a file wins over a preset of its name
    assert resolve_config(tmp_path / "tiny").search.steps == 5
    assert [parse_override(t) for t in ("search.population=8", "search.engine=optuna", "supernet.a_bits=[8, 6]",
                                        "search.bitops_budget=1e9", "model.path=a/b")] == [
        ("search.population", 8), ("search.engine", "optuna"), ("supernet.a_bits", [8, 6]),
        ("search.bitops_budget", "1e9"), ("model.path", "a/b")]


@pytest.mark.slow  # the embedded 16x16 model: about 35 CPU-seconds
def test_quickstart_from_a_pipeline_object_to_the_deployed_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the quick start (README), with the tiny preset cut to one generation of four to keep the test short
    pipe = DDPMPipeline.from_pretrained(tmpq.DiffusionModel.embedded_dir())
    fp = weights_fingerprint(pipe.unet)
    run = tmpq.search(pipe, tmpq.RunConfig.preset("tiny").with_(**SMALL), "runs/quickstart", progress=False)
    export = tmpq.export(run, out="runs/quickstart-export")
    assert weights_fingerprint(pipe.unet) == fp and not hasattr(pipe.unet, "tmpq_supernet")  # the search copied it
    tmpq.apply_export(pipe, export)
    images = pipe(batch_size=2, output_type="np").images

    assert images.shape == (2, 16, 16, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # disk: the run and the export only
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["quickstart", "quickstart-export"]
    assert run.config["model"]["path"] == "embedded"  # the pipeline's directory, as a config names it
    manifest = json.loads((export / "tmpq_export.json").read_text())
    ok = run.evaluations[run.evaluations["status"] == "ok"]
    assert manifest["provenance"]["candidate"] == ok.sort_values("fid_proxy")["key"].iloc[0]  # budget none: best
    assert list(pipe.tmpq_timesteps) == manifest["sampler"]["timesteps"]
    assert hasattr(pipe.unet, "tmpq_supernet")


def test_a_live_pipeline_without_a_directory_is_served_fingerprinted_and_refused_when_changed(tmp_path):
    sched = DDPMScheduler(**embedded_scheduler_config())
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=sched)
    cfg = tmpq.RunConfig.preset("tiny").with_(**SMALL)
    run = tmpq.search(pipe, cfg, tmp_path / "run", progress=False)
    assert run.config["model"]["path"] == "live:UNet2DModel"
    meta, _ = read_supernet_file(run.path / "supernet.safetensors", tensors=False)
    assert meta["model_fingerprint"] == tmpq.DiffusionModel.from_pipeline(pipe).fingerprint
    n = len(run.evaluations)
    assert len(tmpq.search(pipe, cfg, run.path, progress=False).evaluations) == n  # resumed: nothing new

    other = DDPMPipeline(unet=tiny_unet(seed=1), scheduler=sched)
    with pytest.raises(TmpqError, match="refusing to resume"):
        tmpq.search(other, cfg, run.path, progress=False)
    with pytest.raises(TmpqError, match="live:UNet2DModel is a model that lived in the Python session"):
        tmpq.export(run)
    with pytest.raises(TmpqError, match="weights differ from those the run"):
        tmpq.export(run, model=other)
    out = tmpq.export(run, model=pipe, out=tmp_path / "exp")
    assert json.loads((out / "tmpq_export.json").read_text())["provenance"]["model"] == "live:UNet2DModel"
    assert tmpq.export(run, model=pipe, out=tmp_path / "exp") == out  # the same key's export is kept
    with pytest.raises(TmpqError, match="^executor.kind: Ray workers load the model"):
        tmpq.search(pipe, cfg.with_(**{"executor.kind": "ray"}), tmp_path / "ray", progress=False)
    assert not (tmp_path / "ray").exists()


def test_a_directory_a_handle_and_the_command_line_make_the_same_run(tmp_path, tiny_model_dir, capsys):
    code, out, err = run_cli(["search", "--config", "tiny", "--model", tiny_model_dir, "--set",
                              "search.population=4", "--set", "search.generations=1", "--threads", "1",
                              "--run-dir", tmp_path / "cli"], capsys)
    assert code == 0, err
    cfg = tmpq.RunConfig.preset("tiny").with_(**SMALL)
    by_path = tmpq.search(str(tiny_model_dir), cfg, tmp_path / "path", progress=False)
    by_handle = tmpq.search(tmpq.DiffusionModel.load(tiny_model_dir), cfg, tmp_path / "handle", progress=False)
    cli = tmpq.load_run(tmp_path / "cli")
    assert cli.config == by_path.config == by_handle.config  # fingerprint included
    assert cli.config["model"]["path"] == str(tiny_model_dir) and cli.config["search"]["population"] == 4
    proxies = [r.evaluations.set_index("key")["fid_proxy"].sort_index().tolist() for r in (cli, by_path, by_handle)]
    assert proxies[0] == proxies[1] == proxies[2]  # paired evaluations: bit-identical from memory and from disk

    code, out, err = run_cli(["search", "--config", "tiny", "--set", "search.populaton=3", "--run-dir",
                              tmp_path / "bad"], capsys)
    assert code == 2 and err.startswith("tmpq: error: search.populaton: unknown key") and len(err.splitlines()) == 1
    code, out, err = run_cli(["run", "--config", "nope", "--run-dir", tmp_path / "bad"], capsys)
    assert code == 2 and "nor a preset: default, demo" in err and not (tmp_path / "bad").exists()
