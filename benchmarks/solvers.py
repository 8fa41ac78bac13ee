"""Solvers, step selection and reuse of deep features (issue 21). Resumable: rows in <out>/rows.jsonl, search runs in
<out>/runs/<name> (their raw logs committed under <out>/raw/).

    .venv/bin/python -m benchmarks.solvers --part fp         # FP FID per solver x steps, uniform and DP schedules
    .venv/bin/python -m benchmarks.solvers --part gene       # solver gene vs DDIM only: hypervolume, 3 seeds
    .venv/bin/python -m benchmarks.solvers --part stacking   # quantization alone, reuse alone, both naively, joint
    .venv/bin/python -m benchmarks.solvers --part report     # rewrite README.md from the rows

- ``fp``: the FP model with each solver (``--solvers``) at ``--steps`` on uniform DDIM timesteps, on diffusers'
  trailing spacing and on the DP-optimal timesteps of :mod:`tmpq.search.stepsel` (one FP teacher run of 100 uniform
  steps on 64 images of noise seed 20,000, apart from the evaluation noise), scored by FID (domain extractor,
  N = ``--n``, noise seed ``--seed``) with the FP 100-step DDIM row as the reference point.
- ``gene``: searches with the demo's settings (step choices 5-20, W6A6 budget at 10 steps, 200 evaluations) over DDIM
  only and over ``--gene-solvers``, seeds 0..``--seeds``-1; hypervolume of each run's evaluated points (proxy,
  GBitOPs) against one reference point for all runs, by a rule fixed before the runs: 1.1 x the worst proxy and the
  largest BitOPs any run evaluated (on the linear proxy and on log10(proxy)). Then the step-side methods as baselines
  in the same objective space (same supernet, proxy, noise, budget): every uniform bit option x step choice x gene
  solver under the budget on the DP-optimal timesteps, and on uniform timesteps with DeepCache reuse of every other
  call; the report counts those each run's front strictly dominates.
- ``stacking``: on uniform DDIM ``--stack-steps`` steps: FP; uniform W``a``A``b`` (``--stack-bits``) alone; DeepCache
  reuse alone (every other call after the first, branch ``--branch``); both naively; and the best point of a joint
  search with the reuse gene at no more BitOPs than the naive stacking (its proxy-best), all scored by FID at N.
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RowLog,
    calibrated_supernet,
    cpu_setup,
    findings,
    keep_raw,
    kept_evaluations,
    log_proxy,
    read_gzip,
    run_evaluations,
)

SOLVERS = ("ddim", "dpm++-2", "unipc-2", "euler", "heun")
GENE_SOLVERS = ("ddim", "dpm++-2", "unipc-2")


def _model(args):
    from tmpq.core.model import ModelConfig, load_model

    return load_model(ModelConfig(path=args.model, guidance_scale=args.guidance))


def part_fp(args, log: RowLog) -> None:
    from tmpq.core.sampler import make_scheduler
    from tmpq.core.schedules import make_timesteps
    from tmpq.core.solvers import parse_solver
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import embedded_reference, evaluate_schedule
    from tmpq.jobs.search import dp_schedules

    m = _model(args)
    ext = make_extractor("domain")
    ref = embedded_reference(ext, "all", 16)
    dp = None

    def row(solver: str, schedule: str, ts) -> None:
        if log.has(kind="fp", solver=solver, schedule=schedule, steps=len(ts), n=args.n, seed=args.seed):
            return
        name, order = parse_solver(solver)
        sched = make_scheduler(m.scheduler_config, name, order)
        r = evaluate_schedule(m.unet, sched, list(ts), args.n, ext, ref, seed=args.seed, batch_size=256,
                              desc=f"{solver} {schedule} {len(ts)}")
        log.append({"kind": "fp", "solver": solver, "schedule": schedule, **r})

    if args.ddim_from_baseline:
        _ddim_from_baseline(args, log, row)
    row("ddim", "uniform", make_timesteps("uniform", 100))
    for steps in args.steps:
        for sched in args.schedules:
            if sched == "dp" and dp is None:
                dp = dp_schedules(m.unet, m.scheduler_config, args.steps)
            # trailing: diffusers' stock spacing for few steps (from T - 1, no step at t = 0)
            ts = dp[steps] if sched == "dp" else make_timesteps(sched, steps)
            for solver in args.solvers:
                row(solver, sched, ts)


def _ddim_from_baseline(args, log: RowLog, row) -> None:
    """Take the FP DDIM rows on uniform steps from ``benchmarks.baseline``'s rows (same model, noise, extractor and
    reference) instead of sampling them again, once one of them is reproduced here: the check samples the baseline's
    5-step row anew and stops, naming both values, when the FID differs (a protocol that has drifted)."""
    from benchmarks.common import baseline_fp_row
    from tmpq.core.schedules import make_timesteps

    src = Path(args.ddim_from_baseline)
    if args.model != "embedded":
        raise SystemExit("--ddim-from-baseline: the baseline rows are the embedded UNet's")
    check = baseline_fp_row(src, 5, args.n, args.seed, args.guidance)
    if not log.has(kind="fp", solver="ddim", schedule="uniform", steps=5, n=args.n, seed=args.seed):
        row("ddim", "uniform", make_timesteps("uniform", 5))
    here = next(r for r in log.rows.values() if r["kind"] == "fp" and r["solver"] == "ddim"
                and r["schedule"] == "uniform" and r["steps"] == 5 and r["n"] == args.n and r["seed"] == args.seed)
    if abs(here["fid"] - check["fid"]) > 1e-6 * max(1.0, check["fid"]):
        raise SystemExit(f"--ddim-from-baseline: {src} has FID {check['fid']:.6f} for DDIM uniform 5 steps, this "
                         f"protocol gives {here['fid']:.6f}: not the same protocol, rows not taken")
    for steps in sorted({100, *args.steps}):
        if log.has(kind="fp", solver="ddim", schedule="uniform", steps=steps, n=args.n, seed=args.seed):
            continue
        try:
            b = baseline_fp_row(src, steps, args.n, args.seed, args.guidance)
        except SystemExit:
            continue  # not in the baseline: sampled here
        log.append({"kind": "fp", "solver": "ddim", "schedule": "uniform", "steps": steps, "n": args.n,
                    "seed": args.seed, "timesteps": b["timesteps"], "fid": b["fid"], "kid": b.get("kid"),
                    "kid_std": b.get("kid_std"), "sample_s": b.get("sample_s"),
                    "source": f"{src} ({b['command']}, {b['finished']}; DDIM uniform 5 steps reproduced here to "
                              f"{abs(here['fid'] - check['fid']):.1e})"})


def _toml_config(name: str, sn: Path | None, **search) -> dict:
    """``configs/NAME`` as a dict, with ``search`` keys set and, with ``sn``, that calibrated supernet file instead of
    calibrating again (the same ``[calibration]`` settings)."""
    from tmpq.jobs.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / name).to_dict()
    if sn is not None:
        base["calibration"]["supernet_file"] = str(sn)
    base["search"].update(search)
    return base


def _gene_config(args, sn: Path, seed: int, solvers, **extra):
    from tmpq.jobs.config import config_from_dict

    base = _toml_config("demo.toml", sn, seed=seed, solvers=list(solvers), **extra)
    if args.population:  # smaller searches (a smoke run); the report says what was run
        base["search"].update(population=args.population, generations=args.generations)
    base["executor"].update(kind="local", threads_per_worker=args.threads)
    return config_from_dict(base)


def _search(args, log: RowLog, name: str, cfg) -> Path:
    from tmpq.jobs.search import run_search

    path = Path(args.out) / "runs" / name
    if log.has(kind="search", name=name):
        return path
    t0 = time.perf_counter()
    run = run_search(cfg, path, resume=(path / "config.resolved.json").is_file(), progress=True)
    keep_raw(run.path)
    ev = run_evaluations(run.path)
    log.append({"kind": "search", "name": name, "evaluations": int(len(ev)), "wall_s": round(time.perf_counter() - t0, 1),
                "search": {k: v for k, v in cfg.to_dict()["search"].items() if k in ("seed", "solvers", "reuse_branch")}})
    return path


def _supernet(args) -> Path:
    """The demo's supernet, calibrated once for every search here."""
    from tmpq.jobs.config import load_config

    return calibrated_supernet(load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml"),
                               Path(args.out) / "supernet.safetensors")


