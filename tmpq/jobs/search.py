"""Run a search: calibrate (or reuse) the supernet, build the space and the engine, evaluate generations through an
executor, append every evaluation to the log as it finishes, compact each generation.

Resume replays the log: the engine is deterministic given its seed and what it was told, so rerunning the loop
with logged evaluations served from the log reproduces every ask; only candidates missing from the log are
evaluated. A killed driver therefore loses at most the evaluations in flight, and repeats none that were logged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tmpq.core import runlock
from tmpq.core.cost import latency_entries
from tmpq.core.data import data_fingerprint
from tmpq.core.devices import resolve_device, tune_cpu_allocator
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes, malformed, read_json
from tmpq.core.model import ModelConfig, load_model
from tmpq.core.reuse import reused_layers
from tmpq.core.sampler import make_scheduler
from tmpq.core.solvers import parse_solver
from tmpq.deploy.latency import TABLE_FILE, check_fingerprint, latency_fingerprint, measure_table, read_table, \
    write_table
from tmpq.evaluators.candidate import (
    PROXY_VERSION,
    CandidateEvaluator,
    ProxyConfig,
    check_extractor,
    check_reference,
    proxy_reference,
    scoring_extractor,
)
from tmpq.evaluators.profile import RATES, dp_costs
from tmpq.jobs.config import CONFIG_VERSION, LATER_KEYS, RunConfig
from tmpq.search.budget import budget_bitops, uniform_option
from tmpq.search.engines import make_engine, optuna_study_for_run
from tmpq.search.executors import LocalExecutor, RayExecutor, Task
from tmpq.search.groups import TimeGroups, dp_groups, make_groups
from tmpq.search.rundir import EvalResult, RunDir, run_objectives
from tmpq.search.sensitivity import PROFILES
from tmpq.search.space import SearchSpace
from tmpq.search.stepsel import optimal_schedules
from tmpq.supernet import QuantSupernet
from tmpq.supernet.calib_data import calibrate_to_file

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its evaluator (picklable; no tensors)."""

    model: dict  # the run's [model] section (ModelConfig fields); a bare path is read as {"path": ...}
    supernet_file: str
    proxy: dict
    threads: int = 1
    companions: bool = True  # paired_feat / paired_pixel_mse beside a fid proxy (costs the FP teacher's sampling)
    device: str = "cpu"  # executor.device, resolved by the worker on its own machine
    reuse_branch: int = 0  # search.reuse_branch: where a candidate's reuse calls cut the denoiser

    @staticmethod
    def torch_threads(n: int | None = None) -> int:
        """torch's thread count before setting it to ``n`` (None: left as it is): how the executors, which import no
        torch, run a worker at its threads and hand the driver back its own."""
        prev = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        return prev

    def __call__(self):
        torch.set_num_threads(self.threads)
        device = resolve_device(self.device)
        if device == "cpu":
            tune_cpu_allocator()  # this process samples on the CPU (a Ray worker's own process too)
        m = load_model(ModelConfig(**self.model) if isinstance(self.model, dict) else self.model, device=device)
        net = QuantSupernet.from_file(m.unet, self.supernet_file)
        ext = scoring_extractor(m.image_channels, self.proxy.get("extractor", "auto"),
                                self.proxy.get("inception_weights", ""))
        cfg = ProxyConfig(**self.proxy)
        ref = proxy_reference(cfg, ext, m.image_channels)
        return CandidateEvaluator(net, make_scheduler(m.scheduler_config), ext, ref, cfg, companions=self.companions,
                                  reuse_branch=self.reuse_branch)


