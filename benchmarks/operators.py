"""NSGA-II operator settings on a synthetic objective over the real search space (no sampling: seconds on 2 cores).

    python -m benchmarks.operators [--seeds 5] [--generations 5]

The space is the search benchmark's: the embedded model's 54 genes, W{8,6,4} x A{8,6}, step choices 5, 7, 10, 14, 20
on quadratic groups (genome of 129 genes). The objective has the real one's shape: a proxy that falls with steps and
with bits (per-gene sensitivities drawn log-normal, seed 123; each time gene wants the start of its group) and the
analytic BitOPs. It compares random search with pymoo NSGA-II at per-gene mutation 0.25 (tmpq before session 8, the
paper EA's rate), 1 / genes (the default now) and 3 / genes, with and without the uniform seeds, by hypervolume on
(log10 proxy, GBitOPs) at an equal budget of evaluations. Writes results/search/operators.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def synthetic_space():
    from tmpq.core.model import load_model
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.search import build_space
    from tmpq.search.groups import quadratic_groups
    from tmpq.supernet import QuantSupernet

    cfg = config_from_dict({"search": {"steps": 10, "step_choices": [5, 7, 10, 14, 20], "bitops_budget": "none"}})
    m = load_model(None)
    net = QuantSupernet(m.unet, cfg.supernet)
    return build_space(cfg, net, quadratic_groups(10), tuple(quadratic_groups(n) for n in cfg.search.step_choices))


def make_objective(sp, seed: int = 123):
    rng = np.random.default_rng(seed)
    w_sens, a_sens = rng.lognormal(0, 1.0, sp.num_genes), rng.lognormal(0, 1.0, sp.num_genes)

    def obj(genome) -> np.ndarray:
        c = sp.decode(genome)
        n, b = len(c.timesteps), np.array(c.bits, float)
        q = np.sum(w_sens * 4.0 ** -(b[:, 0] - 4)) + np.sum(a_sens * 4.0 ** -(b[:, 1] - 6))
        grp = sp.step_groups[sp.step_choices.index(n)]
        late = np.array(grp.offsets(c.timesteps)) / np.array(grp.sizes)
        return np.array([30.0 / n + 0.05 * q * (1 + 0.05 * n) + 2.0 * np.mean(late ** 2), sp.bitops(c) / 1e9])
    return obj


def run(engine, sp, obj, generations: int) -> np.ndarray:
    """Every distinct candidate's objectives (a repeat costs no evaluation, as in the service)."""
    pts, keys = [], set()
    for _ in range(generations):
        genomes = engine.ask()
        F = np.array([obj(g) for g in genomes])
        for g, f in zip(genomes, F):
            k = sp.decode(g).key
            if k not in keys:
                keys.add(k)
                pts.append(f)
        engine.tell(genomes, F)
    return np.array(pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--out", default="results/search/operators.json")
    args = ap.parse_args()

    from benchmarks.common import log_proxy
    from tmpq.core.rowlog import command_line, machine
    from tmpq.search.engines import make_engine
    from tmpq.search.pareto import hypervolume_2d

    sp = synthetic_space()
    obj = make_objective(sp)
    L = sp.genome_length
    settings = [("random", "random", None), ("pymoo p=0.25", "pymoo", 0.25), ("pymoo p=1/L", "pymoo", None),
                ("pymoo p=3/L", "pymoo", 3 / L)]
    rows = []
    for seeded in (True, False):
        seeds = sp.uniform_seeds(args.population // 2) if seeded else []
        pts = {label: [log_proxy(run(make_engine(eng, sp, seed=s, population=args.population, seeds=seeds,
                                                 p_mutation=p), sp, obj, args.generations)) for s in range(args.seeds)]
               for label, eng, p in settings}
        ref = np.vstack([p for v in pts.values() for p in v]).max(axis=0) + np.array([0.1, 5.0])
        base = np.mean([hypervolume_2d(p, ref) for p in pts["random"]])
        for label, v in pts.items():
            hv = [hypervolume_2d(p, ref) for p in v]
            rows.append({"seeded": seeded, "engine": label, "evaluations": float(np.mean([len(p) for p in v])),
                         "hv_log_mean": float(np.mean(hv)), "hv_vs_random": float(np.mean(hv) / base)})
            print(f"seeded={seeded!s:5} {label:13s} evaluations {rows[-1]['evaluations']:.0f}  "
                  f"HV(log10 proxy) / random {rows[-1]['hv_vs_random']:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(), "machine": machine(), "genome_length": L,
                               "search_seeds": args.seeds, "generations": args.generations,
                               "population": args.population, "objective_seed": 123, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