def part_gene(args, log: RowLog) -> None:
    sn = _supernet(args)
    for seed in range(args.seeds):
        _search(args, log, f"ddim-s{seed}", _gene_config(args, sn, seed, []))
        _search(args, log, f"gene-s{seed}", _gene_config(args, sn, seed, args.gene_solvers))
    _step_side(args, log, sn)


def _step_side(args, log: RowLog, sn: Path) -> None:
    """The step-side methods as points of the searches' own objective space (the same supernet, proxy, noise and
    budget as the gene runs): every uniform (w, a) option x step choice x gene solver under the budget, on the
    DP-optimal timesteps (``dp``), and on uniform timesteps with DeepCache reuse of every other call after the first
    (``deepcache``, branch ``--branch``; BitOPs count the reused calls at their shallow layers only)."""
    from dataclasses import replace

    from tmpq.core.reuse import reused_layers
    from tmpq.core.schedules import make_timesteps
    from tmpq.core.solvers import parse_solver
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import WorkerSpec, dp_schedules
    from tmpq.core.candidate import Candidate

    run = load_run(Path(args.out) / "runs" / "gene-s0")
    cfg, space = run.config, run.space
    m = _model(args)
    deep = tuple(sorted({lay.fqn for lay in space.layers} & set(reused_layers(m.unet, args.branch))))
    reuse_space = replace(space, reuse_branch=args.branch, deep_layers=deep)
    dp = None
    ev = None
    for method, steps, solver, w, a in itertools.product(("dp", "deepcache"), space.step_choices, args.gene_solvers,
                                                         space.w_bits, space.a_bits):
        tag = f"{method}-{solver}-{steps}-w{w}a{a}"
        if log.has(kind="stepside", name=tag):
            continue
        sol = parse_solver(solver)
        bits = tuple((w, a) for _ in range(space.num_genes))
        if method == "dp":
            if dp is None:
                dp = dp_schedules(m.unet, m.scheduler_config, list(space.step_choices))
            cand = Candidate(tuple(int(t) for t in dp[steps]), bits, sol)
            cost = space.bitops(cand)
        else:
            cand = Candidate(tuple(make_timesteps("uniform", steps)), bits, sol,
                             reuse=tuple(range(1, sol.calls(steps), 2)))
            cost = reuse_space.bitops(cand)
        if space.bitops_budget is not None and cost > space.bitops_budget:
            continue
        if ev is None:
            ev = WorkerSpec(cfg["model"], str(sn.resolve()), cfg["proxy"], args.threads, companions=False,
                            reuse_branch=args.branch)()
        r = ev.evaluate(cand)
        log.append({"kind": "stepside", "name": tag, "method": method, "solver": solver, "steps": steps,
                    "bits": [w, a], "timesteps": list(cand.timesteps), "reuse": list(cand.reuse), "bitops": cost,
                    "fid_proxy": r["fid_proxy"], "eval_s": round(r["eval_s"], 2)})


