"""Search benchmark (issue 4): proxy fidelity, front quality against baselines and other engines, joint vs
single-axis search, groupings. Resumable: rows in <out>/rows.jsonl, search runs in <out>/runs/<name> (resumed).

    .venv/bin/python -m benchmarks.search --part fidelity        # Kendall tau of proxies vs FID@10k (~1.5 h)
    .venv/bin/python -m benchmarks.search --part front           # 4 engines x 3 seeds + uniform baselines (~1.5 h)
    .venv/bin/python -m benchmarks.search --part axes            # joint vs time-only vs bits-only (~15 min)
    .venv/bin/python -m benchmarks.search --part grouping        # quad / uniform / error / sensitivity groups (~25 min)
    .venv/bin/python -m benchmarks.search --part report          # rewrite README.md and the plots from the rows

results/search was measured with quadratic time groups and one set of activation ranges (the defaults of --grouping
and --time-groups here); the library's defaults since then (uniform groups, supernet.time_groups = 4) are measured by
the front part into another directory:

    .venv/bin/python -m benchmarks.search --part front --grouping uniform --time-groups 4 --out results/search-defaults

Any model: ``--model embedded-dit --guidance 2`` (or a model directory) gives every run that [model] section.

All parts share one supernet calibrated once (<out>/supernet.safetensors) with the default supernet and
calibration settings, and one proxy (configurable: --proxy, --proxy-n). Every search runs the local executor with
all torch threads (--threads) so that evaluation budgets, not parallelism, are compared. Times are for 2 cores with
nothing else running (one 200-evaluation search of 10-step candidates at proxy N = 128: 6.2 min).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RowLog,
    calibrated_supernet,
    cpu_setup,
    findings,
    keep_raw,
    log_proxy,
    run_evaluations,
)
from tmpq.core.candidate import Candidate

UNIFORM_BASELINES = [(w, a, sched, n) for (w, a) in ((8, 8), (6, 6), (4, 8)) for sched in ("uniform", "quad")
                     for n in (5, 10, 20)]
# the FP model on the same schedules, scored by the same proxy: what each schedule costs before any quantization
# (reported beside the baselines, not part of the dominance check)
# step counts of the fidelity candidates (the proxy must rank across step counts as well as bit allocations)
FIDELITY_STEPS = (5, 7, 10, 14, 20)
SUBSET_N = 128  # the disjoint subsets of the fidelity part's 10,000 images
FP_SCHEDULES = [(sched, n) for sched in ("uniform", "quad") for n in (5, 10, 20)]


# -- shared pieces ---------------------------------------------------------------------------------------------------
def supernet_file(args, out: Path) -> Path:
    """Calibrate the benchmark's supernet (the default but for ``run_pins``) once (resumable per option) and keep it
    for every part."""
    from tmpq.jobs.config import config_from_dict

    path = out / "supernet.safetensors"
    if path.is_file():
        return path
    cpu_setup(args.threads)
    return calibrated_supernet(config_from_dict(run_pins(args)), path, "shared")


def run_pins(args) -> dict:
    """Settings the benchmark sets apart from the library's defaults: ``--time-groups`` (default 1: results/search was
    measured with one set of activation ranges for all timesteps, the default before supernet.time_groups, now 4;
    pinned so that its committed runs resume and its report reproduces)."""
    pins = {"supernet": {"time_groups": args.time_groups}}
    if (getattr(args, "model", "embedded"), getattr(args, "guidance", 1.0)) != ("embedded", 1.0):  # another model
        pins["model"] = {"path": args.model, "guidance_scale": args.guidance}
    return pins


def run_config(args, sn: Path, **search):
    from tmpq.jobs.config import config_from_dict

    return config_from_dict({
        **run_pins(args),
        "calibration": {"supernet_file": str(sn)},
        "search": {"engine": "pymoo", "grouping": args.grouping, "steps": args.steps, "step_choices": list(args.step_choices),
                   "population": args.population, "generations": args.generations, "bitops_budget": "none",
                   **search},
        "proxy": {"name": args.proxy, "n_images": args.proxy_n},
        "executor": {"kind": "local", "threads_per_worker": args.threads},
    })


def search(args, log: RowLog, name: str, sn: Path, **search) -> Path:
    """Run (or resume, or skip when finished) one search; returns its run directory."""
    from tmpq.jobs.search import run_search

    path = Path(args.out) / "runs" / name
    if log.has(kind="search", name=name):
        if (path / "evaluations.jsonl").is_file():
            keep_raw(path)  # runs finished before raw logs were kept
        return path
    cfg = run_config(args, sn, **search)
    t0 = time.perf_counter()
    run = run_search(cfg, path, resume=(path / "config.resolved.json").is_file(), progress=True)
    ev = _evaluations(run.path)
    keep_raw(run.path)
    log.append({"kind": "search", "name": name, "search": search, "evaluations": len(ev),
                "wall_s": round(time.perf_counter() - t0, 1), "eval_s_mean": float(ev["wall_s"].mean())})
    return path


def _evaluations(run_path: Path):
    """A run's successful evaluations, from its directory or, on a fresh clone, its committed raw log."""
    ev = run_evaluations(run_path)
    return ev[ev["status"] == "ok"]


