"""The solver as a gene (issue 21 item 2): a search over DDIM, DPM-Solver++ and Heun logs each candidate's solver,
costs Heun's extra calls, validates and exports a point with its solver, and the stock pipeline after apply_export
samples with that solver what tmpq samples from the export (or, for a sigma-space solver in a pipeline that cannot run
one, refuses in one line)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.export import export_candidate
from tmpq.jobs.search import run_search

SOLVERS = ["ddim", "dpm++-2", "heun"]


def test_a_search_with_a_solver_gene_validates_and_exports_its_solver(tiny_model_dir, tmp_path):
    from diffusers import DDPMPipeline

    import tmpq
    import tmpq.jobs.validate as fin
    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.core.solvers import RespacedDPMSolverScheduler, RespacedHeunScheduler
    from tmpq.deploy.bundle import load_export

    run = run_search(tiny_cfg(tiny_model_dir, solvers=SOLVERS, population=8, generations=2), tmp_path / "run",
                     progress=False)
    ev = pd.read_parquet(run.path / "evaluations.parquet")
    assert set(ev["status"]) == {"ok"} and set(ev["solver"]) == {"ddim", "dpm++", "heun"}
    space = json.loads((run.path / "search_space.json").read_text())
    assert space["solvers"] == [["ddim", 1], ["dpm++", 2], ["heun", 2]]
    # the cost model counts denoiser calls: a Heun candidate costs (2n - 1) / n of the same bits under DDIM
    by = {(r.solver, json.dumps([[int(v) for v in wa] for wa in r.bits]), len(r.timesteps)): r.bitops
          for r in ev.itertuples()}
    pairs = [(by[("heun", b, n)], by[("ddim", b, n)], n) for (s, b, n) in by if s == "heun" and ("ddim", b, n) in by]
    for heun, ddim, n in pairs:
        assert heun == pytest.approx(ddim * (2 * n - 1) / n)
    key = ev[ev["solver"] == "heun"]["key"].iloc[0]
    dpm_key = ev[ev["solver"] == "dpm++"]["key"].iloc[0]
    lines = [json.loads(x) for x in run.log_path.read_text().splitlines()]
    assert {x["key"]: x.get("solver", "ddim") for x in lines}[key] == "heun"
    assert sum("solver" not in x for x in lines) == (ev["solver"] == "ddim").sum()  # DDIM rows as before solvers

    # one solver for the whole run (no gene): every front point is Heun's, validated and exported with it
    run = run_search(tiny_cfg(tiny_model_dir, solvers=["heun"], population=4, generations=1), tmp_path / "heun",
                     progress=False)
    key = pd.read_parquet(run.path / "pareto.parquet")["key"].iloc[0]
    final = fin.validate_run(run.path, fin.ValidateConfig(keys=(key,), n=8, seeds=(1,), calib_per_step=2,
                                                           distill_iters=0, batch_size=8), progress=False)
    assert final["solver"].tolist() == ["heun"] and final["order"].tolist() == [2]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert (man["sampler"]["solver"], man["sampler"]["order"]) == ("heun", 2)
    ts = man["sampler"]["timesteps"]
    assert man["sampler"]["denoiser_calls"] == 2 * len(ts) - 1
    unet, sched, ts2, _ = load_export(tmp_path / "exp")
    assert isinstance(sched, RespacedHeunScheduler) and ts2 == ts
    assert sample_images(unet, sched, ts, 2, seed=0, progress=False).shape == (2, 1, 8, 8)

    # DDPMPipeline scales neither its noise nor its inputs: a sigma-space solver is refused in one line
    with pytest.raises(TmpqError, match="the export samples with heun \\(sigma space\\), but DDPMPipeline neither"):
        tmpq.apply_export(DDPMPipeline.from_pretrained(str(tmp_path / "exp")), tmp_path / "exp")

    # a DPM-Solver++ candidate of the gene run: the stock DDPMPipeline's call samples it as tmpq does
    export_candidate(tmp_path / "run", dpm_key, tmp_path / "dpm")
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(tmp_path / "dpm")), tmp_path / "dpm")
    assert isinstance(pipe.scheduler, RespacedDPMSolverScheduler) and pipe.scheduler.config.solver_order == 2
    img = pipe(batch_size=2, generator=noise_generators(2, 0), output_type="np").images
    unet, sched, ts, _ = load_export(tmp_path / "dpm")
    assert pipe.scheduler.timesteps.tolist() == ts == pipe.tmpq_timesteps
    ref = sample_images(unet, sched, ts, 2, seed=0, progress=False)
    out = torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2) * 2 - 1
    assert float((out - ref).abs().max()) < 1e-5


def test_solver_choices_are_checked_in_one_line():
    with pytest.raises(TmpqError, match="search.solvers: solver: unknown 'rk4'"):
        config_from_dict({"search": {"solvers": ["ddim", "rk4"]}})
    with pytest.raises(TmpqError, match="search.solvers: repeated solver"):
        config_from_dict({"search": {"solvers": ["dpm++", "dpm++-2"]}})
    with pytest.raises(TmpqError, match="search.solvers: solver order: heun takes order 2, got 3"):
        config_from_dict({"search": {"solvers": ["heun-3"]}})