def part_speed(args, log: RowLog) -> None:
    """The speed must-show from the step side: one point fixed before its validation (``--speed-solver`` on the
    DP-optimal timesteps of ``--speed-steps`` steps, every layer at ``--speed-bits``: the int8 kernels' own width,
    where lower bits add error and no speed), added to a run of ``configs/solvers.toml`` (the issue-21 final run's
    model, supernet calibration, proxy and budget; no search) as an evaluated candidate of origin ``stepside-dp``,
    then validated, exported and timed exactly as ``benchmarks.final`` does its picks (re-calibrated along its own
    schedule, N = ``--n`` x seeds 1, 2; ``measure_speed`` with 256 images, FID of fake quant and int8 at N = 2,000)."""
    from tmpq.core.solvers import parse_solver
    from tmpq.deploy.int8 import measure_speed
    from tmpq.jobs.config import load_config
    from tmpq.jobs.export import ensure_export
    from tmpq.jobs.search import prepare_run, proxy_record, worker_spec
    from tmpq.jobs.validate import ValidateConfig, validate_run
    from tmpq.search.budget import fp_bitops
    from tmpq.search.rundir import EvalResult
    from tmpq.core.candidate import Candidate

    fp_row = next((r for r in log.rows.values() if r["kind"] == "fp" and r["solver"] == args.speed_solver
                   and r["schedule"] == "dp" and r["steps"] == args.speed_steps and r["n"] == args.n
                   and r["seed"] == args.seed), None)
    if fp_row is None:
        raise SystemExit(f"--part speed: no FP row of {args.speed_solver} on DP {args.speed_steps} steps yet "
                         f"(run --part fp first)")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "solvers.toml")
    path = Path(args.out) / "runs" / f"speed-{args.speed_solver}-dp{args.speed_steps}"
    run, space, sn = prepare_run(cfg, path, resume=(path / "config.resolved.json").is_file())
    w, a = args.speed_bits
    cand = Candidate(tuple(int(t) for t in fp_row["timesteps"]), tuple((w, a) for _ in range(space.num_genes)),
                     parse_solver(args.speed_solver))
    if not any(r.key == cand.key for r in run.replay()):
        t0 = time.perf_counter()
        r = worker_spec(cfg, sn, args.threads)().evaluate(cand)
        objectives = {k: float(v) for k, v in r.items() if isinstance(v, (int, float))}
        objectives.update(bitops=space.bitops(cand), size_mb=space.size_mb(cand))
        run.append(EvalResult(key=cand.key, status="ok", candidate=cand, objectives=objectives, n_images=cfg.proxy.n_images, seed=cfg.proxy.seed,
                              proxy=proxy_record(cfg),
                              wall_s=round(time.perf_counter() - t0, 3), worker="benchmarks.solvers",
                              origin="stepside-dp"))
        run.compact()
    final = validate_run(run.path, ValidateConfig(n=args.n, seeds=(1, 2), keys=(cand.key,)), progress=True)
    p = final[final["key"] == cand.key].iloc[0]
    tag = f"{args.speed_solver}-dp{args.speed_steps}-w{w}a{a}"
    if not log.has(kind="speed", name=tag):
        export_dir = ensure_export(run.path, cand.key, Path(args.out) / "runs" / f"{path.name}-export",
                                   command="python -m benchmarks.solvers --part speed")
        speed = measure_speed(export_dir, n=256, batch_size=256, fid_n=2000)
        speed.pop("layers")
        seeds = _validated_fids(run.path, cand.key, args.n)
        log.append({"kind": "speed", "name": tag, "key": cand.key, "solver": args.speed_solver, "n_validated": args.n,
                    "steps": args.speed_steps, "timesteps": list(cand.timesteps), "bits": [w, a],
                    "bitops_frac": float(p["bitops"]) / fp_bitops(space, 100), "fid_mean": float(p["fid_mean"]),
                    "fid_seeds": seeds, "fid_proxy": float(p["fid_proxy"]), "fp_fid": fp_row["fid"],
                    "speed": speed})


def _grouping_config(dp: bool, seed: int, sn: Path | None):
    """``configs/solvers-dp.toml`` (``dp``) or ``configs/solvers.toml`` at search seed ``seed`` (``_toml_config``)."""
    from tmpq.jobs.config import config_from_dict

    return config_from_dict(_toml_config("solvers-dp.toml" if dp else "solvers.toml", sn, seed=seed))


def part_grouping(args, log: RowLog) -> None:
    """``configs/solvers-dp.toml`` (the issue-21 final run's config with ``grouping = "dp"``) against the same config
    with uniform groups, search seeds 0 .. ``--seeds`` - 1. Seed 0's uniform side is the final run's own search
    (``final/raw``); seeds >= 1 search both sides with the seed-0 DP run's calibrated supernet file when it is here
    (the same ``[calibration]`` settings as every run of the comparison)."""

    first = _search(args, log, "dp-grouping-s0", _grouping_config(True, 0, None))
    sn = first / "supernet.safetensors"
    for seed in range(1, args.seeds):
        for dp in (False, True):
            _search(args, log, f"{'dp' if dp else 'uniform'}-grouping-s{seed}",
                    _grouping_config(dp, seed, sn if sn.is_file() else None))


def part_grouping_validate(args, log: RowLog) -> None:
    """The rule, fixed before any of these points was sampled at large N: per search seed and side of the grouping
    comparison, the proxy-best evaluated point under 0.5 % of the FP 100-step BitOPs, validated as
    ``benchmarks.final`` validates (re-calibrated along its own schedule, N = ``--n`` x noise seeds 1, 2). Seed 0's
    uniform side is the final run's, validated there (``final/raw``); its rows are read, not sampled again."""
    from benchmarks.final import restore_run
    from tmpq.jobs.run import load_run
    from tmpq.jobs.validate import ValidateConfig, validate_run

    out = Path(args.out)
    for seed in range(args.seeds):
        for side in ("uniform", "dp"):
            name = f"{side}-grouping-s{seed}"
            if log.has(kind="grouping-validated", name=name):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                if seed == 0 and side == "uniform":
                    run_path, source = restore_run(out / "final" / "raw", Path(tmp)), "final/raw (benchmarks.final)"
                else:
                    run_path, source = out / "runs" / name, f"runs/{name}"
                run = load_run(run_path)
                key = _best_under(run, 0.005)
                if source.startswith("runs/"):
                    validate_run(run_path, ValidateConfig(n=args.n, seeds=(1, 2), keys=(key,)), progress=True)
                fids = _validated_fids(run_path, key, args.n)
                if len(fids) != 2:
                    raise SystemExit(f"--part grouping-validate: {name}: expected the validation rows of seeds 1, 2 "
                                     f"for {key}, found {len(fids)}")
                log.append({"kind": "grouping-validated", "name": name, "side": side, "search_seed": seed,
                            **_point_record(run, key), "n": args.n, "fid_seeds": fids, "source": source})