def _proxy_gbitops(ev) -> np.ndarray:
    return np.stack([ev["fid_proxy"].to_numpy(float), ev["bitops"].to_numpy(float) / 1e9], axis=1)


def points(run_path: Path) -> np.ndarray:
    """(proxy, GBitOPs) of every successful evaluation of a run."""
    return _proxy_gbitops(_evaluations(run_path))


def seed_points(run_path: Path) -> np.ndarray:
    """(proxy, GBitOPs) of a run's uniform-bit seeds: first-generation candidates with one option on every gene."""
    ev = _evaluations(run_path)
    return _proxy_gbitops(ev[(ev["generation"] == 0) & ev["bits"].map(lambda b: len({tuple(x) for x in b}) == 1)])


def evaluator(args, sn: Path):
    from tmpq.jobs.search import WorkerSpec

    model = run_pins(args).get("model", {"path": "embedded"})
    spec = WorkerSpec(model, str(sn), {"name": args.proxy, "n_images": args.proxy_n}, args.threads)
    return spec()


def baseline_points(args, log: RowLog, sn: Path) -> list[dict]:
    """Uniform W8A8 / W6A6 / W4A8 x uniform / quad DDIM x 5 / 10 / 20 steps, scored with the search's proxy."""
    from tmpq.core.schedules import make_timesteps

    ev, rows = None, []
    for w, a, sched, n in UNIFORM_BASELINES:
        name = f"W{w}A{a} {sched} {n}"
        if not log.has(kind="baseline", name=name):
            if ev is None:
                ev = evaluator(args, sn)
            alloc = [(w, a)] * ev.net.num_genes
            obj = ev.evaluate(Candidate(make_timesteps(sched, n), alloc))
            log.append({"kind": "baseline", "name": name, "w": w, "a": a, "schedule": sched, "steps": n,
                        "fid_proxy": obj["fid_proxy"], "gbitops": ev.net.bitops(alloc) * n / 1e9,
                        "eval_s": obj["eval_s"]})
        rows.append(next(r for r in log.rows.values() if r["kind"] == "baseline" and r["name"] == name))
    for sched, n in FP_SCHEDULES:
        name = f"FP {sched} {n}"
        if not log.has(kind="fp-schedule", name=name):
            if ev is None:
                ev = evaluator(args, sn)
            obj = ev.evaluate(Candidate.fp(make_timesteps(sched, n)))
            log.append({"kind": "fp-schedule", "name": name, "schedule": sched, "steps": n,
                        "fid_proxy": obj["fid_proxy"], "paired_pixel_mse": obj["paired_pixel_mse"],
                        "eval_s": obj["eval_s"]})
    return rows


