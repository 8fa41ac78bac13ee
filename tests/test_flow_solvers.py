"""Flow-matching solvers: each reproduces its stock diffusers scheduler on that scheduler's own spacing, installs
exactly the axis' sigmas for any integer schedule (diffusers' index -> sigma rule, dynamic shifting included), counts
its denoiser calls, lands on sigma 0, and serves a pinned schedule to stock pipelines' ``set_timesteps`` calls."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from tmpq.core.candidate import Solver
from tmpq.core.errors import TmpqError
from tmpq.core.flow_solvers import (
    FLOW_CLASSES,
    FLOW_SOLVERS,
    FlowEulerScheduler,
    make_flow_scheduler,
)
from tmpq.core.solvers import SOLVERS
from tmpq.core.timeaxis import TimeAxis

N = 1000
CASES = [(s, o) for s in FLOW_SOLVERS for o in SOLVERS[s]]
SCHEDULE = [999, 850, 600, 310, 120, 5]


def model_config(shift: float) -> dict:
    """A flow model's scheduler config, as SD3's ``scheduler_config.json`` reads."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": N, "shift": shift}


def stock_scheduler(solver: str, order: int, shift: float):
    """The stock diffusers scheduler of ``solver``, configured by hand (not through tmpq)."""
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    if solver == "heun":
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=N, shift=shift)
    flow = {"num_train_timesteps": N, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
            "flow_shift": shift, "solver_order": order, "lower_order_final": True, "final_sigmas_type": "zero"}
    if solver == "dpm++":
        return DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++", solver_type="midpoint")
    return UniPCMultistepScheduler(**flow, solver_type="bh2", predict_x0=True)


class Velocity:
    """A deterministic toy velocity model: a fixed random linear map of x plus a smooth function of the model time t
    (as diffusers' flow pipelines call it: sigma * N); counts its calls."""

    def __init__(self, dim: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g) * 0.3
        self.phase = torch.rand(dim, generator=g) * 6.0
        self.calls = 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).float()
        return x @ self.w.T + torch.sin(t / 137.0 + self.phase)