def part_grouping_speed(args, log: RowLog) -> None:
    """Speed at equal quality from the searches themselves, by a rule fixed before this part's timing: of the grouping
    comparison's validated points (``--part grouping-validate``) within 1.15x the FP DDIM 100-step FID, the one with
    the fewest full denoiser calls (then the fewest BitOPs), exported from its run and timed exactly as ``--part
    speed`` times the step-side point."""
    from tmpq.core.solvers import parse_solver
    from tmpq.deploy.int8 import measure_speed
    from tmpq.jobs.export import ensure_export

    ref = next((r for r in log.rows.values() if r["kind"] == "fp" and r["solver"] == "ddim" and r["steps"] == 100),
               None)
    val = [r for r in log.rows.values() if r["kind"] == "grouping-validated"]
    if ref is None or not val:
        raise SystemExit("--part grouping-speed: needs the FP DDIM 100-step row and --part grouping-validate first")
    within = [r for r in val if np.mean(list(r["fid_seeds"].values())) <= 1.15 * ref["fid"]]
    if not within:
        raise SystemExit("--part grouping-speed: no validated search point here within 1.15x FP 100 steps")
    pick = min(within, key=lambda r: (parse_solver(r["solver"]).calls(len(r["timesteps"])) - r["reused"],
                                      r["bitops_frac"]))
    if not pick["source"].startswith("runs/"):  # chosen among all the points, never silently among the others
        raise SystemExit(f"--part grouping-speed: the pick, {pick['name']} ({pick['key']}), comes from "
                         f"{pick['source']}, whose run is kept only as raw logs here: export it from there first")
    tag = f"search-{pick['name']}"
    if log.has(kind="speed", name=tag):
        return
    run_path = Path(args.out) / pick["source"]
    export_dir = ensure_export(run_path, pick["key"], run_path.parent / f"{run_path.name}-export",
                               command="python -m benchmarks.solvers --part grouping-speed")
    speed = measure_speed(export_dir, n=256, batch_size=256, fid_n=2000)
    speed.pop("layers")
    f = list(pick["fid_seeds"].values())
    log.append({"kind": "speed", "name": tag, "origin": "search", "key": pick["key"], "solver": pick["solver"],
                "n_validated": pick["n"], "steps": len(pick["timesteps"]), "timesteps": pick["timesteps"],
                "reused": pick["reused"], "bitops_frac": pick["bitops_frac"], "fid_mean": float(np.mean(f)),
                "fid_seeds": pick["fid_seeds"], "fid_proxy": pick["fid_proxy"], "speed": speed})


def _point_record(run, key: str) -> dict:
    """What the report says of one evaluated point of ``run``."""
    from tmpq.search.budget import fp_bitops

    ev = run.evaluations.set_index("key").loc[key]
    return {"key": key, "solver": str(ev.get("solver", "ddim")), "order": int(ev.get("order", 1)),
            "timesteps": [int(t) for t in ev["timesteps"]], "reused": len(ev.get("reuse", [])),
            "bitops_frac": float(ev["bitops"]) / fp_bitops(run.space, 100), "fid_proxy": float(ev["fid_proxy"])}


def _validated_fids(run_path: Path, key: str, n: int, seeds=(1, 2)) -> dict[str, float]:
    """``{seed: FID}`` of point ``key`` validated at ``n`` images per seed, from the run's ``final/rows.jsonl``."""
    rows = map(json.loads, (Path(run_path) / "final" / "rows.jsonl").read_text().splitlines())
    return {str(r["seed"]): r["fid"] for r in rows if r["key"] == key and r["n"] == n and r["seed"] in seeds}


def _proxy_best(ev, max_bitops: float):
    """The ``ok`` row of evaluations frame ``ev`` with the best (non-NaN) proxy at no more than ``max_bitops``; None
    if none (also for a frame without objective columns: a run whose every evaluation failed)."""
    if not {"status", "bitops", "fid_proxy"} <= set(ev.columns):
        return None
    ev = ev[(ev["status"] == "ok") & (ev["bitops"] <= max_bitops) & ev["fid_proxy"].notna()]
    return ev.loc[ev["fid_proxy"].idxmin()] if len(ev) else None


def _best_under(run, frac: float) -> str:
    """Key of the proxy-best evaluated point of ``run`` under ``frac`` of the FP 100-step BitOPs."""
    from tmpq.search.budget import fp_bitops

    best = _proxy_best(run.evaluations, frac * fp_bitops(run.space, 100))
    if best is None:
        raise SystemExit(f"no evaluated point of {run.path} under {frac:.1%} of the FP 100-step BitOPs")
    return str(best["key"])