# -- parts -------------------------------------------------------------------------------------------------------------
def part_fidelity(args, log: RowLog, sn: Path) -> None:
    """>= 30 diverse candidates: each proxy (and its wall time) vs FID at N = 10,000 on the same candidate."""
    from tmpq.core.sampler import sample_images
    from tmpq.evaluators.fid import FeatureStats
    from tmpq.evaluators.quality import embedded_reference, score_features
    from tmpq.search.groups import quadratic_groups, uniform_groups
    from tmpq.search.space import SearchSpace

    ev = evaluator(args, sn)
    # diverse candidates: step count (5-20), grouping (quad / uniform), one timestep drawn per group, and random bits
    # with a per-candidate probability of the lower options, so that total BitOPs span the whole range
    # results/search drew from both groupings; on the library's default (--grouping uniform) the candidates are the
    # search's own kind: uniform groups only
    makers = (("quad", quadratic_groups), ("uniform", uniform_groups)) if args.grouping == "quad" else \
        (("uniform", uniform_groups),)
    spaces = {(grp, n): SearchSpace.from_supernet(ev.net, make(n)) for grp, make in makers for n in FIDELITY_STEPS}
    keys = sorted(spaces)
    rng = np.random.default_rng(args.seed)
    pool = []
    for _ in range(3000):
        space = spaces[keys[rng.integers(len(keys))]]
        g = space.sample(rng)
        bits = g[space.n_steps:]
        low = rng.uniform(size=bits.size) < rng.uniform()
        ub = space.upper_bounds()[space.n_steps:]
        bits[low] = ub[low] - 1
        g[space.n_steps:] = bits
        c = space.decode(g)
        pool.append((space.bitops(c), c))
    pool.sort(key=lambda x: x[0])
    base = spaces[(makers[0][0], 10)]
    picks = [pool[i][1] for i in np.linspace(0, len(pool) - 1, args.n_cand - 3).round().astype(int)]
    picks += [base.uniform_candidate(w, a) for w, a in ((8, 8), (6, 6), (4, 8))]
    ref = embedded_reference(ev.extractor)
    # rows recorded before a small N was added: sample just those n images (bank indices 0..n-1, the same images as
    # the first n of the 10,000) and score them
    for r in [r for r in list(log.rows.values()) if r["kind"] == "fidelity"]:
        missing = [n for n in args.small_n if f"fid_n{n}" not in r]
        if missing:
            ev.net.set_bits([tuple(p) for p in r["bits"]])
            imgs = sample_images(ev.net.unet, ev.scheduler, r["timesteps"], max(missing), seed=args.seed + 1,
                                 progress=False)
            extra = _small_n_scores(ev.extractor(imgs), ref, missing)
            log.append({k: v for k, v in r.items() if k not in ("command", "machine", "finished")} | extra
                       | {"backfilled": sorted(extra)})
    # visited in a shuffled order, so that a partial run already spans the BitOPs range
    for i in np.random.default_rng(args.seed).permutation(len(picks)).tolist():
        c = picks[i]
        if log.has(kind="fidelity", name=f"cand{i:02d}"):
            continue
        proxy = ev.evaluate(c)
        ev.net.set_bits(c.bits)
        t0 = time.perf_counter()
        imgs = sample_images(ev.net.unet, ev.scheduler, c.timesteps, 10_000, seed=args.seed + 1,
                             desc=f"cand {i} FID@10k")
        feats = ev.extractor(imgs)
        full_s = time.perf_counter() - t0
        full = score_features(feats, ref)
        # small-N FID / KID on the first n images: the noise bank is indexed, so these are exactly the images a
        # separate n-image run with the same seed would draw (common noise across candidates); cost ~ n / 10,000
        small = _small_n_scores(feats, ref, args.small_n)
        # the proxy exactly as the search computes it (``fid_proxy``: the proxy's own bank seed, ProxyConfig.seed,
        # independent of the 10,000 images' seed --seed + 1), and FID on every disjoint 128-image subset of the
        # 10,000 (the spread of a small-N FID's ranking over noise draws; FID only, no KID)
        subsets = [FeatureStats.from_features(feats[j:j + SUBSET_N]).fid(ref.stats)
                   for j in range(0, len(feats) - SUBSET_N + 1, SUBSET_N)]
        log.append({"kind": "fidelity", "name": f"cand{i:02d}", "timesteps": list(c.timesteps),
                    "bits": [list(b) for b in c.bits], "steps": len(c.timesteps),
                    "gbitops": base.bitops(c) / 1e9, "fid_proxy": proxy["fid_proxy"], "proxy_seed": ev.cfg.seed,
                    "fid10k_seed": args.seed + 1,
                    "fid_sub128": subsets,
                    "paired_feat": proxy["paired_feat"], "paired_pixel_mse": proxy["paired_pixel_mse"],
                    "proxy_s": proxy["eval_s"], "proxy_n": args.proxy_n, **small,
                    "fid10k": full["fid"], "kid10k": full.get("kid"), "fid10k_s": round(full_s, 1)})


def _small_n_scores(feats: np.ndarray, ref, ns) -> dict:
    """FID and KID of the first n feature rows, for each n in ``ns``."""
    from tmpq.evaluators.quality import score_features

    out = {}
    for n in ns:
        s = score_features(feats[:n], ref)
        out[f"fid_n{n}"], out[f"kid_n{n}"] = s["fid"], s.get("kid")
    return out


def part_front(args, log: RowLog, sn: Path) -> None:
    baseline_points(args, log, sn)
    # the paper's EA runs at the paper's population (50 new candidates per generation; search.population, which the
    # engine honours, pinned so that the committed rows reproduce): it gets as many generations as give it the same
    # evaluation budget as the others (population x generations), and the paper's BitOPs constraint
    paper_gens = max(1, round(args.population * args.generations / 50))
    # random-plain: random search without the uniform seeds every other engine starts from (the textbook baseline;
    # "random" gets the seeds, so the two show how much of a front the seeds alone give)
    for seed in range(args.seeds):
        for engine in args.engines:
            extra = ({"bitops_budget": "w6a6", "generations": paper_gens, "population": 50} if engine == "paper-ea"
                     else {})
            if engine == "random-plain":
                extra = {"engine": "random", "uniform_seeds": False}
            search(args, log, f"{engine}-s{seed}", sn, **{"engine": engine, "seed": seed, **extra})