def noise(n: int = 3, dim: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def sample(s, model, x: torch.Tensor, model_time=None) -> torch.Tensor:
    """A flow pipeline's loop (unit noise in, no input scaling); ``model_time(i, t)``, if given, is what the model
    is called with instead of t."""
    for i, t in enumerate(s.timesteps):
        x = s.step(model(x, t if model_time is None else model_time(i, t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver,order", CASES)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_each_flow_solver_reproduces_its_stock_scheduler_on_its_own_spacing(solver, order, shift):
    ours = make_flow_scheduler(model_config(shift), solver, order)
    stock = stock_scheduler(solver, order, shift)
    assert (ours.order, ours.init_noise_sigma) == (stock.order, getattr(stock, "init_noise_sigma", 1.0))
    for n in (4, 8, 28):
        ours.set_timesteps(n)
        stock.set_timesteps(n)
        assert torch.equal(ours.timesteps, stock.timesteps) and torch.equal(ours.sigmas, stock.sigmas)
        out, ref = sample(ours, Velocity(), noise()), sample(stock, Velocity(), noise())
        assert float((out - ref).abs().max()) <= 1e-5, (solver, order, shift, n)


# stock spacings that fall on the integer grid (u = (t + 1) / N): the index schedule installs the same sigmas and
# samples the same. Euler / Heun shift their first-and-last linspace twice (off the grid unless shift = 1); DPM-Solver
# spaces u = 0.999 k / n (on the grid for n | 999, any shift); UniPC spaces u = 1 - 0.999 k / n (likewise).
ON_GRID = [("euler", 1, 1.0, 10), ("euler", 1, 1.0, 28), ("heun", 2, 1.0, 4), ("heun", 2, 1.0, 28)] + [
    (s, o, shift, n) for s in ("dpm++", "unipc") for o in SOLVERS[s] for shift in (1.0, 3.0) for n in (9, 27)]


@pytest.mark.parametrize("solver,order,shift,n", ON_GRID)
def test_an_index_schedule_on_a_stock_spacing_is_that_stock_spacing(solver, order, shift, n):
    stock = stock_scheduler(solver, order, shift)
    stock.set_timesteps(n)
    sig = stock.sigmas[:-1].double().numpy()
    ts = [int(round(u)) for u in (sig / (shift - (shift - 1) * sig) * N - 1).tolist()]
    ts = list(dict.fromkeys(ts))  # Heun visits its timesteps twice
    assert len(ts) == n
    ours = make_flow_scheduler(model_config(shift), solver, order)
    ours.set_timesteps(timesteps=ts)
    assert ours.schedule_timesteps() == ts
    assert float((ours.sigmas - stock.sigmas).abs().max()) <= 1e-6
    # the multistep schedulers store int64 (truncated) timesteps: the model is called with their exact sigma * N
    exact = None if solver in ("euler", "heun") else (lambda i, t: stock.sigmas[i].double() * N)
    out, ref = sample(ours, Velocity(), noise()), sample(stock, Velocity(), noise(), exact)
    assert float((out - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
def test_the_index_to_sigma_rule_is_diffusers_rule(shift):
    """Stock Euler given the unshifted sigmas u(t) = (t + 1) / N (it shifts them itself) samples what ours does."""
    ours = make_flow_scheduler(model_config(shift), "euler")
    ours.set_timesteps(timesteps=SCHEDULE)
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    stock.set_timesteps(sigmas=[(t + 1) / N for t in SCHEDULE])
    assert float((ours.sigmas - stock.sigmas).abs().max()) <= 1e-6
    assert float((ours.timesteps - stock.timesteps).abs().max()) <= 1e-3
    out, ref = sample(ours, Velocity(), noise()), sample(stock, Velocity(), noise())
    assert float((out - ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("kind,mu", [("exponential", 0.8), ("exponential", 1.15), ("linear", 2.5)])
def test_dynamic_shifting_is_the_static_shift_exp_mu_or_mu(kind, mu):
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, use_dynamic_shifting=True, time_shift_type=kind)
    stock.set_timesteps(sigmas=[(t + 1) / N for t in SCHEDULE], mu=mu)
    ours = make_flow_scheduler(model_config(math.exp(mu) if kind == "exponential" else mu), "euler")
    ours.set_timesteps(timesteps=SCHEDULE)
    assert float((ours.sigmas - stock.sigmas).abs().max()) <= 1e-6
    out, ref = sample(ours, Velocity(), noise()), sample(stock, Velocity(), noise())
    assert float((out - ref).abs().max()) <= 1e-6


def test_a_resolved_flux_config_samples_what_the_stock_scheduler_samples_at_the_pipelines_mu():
    flux = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": N, "shift": 3.0,
            "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
            "max_shift": 1.15}
    seq_len = 1024
    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)  # diffusers' calculate_shift, as FluxPipeline calls it
    stock = FlowMatchEulerDiscreteScheduler.from_config(flux)
    stock.set_timesteps(sigmas=[(t + 1) / N for t in SCHEDULE], mu=mu)
    ours = make_flow_scheduler(TimeAxis.resolved_config(flux, "model", image_seq_len=seq_len), "heun")
    ours.set_timesteps(timesteps=SCHEDULE)
    assert float((ours.sigmas.unique() - stock.sigmas.unique()).abs().max()) <= 1e-6


def reference(solver: str, model, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Euler / Heun on flow sigmas written out (the last Heun step is Euler: no model call at sigma 0)."""
    for s, s_next in zip(sigmas, sigmas[1:]):
        v = model(x, s * N)
        x_euler = x + (s_next - s) * v
        if solver == "heun" and s_next > 0:
            x = x + (s_next - s) * 0.5 * (v + model(x_euler, s_next * N))
        else:
            x = x_euler
    return x


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_euler_and_heun_are_the_methods_their_names_say(solver):
    axis = TimeAxis("flow", N, 3.0)
    sigmas = [axis.sigma(t) for t in SCHEDULE] + [0.0]
    ours = make_flow_scheduler(model_config(3.0), solver)
    ours.set_timesteps(timesteps=SCHEDULE)
    out = sample(ours, Velocity(), noise())
    ref = reference(solver, Velocity(), noise(), [float(np.float32(s)) for s in sigmas])
    assert float((out - ref).abs().max()) <= 1e-5
    other = reference("heun" if solver == "euler" else "euler", Velocity(), noise(), sigmas)
    assert float((out - other).abs().max()) > 1e-2  # the two methods differ on this model


@pytest.mark.parametrize("solver,order", CASES)
def test_each_flow_solver_counts_its_calls_installs_the_axis_sigmas_and_lands_on_sigma_0(solver, order):
    shift = 3.0
    axis = TimeAxis("flow", N, shift)
    s = make_flow_scheduler(model_config(shift), solver, order)
    s.set_timesteps(timesteps=SCHEDULE)
    assert s.schedule_timesteps() == SCHEDULE and s.num_inference_steps == len(SCHEDULE)
    assert s.timesteps.dtype == torch.float32 and float(s.sigmas[-1]) == 0.0
    sig = torch.tensor([axis.sigma(t) for t in SCHEDULE], dtype=torch.float32)
    if solver == "unipc":  # UniPC lowers a first sigma of 1 by 1e-6, as stock does (log(1 - sigma) stays finite)
        assert float(s.sigmas[0]) == float(np.float32(1 - 1e-6))
        sig[0] = float(s.sigmas[0])
    distinct = s.sigmas.unique_consecutive()
    assert torch.equal(distinct[:-1], sig)
    assert torch.equal(s.timesteps.unique_consecutive(), sig * N)  # the model time: sigma * N, float32
    # an exact velocity field (all data at x0: v = (x - x0) / sigma): every solver must land on x0 when its last step
    # reaches sigma 0 and the model is called with sigma * N at every step
    x0 = noise(seed=7)
    calls = {"n": 0}

    def exact(x, t):
        calls["n"] += 1
        return (x - x0) / (float(t) / N)

    out = sample(s, exact, noise())
    assert calls["n"] == Solver(solver, order).calls(len(SCHEDULE)) == (11 if solver == "heun" else 6)
    assert float((out - x0).abs().max()) <= 1e-4
    s.set_timesteps(timesteps=SCHEDULE)  # a new sampling run (the step index is the scheduler's state)
    assert bool(torch.isfinite(sample(s, Velocity(), noise())).all())


def test_unpinned_sigmas_calls_follow_the_flow_match_euler_rule():
    """``set_timesteps(sigmas=u)``, unpinned: stock for Euler and UniPC; Heun and DPM-Solver++ (whose stock
    ``set_timesteps`` takes no sigmas) shift them by the same rule, which is the index schedule's."""
    u = [(t + 1) / N for t in SCHEDULE]
    for solver in FLOW_SOLVERS:
        by_index = make_flow_scheduler(model_config(3.0), solver)
        by_index.set_timesteps(timesteps=SCHEDULE)
        by_sigmas = make_flow_scheduler(model_config(3.0), solver)
        by_sigmas.set_timesteps(sigmas=u, mu=1.1)  # mu is ignored under a static shift, as stock Euler ignores it
        assert float((by_index.sigmas - by_sigmas.sigmas).abs().max()) <= 1e-6, solver
        assert by_sigmas.schedule_timesteps() == SCHEDULE
    stock = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    stock.set_timesteps(sigmas=np.array(u))  # stock UniPC takes an array only (FluxPipeline passes one)
    ours = make_flow_scheduler(model_config(3.0), "unipc")
    ours.set_timesteps(sigmas=u)
    assert torch.equal(ours.sigmas, stock.sigmas) and torch.equal(ours.timesteps, stock.timesteps)


def test_a_pinned_schedule_serves_every_set_timesteps_call_of_a_stock_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    pinned = [999, 640, 300, 40]
    for solver in FLOW_SOLVERS:
        s = make_flow_scheduler(model_config(3.0), solver)
        s.pin_timesteps(pinned, default_steps=28)
        for n in (None, 4, 28):  # no count, the pinned count, the pipeline's default count
            s.set_timesteps(n)
            assert s.schedule_timesteps() == pinned, (solver, n)
        with pytest.raises(TmpqError, match="num_inference_steps=7: this scheduler samples the exported 4-step") as e:
            s.set_timesteps(7)
        assert "\n" not in str(e.value)
        # SD3: set_timesteps(n, device=...); Flux: set_timesteps(sigmas=linspace(1, 1 / n, n), mu=...)
        for n in (4, 28):
            ts, count = retrieve_timesteps(s, n, "cpu")
            assert s.schedule_timesteps() == pinned and count == n
            ts, count = retrieve_timesteps(s, None, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=0.9)
            assert s.schedule_timesteps() == pinned and count == len(ts) == Solver(solver).calls(4)
        with pytest.raises(TmpqError, match="num_inference_steps=12: this scheduler samples the exported 4-step"):
            retrieve_timesteps(s, None, "cpu", sigmas=np.linspace(1.0, 1 / 12, 12), mu=0.9)
        s.set_timesteps(timesteps=[900, 100])  # an explicit schedule is always obeyed
        assert s.schedule_timesteps() == [900, 100]
        s.pin_timesteps(None)  # unpinned: the stock spacing again
        s.set_timesteps(7)
        stock = stock_scheduler(solver, SOLVERS[solver][0], 3.0)
        stock.set_timesteps(7)
        assert torch.equal(s.timesteps, stock.timesteps)


def test_make_flow_scheduler_reads_either_flow_config_and_refuses_in_one_line():
    dpm_cfg = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": N, "use_flow_sigmas": True,
               "flow_shift": 5.0, "prediction_type": "flow_prediction", "solver_order": 2}
    for cfg, shift in ((model_config(3.0), 3.0), (dpm_cfg, 5.0)):
        for solver, order in CASES:
            s = make_flow_scheduler(cfg, solver, order)
            assert type(s) is FLOW_CLASSES[solver] and s.solver == solver
            assert s.time_axis == TimeAxis("flow", N, shift)
            if solver in ("dpm++", "unipc"):
                assert (s.config.solver_order, s.config.use_flow_sigmas, s.config.prediction_type) == (
                    order, True, "flow_prediction")
            x = noise()
            assert s.init_noise_sigma == 1.0 and s.scale_model_input(x, 500.0) is x
    refusals = [
        ((model_config(3.0), "ddim"), "solver: ddim is a DDPM solver; a flow model takes euler, heun, dpm\\+\\+ or "
                                      "unipc"),
        ((model_config(3.0), "rk4"), "solver: unknown 'rk4'"),
        ((model_config(3.0), "heun", 3), "solver order: heun takes order 2, got 3"),
        ((model_config(3.0), "dpm++", 4), "solver order: dpm\\+\\+ takes order 1 or 2 or 3, got 4"),
        (({**model_config(3.0), "use_dynamic_shifting": True}, "euler"), "use_dynamic_shifting = True; a flow"),
        (({**model_config(3.0), "shift_terminal": 0.1}, "euler"), "sets shift_terminal = 0.1"),
        (({"num_train_timesteps": N}, "euler"), "not a flow-matching scheduler config"),
        (({**model_config(3.0), "shift": -1.0}, "euler"), "shift must be a positive number"),
    ]
    for args, message in refusals:
        with pytest.raises(TmpqError, match=message) as e:
            make_flow_scheduler(*args)
        assert "\n" not in str(e.value)
    dynamic = FlowEulerScheduler(use_dynamic_shifting=True)
    with pytest.raises(TmpqError, match="dynamic shifting") as e:
        dynamic.set_timesteps(timesteps=SCHEDULE)  # an index schedule needs the static shift
    assert "\n" not in str(e.value)
    dynamic.set_timesteps(4, mu=0.8)  # unpinned: stock
    stock = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    stock.set_timesteps(4, mu=0.8)
    assert torch.equal(dynamic.sigmas, stock.sigmas)
    with pytest.raises(TmpqError, match="timesteps: must be strictly descending, got 100 then 300"):
        make_flow_scheduler(model_config(3.0), "unipc").set_timesteps(timesteps=[900, 100, 300])
