"""Predicted vs measured latency (``search.cost = "latency"``) on the embedded UNet.

    .venv/bin/python -m benchmarks.latency                                   # batch 64, 64 images, 2 threads
    .venv/bin/python -m benchmarks.latency --batch 16 --n 32 --contended     # a quick run on a shared machine

Prepares a latency run as ``tmpq search`` does (``tmpq.jobs.search.prepare_run``: the supernet calibrated at a
smoke-test size, W16 / W8 / W4 weights x A8 / A6, step counts 4 / 8 / 12, DDIM and DPM-Solver++, reuse of deep
features), which measures the run's latency table (``RUN/latency.json``, :mod:`tmpq.deploy.latency`). Then >= 10
fixed points (varied steps, uniform and mixed bits with 16-bit layers that stay FP, solver, reuse) are logged in the
run as rows of origin ``benchmarks.latency`` (their analytic objectives only: nothing here scores quality), exported
(``tmpq export``'s code), loaded with the int8 kernels (``apply_export(..., kernels="int8")``) and timed with the code
``tmpq speed`` uses for its int8 row (``tmpq.deploy.int8.time_sampling``: one warm-up batch, median of ``--repeats``
samplings of ``--n`` images at ``--batch``). The table is measured at the same batch and thread count.

Writes ``--out/rows.jsonl`` (one row per point: predicted and measured seconds per image, error %, the CPU, its int8
ISA, threads, batch, the load average at the start; rows already there for the same point, batch, threads and CPU
are skipped) and ``--out/README.md`` (the command, the machine and this invocation's table). ``--contended`` labels
the numbers as taken while other processes shared the cores (they are then not results): rerun on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RowLog, command_line, cpu_setup
from tmpq.core.candidate import Candidate
from tmpq.deploy.bundle import load_export
from tmpq.deploy.int8 import time_sampling
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.export import ensure_export
from tmpq.jobs.search import prepare_run
from tmpq.search.rundir import EvalResult, run_objectives

KEYS = ("key", "batch", "threads", "cpu")


def bench_config(batch: int) -> dict:
    """The run: the embedded UNet, a smoke-test calibration (timing does not depend on its quality), every axis the
    latency model sums over (16-bit weights, step counts, two solvers, reuse)."""
    return {"model": {"path": "embedded"},
            "supernet": {"w_bits": [16, 8, 4], "a_bits": [8, 6]},
            "calibration": {"steps": 2, "per_step": 8, "sampler_steps": 4, "batch_size": 8},
            "search": {"steps": 8, "step_choices": [4, 8, 12], "solvers": ["ddim", "dpm++"], "reuse_branch": 1,
                       "bitops_budget": "none", "cost": "latency", "generations": 1, "population": 2},
            "proxy": {"batch_size": batch}}


def points(space) -> list[tuple[str, Candidate]]:
    """The fixed points: uniform W8A8 at three step counts, all-W16 (every layer FP), W4A6, half W16 / half W8,
    random per-gene mixes of W16 / W8 / W4, both solvers, and reuse on every other call."""
    rng = np.random.default_rng(0)
    ddim, dpm = space.solver_choices  # the configured ["ddim", "dpm++"]

    def uniform(w, a, steps, solver=ddim, reuse=()):
        c = space.uniform_candidate(w, a, steps=steps, solver=tuple(solver))
        return Candidate(c.timesteps, c.bits, solver, tuple(reuse))

    def mixed(steps, solver, weights, reuse=()):
        c = space.uniform_candidate(8, 8, steps=steps)
        bits = tuple((int(rng.choice(weights)), int(rng.choice([8, 6]))) for _ in range(space.num_genes))
        return Candidate(c.timesteps, bits, solver, tuple(reuse))

    half = space.num_genes // 2
    c8 = space.uniform_candidate(8, 8, steps=8)
    return [
        ("w8a8-4-ddim", uniform(8, 8, 4)),
        ("w8a8-8-ddim", uniform(8, 8, 8)),
        ("w8a8-12-ddim", uniform(8, 8, 12)),
        ("w16a8-8-ddim (all FP)", uniform(16, 8, 8)),
        ("w4a6-12-dpm++", uniform(4, 6, 12, dpm)),
        ("w16/w8 halves-8-ddim", Candidate(c8.timesteps, tuple((16, 8) if g < half else (8, 8)
                                                               for g in range(space.num_genes)))),
        ("mixed w16/8/4-8-dpm++", mixed(8, dpm, [16, 8, 4])),
        ("mixed w16/8/4-12-ddim", mixed(12, ddim, [16, 8, 4])),
        ("mixed w8/4-4-dpm++", mixed(4, dpm, [8, 4])),
        ("w8a8-8-ddim reuse odd calls", uniform(8, 8, 8, reuse=(1, 3, 5, 7))),
        ("w8a8-12-dpm++ reuse odd calls", uniform(8, 8, 12, dpm, reuse=tuple(range(1, 12, 2)))),
        ("mixed w16/8/4-12-ddim reuse 2 of 3", mixed(12, ddim, [16, 8, 4], reuse=tuple(k for k in range(1, 12)
                                                                                           if k % 3))),
    ]


def readme(out: Path, rows: list[dict], args, table: dict, contended: bool) -> None:
    fp = table["fingerprint"]
    err = [abs(r["error_pct"]) for r in rows]
    lines = ["# Latency: predicted vs measured (embedded UNet, CPU int8)", "",
             "Predicted: the run's measured latency table (`search.cost = \"latency\"`, tmpq/deploy/latency.py) "
             "summed over the point's denoiser calls (`SearchSpace.latency`). Measured: the export loaded with the "
             "int8 kernels and timed as `tmpq speed` times its int8 row (`time_sampling`). Seconds per image.", "",
             f"Command: `{command_line()}`", "",
             f"CPU: {fp['cpu']}; int8 ISA: {', '.join(fp['int8_isa']) or 'none'}"
             f"{'; oneDNN capped at ' + fp['onednn_max_cpu_isa'] if fp['onednn_max_cpu_isa'] else ''}; torch "
             f"{fp['torch']}; threads {fp['threads']}; batch {fp['batch']}; {args.n} images per timing, median of "
             f"{args.repeats}; load average at the start {rows[0]['loadavg'] if rows else '?'}.", ""]
    if contended:
        lines += ["**Contended**: taken while other processes shared the cores; these numbers are not results. "
                  "Rerun on a quiet machine with the command above (without `--contended`).", ""]
    lines += ["| point | steps | solver | calls (reuse) | layers off int8 | predicted ms | measured ms | error % |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['steps']} | {r['solver']} | {r['calls']} ({len(r['reuse'])}) | "
                     f"{r['fp_layers']}/{r['layers']} | {r['predicted_s'] * 1e3:.3f} | {r['measured_s'] * 1e3:.3f} | "
                     f"{r['error_pct']:+.1f} |")
    if err:
        lines += ["", f"Mean |error| {np.mean(err):.1f} %, max {np.max(err):.1f} % over {len(rows)} points "
                      f"(error = predicted / measured - 1)."]
    lines += ["", "Rows: rows.jsonl (every invocation, each with its machine and load average)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="images per denoiser call, table and timings")
    ap.add_argument("--n", type=int, default=64, help="images per timed sampling")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/latency")
    ap.add_argument("--contended", action="store_true", help="label the numbers as taken on a shared machine")
    args = ap.parse_args()
    if min(args.batch, args.n, args.repeats, args.threads) < 1:
        raise SystemExit("--batch, --n, --repeats and --threads must be >= 1")
    cpu_setup(args.threads)
    out = Path(args.out)
    log = RowLog(out / "rows.jsonl", KEYS)
    load = round(os.getloadavg()[0], 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tmpq-latency-") as tmp:
        cfg = config_from_dict(bench_config(args.batch))
        run, space, _sn = prepare_run(cfg, Path(tmp) / "run", progress=True)
        table = json.loads((run.path / "latency.json").read_text())
        fp = table["fingerprint"]
        chosen = points(space)
        try:
            for name, cand in chosen:
                objectives = {"bitops": space.bitops(cand), "size_mb": space.size_mb(cand),
                              "latency_s": space.latency(cand)}
                run.append(EvalResult(key=cand.key, status="ok", candidate=cand, objectives=objectives,
                                      origin="benchmarks.latency"))
            run.compact(run_objectives(run.config()))
        finally:
            run.lock.release()
        for name, cand in chosen:
            if log.has(key=cand.key, batch=args.batch, threads=fp["threads"], cpu=fp["cpu"]):
                rows.append(log.rows[log.key({"key": cand.key, "batch": args.batch, "threads": fp["threads"],
                                              "cpu": fp["cpu"]})])
                print(f"{name}: already in {log.path}, skipped")
                continue
            export = ensure_export(run.path, cand.key, Path(tmp) / "exports" / cand.key[:12])
            unet, sched, ts, _manifest = load_export(export, kernels="int8")
            measured = time_sampling(unet, sched, ts, args.n, args.batch, args.repeats) / args.n
            predicted = space.latency(cand)
            deployed = unet.tmpq_int8["layers"]
            rows.append(log.append({
                "point": name, "key": cand.key, "steps": len(cand.timesteps), "solver": cand.solver.label,
                "reuse": list(cand.reuse), "calls": cand.calls,
                "fp_layers": sum(not r["int8"] for r in deployed), "layers": len(deployed),
                "predicted_s": predicted, "measured_s": measured, "error_pct": 100 * (predicted / measured - 1),
                "bitops": space.bitops(cand), "batch": args.batch, "n": args.n, "repeats": args.repeats,
                "threads": fp["threads"], "cpu": fp["cpu"], "int8_isa": fp["int8_isa"], "torch": torch.__version__,
                "loadavg": load, "contended": bool(args.contended), "table_fingerprint": fp,
                "table_remainder_s": table["remainder"], "table_remainder_reuse_s": table["remainder_reuse"]}))
    readme(out, rows, args, table, args.contended)
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