def part_axes(args, log: RowLog, sn: Path) -> None:
    search(args, log, "pymoo-s0", sn, engine="pymoo", seed=0)
    # time-only: one search per uniform bit option, a third of the budget each (same total evaluations: 2
    # generations of a third of the joint search's evaluations / 2)
    gens = 2
    pop = max(2, round(args.population * args.generations / (3 * gens)))
    for w, a in ((8, 8), (6, 6), (4, 8)):
        search(args, log, f"time-w{w}a{a}", sn, axes="time", fixed_bits=f"w{w}a{a}", generations=gens, population=pop)
    search(args, log, "bits-quad", sn, axes="bits")


GROUPING_STEPS = (5, 7, 10, 14, 20)


def fp_grouping_rows(args, log: RowLog, sn: Path) -> None:
    """The FP model on each grouping's seed schedule (every group's first timestep) at 5-20 steps, same proxy: how
    good a schedule each grouping starts its search from."""
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.jobs.search import fp_profile
    from tmpq.search.groups import make_groups
    from tmpq.search.sensitivity import PROFILES

    ev, profiles = None, {}
    for kind in ("uniform", "quad", "error", "sensitivity"):
        for n in GROUPING_STEPS:
            name = f"FP {kind} groups {n}"
            if log.has(kind="fp-grouping", name=name):
                continue
            if kind in PROFILES and kind not in profiles:  # the search's own profile: same FP model, seed 0
                m = load_model(ModelConfig(**run_pins(args).get("model", {})))
                profiles[kind] = fp_profile(kind, m.unet, make_scheduler(m.scheduler_config), seed=0)
            groups = make_groups(kind, n, profile=profiles.get(kind))
            if ev is None:
                ev = evaluator(args, sn)
            obj = ev.evaluate(Candidate.fp(sorted(groups.starts, reverse=True)))
            log.append({"kind": "fp-grouping", "name": name, "grouping": kind, "steps": n,
                        "starts": list(groups.starts), "fid_proxy": obj["fid_proxy"], "eval_s": obj["eval_s"]})


def part_grouping(args, log: RowLog, sn: Path) -> None:
    fp_grouping_rows(args, log, sn)
    search(args, log, "pymoo-s0", sn, engine="pymoo", seed=0)
    for grouping in ("uniform", "sensitivity", "error"):
        search(args, log, f"group-{grouping}", sn, grouping=grouping)
    # the default grouping on further seeds: does its front dominate every uniform baseline on more than one seed?
    for seed in range(1, args.seeds):
        search(args, log, f"group-uniform-s{seed}", sn, grouping="uniform", seed=seed)