def _grouping_section(out: Path, names: set, validated: list, ref100: dict | None) -> list[str]:
    """DP-seeded groups vs uniform groups, one search per side and seed (``names``: the searches logged), the same
    supernet calibration settings, proxy, noise, budget and evaluations: hypervolume of each run's evaluated points
    against one reference point for all runs (the gene part's rule), its ratio per seed, and each run's best proxy
    under 1 % and 0.5 % of the FP 100-step BitOPs."""
    from tmpq.search.budget import fp_bitops
    from tmpq.search.pareto import hypervolume_2d
    from tmpq.search.space import SearchSpace

    raw = out / "final" / "raw"
    space = SearchSpace.from_dict(json.loads(read_gzip(raw / "search_space.json.gz", "search space")))
    fp100 = fp_bitops(space, 100)
    seeds = [s for s in range(10) if f"dp-grouping-s{s}" in names and (s == 0 or f"uniform-grouping-s{s}" in names)]
    frames = {}
    for s in seeds:
        uni = (kept_evaluations(raw / "evaluations.jsonl.gz") if s == 0
               else run_evaluations(out / "runs" / f"uniform-grouping-s{s}"))
        for side, ev in (("uniform", uni), ("dp", run_evaluations(out / "runs" / f"dp-grouping-s{s}"))):
            frames[(s, side)] = ev[ev["status"] == "ok"]
    pts = {k: _proxy_gbitops(ev) for k, ev in frames.items()}
    refpt, logp = _reference_point(pts)
    hv = {k: (hypervolume_2d(p, refpt), hypervolume_2d(log_proxy(p), logp)) for k, p in pts.items()}
    lines = ["## DP-seeded time groups vs uniform groups", "",
             "`configs/solvers-dp.toml` (`grouping = \"dp\"`) against `configs/solvers.toml` (uniform groups; at seed 0 "
             "the final run's own search, `final/raw`), search seeds " + ", ".join(map(str, seeds)) + ", the same "
             "supernet calibration settings, proxy, noise, budget and number of evaluations (`python -m "
             "benchmarks.solvers --part grouping`). One reference point for every run, by the gene part's rule: "
             f"({refpt[0]:.4g}, {refpt[1]:.4g} GBitOPs)"
             + (" — it moves as runs are added, so the seed-0 values differ from the one-seed reading." if len(seeds) > 1
                else ". One seed: a first reading, not a mean."), "",
             "| seed | groups | evaluations | HV | HV, log10 proxy | best proxy <= 1 % BitOPs | best proxy <= 0.5 % BitOPs |",
             "|---:|---|---:|---:|---:|---|---|"]
    for (s, side), ev in frames.items():
        cells = []
        for frac in (0.01, 0.005):
            b = _proxy_best(ev, frac * fp100)
            cells.append("-" if b is None else
                         f"{b['fid_proxy']:.4f} ({b.get('solver', 'ddim')}, {len(b['timesteps'])} steps)")
        lines.append(f"| {s} | {side} | {len(ev)} | {hv[(s, side)][0]:.4g} | {hv[(s, side)][1]:.4g} | {cells[0]} | "
                     f"{cells[1]} |")
    ratio = np.array([[hv[(s, "dp")][i] / hv[(s, "uniform")][i] for i in (0, 1)] for s in seeds])
    lines += ["", "HV ratio dp / uniform per seed: " + ", ".join(
        f"seed {s}: {r[0]:.3f} (log10 {r[1]:.3f})" for s, r in zip(seeds, ratio))
        + (f"; mean {ratio[:, 0].mean():.3f} (range {ratio[:, 0].min():.3f}-{ratio[:, 0].max():.3f}), log10 mean "
           f"{ratio[:, 1].mean():.3f} (range {ratio[:, 1].min():.3f}-{ratio[:, 1].max():.3f})." if len(seeds) > 1
           else "."), ""]
    if validated:
        lines += ["Validated (`--part grouping-validate`; the rule, fixed before any of them was sampled at large N: "
                  "per seed and side, the proxy-best evaluated point under 0.5 % of the FP 100-step BitOPs, "
                  "re-calibrated along its own schedule as `benchmarks.final` does, N = "
                  f"{validated[0]['n']} x noise seeds 1, 2; x FP100 against FP DDIM 100 steps, "
                  f"{ref100['fid']:.4f}):" if ref100 else "Validated:", "",
                  "| seed | groups | key | solver | timesteps | reused calls | % FP100 BitOPs | proxy | FID seeds 1 / 2 "
                  "| mean | x FP100 |", "|---:|---|---|---|---|---:|---:|---:|---|---:|---:|"]
        for r in sorted(validated, key=lambda r: (r["search_seed"], r["side"] != "uniform")):
            f = [r["fid_seeds"][k] for k in sorted(r["fid_seeds"])]
            x = f"{np.mean(f) / ref100['fid']:.2f}" if ref100 else "-"
            lines.append(f"| {r['search_seed']} | {r['side']} | {r['key']} | {r['solver']} | {r['timesteps']} | "
                         f"{r['reused']} | {100 * r['bitops_frac']:.3f} | {r['fid_proxy']:.4f} | "
                         f"{' / '.join(f'{v:.4f}' for v in f)} | {np.mean(f):.4f} | {x} |")
        lines.append("")
    return lines


def part_stacking(args, log: RowLog) -> None:
    from tmpq.core.schedules import make_timesteps
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import embedded_reference, score_features
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import WorkerSpec
    from tmpq.search.budget import fp_bitops
    from tmpq.core.candidate import Candidate

    sn = _supernet(args)
    joint = _search(args, log, "joint-reuse-s0", _gene_config(args, sn, 0, [], reuse_branch=args.branch,
                                                               bitops_budget="none"))
    run = load_run(joint)
    space = run.space
    ev = WorkerSpec({"path": args.model, "guidance_scale": args.guidance}, str(sn.resolve()),
                    {"name": "fid", "n_images": 128}, args.threads, reuse_branch=args.branch)()
    ext = make_extractor("domain")
    ref = embedded_reference(ext, "all", 16)
    n = args.stack_steps
    ts = tuple(make_timesteps("uniform", n))
    w, a = args.stack_bits
    every_other = tuple(range(1, n, 2))
    quant = space.uniform_candidate(w, a)
    cases = {"fp": (None, ()), "quant": ((w, a), ()), "reuse": (None, every_other), "both": ((w, a), every_other)}
    fp100 = fp_bitops(space, 100)  # the FP model (32 x 32 bits on every layer) at 100 steps: the reference
    deep_macs = sum(lay.macs for lay in space.layers if lay.fqn in set(space.deep_layers))
    for name, (bits, reuse) in cases.items():
        if log.has(kind="stack", name=name, n=args.n, seed=args.seed):
            continue
        alloc = tuple(bits for _ in quant.bits) if bits else None
        cost = (space.bitops(Candidate(ts, alloc, reuse=reuse)) if alloc
                else fp_bitops(space, n) - 32 * 32 * deep_macs * len(reuse))
        t0 = time.perf_counter()
        imgs = ev.images(Candidate(ts, alloc, reuse=reuse), n=args.n, seed=args.seed)
        s = score_features(ext(imgs), ref)
        log.append({"kind": "stack", "name": name, "n": args.n, "seed": args.seed, "timesteps": list(ts),
                    "bits": [w, a] if bits else None, "reuse": list(reuse), "bitops": cost,
                    "bitops_share_of_fp100": cost / fp100, "fid": s["fid"], "sample_s": round(time.perf_counter() - t0, 1)})
    both = next(r for r in log.rows.values() if r["kind"] == "stack" and r["name"] == "both")
    if not log.has(kind="stack", name="joint", n=args.n, seed=args.seed):
        front = run.pareto()
        ok = front[front["bitops"] <= both["bitops"]]
        if len(ok):
            p = ok.sort_values("fid_proxy").iloc[0]
            cand = Candidate.from_dict(p)
            reuse = cand.reuse
            imgs = ev.images(cand, n=args.n, seed=args.seed)
            s = score_features(ext(imgs), ref)
            log.append({"kind": "stack", "name": "joint", "n": args.n, "seed": args.seed, "key": p["key"],
                        "timesteps": list(p["timesteps"]), "bits": json.loads(json.dumps(p["bits"])),
                        "reuse": list(reuse), "bitops": float(p["bitops"]),
                        "bitops_share_of_fp100": float(p["bitops"]) / fp100, "fid": s["fid"]})


