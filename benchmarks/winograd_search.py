"""Does the Winograd algorithm gene help a search? The demo's search of the embedded UNet without the gene and with
``supernet.winograd = [2, 4]``, everything else identical, on search seeds 1, 2, 3: hypervolume of each arm's front in
(proxy FID, GBitOPs) against one reference point fixed before the runs (results/winograd/SEARCH_PROTOCOL.md), and
which convs the front puts on Winograd at which (w, a) bits and tile. Resumable: one row per finished search in
``<out>/search_rows.jsonl`` (partial results survive), runs in ``<out>/runs-search/<name>`` (git-ignored; their
evaluation logs kept under ``<out>/search-raw/``).

    .venv/bin/python -m benchmarks.winograd_search --part time     # one evaluation per arm: the sizing
    .venv/bin/python -m benchmarks.winograd_search --part runs     # 2 arms x 3 seeds, resumable
    .venv/bin/python -m benchmarks.winograd_search --part report   # the section at the end of <out>/README.md

Each arm calibrates its own supernet once (``<out>/search-supernet-<arm>.safetensors``, the demo's calibration, seed
10,000) and its three searches reuse it (``calibration.supernet_file``).
"""
from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import numpy as np

from benchmarks.common import RowLog, calibrated_supernet, cpu_setup, keep_gzip, log_proxy
from tmpq.core.candidate import Candidate
from tmpq.core.rowlog import cpu_info
from tmpq.search.pareto import hypervolume_2d, non_dominated

SEEDS = (1, 2, 3)
ARMS = {"direct": (), "gene": (2, 4)}  # F(2,3) / F(4,3): the two tiles with group-wise layer error <= 4.2e-3
# the sizing (SEARCH_PROTOCOL.md): both arms alike
POPULATION, GENERATIONS, PROXY_N, STEPS = 16, 4, 32, 10
# the reference point, fixed before any search (SEARCH_PROTOCOL.md): proxy bound, and the BitOPs of uniform W8A8 at
# STEPS steps, all direct (the int8 model every front point must beat; it bounds the W6A6 budget's region)
REF_PROXY = 13.6  # 2 x the FP model's proxy at PROXY_N (6.796: N = 32, 10 uniform DDIM steps; --part time)
REF_BITS = (8, 8)
ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Does the algorithm gene help a search?"
SECTION_END = "<!-- end: winograd search -->"


def arm_config(arm: str, seed: int, sn: Path | None, proxy_n: int = PROXY_N, population: int = POPULATION,
               generations: int = GENERATIONS, threads: int = 1, base: dict | None = None) -> dict:
    """configs/demo.toml (or ``base``) for one arm and search seed: the arm's Winograd tiles, the shared sizing, a
    fixed step count, the local executor with ``threads`` per worker, and the arm's calibrated supernet file."""
    demo = ROOT / "configs" / "demo.toml"
    cfg = json.loads(json.dumps(base)) if base is not None else tomllib.loads(demo.read_text())
    if ARMS[arm]:
        cfg.setdefault("supernet", {})["winograd"] = list(ARMS[arm])
    cfg.setdefault("search", {}).update(seed=seed, population=population, generations=generations, steps=STEPS,
                                        step_choices=[])
    cfg.setdefault("proxy", {})["n_images"] = proxy_n
    cfg["executor"] = {"kind": "local", "threads_per_worker": threads}
    if sn is not None:
        cfg.setdefault("calibration", {})["supernet_file"] = str(sn)
    return cfg


def supernet_file(out: Path, arm: str) -> Path:
    """The arm's supernet, calibrated once with the demo's calibration settings (resumable per option)."""
    from tmpq.jobs.config import config_from_dict

    return calibrated_supernet(config_from_dict(arm_config(arm, SEEDS[0], None)),
                               out / f"search-supernet-{arm}.safetensors", arm)


# -- the measures (pure: hand-made fronts in the tests) ---------------------------------------------------------------
def reference_point(space) -> np.ndarray:
    """(REF_PROXY, GBitOPs of uniform REF_BITS at the space's reference steps, all direct)."""
    return np.array([REF_PROXY, space.bitops(space.uniform_candidate(*REF_BITS)) / 1e9])


def hypervolumes(points: np.ndarray, ref: np.ndarray) -> dict:
    """Hypervolume of (proxy, GBitOPs) points against ``ref``: linear proxy (the decision) and log10 proxy."""
    return {"hv": hypervolume_2d(points, ref),
            "hv_log10": hypervolume_2d(log_proxy(points), log_proxy(ref[None, :])[0]) if len(points) else 0.0}