# -- report ------------------------------------------------------------------------------------------------------------
def write_report(args, log: RowLog) -> None:
    from scipy.stats import kendalltau

    from tmpq.search.pareto import dominates_all, hypervolume_2d, non_dominated

    out = Path(args.out)
    rows = list(log.rows.values())
    model = getattr(args, "model", "embedded")
    lines = ["# Search benchmark (issue 4)" + (f": model `{model}`, guidance {args.guidance:g}" if model != "embedded"
                                              else ""), "", *findings(out),
             ("Embedded model" if getattr(args, "model", "embedded") == "embedded"
              else f"Model `{args.model}`, guidance {args.guidance}")
             + "; searches pick the step count from "
             f"{', '.join(map(str, args.step_choices or [args.steps]))} (reference {args.steps} steps; {args.grouping} "
             "time groups unless stated), supernet "
             f"W{{8,6,4}} x A{{8,6}} calibrated once with the default settings but time_groups = {args.time_groups}, "
             "proxy "
             f"`{args.proxy}` at N = {args.proxy_n} (FP teacher: uniform DDIM 100 steps, same noise bank).", ""]
    fid = [r for r in rows if r["kind"] == "fidelity"]
    if len(fid) >= 3:
        ref = [r["fid10k"] for r in fid]
        lines += [f"## Proxy fidelity ({len(fid)} candidates)", "",
                  "| proxy | Kendall tau vs FID@10k | mean wall s | cost vs FID@10k |", "|---|---:|---:|---:|"]
        cost10k = float(np.mean([r["fid10k_s"] for r in fid]))
        pn = fid[0]["proxy_n"]
        cands = [(f"paired-feat (N={pn})", "paired_feat", float(np.mean([r["proxy_s"] for r in fid]))),
                 (f"paired pixel MSE (N={pn})", "paired_pixel_mse", float(np.mean([r["proxy_s"] for r in fid])))]
        # small-N FID / KID: the first n of the 10,000 images, so their cost is n / 10,000 of it
        for k in sorted(fid[0], key=lambda k: (k[:3], int(k[5:]) if k[5:].isdigit() else 0)):
            if k.startswith(("fid_n", "kid_n")) and all(r.get(k) is not None for r in fid):
                cands.append((f"{k[:3].upper()} at N={k[5:]}", k, cost10k * int(k[5:]) / 10_000))
        cands.append(("KID at N=10,000", "kid10k", cost10k))
        for label, key, cost in cands:
            tau = kendalltau([r[key] for r in fid], ref)[0]
            lines.append(f"| {label} | {tau:.3f} | {cost:.1f} | {100 * cost / cost10k:.1f} % |")
        by_steps = sorted({r["steps"] for r in fid if "steps" in r})
        for n in by_steps:  # within one step count: does the proxy rank bit allocations?
            sub = [r for r in fid if r.get("steps") == n]
            for key, label in (("paired_feat", "paired-feat"), ("fid_n128", "FID at N=128")):
                if len(sub) >= 4 and all(key in r for r in sub):
                    tau = kendalltau([r[key] for r in sub], [r["fid10k"] for r in sub])[0]
                    lines.append(f"| {label}, only the {len(sub)} candidates of {n} steps | {tau:.3f} | | |")
        if all("fid_sub128" in r and "fid_proxy" in r for r in fid):
            taus = np.array([kendalltau([r["fid_sub128"][j] for r in fid], ref)[0]
                             for j in range(min(len(r["fid_sub128"]) for r in fid))])
            tau_search = kendalltau([r["fid_proxy"] for r in fid], ref)[0]
            lines += ["", f"**The search's own proxy** (`fid_proxy`: FID at N = {pn} on its bank seed "
                      f"{fid[0]['proxy_seed']}, as logged by every search) against FID@10k on independent noise (seed "
                      f"{fid[0]['fid10k_seed']}): Kendall tau **{tau_search:.3f}**. FID at N = {SUBSET_N} on each of "
                      f"the {len(taus)} disjoint {SUBSET_N}-image subsets of the 10,000 images: tau mean "
                      f"**{taus.mean():.3f} +- {taus.std(ddof=1):.3f}** (sd), median {np.median(taus):.3f}, range "
                      f"{taus.min():.3f} to {taus.max():.3f} (each subset is part of the 10,000 images it is ranked "
                      "against, so these are slightly optimistic; the search proxy above is not)."]
        lines += ["", f"FID@10k: mean {cost10k:.0f} s per candidate (sampling + features).", ""]
        _plot_fidelity(out, fid)
        lines += ["![proxy fidelity](fidelity.png)", ""]
    base_rows = [r for r in rows if r["kind"] == "baseline"]
    fp_rows = {r["name"]: r for r in rows if r["kind"] == "fp-schedule"}
    if base_rows:
        lines += ["## Uniform baselines and the FP model on the same schedules (proxy, lower is better)", "",
                  "| schedule | FP | W8A8 | W6A6 | W4A8 |", "|---|---:|---:|---:|---:|"]
        for sched in ("uniform", "quad"):
            for n in (5, 10, 20):
                fp = fp_rows.get(f"FP {sched} {n}")
                cells = [f"{fp['fid_proxy']:.2f}" if fp else "-"]
                for w, a in ((8, 8), (6, 6), (4, 8)):
                    b = next((r for r in base_rows if r["name"] == f"W{w}A{a} {sched} {n}"), None)
                    cells.append(f"{b['fid_proxy']:.2f} ({b['gbitops']:.1f} G)" if b else "-")
                lines.append(f"| {sched} {n} | " + " | ".join(cells) + " |")
        lines.append("")
    fpg = {(r["grouping"], r["steps"]): r for r in rows if r["kind"] == "fp-grouping"}
    if fpg:
        kinds = [k for k in ("uniform", "quad", "error", "sensitivity") if any(g == k for g, _ in fpg)]
        lines += ["## The FP model on each grouping's seed schedule (first timestep of every group; proxy)", "",
                  "| steps | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for n in GROUPING_STEPS:
            lines.append(f"| {n} | " + " | ".join(f"{fpg[(k, n)]['fid_proxy']:.2f}" if (k, n) in fpg else "-"
                                                  for k in kinds) + " |")
        lines += ["", "Group starts at 10 steps: " + "; ".join(
            f"{k} {fpg[(k, 10)]['starts']}" for k in kinds if (k, 10) in fpg), ""]
    runs = {r["name"]: r for r in rows if r["kind"] == "search"}
    base = [r for r in rows if r["kind"] == "baseline"]
    all_pts = {name: points(out / "runs" / name) for name in runs}
    if all_pts:
        # the reference point bounds the region of the uniform baselines (1.1 x their worst proxy and largest
        # BitOPs): a stable region, not one that a single very bad candidate of some run stretches
        bstack = np.array([[b["fid_proxy"], b["gbitops"]] for b in base]) if base else \
            np.concatenate(list(all_pts.values()))
        refpt = bstack.max(axis=0) * 1.1
        hv = {name: hypervolume_2d(p, refpt) for name, p in all_pts.items()}
        lines += ["## Front quality", "", f"Hypervolume of all evaluated points (proxy, GBitOPs) against the reference "
                  f"point ({refpt[0]:.4g}, {refpt[1]:.4g}) = 1.1 x the uniform baselines' worst proxy and largest "
                  "BitOPs (points beyond it add nothing). Uniform baselines dominated by the run's front: strictly "
                  "(a front point <= in both objectives and < in one), and in brackets weakly (<= in both), which "
                  "also counts a baseline the run evaluated itself as one of its uniform seeds.", "",
                  "| run | evaluations | hypervolume | front size | uniform baselines dominated: strictly (weakly) |",
                  "|---|---:|---:|---:|---|"]
        bpts = np.array([[b["fid_proxy"], b["gbitops"]] for b in base]) if base else np.zeros((0, 2))
        for name, p in sorted(all_pts.items()):
            f = p[non_dominated(p)]
            strict, weak = dominates_all(f, bpts, strict=True), dominates_all(f, bpts)
            beaten = f"{int(strict.sum())}/{len(bpts)} ({int(weak.sum())})" if len(bpts) else "-"
            lines.append(f"| {name} | {len(p)} | {hv[name]:.4g} | {int(non_dominated(p).sum())} | {beaten} |")
        # the paper's EA only searches under its constraint (BitOPs <= uniform W6A6 at the same steps): it is also
        # compared inside that region, where the reference point's BitOPs coordinate is the constraint itself
        w6 = next((b["gbitops"] for b in base if b["name"] == f"W6A6 quad {args.steps}"), None)
        # the proxy spans an order of magnitude (FID@128 from ~1.6 to ~27): on a linear axis the hypervolume is
        # dominated by the easy high-proxy region, so it is also given on log10(proxy) (same reference point, logged)
        ident, logp = (lambda p: p), log_proxy
        regions = [("whole range", refpt, ident), ("whole range, log10 proxy", refpt, logp)]
        if w6:
            regions += [("BitOPs <= W6A6", np.array([refpt[0], w6]), ident),
                        ("BitOPs <= W6A6, log10 proxy", np.array([refpt[0], w6]), logp)]
        for other in ("random", "paper-ea", "random-plain"):
            for label, rp, tf in regions:
                rp = tf(rp[None, :])[0]
                pairs = [(hypervolume_2d(tf(all_pts[f"pymoo-s{s}"]), rp),
                          hypervolume_2d(tf(all_pts[f"{other}-s{s}"]), rp))
                         for s in range(args.seeds) if f"pymoo-s{s}" in all_pts and f"{other}-s{s}" in all_pts]
                if pairs and np.mean([b for _, b in pairs]) > 0:
                    ratio = float(np.mean([a for a, _ in pairs]) / np.mean([b for _, b in pairs]))
                    lines.append(f"- mean hypervolume pymoo / {other} ({label}) over {len(pairs)} seeds: "
                                 f"**{ratio:.3f}x**")
        # every engine starts from uniform-bit seeds (SearchSpace.uniform_seeds; the paper EA only from those under
        # its constraint): what each adds beyond its own seeds separates the engines more sharply than the raw
        # hypervolume, which the seeds inflate alike
        gains = {}
        for s in range(args.seeds):
            for other in ("pymoo", "random", "paper-ea"):  # random-plain has no seeds: all it has is a gain
                name = f"{other}-s{s}"
                if name in all_pts and f"pymoo-s{s}" in all_pts:
                    gains.setdefault(other, []).append(
                        hv[name] - hypervolume_2d(seed_points(out / "runs" / name), refpt))
        if gains.get("pymoo"):
            others = [f"{k} **{np.mean(gains['pymoo']) / np.mean(v):.2f}x**" for k, v in gains.items()
                      if k != "pymoo" and np.mean(v) > 0]
            lines.append("- hypervolume added beyond each run's own uniform seeds (mean over seeds): "
                         + ", ".join(f"{k} {np.mean(v):.4g}" for k, v in gains.items())
                         + ("; pymoo / " + ", pymoo / ".join(others) if others else ""))
        lines += _ceiling(all_pts, hv, refpt, args.seeds)
        lines.append("")
        lines += _axes_table(all_pts, refpt)
        _plot(out, all_pts, base)
        lines += ["![fronts](fronts.png)", ""]
    any_row = next(iter(log.rows.values()), None)
    if any_row:
        lines += ["## How it was produced", "",
                  f"- commands: `{args.cmd_doc}` (parts: fidelity, front, axes, grouping; resumable)",
                  f"- machine: {any_row['machine']}",
                  f"- seed {args.seed} (fidelity candidates drawn with it, their images from noise-bank seed "
                  f"{args.seed + 1}); search seeds 0..{args.seeds - 1} in the front part; rows in `rows.jsonl`", ""]
    (out / "README.md").write_text("\n".join(lines))


def _ceiling(all_pts: dict, hv: dict, refpt: np.ndarray, seeds: int) -> list[str]:
    """How far above the seeded random search any front could be: the front of every evaluation of every run here
    together (the best known), and the utopia box (one point with the lowest proxy and the lowest BitOPs any run
    reached; no front of these candidates can exceed it), as multiples of the mean random run's hypervolume."""
    from tmpq.search.pareto import hypervolume_2d

    rnd = [hv[f"random-s{s}"] for s in range(seeds) if f"random-s{s}" in hv]
    if not rnd:
        return []
    union = np.concatenate(list(all_pts.values()))
    best = hypervolume_2d(union, refpt)
    utopia = hypervolume_2d(union.min(axis=0, keepdims=True), refpt)
    n = sum(len(p) for p in all_pts.values())
    return [f"- ceiling against the seeded random search (mean hypervolume {np.mean(rnd):.4g}): the front of all {n} "
            f"evaluations of the {len(all_pts)} runs here together {best:.4g} = **{best / np.mean(rnd):.3f}x**; the "
            f"utopia box (proxy {union[:, 0].min():.3g} and {union[:, 1].min():.3g} GBitOPs in one point, which no "
            f"candidate reaches) {utopia:.4g} = {utopia / np.mean(rnd):.3f}x"]


AXES_RUNS = {"time-w8a8": "timestep-only, bits held at uniform W8A8", "time-w6a6": "timestep-only, uniform W6A6",
             "time-w4a8": "timestep-only, uniform W4A8",
             "time-all": "timestep-only, the three uniform options together",
             "bits-quad": "bits-only, schedule held at quadratic DDIM", "group-uniform": "joint, uniform time groups",
             "group-sensitivity": "joint, data-driven (sensitivity) time groups",
             "group-error": "joint, data-driven (step-error) time groups"}


def _axes_table(all_pts: dict, refpt: np.ndarray) -> list[str]:
    """The joint search (pymoo-s0: quadratic groups) against the single-axis and other-grouping searches: hypervolume
    on linear and log10 proxy, and coverage both ways (share of one front weakly dominated by the other's front)."""
    from tmpq.search.pareto import dominates_all, hypervolume_2d, non_dominated

    joint = all_pts.get("pymoo-s0")
    pts = dict(all_pts)
    times = [pts[k] for k in ("time-w8a8", "time-w6a6", "time-w4a8") if k in pts]
    if len(times) == 3:  # the three fixed-bit searches share the budget: their union is the timestep-only front
        pts["time-all"] = np.concatenate(times)
    others = [k for k in AXES_RUNS if k in pts]
    if joint is None or not others:
        return []
    jf = joint[non_dominated(joint)]
    lines = ["## Joint vs single-axis searches, and time groupings", "",
             "Against the joint search `pymoo-s0` (quadratic groups, same evaluation budget; the three timestep-only "
             "searches get a third of it each). Coverage C(A, B) = share of B's front weakly dominated by A's "
             "front.", "",
             "| run | what | evaluations | HV | HV log10 proxy | HV / joint | C(joint, run) | C(run, joint) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    hj, hjl = hypervolume_2d(joint, refpt), hypervolume_2d(log_proxy(joint), log_proxy(refpt[None, :])[0])
    for k in others:
        p = pts[k]
        f = p[non_dominated(p)]
        h, hl = hypervolume_2d(p, refpt), hypervolume_2d(log_proxy(p), log_proxy(refpt[None, :])[0])
        lines.append(f"| {k} | {AXES_RUNS[k]} | {len(p)} | {h:.4g} | {hl:.4g} | {h / hj:.3f} (log {hl / hjl:.3f}) | "
                     f"{dominates_all(jf, f).mean():.2f} | {dominates_all(f, jf).mean():.2f} |")
    return lines + [""]


def _plot_fidelity(out: Path, fid: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("paired_feat", "paired-feat (N=%d)" % fid[0]["proxy_n"]), ("fid_n128", "FID at N=128 (common noise)")]
    keys = [(k, label) for k, label in keys if all(k in r for r in fid)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys) + 1, 4), squeeze=False, layout="constrained")
    steps = np.array([r.get("steps", 0) for r in fid])
    for ax, (k, label) in zip(axes[0], keys):
        sc = ax.scatter([r["fid10k"] for r in fid], [r[k] for r in fid], c=steps, cmap="viridis", s=22)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FID at N = 10,000")
        ax.set_ylabel(label)
    fig.colorbar(sc, ax=axes[0].tolist(), label="steps")
    fig.suptitle(f"proxy vs FID@10k over {len(fid)} candidates")
    fig.savefig(out / "fidelity.png", dpi=110)
    plt.close(fig)


