"""A flow-matching model (a UNet2DModel whose scheduler is FlowMatchEulerDiscreteScheduler, the layout stock
diffusers samples with DDPMPipeline) through the whole service: tmpq's sampler equals the stock pipeline's, and
calibrate -> search -> validate -> export -> the stock pipeline + apply_export samples the searched schedule with
tmpq's images."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError

SHIFT = 3.0


def flow_model_dir(root, shift: float = SHIFT):
    """A tiny seeded UNet2DModel saved as a DDPMPipeline directory whose scheduler is flow matching."""
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir

    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root)
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(str(root / "scheduler"))
    index = json.loads((root / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return flow_model_dir(tmp_path_factory.mktemp("flow") / "m")


def test_the_flow_axis_is_read_and_the_sampler_equals_the_stock_pipeline(flow_dir):
    """tmpq samples the flow model as stock DDPMPipeline + FlowMatchEulerDiscreteScheduler does on the same sigmas
    (noise from noise_generators): velocity steps in sigma, the model called at sigma * N."""
    from tmpq.core.adapters import time_axis_of
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler, noise_generators, sample_images
    from tmpq.core.timeaxis import TimeAxis

    m = load_model(str(flow_dir))
    assert m.time_axis == TimeAxis("flow", 1000, SHIFT) and time_axis_of(m.unet) == m.time_axis
    ts = [999, 700, 420, 150, 10]
    ours = sample_images(m.unet, make_scheduler(m.scheduler_config), ts, 4, seed=5, batch_size=4, progress=False)
    stock = FlowMatchEulerDiscreteScheduler.from_pretrained(str(flow_dir / "scheduler"))
    seen = []
    pipe = DDPMPipeline(unet=m.unet, scheduler=stock)
    pipe.set_progress_bar_config(disable=True)
    hook = m.unet.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1].reshape(-1)[0])))
    # stock, told the same (unshifted) times: it shifts them itself
    stock.set_timesteps(sigmas=[(t + 1) / 1000 for t in ts])
    stock.set_timesteps = lambda *a, **k: None  # DDPMPipeline's set_timesteps(1000) would reset it
    got = pipe(batch_size=4, generator=noise_generators(4, seed=5), output_type="np").images
    hook.remove()
    want = [m.time_axis.model_time(t) for t in ts]
    assert np.allclose(seen, want, atol=1e-3)
    assert np.abs(got - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() <= 1e-5
    # DDIM on the flow path is Euler's step: the default solver samples the same images
    euler = sample_images(m.unet, make_scheduler(m.scheduler_config, "euler"), ts, 4, seed=5, batch_size=4,
                          progress=False)
    assert torch.equal(euler, ours)
    with pytest.raises(TmpqError, match="eta: only the ddim solver"):
        sample_images(m.unet, make_scheduler(m.scheduler_config), ts, 2, eta=0.5, progress=False)


@pytest.fixture(scope="module")
def flow_run(flow_dir, tmp_path_factory):
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("flowrun")
    cfg = tiny_cfg(flow_dir, generations=1, solvers=["ddim", "heun", "dpm++"])
    return run_search(cfg, root / "run", progress=False)


def test_a_flow_model_searches_validates_and_exports_to_the_stock_pipeline(flow_run, tmp_path):
    """The search runs on the flow axis (integer timesteps, the model called at sigma * N, the supernet's time
    groups routed on the grid), and its export samples in DDPMPipeline + apply_export exactly as tmpq does."""
    import tmpq
    from tmpq.core.candidate import Candidate
    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.validate import ValidateConfig, validate_run

    run = load_run(flow_run.path)
    ev = run.evaluations
    assert set(ev["status"]) == {"ok"} and len(ev) >= 4
    assert set(ev["solver"]) >= {"ddim", "heun"}
    front = run.pareto()
    key = front["key"].iloc[0]
    cand = run.candidate(key)
    # validation re-calibrates the point along its own flow schedule (capture, routing and FID on the flow axis)
    final = validate_run(run.path, ValidateConfig(keys=(key,), n=4, seeds=(1,), calib_per_step=2, batch_size=4),
                         progress=False)
    assert final["key"].tolist() == [key] and np.isfinite(final["fid_mean"]).all()
    man = export_candidate(run.path, key, tmp_path / "exp", command="test")
    assert man["provenance"]["quantizers"].startswith("validated")
    assert man["sampler"]["time_axis"] == {"kind": "flow", "num_train_timesteps": 1000, "shift": SHIFT}
    assert man["sampler"]["solver"] in ("euler", "heun", "dpm++") and "Flow" in man["sampler"]["class"]
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    assert ts == list(cand.timesteps)
    ref = sample_images(unet, sched, ts, 4, seed=3, batch_size=4, progress=False)
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(tmp_path / "exp")), tmp_path / "exp")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(float(args[1].reshape(-1)[0])))
    got = pipe(batch_size=4, generator=noise_generators(4, seed=3), output_type="np").images
    assert len(calls) == Candidate(cand.timesteps, cand.bits, cand.solver).calls
    assert np.abs(got - (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() <= 1e-5


def test_flow_refusals_are_one_line(flow_dir, tmp_path):
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.jobs.search import run_search

    m = load_model(str(flow_dir))
    with pytest.raises(TmpqError, match="solver: dpm is|solver: unknown"):
        make_scheduler(m.scheduler_config, "dpm")
    with pytest.raises(TmpqError, match="search.grouping: sensitivity profiles the DDPM noise schedule"):
        run_search(tiny_cfg(flow_dir, grouping="sensitivity"), tmp_path / "r", progress=False)
