"""Executor scaling: N evaluations of one fixed candidate list with the local executor and with 1, 2, ... Ray actors
(``threads_per_worker`` torch threads each, default 1), on this machine.

    .venv/bin/python -m benchmarks.ray_scaling --config configs/tiny.toml --n 24 --workers 1,2

The candidates are ``--n`` feasible random draws from the search space of ``--config`` (seeded by ``--seed``); the
supernet is calibrated once into ``--work`` and reused. Each executor first builds its evaluators and evaluates one
warm-up candidate per worker (``startup_s``), then the N candidates are timed (``evals_per_s``). Every executor
must give the same objectives for every candidate (checked). Rows are appended to ``--out`` (a JSON list), each
with the command, machine and seed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, machine
from tmpq.core.fileio import atomic_write_bytes


def build(cfg, work: Path):
    """The supernet file (calibrated once, as ``run_search`` does) and the search space of ``cfg``."""
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.jobs.search import build_space, time_groups
    from tmpq.supernet import QuantSupernet
    from tmpq.supernet.calib_data import calibrate_to_file

    m = load_model(cfg.model.path)
    groups, step_groups = time_groups(cfg, m, None)  # before wrapping: a sensitivity grouping profiles the FP model
    net = QuantSupernet(m.unet, cfg.supernet)
    space = build_space(cfg, net, groups, step_groups)
    # cached per model x supernet options x calibration settings (configs with other bit options get their own file)
    key = hashlib.sha256(json.dumps([net.fingerprint, net.config.to_json(), cfg.calibration.__dict__],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    sn_file = work / f"supernet-{key}.safetensors"
    if sn_file.is_file():
        net.load(sn_file)  # refuses a file that does not fit this config
    else:
        work.mkdir(parents=True, exist_ok=True)
        calibrate_to_file(net, make_scheduler(m.scheduler_config), sn_file, cfg.calibration, progress=False)
    return sn_file, space


def time_executor(make, tasks, warmup, workers: int) -> tuple[dict, float, float]:
    """(outcomes by key, startup_s, wall_s of the timed tasks)."""
    t0 = time.perf_counter()
    ex = make()
    try:
        if hasattr(ex, "wait_ready"):
            ex.wait_ready()  # every actor built, so the warm-up gives each one a candidate
        for _task, out in ex.map(warmup[:workers]):
            assert out.status == "ok", out.error
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        outs = {task.key: out for task, out in ex.map(tasks)}
        wall = time.perf_counter() - t1
    finally:
        ex.close()
    return outs, startup, wall


def main(argv: list[str] | None = None) -> None:
    from tmpq.jobs.config import load_config
    from tmpq.jobs.search import WorkerSpec
    from tmpq.search.executors import LocalExecutor, RayExecutor, Task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.toml", help="TOML run config (default: %(default)s)")
    ap.add_argument("--model", default=None, help="override model.path")
    ap.add_argument("--n", type=int, default=24, help="timed evaluations per executor (default: %(default)s)")
    ap.add_argument("--workers", default="1,2", help="Ray actor counts, comma-separated (default: %(default)s)")
    ap.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="candidate sampling seed (default: %(default)s)")
    ap.add_argument("--no-local", action="store_true", help="skip the local executor")
    ap.add_argument("--work", default="results/search/ray_scaling_work", help="supernet cache directory")
    ap.add_argument("--out", default="results/search/ray_scaling.json", help="JSON list of rows to append to")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    if args.model:
        from tmpq.jobs.config import config_from_dict

        cfg = config_from_dict({**cfg.to_dict(), "model": {"path": args.model}})
    sn_file, space = build(cfg, Path(args.work))
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    rng = np.random.default_rng(args.seed)
    cands, seen = [], set()
    while len(cands) < args.n + max(workers, default=1):
        c = space.decode(space.sample_feasible(rng))
        if c.key not in seen:
            seen.add(c.key)
            cands.append(c)
    tasks = [Task(c.key, c) for c in cands]
    warmup, timed = tasks[args.n:], tasks[: args.n]
    spec = WorkerSpec(cfg.model.path, str(sn_file.resolve()), json.loads(json.dumps(cfg.proxy.__dict__)),
                      args.threads_per_worker)

    runs = [("local", 1, lambda: LocalExecutor(spec))] if not args.no_local else []
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's unix socket paths live in it
    for w in workers:
        # a fresh local Ray per row, as `tmpq search` starts one
        runs.append(("ray", w, lambda w=w: RayExecutor(spec, workers=w, threads_per_worker=args.threads_per_worker,
                                                       timeout_s=cfg.executor.timeout_s, retries=0,
                                                       temp_dir=str(ray_tmp / f"x{w}"))))
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text()) if out_path.is_file() else []
    reference = None
    for kind, w, make in runs:
        outs, startup, wall = time_executor(make, timed, warmup, w)
        failed = [k for k, o in outs.items() if o.status != "ok"]
        if failed:
            raise SystemExit(f"{kind} x{w}: {len(failed)} evaluations failed: {outs[failed[0]].error}")
        values = {k: {n: v for n, v in o.objectives.items() if n != "eval_s"} for k, o in outs.items()}
        reference = reference or values
        row = {"executor": kind, "workers": w, "threads_per_worker": args.threads_per_worker, "n": args.n,
               "startup_s": round(startup, 2), "wall_s": round(wall, 3), "evals_per_s": round(args.n / wall, 3),
               "same_objectives_as_first": values == reference, "config": args.config,
               "model": cfg.model.path, "seed": args.seed, "command": command_line(), "machine": machine(),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(f"{kind:5s} x{w}: {row['evals_per_s']:.2f} evaluations/s ({args.n} in {wall:.1f} s; "
              f"startup {startup:.1f} s){'' if row['same_objectives_as_first'] else '  OBJECTIVES DIFFER'}",
              flush=True)
        rows.append(row)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_path, (json.dumps(rows, indent=1) + "\n").encode())
    shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