def _plot(out: Path, all_pts: dict, base: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmpq.search.pareto import non_dominated

    panels = [("engines (seed 0)", [k for k in sorted(all_pts) if k.endswith("-s0")]),
              ("joint vs single-axis, groupings", ["pymoo-s0"] + [k for k in AXES_RUNS if k in all_pts])]
    panels = [(t, names) for t, names in panels if any(n in all_pts for n in names) and (t.startswith("engines")
                                                                                      or len(names) > 1)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            p = all_pts[name]
            f = p[non_dominated(p)]
            f = f[np.argsort(f[:, 1])]
            ax.step(f[:, 1], f[:, 0], where="post", label=name, lw=1.2)
        for b in base:
            ax.scatter(b["gbitops"], b["fid_proxy"], marker="x" if b["schedule"] == "uniform" else "+", color="k",
                       s=25)
        ax.set_xlabel("GBitOPs per image (whole schedule)")
        ax.set_ylabel("proxy (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"{title}; x: uniform DDIM, +: quad baselines", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fronts.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=("fidelity", "front", "axes", "grouping", "report"))
    ap.add_argument("--out", default="results/search")
    ap.add_argument("--model", default="embedded", help="model.path of every run (default: %(default)s; e.g. "
                    "embedded-dit or a model directory)")
    ap.add_argument("--guidance", type=float, default=1.0, help="model.guidance_scale of every run (default: 1)")
    ap.add_argument("--steps", type=int, default=10, help="reference step count (budgets, bits-only search)")
    ap.add_argument("--step-choices", type=lambda s: [int(v) for v in s.split(",") if v], default=[5, 7, 10, 14, 20],
                    help="step counts the searches may pick (a step-count gene); '' = fixed at --steps")
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--engines", type=lambda s: [v for v in s.split(",") if v],
                    default=["pymoo", "random", "paper-ea", "random-plain"],
                    help="front part: the engines run on every seed (default: %(default)s)")
    ap.add_argument("--proxy", default="fid", choices=("paired-feat", "fid"))
    ap.add_argument("--proxy-n", type=int, default=128)
    ap.add_argument("--n-cand", type=int, default=32)
    ap.add_argument("--small-n", type=lambda s: [int(v) for v in s.split(",")], default=[128, 250, 500])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grouping", default="quad", choices=("quad", "uniform"),
                    help="time groups of the searches (default quad: results/search; the library's default: uniform)")
    ap.add_argument("--time-groups", type=int, default=1,
                    help="supernet.time_groups of the shared supernet (default 1: results/search; the library's: 4)")
    args = ap.parse_args()
    shown = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    args.cmd_doc = "python -m benchmarks.search --part PART" + "".join(
        f" --{k.replace('_', '-')} {shown(getattr(args, k))}" for k in ("model", "guidance", "grouping", "time_groups",
                                                                       "population", "generations", "engines")
        if getattr(args, k) != ap.get_default(k)) + (f" --out {args.out}" if args.out != "results/search" else "")
    cpu_setup(args.threads)
    out = Path(args.out)
    log = RowLog(out / "rows.jsonl", ("kind", "name"))
    if args.part != "report":
        sn = supernet_file(args, out)
        {"fidelity": part_fidelity, "front": part_front, "axes": part_axes, "grouping": part_grouping}[args.part](
            args, log, sn)
    write_report(args, log)
    print(json.dumps({"report": str(out / "README.md")}))


if __name__ == "__main__":
    main()