def _proxy_gbitops(ev) -> np.ndarray:
    """(proxy, GBitOPs) rows of an evaluations frame."""
    return np.stack([ev["fid_proxy"].to_numpy(float), ev["bitops"].to_numpy(float) / 1e9], axis=1)


def _reference_point(pts: dict) -> tuple[np.ndarray, np.ndarray]:
    """One reference point for all runs, by the rule fixed before the gene runs: 1.1 x the worst proxy and the largest
    BitOPs any run evaluated; and the same point with the proxy on log10."""
    bad = [name for name, p in pts.items() if not np.isfinite(p).all()]
    if bad:  # max() would carry the NaN into the point, and every hypervolume against it would read 0
        raise ValueError(f"reference point: non-finite proxy or BitOPs in run(s) {', '.join(map(str, bad))}")
    refpt = np.array([1.1 * max(p[:, 0].max() for p in pts.values()), 1.1 * max(p[:, 1].max() for p in pts.values())])
    return refpt, log_proxy(refpt[None, :])[0]


def _gene_section(args, out: Path, runs: dict, stepside: list) -> list[str]:
    """Hypervolume of each run's evaluated points (proxy, GBitOPs) against one reference point for all runs, fixed
    before the runs: 1.1 x the worst proxy and the largest BitOPs any run evaluated; on the linear proxy and on
    log10(proxy) (the proxy spans an order of magnitude, and on a linear axis the easy high-proxy region weighs most).
    And the step-side baselines each run's front strictly dominates."""
    from tmpq.search.pareto import dominates_all, hypervolume_2d, non_dominated

    pts = {}
    for name in runs:
        ev = run_evaluations(out / "runs" / name)
        pts[name] = _proxy_gbitops(ev[ev["status"] == "ok"])
    first = runs[next(iter(runs))]
    refpt, logp = _reference_point(pts)
    base = np.array([[r["fid_proxy"], r["bitops"] / 1e9] for r in stepside]) if stepside else np.zeros((0, 2))
    lines = ["## Solver gene vs DDIM only (hypervolume, same supernet, proxy, noise and budget)", "",
             f"The demo's search (`configs/demo.toml`: step choices 5-20, budget uniform W6A6 at 10 steps, population x "
             f"generations as configured, {first['evaluations']} evaluations per run) over DDIM only and over "
             f"{' / '.join(args.gene_solvers)} as a gene, search seeds 0..{args.seeds - 1}. Reference point "
             f"({refpt[0]:.4g}, {refpt[1]:.4g} GBitOPs) = 1.1 x the worst proxy and the largest BitOPs of all runs "
             "(rule fixed before the runs); also on log10(proxy) with the same point, logged."
             + (f" Step-side baselines: {len(base)} points (below), counted as strictly dominated by a run's front "
                "(<= in both objectives, < in one)." if len(base) else ""), "",
             "| seed | HV DDIM only | HV solver gene | ratio | ratio, log10 proxy | step-side baselines dominated: "
             "DDIM only / gene |", "|---:|---:|---:|---:|---:|---|"]
    ratios, lratios = [], []
    for s in range(args.seeds):
        d, g = pts.get(f"ddim-s{s}"), pts.get(f"gene-s{s}")
        if d is None or g is None:
            continue
        hd, hg = hypervolume_2d(d, refpt), hypervolume_2d(g, refpt)
        ld, lg = hypervolume_2d(log_proxy(d), logp), hypervolume_2d(log_proxy(g), logp)
        ratios.append(hg / hd)
        lratios.append(lg / ld)
        dom = " / ".join(f"{int(dominates_all(p[non_dominated(p)], base, strict=True).sum())}/{len(base)}"
                         for p in (d, g)) if len(base) else "-"
        lines.append(f"| {s} | {hd:.4g} | {hg:.4g} | {hg / hd:.3f} | {lg / ld:.3f} | {dom} |")
    if ratios:
        lines += ["", f"Ratio mean {np.mean(ratios):.3f} +- {np.std(ratios):.3f} (log10 proxy {np.mean(lratios):.3f} +- "
                  f"{np.std(lratios):.3f}) over {len(ratios)} seeds."]
    if len(base):
        lines.append(f"The step-side baselines taken together as one set: hypervolume {hypervolume_2d(base, refpt):.4g} "
                     f"(log10 proxy {hypervolume_2d(log_proxy(base), logp):.4g}).")
    lines.append("")
    if stepside:
        lines += ["### Step-side baselines (same proxy, noise and budget)", "",
                  "`dp`: the DP-optimal timesteps of `tmpq.search.stepsel` (DDIM's local error over one FP teacher "
                  "trajectory), sampled with each solver. `deepcache`: uniform timesteps, every other denoiser call "
                  f"after the first reuses the deep features (branch {args.branch}).", "",
                  "| method | solver | steps | bits | GBitOPs | proxy |", "|---|---|---:|---|---:|---:|"]
        for r in sorted(stepside, key=lambda r: (r["method"], r["solver"], r["steps"], r["bitops"])):
            lines.append(f"| {r['method']} | {r['solver']} | {r['steps']} | W{r['bits'][0]}A{r['bits'][1]} | "
                         f"{r['bitops'] / 1e9:.4g} | {r['fid_proxy']:.4g} |")
        lines.append("")
    return lines