def run_fingerprint(cfg: RunConfig, model_fp: str) -> str:
    """The run's identity: its config, the model's and the data's fingerprints. A resume must match it."""
    # The executor section is left out: local and Ray give bit-identical evaluations at the same threads_per_worker
    # (tests/test_search_ray.py), so a run may resume on another executor or at a new cluster address.
    config = {k: v for k, v in cfg.to_dict().items() if k != "executor"}
    # a key added after the first runs counts only when it is not the value the runs before it behaved as, so they
    # still resume (the config's version table, tmpq.jobs.config.LATER_KEYS)
    for dotted, (_version, before) in LATER_KEYS.items():
        section, key = dotted.split(".", 1)
        if key in config.get(section, {}) and config[section][key] == before:
            del config[section][key]
    blob = json.dumps({"config": config, "model": model_fp, "data": data_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def fp_profile(kind: str, unet, scheduler, seed: int = 0, **probe):
    """The FP model's per-timestep profile of a data-driven grouping ``kind`` (``sensitivity`` or ``error``): the
    evaluators' probe measures its rates (``probe``: ``n_images``, ``probe_steps``), the search library makes the
    profile of them (:data:`tmpq.search.sensitivity.PROFILES`)."""
    steps, rates = RATES[kind](unet, scheduler, seed=seed, **probe)
    return PROFILES[kind](steps, rates, scheduler.alphas_cumprod.numpy())


def dp_schedules(unet, scheduler_config: dict, steps, guidance_scale: float = 1.0,
                 **teacher) -> dict[int, tuple[int, ...]]:
    """The DP-optimal schedule of every step count in ``steps``: one FP teacher run and its transition costs
    (:func:`tmpq.evaluators.profile.dp_costs`; ``teacher``: ``grid_steps``, ``n``, ``seed``), then the dynamic
    programme over them (:func:`tmpq.search.stepsel.optimal_schedules`)."""
    grid, cost = dp_costs(unet, scheduler_config, guidance_scale=guidance_scale, **teacher)
    return optimal_schedules(grid, cost, steps)


def time_groups(cfg: RunConfig, m, resumed_run: Path | None):
    """Time groups of the configured grouping (the reference ``search.steps``) and, with ``search.step_choices``, one
    grouping per step choice. ``sensitivity`` and ``error`` profile the FP model once (64 bank images along 100-step
    uniform DDIM, seed = search.seed); ``dp`` groups each step count around its DP-optimal timesteps (one FP teacher
    run, :func:`dp_schedules`); a resumed run reuses the groups stored in its search_space.json, so round-off
    in a re-profile can never change the space under a running search."""

    kind, T = cfg.search.grouping, m.num_train_timesteps
    if kind in ("sensitivity", "error") and m.time_axis.flow:
        raise TmpqError(f"search.grouping: {kind} profiles the DDPM noise schedule (alphas_cumprod); a flow-matching "
                        f"model groups by quad, uniform or dp")
    choices = cfg.search.step_choices or (cfg.search.steps,)
    if kind in ("quad", "uniform"):
        per = {n: make_groups(kind, n, T) for n in choices}
    else:
        stored = resumed_run / "search_space.json" if resumed_run is not None else None
        if stored is not None and stored.is_file():
            d = read_json(stored, "search space")
            with malformed(stored, "search space"):
                found = [TimeGroups.from_dict(g) for g in d.get("step_groups") or [d["groups"]]]
            per = {g.n: g for g in found}
        elif kind == "dp":  # one FP teacher run (its own noise seed, apart from the proxy's) for every step count
            best = dp_schedules(m.unet, m.scheduler_config, choices)
            per = {n: dp_groups(best[n], T) for n in choices}
        else:
            prof = fp_profile(kind, m.unet, make_scheduler(m.scheduler_config), seed=cfg.search.seed)
            per = {n: make_groups(kind, n, T, prof) for n in choices}
    steps = tuple(per.values()) if cfg.search.step_choices else ()  # from_supernet orders them
    return per[cfg.search.steps], steps


def check_proxy(cfg: RunConfig, channels: int) -> None:
    """Refuse, before any run directory exists, a proxy whose extractor cannot read this model's images (or has no
    weights file), and a ``fid`` proxy that has no reference for this model."""

    check_extractor(channels, cfg.proxy.extractor, cfg.proxy.inception_weights)
    if cfg.proxy.name == "fid":
        check_reference(cfg.proxy.reference, channels)


def build_space(cfg: RunConfig, net, groups, step_groups=()):
    """The run's search space: the supernet's genes on ``groups`` (and step choices), restricted to the configured
    axes, with its BitOPs and size budgets."""
    from dataclasses import replace


    space = SearchSpace.from_supernet(net, groups, per_group_bits=cfg.search.per_group_bits, step_groups=step_groups,
                                      solvers=tuple(parse_solver(v) for v in cfg.search.solvers),
                                      reuse_branch=cfg.search.reuse_branch,
                                      reused=reused_layers(net.unet, cfg.search.reuse_branch)
                                      if cfg.search.reuse_branch else ())
    space = space.restrict(cfg.search.axes, uniform_option(cfg.search.fixed_bits, "search.fixed_bits"))
    return replace(space, bitops_budget=budget_bitops(space, cfg.search.bitops_budget),
                   size_budget_mb=cfg.search.size_budget_mb or None)


def prepare_run(cfg: RunConfig, run_path: Path, resume: bool = False,
                progress: bool = True) -> tuple[RunDir, SearchSpace, Path]:
    """A search's start-up without its search: load the model, refuse a proxy it cannot serve, place the time groups
    (a resumed run keeps its stored ones), build the space, create (or, with ``resume``, reopen under the same
    fingerprint) the run directory and give it a calibrated ``supernet.safetensors`` (copied from
    ``calibration.supernet_file`` when set, else calibrated here, resumably) and, with ``search.cost = "latency"``,
    its latency table (:func:`latency_table`, attached to the space). Returns (run, space, supernet file);
    the run holds its writer lock (``run.lock``, taken before anything is written: a resume takes it first of all,
    a new run as it is created) until the caller releases it or exits."""

    lock = runlock.acquire(RunDir.open(run_path).path, "search") if resume else None  # a second writer: one line
    try:
        m = load_model(cfg.model, device=resolve_device(cfg.executor.device))
        check_proxy(cfg, m.image_channels)
        groups, step_groups = time_groups(cfg, m, run_path if resume else None)  # before wrapping: profiles FP
        net = QuantSupernet(m.unet, cfg.supernet)
        fp = run_fingerprint(cfg, net.fingerprint)
        space = build_space(cfg, net, groups, step_groups)
        given = Path(cfg.calibration.supernet_file) if cfg.calibration.supernet_file else None
        if given is not None:
            net.load(given)  # refuses a missing, corrupt, unfinished or foreign file before any run directory exists
        if resume:
            run = RunDir.reopen(run_path, fp)  # under the lock taken above
            run.lock = lock
        else:
            # the resolved config records its version (outside the fingerprint; config_from_dict drops it)
            run = RunDir.create(run_path, {**cfg.to_dict(), "config_version": CONFIG_VERSION}, space.to_dict(), fp,
                                writer="search")
            lock = run.lock
        sn_file = run.path / "supernet.safetensors"
        if not sn_file.is_file() and given is not None:
            atomic_write_bytes(sn_file, given.read_bytes())
        if not sn_file.is_file():  # resumable per option through supernet.partial.safetensors beside it
            calibrate_to_file(net, make_scheduler(m.scheduler_config), sn_file, cfg.calibration, progress=progress)
        if cfg.search.cost == "latency":
            table = latency_table(cfg, run.path, sn_file, progress)
            space = dataclasses.replace(space, latency_table=latency_entries(table))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run, space, sn_file


# timed denoiser calls per configuration of a latency table (medians; the tables of a search are measured once per run)
LATENCY_REPEATS = 7


def latency_table(cfg: RunConfig, run_path: Path, sn_file: Path, progress: bool = True) -> dict:
    """The run's latency table (``search.cost = "latency"``): read back from ``RUN/latency.json`` when the run has
    one, refused in one line when it was measured on another fingerprint (machine, int8 ISA, torch, threads, batch);
    else measured on this process's CPU at ``proxy.batch_size`` images per call over the calibrated supernet and
    written atomically. The supernet file must exist."""
    path = Path(run_path) / TABLE_FILE
    fingerprint = latency_fingerprint(cfg.proxy.batch_size)
    if path.is_file():
        table = read_table(path)
        check_fingerprint(table, fingerprint, path)
        return table

    def load_net():
        return QuantSupernet.from_file(load_model(cfg.model, device="cpu").unet, sn_file)

    table = measure_table(load_net, load_model(cfg.model, device="cpu").scheduler_config,
                          batch=cfg.proxy.batch_size, repeats=LATENCY_REPEATS, reuse_branch=cfg.search.reuse_branch,
                          progress=progress)
    write_table(path, table)
    return table


def worker_spec(cfg: RunConfig, sn_file: Path, threads: int | None = None) -> WorkerSpec:
    """The evaluator every worker of a run of ``cfg`` builds (``threads`` overrides ``executor.threads_per_worker``).
    A search logs no paired companions: they would cost every worker the FP teacher's 100 steps per candidate."""
    proxy = json.loads(json.dumps(dataclasses.asdict(cfg.proxy)))
    return WorkerSpec(dataclasses.asdict(cfg.model), str(Path(sn_file).resolve()), proxy,
                      cfg.executor.threads_per_worker if threads is None else threads, companions=False,
                      device=cfg.executor.device, reuse_branch=cfg.search.reuse_branch)


def proxy_record(cfg: RunConfig) -> dict:
    """The proxy an evaluation of a run of ``cfg`` was scored with, as its log row records it."""
    return {"name": cfg.proxy.name, "version": PROXY_VERSION, "n_images": cfg.proxy.n_images}


def first_generation_seeds(space: SearchSpace, population: int, uniform: bool = True) -> list:
    """The genomes a search's first generation starts from: the uniform options at every step choice, at most half
    of the population (none with ``search.uniform_seeds = false``); the report measures front points against them."""
    return space.uniform_seeds(max(1, population // 2)) if uniform else []


def run_search(cfg: RunConfig, run_path: Path, resume: bool = False, executor=None, progress: bool = True) -> RunDir:
    """Run (or resume) a search; returns the run directory. ``executor`` overrides the configured one (tests). The
    run's writer lock is held from before calibration to the end (released on return, or by the kernel on a kill)."""

    run, space, sn_file = prepare_run(cfg, run_path, resume, progress)
    try:
        return _search(cfg, run, space, sn_file, executor, progress)
    finally:
        run.lock.release()


def _search(cfg: RunConfig, run: RunDir, space: SearchSpace, sn_file: Path, executor, progress: bool) -> RunDir:
    """The search loop of :func:`run_search` over a prepared run (whose writer lock the caller holds)."""
    if executor is None:
        spec = worker_spec(cfg, sn_file)
        if cfg.executor.kind == "ray":
            executor = RayExecutor(spec, workers=cfg.executor.workers, threads_per_worker=cfg.executor.threads_per_worker,
                                   timeout_s=cfg.executor.timeout_s, retries=cfg.executor.retries,
                                   address=cfg.executor.address, temp_dir=str(run.path / "ray"),
                                   gpus_per_worker=cfg.executor.gpus_per_worker,
                                   min_task_s=cfg.executor.min_task_s)
            # every actor builds its evaluator before the first generation (bounded by its start timeout; an actor
            # that cannot is given up), so the work spreads over all of them instead of running on whichever came
            # up first (a joined cluster's second node can take much longer)
            if progress:
                print(f"starting {cfg.executor.workers} Ray workers ...", flush=True)
            executor.wait_ready()
            if progress:
                print("Ray workers: " + ", ".join(executor.names), flush=True)
        else:
            executor = LocalExecutor(spec)
    seeds = first_generation_seeds(space, cfg.search.population, cfg.search.uniform_seeds)
    storage = study_name = None
    if cfg.search.engine == "optuna":  # a persistent study: resume continues it from engine.generation
        # One process per study, also in an external storage many runs share: the study is named once per run
        # (optuna.json in the run, a fresh suffix each) and opened only here, under the run's writer lock. (A copy
        # of a run directory names the same study: resume the copy only while the original is not written.)
        storage, study_name = optuna_study_for_run(run.path, cfg.search.storage)

    obj_names = run_objectives(cfg.to_dict())
    engine = make_engine(cfg.search.engine, space, seed=cfg.search.seed, population=cfg.search.population,
                         seeds=seeds, storage=storage, study_name=study_name,
                         p_mutation=cfg.search.mutation_prob or None, n_obj=len(obj_names))
    logged = {r.key: r for r in run.replay()}
    proxy_info = proxy_record(cfg)
    try:
        for gen in range(engine.generation, cfg.search.generations):  # > 0 only for a resumed Optuna study
            genomes = engine.ask()
            cands = [space.decode(g) for g in genomes]
            todo, seen_now = [], set()

            for c in cands:
                if c.key not in logged and c.key not in seen_now:
                    todo.append(Task(c.key, c))
                    seen_now.add(c.key)
            t0 = time.perf_counter()
            bar = tqdm(executor.map(todo), total=len(todo), desc=f"generation {gen + 1}/{cfg.search.generations}",
                       unit="eval", disable=not progress, leave=False)
            for task, out in bar:
                cand = task.candidate
                objectives = dict(out.objectives)
                if out.status == "ok":
                    objectives["bitops"] = space.bitops(cand)
                    objectives["size_mb"] = space.size_mb(cand)
                    if space.latency_table is not None:
                        objectives["latency_s"] = space.latency(cand)
                res = EvalResult(key=task.key, status=out.status, candidate=cand, objectives=objectives,
                                 proxy=proxy_info, n_images=cfg.proxy.n_images, seed=cfg.proxy.seed,
                                 wall_s=round(out.wall_s, 3), worker=out.worker, error=out.error, generation=gen,
                                 origin=engine.name, peak_mib=out.peak_mib)
                run.append(res)
                logged[task.key] = res
            F = np.array([[logged[c.key].objectives.get(o, np.inf) if logged[c.key].status == "ok" else np.inf
                           for o in obj_names] for c in cands])
            engine.tell(genomes, F[:, : engine.n_obj])
            run.compact(obj_names)
            if progress:
                ok = [r for r in logged.values() if r.status == "ok"]
                best = min((r.objectives["fid_proxy"] for r in ok), default=float("nan"))
                import pandas as pd

                front = pd.read_parquet(run.path / "pareto.parquet")
                print(f"generation {gen + 1}/{cfg.search.generations}: {len(logged)} evaluations "
                      f"({len(todo)} new, {time.perf_counter() - t0:.0f} s), best proxy {best:.4g}, "
                      f"front {len(front)}", flush=True)
    finally:
        executor.close()
    _refuse_all_failed(run, logged)
    return run


def _refuse_all_failed(run: RunDir, logged: dict) -> None:
    """A search whose every evaluation failed has no front: one line (exit 2) with the first error, not an empty
    result and exit 0. The log keeps every failure row."""
    if logged and not any(r.status == "ok" for r in logged.values()):
        first = next(iter(logged.values())).error.split(" | ")[0].strip() or "no error recorded"
        raise TmpqError(f"search: all {len(logged)} evaluations failed (first: {first}); see {run.log_path}")