def hv_above(points: np.ndarray, ref: np.ndarray, floor: float) -> float:
    """Hypervolume counted only at GBitOPs >= ``floor`` (points below it moved up to it): what a front adds where
    the other arm's space reaches too (the direct space's floor: uniform W4A6)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
    p[:, 1] = np.maximum(p[:, 1], floor)
    return hypervolume_2d(p, ref)


def wino_counts(space, cand: Candidate) -> dict[str, int]:
    """How many convs the candidate runs as Winograd, by ``"W{w}A{a} F{m}"`` (the layer's gene bits and tile)."""
    out: dict[str, int] = {}
    for i, m in zip(space.wino_layers, cand.algos):
        if m:
            w, a = cand.bits[space.layers[i].gene]
            k = f"W{w}A{a} F{m}"
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def front_points(space, front, distances: dict[str, int]) -> list[dict]:
    """One record per front point (a ``pareto`` frame, by BitOPs): key, proxy, GBitOPs, Winograd convs (total and
    by bits / tile), the distance in genes to the nearest first-generation seed."""
    pts = []
    for _, p in front.sort_values("bitops").iterrows():
        c = Candidate.from_dict(p)
        counts = wino_counts(space, c)
        pts.append({"key": p["key"], "fid_proxy": float(p["fid_proxy"]), "gbitops": float(p["bitops"]) / 1e9,
                    "bits": sorted({f"W{w}A{a}" for w, a in c.bits}), "n_wino": sum(counts.values()),
                    "wino": counts, "seed_distance": distances.get(p["key"])})
    return pts


def search_row(run_path: Path, arm: str, seed: int, wall_s: float) -> dict:
    """The row of one finished search: evaluations, hypervolumes against the fixed reference point, its front."""
    from tmpq.jobs.report import seed_distances
    from tmpq.jobs.run import load_run

    run = load_run(run_path)
    space, ev = run.space, run.evaluations
    ok = ev[ev["status"] == "ok"]
    pts = np.stack([ok["fid_proxy"].to_numpy(float), ok["bitops"].to_numpy(float) / 1e9], axis=1)
    ref = reference_point(space)
    front = run.pareto()
    return {"kind": "search", "name": f"{arm}-s{seed}", "arm": arm, "seed": seed, "tiles": list(ARMS[arm]),
            "evaluations": int(len(ev)), "ok": int(len(ok)), "wall_s": round(wall_s, 1),
            "eval_s_mean": float(ok["wall_s"].mean()), "ref": [float(x) for x in ref], **hypervolumes(pts, ref),
            "eligible_convs": len(space.wino_layers),
            "front": front_points(space, front, seed_distances(space, run.config, front))}


def verdict(rows: list[dict]) -> dict:
    """Per seed hypervolume of both arms; the gene helps iff its hypervolume is higher on every seed (all 3 run)."""
    by = {(r["arm"], r["seed"]): r for r in rows if r.get("kind") == "search"}
    seeds = [s for s in SEEDS if ("direct", s) in by and ("gene", s) in by]
    wins = [by[("gene", s)]["hv"] > by[("direct", s)]["hv"] for s in seeds]
    return {"seeds": seeds, "wins": int(sum(wins)), "complete": len(seeds) == len(SEEDS),
            "helps": len(seeds) == len(SEEDS) and all(wins)}


# -- parts -------------------------------------------------------------------------------------------------------------
def part_time(out: Path, log: RowLog, threads: int) -> None:
    """One evaluation per arm and kind of candidate on the arm's supernet (the sizing), and the proxy of FP and of
    the uniform direct options at the reference steps (the scale the reference point's proxy bound was set on)."""
    from tmpq.core.schedules import make_timesteps
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.search import worker_spec

    ts = make_timesteps("uniform", STEPS)
    for arm in ARMS:
        sn = supernet_file(out, arm)
        ev = worker_spec(config_from_dict(arm_config(arm, SEEDS[0], sn, threads=threads)), sn)()
        n, k = ev.net.num_genes, len(ev.net.wino_layers)
        cands = {"FP": Candidate.fp(ts)} if arm == "direct" else {}
        cands |= {f"W{w}A{a} direct": Candidate(ts, ((w, a),) * n) for w, a in ((8, 8), (6, 6), (4, 6))}
        cands |= {f"W8A8 all F{m}": Candidate(ts, ((8, 8),) * n, algos=(m,) * k) for m in ARMS[arm]}
        for what, c in cands.items():
            name = f"{arm}: {what} (N={PROXY_N})"
            if not log.has(kind="time", name=name):
                obj = ev.evaluate(c)
                log.append({"kind": "time", "name": name, "arm": arm, "proxy_n": PROXY_N, "steps": STEPS,
                            "threads": threads, "fid_proxy": obj["fid_proxy"], "eval_s": obj["eval_s"]})


def part_runs(out: Path, log: RowLog, threads: int, arms=tuple(ARMS), seeds=SEEDS) -> None:
    """The searches, seed by seed (both arms of a seed before the next, so partial results stay paired)."""
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.search import run_search

    for seed in seeds:
        for arm in arms:
            name = f"{arm}-s{seed}"
            if log.has(kind="search", name=name):
                continue
            sn = supernet_file(out, arm)
            path = out / "runs-search" / name
            t0 = time.perf_counter()
            run = run_search(config_from_dict(arm_config(arm, seed, sn, threads=threads)), path,
                             resume=(path / "config.resolved.json").is_file(), progress=True)
            keep_gzip(run.path / "evaluations.jsonl", out / "search-raw" / f"{name}.jsonl.gz", "evaluation log")
            log.append(search_row(run.path, arm, seed, time.perf_counter() - t0))


def _ms(xs) -> str:
    return f"{np.mean(xs):.4g} +- {np.std(xs, ddof=1):.2g}" if len(xs) > 1 else (f"{xs[0]:.4g}" if xs else "-")


def report_lines(rows: list[dict]) -> list[str]:
    """The README section: per seed and mean, the front's Winograd convs, the verdict, how it was produced."""
    runs = sorted((r for r in rows if r.get("kind") == "search"), key=lambda r: (r["seed"], r["arm"]))
    times = [r for r in rows if r.get("kind") == "time"]
    v = verdict(runs)
    ref = runs[0]["ref"] if runs else None
    lines = [SECTION, "",
             f"The demo's search (configs/demo.toml: pymoo, uniform time groups, W6A6 budget at {STEPS} steps) shrunk "
             f"to population {POPULATION} x {GENERATIONS} generations, {STEPS} steps fixed, proxy FID at "
             f"N = {PROXY_N}, "
             f"without the algorithm gene (`direct`) and with `supernet.winograd = {list(ARMS['gene'])}` (`gene`), "
             "each arm on its own supernet (same calibration seed), search seeds "
             f"{', '.join(map(str, SEEDS))}. Protocol and decision rule fixed before the runs: `SEARCH_PROTOCOL.md`."
             + (f" Reference point ({ref[0]:.4g}, {ref[1]:.4g} GBitOPs = uniform W{REF_BITS[0]}A{REF_BITS[1]} at "
                f"{STEPS} steps, all direct)." if ref else ""), ""]
    if runs:
        lines += ["| seed | arm | evaluations | HV | HV log10 proxy | front size | front points with Winograd | "
                  "Winograd convs summed over the front's points, by bits and tile | front points that are a seed / 1 gene "
                  "from one | wall s | s per evaluation |", "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in runs:
            f = r["front"]
            conv: dict[str, int] = {}
            for p in f:
                for k, n in p["wino"].items():
                    conv[k] = conv.get(k, 0) + n
            conv = dict(sorted(conv.items()))
            of = f" (of {r['eligible_convs']} per point)" if r["eligible_convs"] else ""
            near = f"{sum(p['seed_distance'] == 0 for p in f)} / {sum(p['seed_distance'] == 1 for p in f)}"
            lines.append(f"| {r['seed']} | {r['arm']} | {r['ok']} | {r['hv']:.4g} | {r['hv_log10']:.4g} | {len(f)} | "
                         f"{sum(p['n_wino'] > 0 for p in f)} | "
                         f"{', '.join(f'{k}: {n}' for k, n in conv.items()) or '-'}{of} | "
                         f"{near} | {r['wall_s']:.0f} | {r['eval_s_mean']:.1f} |")
        lines += ["", "| arm | HV mean +- sd | HV log10 proxy | seeds |", "|---|---:|---:|---:|"]
        for arm in ARMS:
            rs = [r for r in runs if r["arm"] == arm]
            lines.append(f"| {arm} | {_ms([r['hv'] for r in rs])} | {_ms([r['hv_log10'] for r in rs])} | {len(rs)} |")
        lines += ["", f"**Verdict (rule fixed before the runs): the gene arm's hypervolume is higher on {v['wins']} of "
                  f"{len(v['seeds'])} paired seeds" + ("" if v["complete"] else " (not all seeds ran: no verdict)")
                  + (": the gene helps.**" if v["helps"] else ": the gene does not help by this rule.**"
                     if v["complete"] else ".**"), ""]
        direct = [r for r in runs if r["arm"] == "direct"]
        if direct:  # descriptive, not part of the rule: where the gene arm's extra area lies
            floor = min(p["gbitops"] for r in direct for p in r["front"])
            lines += [f"Where the area lies (descriptive): hypervolume counted only at GBitOPs >= {floor:.4g}, the "
                      "direct space's floor (uniform W4A6, the cheapest point the direct arm can reach), i.e. what "
                      "each front adds where the other arm also reaches; the rest of the gene arm's area lies below "
                      "that floor.", "", "| seed | direct | gene | gene - direct | gene's area below the floor |",
                      "|---:|---:|---:|---:|---:|"]
            for s in v["seeds"]:
                d, g = (next(r for r in runs if (r["arm"], r["seed"]) == (a, s)) for a in ("direct", "gene"))
                hd, hg = (hv_above(np.array([[p["fid_proxy"], p["gbitops"]] for p in r["front"]]),
                                   np.array(r["ref"]), floor) for r in (d, g))
                lines.append(f"| {s} | {hd:.4g} | {hg:.4g} | {hg - hd:+.4g} | {g['hv'] - hg:.4g} |")
            lines.append("")
        lines += ["Front points with Winograd convs (gene arm):", ""]
        for r in runs:
            for p in r["front"]:
                if p["n_wino"]:
                    lines.append(f"- {r['name']}: proxy {p['fid_proxy']:.3g} at {p['gbitops']:.3g} G, bits "
                                 f"{'/'.join(p['bits'])}, {p['n_wino']} Winograd convs "
                                 f"({', '.join(f'{k}: {n}' for k, n in p['wino'].items())}), "
                                 f"{p['seed_distance']} genes from the nearest seed")
        lines.append("")
    if times:
        lines += [f"One evaluation ({STEPS} uniform DDIM steps, {times[0]['threads']} thread, on the shared machine; "
                  "the sizing, measured before any search):", "", "| candidate | proxy | s |", "|---|---:|---:|"]
        lines += [f"| {t['name']} | {t['fid_proxy']:.4g} | {t['eval_s']:.1f} |" for t in times]
        lines.append("")
    model, flags = cpu_info()
    isa = ", ".join(sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx512f"})) or "none"
    any_row = (runs or times or [None])[0]
    lines += [f"Command: `.venv/bin/python -m benchmarks.winograd_search --part time` then `--part runs` and "
              f"`--part report`. Machine: {any_row['machine'] if any_row else model} (int8 ISA flags: {isa}; unused: "
              "fake quantization), shared with other benchmarks during the runs, so wall times are upper bounds. "
              "Rows: `search_rows.jsonl`; evaluation logs `search-raw/`.", "", SECTION_END, ""]
    return lines


def write_section(readme: Path, lines: list[str]) -> None:
    """Replace this benchmark's section of ``readme`` (from its heading to its end marker), or append it at the end;
    the rest of the file stays as it is."""
    text = readme.read_text() if readme.is_file() else ""
    body = "\n".join(lines)
    start = text.find(SECTION)
    if start >= 0:
        end = text.find(SECTION_END, start)
        end = len(text) if end < 0 else end + len(SECTION_END) + 1
        text = text[:start] + body + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=("time", "runs", "report"))
    ap.add_argument("--out", default="results/winograd")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], default=list(ARMS),
                    help="runs part: these arms only (default: both)")
    ap.add_argument("--seeds", type=lambda s: [int(a) for a in s.split(",") if a], default=list(SEEDS),
                    help="runs part: these search seeds only (default: %(default)s; two processes may split them)")
    args = ap.parse_args()
    out = Path(args.out)
    cpu_setup(args.threads)
    log = RowLog(out / "search_rows.jsonl", ("kind", "name"))
    if args.part == "time":
        part_time(out, log, args.threads)
    elif args.part == "runs":
        part_runs(out, log, args.threads, tuple(args.arms), tuple(args.seeds))
    write_section(out / "README.md", report_lines(list(log.rows.values())))
    print(json.dumps({"report": str(out / "README.md")}))


if __name__ == "__main__":
    main()
