"""Solvers beyond DDIM (issue 21 item 1): each respaced solver reproduces its stock diffusers scheduler on that
scheduler's own spacing, runs any strictly descending schedule, and counts its denoiser calls."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_unet
from tmpq.core.candidate import Solver
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import NoiseBank, sample_images
from tmpq.core.solvers import (
    SOLVERS,
    STOCK,
    make_scheduler,
    solver_config,
)

# diffusers' Euler and Heun default to "linspace" spacing, whose timesteps are not integers: they are compared on
# their "trailing" spacing (integers; diffusers' advice for few steps); the others on their own default
SPACING = {"euler": {"timestep_spacing": "trailing"}, "heun": {"timestep_spacing": "trailing"}}
CASES = [(s, o) for s, orders in SOLVERS.items() for o in orders]


def stock_samples(unet, solver: str, order: int, n_steps: int, n: int = 3):
    """A diffusers pipeline's loop over the stock scheduler (its own spacing for ``n_steps``), from the bank's noise."""
    cfg = {**embedded_scheduler_config(), **solver_config(solver, order), **SPACING.get(solver, {})}
    stock = STOCK[solver].from_config(cfg)
    stock.set_timesteps(n_steps)
    x = NoiseBank(0, (1, 8, 8)).initial(range(n)) * stock.init_noise_sigma
    with torch.no_grad():
        for t in stock.timesteps:
            eps = unet(stock.scale_model_input(x, t), t).sample
            x = stock.step(eps, t, x).prev_sample
    distinct = list(dict.fromkeys(int(round(float(t))) for t in stock.timesteps))
    return x.clamp(-1, 1), distinct, cfg


@pytest.mark.parametrize("solver,order", CASES)
def test_each_solver_reproduces_its_stock_scheduler_on_its_own_spacing(solver, order):
    unet = tiny_unet()
    for n_steps in (4, 10):
        ref, ts, cfg = stock_samples(unet, solver, order, n_steps)
        sched = make_scheduler(cfg, solver, order)
        out = sample_images(unet, sched, ts, 3, seed=0, progress=False)
        assert float((out - ref).abs().max()) <= 1e-5, (solver, order, n_steps)
        assert sched.schedule_timesteps() == ts


@pytest.mark.parametrize("solver,order", CASES)
def test_each_solver_runs_any_schedule_and_counts_its_denoiser_calls(solver, order):
    unet = tiny_unet()
    calls = []
    hook = unet.register_forward_pre_hook(lambda mod, args: calls.append(1))
    ts = [964, 881, 717, 300, 20]
    sched = make_scheduler(embedded_scheduler_config(), solver, order)
    out = sample_images(unet, sched, ts, 2, batch_size=2, progress=False)
    hook.remove()
    assert out.shape == (2, 1, 8, 8) and bool(torch.isfinite(out).all())
    assert len(calls) == Solver(sched.solver).calls(len(ts)) == (9 if solver == "heun" else 5)
    assert sched.schedule_timesteps() == ts


def test_first_order_dpm_solver_plus_plus_is_ddim():
    """DPM-Solver++ of order 1 is DDIM (eta = 0) in another parameterisation: the same samples on a non-uniform
    schedule (without DDIM's x0 clipping, which DPM-Solver++ does not do)."""
    unet = tiny_unet()
    cfg = {**embedded_scheduler_config(), "clip_sample": False}
    ts = [964, 881, 717, 300, 20]
    ddim = sample_images(unet, make_scheduler(cfg, "ddim"), ts, 3, progress=False)
    dpm1 = sample_images(unet, make_scheduler(cfg, "dpm++", 1), ts, 3, progress=False)
    assert float((ddim - dpm1).abs().max()) < 1e-4
    dpm2 = sample_images(unet, make_scheduler(cfg, "dpm++", 2), ts, 3, progress=False)
    assert float((ddim - dpm2).abs().max()) > 1e-3  # the second order is another method


def test_solver_errors_are_one_line_and_a_pinned_schedule_serves_every_solver():
    with pytest.raises(TmpqError, match="solver: unknown 'rk4'; choose one of ddim, dpm\\+\\+, unipc, euler, heun"):
        make_scheduler(embedded_scheduler_config(), "rk4")
    with pytest.raises(TmpqError, match="solver order: heun takes order 2, got 3"):
        make_scheduler(embedded_scheduler_config(), "heun", 3)
    with pytest.raises(TmpqError, match="eta: only the ddim solver takes eta > 0"):
        sample_images(tiny_unet(), make_scheduler(embedded_scheduler_config(), "euler"), [900, 100], 1, eta=0.5,
                      progress=False)
    for solver in SOLVERS:
        s = make_scheduler(embedded_scheduler_config(), solver)
        s.pin_timesteps([964, 500, 20], default_steps=50)
        s.set_timesteps(50)  # a pipeline's default count: the pinned schedule
        assert s.schedule_timesteps() == [964, 500, 20]
        with pytest.raises(TmpqError, match="num_inference_steps=7: this scheduler samples the exported 3-step"):
            s.set_timesteps(7)


def test_tmpq_fid_and_sample_take_a_solver(tmp_path, tiny_model_dir, capsys):
    import json

    from tests.conftest import run_cli

    code, out, err = run_cli(["fid", "--model", tiny_model_dir, "--solver", "dpm++", "--order", "3", "--steps", "4",
                              "--schedule", "uniform", "--n", "8", "--extractor", "random", "--out",
                              tmp_path / "f.json"], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "f.json").read_text())["rows"][0]
    assert (row["solver"], row["order"], row["steps"]) == ("dpm++", 3, 4) and "dpm++-3" in out
    code, out, err = run_cli(["sample", "--model", tiny_model_dir, "--solver", "heun", "--steps", "3", "--n", "2",
                              "--out", tmp_path / "h.png"], capsys)
    assert code == 0 and (tmp_path / "h.png").is_file(), err
    code, out, err = run_cli(["sample", "--model", tiny_model_dir, "--solver", "rk4", "--out", tmp_path / "x.png"],
                             capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("tmpq: error: solver: unknown 'rk4'")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_matches_stock_on_a_custom_schedule_ending_at_t0(order):
    """DDIM's leading spacing ends at t = 0, where a multistep solver's last step (sigma(0) -> 0) overshoots: the
    respaced solver does what the stock scheduler does with the same ``timesteps=`` (clipped), not something else.
    (UniPC's stock scheduler takes no ``timesteps=``.)"""
    solver = "dpm++"
    unet = tiny_unet()
    ts = [800, 600, 400, 200, 0]
    cfg = {**embedded_scheduler_config(), **solver_config(solver, order)}
    stock = STOCK[solver].from_config(cfg)
    stock.set_timesteps(timesteps=ts)
    x = NoiseBank(0, (1, 8, 8)).initial(range(3)) * stock.init_noise_sigma
    with torch.no_grad():
        for t in stock.timesteps:
            x = stock.step(unet(stock.scale_model_input(x, t), t).sample, t, x).prev_sample
    out = sample_images(unet, make_scheduler(cfg, solver, order), ts, 3, seed=0, progress=False)
    assert float((out - x.clamp(-1, 1)).abs().max()) <= 1e-5