def _bits_text(bits) -> str:
    """``[w, a]`` (uniform) or one pair per layer gene: a short label."""
    if not bits:
        return "FP"
    if isinstance(bits[0], int):
        return f"W{bits[0]}A{bits[1]}"
    pairs = sorted({(int(w), int(a)) for w, a in bits}, reverse=True)
    return (f"W{pairs[0][0]}A{pairs[0][1]} (all)" if len(pairs) == 1
            else "mixed: " + ", ".join(f"W{w}A{a} x{sum(1 for b in bits if tuple(b) == (w, a))}" for w, a in pairs))


def _speed_line(sp: dict) -> str:
    """One ``measure_speed`` result as the report's bullet (the CPU, its int8 ISA and the allocator beside it)."""
    return (f"- `tmpq speed` ({sp['images']} images, batch {sp['batch_size']}, median of 3, "
            f"CPU: {sp['cpu_int8']['cpu']}, int8 ISA {', '.join(sp['cpu_int8']['int8_isa'])}; allocator: "
            f"{sp.get('cpu_allocator', 'stock')}): FP DDIM 100 steps {sp['fp_100_uniform_s']:.2f} s, FP on the "
            f"schedule {sp['fp_export_schedule_s']:.2f} s, fake quantization {sp['fakequant_export_s']:.2f} s, "
            f"int8 {sp['int8_export_s']:.2f} s: **{sp['speedup_int8_vs_fp100']:.1f}x** FP 100 steps "
            f"({sp['int8_layers']} int8 layers, {sp['fallback_layers']} fallbacks; FID at N = 2,000 seed 1: "
            f"fake quant {sp['fakequant_fid_n2000']:.4f}, int8 {sp['int8_fid_n2000']:.4f})")


def write_report(args, log: RowLog) -> None:
    out = Path(args.out)
    rows = list(log.rows.values())
    lines = ["# Solvers, step selection and reuse of deep features (issue 21)", "", *findings(out)]
    fp = [r for r in rows if r["kind"] == "fp"]
    ref100 = next((r for r in fp if r["solver"] == "ddim" and r["steps"] == 100), None)
    if fp:
        steps = sorted({r["steps"] for r in fp if r["steps"] != 100})
        lines += [f"## FP model per solver (FID, N = {fp[0]['n']}, noise seed {fp[0]['seed']})", "",
                  (f"Reference: FP uniform DDIM 100 steps, FID {ref100['fid']:.4f}. " if ref100 else "")
                  + "`uniform`: DDIM's leading spacing (5 steps: 800 ... 200, 0); `trailing`: diffusers' trailing "
                  "spacing (999, 799, ..., 199); `dp`: the DP-optimal timesteps (tmpq.search.stepsel) of each step "
                  "count, the same for every solver.", "",
                  "| solver | schedule | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---|" + "---:|" * len(steps)]
        for solver in dict.fromkeys(r["solver"] for r in fp):
            for sched in ("uniform", "trailing", "dp"):
                cells = []
                for s in steps:
                    r = next((x for x in fp if (x["solver"], x["schedule"], x["steps"]) == (solver, sched, s)), None)
                    cells.append(f"{r['fid']:.4f}" if r else "-")
                lines.append(f"| {solver} | {sched} | " + " | ".join(cells) + " |")
        lines += ["", "`-`: not sampled (the trailing spacing was added to the grid for 5 and 7 steps only; the "
                  "uniform and DP rows are the ones the issue asks for; a missing one of those has not been reached "
                  "yet and resumes with the same command).", ""]
    runs = {r["name"]: r for r in rows if r["kind"] == "search" and r["name"][:4] in ("ddim", "gene")}
    if runs:
        lines += _gene_section(args, out, runs, [r for r in rows if r["kind"] == "stepside"])
    searched = {r["name"] for r in rows if r["kind"] == "search"}
    if "dp-grouping-s0" in searched:
        lines += _grouping_section(out, searched, [r for r in rows if r["kind"] == "grouping-validated"], ref100)
    st = {r["name"]: r for r in rows if r["kind"] == "stack"}
    if st:
        lines += ["## Stacking quantization and reuse", "",
                  "| case | steps | bits | reused calls | BitOPs / FP 100 steps | FID |", "|---|---:|---|---|---:|---:|"]
        for name in ("fp", "quant", "reuse", "both", "joint"):
            r = st.get(name)
            if r:
                lines.append(f"| {name} | {len(r['timesteps'])} | {_bits_text(r['bits'])} | {r['reuse']} | "
                             f"{r['bitops_share_of_fp100']:.4f} | {r['fid']:.4f} |")
        if all(k in st for k in ("fp", "quant", "reuse", "both")):
            dq, dr, db = (st[k]["fid"] - st["fp"]["fid"] for k in ("quant", "reuse", "both"))
            lines += ["", f"FID added to FP on the same {len(st['fp']['timesteps'])} steps (N = {st['fp']['n']}, noise "
                      f"seed {st['fp']['seed']}): quantization alone {dq:+.4f}, reuse alone {dr:+.4f}, both naively "
                      f"{db:+.4f} against a sum of {dq + dr:+.4f}"
                      + ((": the two stack " + ("super-additively (the effect CacheQuant reports)" if db > dq + dr
                                                else "at most additively") + f", ratio {db / (dq + dr):.2f}.")
                         if dq > 0 and dr > 0 else " (one of the two alone adds no FID: no stacking to read).")]
            if "joint" in st:
                j = st["joint"]
                lines.append(f"The joint search's proxy-best point at no more BitOPs than both naively "
                             f"({len(j['timesteps'])} steps, {len(j['reuse'])} reused calls): FID {j['fid']:.4f} vs "
                             f"{st['both']['fid']:.4f}.")
        lines.append("")
    for r in (r for r in rows if r["kind"] == "speed" and r.get("origin") == "search"):
        f = [r["fid_seeds"][k] for k in sorted(r["fid_seeds"])]
        ratio = r["fid_mean"] / ref100["fid"] if ref100 else float("nan")
        lines += [f"## Speed at equal quality: a searched point ({r['name']})", "",
                  f"`{r['key']}`, {r['solver']}, {r['steps']} steps ({r['timesteps']}), {r['reused']} reused calls, "
                  f"{r['bitops_frac']:.3%} of the FP 100-step BitOPs: picked by `--part grouping-speed`'s rule (of "
                  "the grouping comparison's validated points within 1.15x, the fewest full denoiser calls, then the "
                  "fewest BitOPs), exported from its run and timed as the step-side point below.", "",
                  f"- validated FID (N = {r['n_validated']}, seeds 1 / 2): {' / '.join(f'{v:.4f}' for v in f)}, mean "
                  f"{r['fid_mean']:.4f} = **{ratio:.3f}x** the FP DDIM 100-step FID; proxy {r['fid_proxy']:.4f}",
                  _speed_line(r["speed"]), ""]
    for r in (r for r in rows if r["kind"] == "speed" and r.get("origin") != "search"):
        sp = r["speed"]
        seeds = " / ".join(f"{v:.4f}" for _, v in sorted(r["fid_seeds"].items()))
        ratio = r["fid_mean"] / ref100["fid"] if ref100 else float("nan")
        lines += [f"## Speed at equal quality: a step-side point ({r['name']})", "",
                  f"{r['solver']} on the DP-optimal timesteps of {r['steps']} steps ({r['timesteps']}), every layer "
                  f"at W{r['bits'][0]}A{r['bits'][1]} (the int8 kernels' own width: lower bits add error, no speed), "
                  f"{r['bitops_frac']:.3%} of the FP 100-step BitOPs. Fixed after the FP grid showed this schedule's "
                  f"FP FID ({r['fp_fid']:.4f}) and before the point was validated; added to a run of "
                  "`configs/solvers.toml` (no search) as an evaluated candidate and validated, exported and timed as "
                  "`benchmarks.final` does its picks.", "",
                  f"- validated FID (N = {r['n_validated']}, seeds 1 / 2): {seeds}, mean {r['fid_mean']:.4f} = "
                  f"**{ratio:.3f}x** the FP DDIM 100-step FID (target for the speed pick: <= 1.15x); FP on the same "
                  f"schedule {r['fp_fid']:.4f}; proxy {r['fid_proxy']:.4f}",
                  _speed_line(sp), ""]
    if rows:
        lines += ["## How it was produced", "", "Resumable; rows in `rows.jsonl` (each with its command, machine and "
                  "time), raw search logs in `raw/`.", ""]
        lines += [f"- command: `{c}`" for c in dict.fromkeys(r["command"] for r in rows if "command" in r)]
        lines += [f"- machine: {m}" for m in dict.fromkeys(r["machine"] for r in rows if "machine" in r)] + [""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True,
                    choices=("fp", "gene", "stacking", "speed", "grouping", "grouping-validate",
                             "grouping-speed", "report"))
    ap.add_argument("--out", default="results/solvers")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--solvers", type=lambda s: s.split(","), default=list(SOLVERS))
    ap.add_argument("--gene-solvers", type=lambda s: s.split(","), default=list(GENE_SOLVERS))
    ap.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[5, 7, 10, 14, 20])
    ap.add_argument("--schedules", type=lambda s: s.split(","), default=["uniform", "trailing", "dp"],
                    help="fp part: timestep spacings, of uniform (DDIM's leading), trailing, dp")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--ddim-from-baseline", default="", help="fp part: take FP DDIM uniform rows from this "
                    "benchmarks.baseline rows.jsonl (e.g. results/baseline/rows.jsonl) once its 5-step row reproduces")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--branch", type=int, default=1)
    ap.add_argument("--stack-steps", type=int, default=20)
    ap.add_argument("--stack-bits", type=lambda s: tuple(int(v) for v in s.split(",")), default=(6, 6))
    ap.add_argument("--population", type=int, default=0, help="override the demo's population (0: keep it)")
    ap.add_argument("--generations", type=int, default=1, help="with --population: generations")
    ap.add_argument("--speed-solver", default="dpm++-2", help="speed part: the solver of the step-side point")
    ap.add_argument("--speed-steps", type=int, default=7, help="speed part: its steps (DP-optimal timesteps)")
    ap.add_argument("--speed-bits", type=lambda s: tuple(int(v) for v in s.split(",")), default=(8, 8),
                    help="speed part: every layer's W,A bits")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bad = sorted(set(args.schedules) - {"uniform", "trailing", "dp"})
    if bad:
        raise SystemExit(f"--schedules: unknown spacing {', '.join(bad)} (uniform, trailing, dp)")
    cpu_setup(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RowLog(out / "rows.jsonl", ("kind", "name", "solver", "schedule", "steps", "n", "seed"))
    if args.part == "fp":
        part_fp(args, log)
    elif args.part == "gene":
        part_gene(args, log)
    elif args.part == "stacking":
        part_stacking(args, log)
    elif args.part == "speed":
        part_speed(args, log)
    elif args.part == "grouping":
        part_grouping(args, log)
    elif args.part == "grouping-validate":
        part_grouping_validate(args, log)
    elif args.part == "grouping-speed":
        part_grouping_speed(args, log)
    write_report(args, log)
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
