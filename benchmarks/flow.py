"""The embedded flow-matching model's FP baseline: results/flow/ (resumable: finished rows live in rows.jsonl).

    .venv/bin/python -m benchmarks.flow --part guidance     # the guidance scale of configs/flow.toml (rule below)
    .venv/bin/python -m benchmarks.flow --part fp           # FID + class accuracy per flow solver and step count
    .venv/bin/python -m benchmarks.flow --part keep --run results/runs/flow --wall-s 316
                                                            # keep a finished `tmpq run --config configs/flow.toml`
    .venv/bin/python -m benchmarks.flow --part report       # README.md from the committed rows only

The model: ``embedded-flow`` (tmpq/assets/mnist16-flow), a class-conditional rectified-flow MMDiT
(``SD3Transformer2DModel`` on 16x16 pixels, its digit class given as learned text tokens), trained by
``tmpq train --arch mmdit --objective flow``.

Rules, fixed before the runs:
- guidance: FP Euler on the ``trailing`` sigmas (1, 1 - 1/n, ..., 1/n: diffusers' flow spacing for few steps) at
  16 steps, N = 1,000, noise seed 1; the tuned scale is the lowest-FID one among 1.5, 2, 3, 4 (scale 1, no guidance,
  is measured beside them and is the grid's other arm whatever it scores). ``configs/flow.toml`` (the main job)
  samples at whichever of 1 and the tuned scale has the lower FID in these rows.
- fp: every solver of ``--solvers`` at 4 / 8 / 16 / 28 / 50 trailing steps, at guidance 1 and at the tuned scale,
  N = ``--n`` (default 2,000), noise seed 0; FID against the 5,000 real digits in the domain classifier's feature
  space and class accuracy (the domain classifier reads image i as the class it asked for, i mod 10).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RowLog, cpu_setup, findings

OUT = Path("results/flow")
SOLVERS = ("euler", "heun", "dpm++-2", "unipc-2")
STEPS = (4, 8, 16, 28, 50)
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
MODEL = "embedded-flow"


def tuned_scale(rows: list[dict]) -> float | None:
    """The rule: the lowest-FID guided scale (> 1) of the guidance rows; None before they exist."""
    guided = [r for r in rows if r["kind"] == "guidance" and r["guidance"] > 1.0]
    return min(guided, key=lambda r: (r["fid"], r["guidance"]))["guidance"] if guided else None


def _evaluate(log: RowLog, key: dict, solver: str, steps: int, scale: float, n: int, seed: int, model) -> None:
    from tmpq.core.sampler import make_scheduler
    from tmpq.core.schedules import make_timesteps
    from tmpq.core.solvers import parse_solver
    from tmpq.evaluators.quality import evaluate_schedule

    if log.has(**key):
        return
    m, ext, ref = model(scale)
    s = parse_solver(solver)
    sched = make_scheduler(m.scheduler_config, s.name, s.order)
    r = evaluate_schedule(m.unet, sched, list(make_timesteps("trailing", steps)), n, ext, ref, seed=seed,
                          guidance_scale=scale, desc=f"{solver} {steps} g{scale:g}")
    log.append({**key, "schedule": "trailing", **r})


def run(args) -> None:
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import embedded_reference

    log = RowLog(Path(args.out) / "rows.jsonl", ("kind", "solver", "steps", "guidance", "n", "seed"))
    cache: dict = {}

    def model(scale: float):
        if scale not in cache:
            cache.clear()
            ext = make_extractor("domain")
            cache[scale] = (load_model(ModelConfig(path=args.model, guidance_scale=scale)), ext,
                            embedded_reference(ext, "all", 16))
        return cache[scale]

    if args.part == "guidance":
        for g in SCALES:
            _evaluate(log, dict(kind="guidance", solver="euler", steps=16, guidance=g, n=1000, seed=1), "euler", 16,
                      g, 1000, 1, model)
    elif args.part == "keep":
        if not args.run:
            raise SystemExit("part keep: give --run RUN_DIR")
        keep_run(Path(args.run), Path(args.out), args.wall_s)
    elif args.part == "fp":
        scale = tuned_scale(list(log.rows.values()))
        if scale is None:
            raise SystemExit("part fp: run --part guidance first (the tuned scale comes from its rows)")
        for g in (1.0, scale):
            for steps in args.steps:
                for solver in args.solvers:
                    _evaluate(log, dict(kind="fp", solver=solver, steps=steps, guidance=g, n=args.n, seed=0), solver,
                              steps, g, args.n, 0, model)
    write_report(Path(args.out), log)


RAW = ("evaluations.jsonl", "final/rows.jsonl", "final/fp_rows.jsonl", "main_job.json", "config.resolved.json",
       "search_space.json")


def keep_run(run: Path, out: Path, wall_s: float | None) -> None:
    """Copy the run files the report reads into ``OUT/raw`` (the evaluation log gzipped), with the job's measured
    wall clock (``/usr/bin/time``'s, given by the caller) beside them."""
    import gzip

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW:
        data = (run / name).read_bytes()
        dst = raw / name.replace("/", "-")
        if name == "evaluations.jsonl":
            (raw / "evaluations.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            dst.write_bytes(data)
    if wall_s is not None:
        (raw / "wall.json").write_text(json.dumps({"wall_s": wall_s, "command": "/usr/bin/time -v tmpq run --config "
                                                   "configs/flow.toml --run-dir results/runs/flow"}) + "\n")


def _main_job_lines(out: Path) -> list[str]:
    import gzip

    import pandas as pd

    from tmpq.jobs.report import seed_distances
    from tmpq.search.space import SearchSpace

    raw = out / "raw"
    if not (raw / "main_job.json").is_file():
        return []
    job = json.loads((raw / "main_job.json").read_text())
    cfg = json.loads((raw / "config.resolved.json").read_text())
    ev = [json.loads(x) for x in gzip.decompress((raw / "evaluations.jsonl.gz").read_bytes()).decode().splitlines()]
    fin = [json.loads(x) for x in (raw / "final-rows.jsonl").read_text().splitlines() if x.strip()]
    fp = [json.loads(x) for x in (raw / "final-fp_rows.jsonl").read_text().splitlines() if x.strip()]
    space = SearchSpace.from_dict(json.loads((raw / "search_space.json").read_text()))
    first = pd.DataFrame(fin).drop_duplicates("key")
    dist = seed_distances(space, cfg, first)
    wall = json.loads((raw / "wall.json").read_text()) if (raw / "wall.json").is_file() else None
    t = job["timings"]
    lines = ["## The main job", "", f"`tmpq run --config configs/flow.toml --run-dir results/runs/flow` (guidance "
             f"{cfg['model'].get('guidance_scale', 1.0):g}, {len(ev)} evaluations, "
             f"{sum(r['status'] == 'ok' for r in ev)} ok; validation N = {fin[0]['n']} x noise seeds "
             f"{sorted({r['seed'] for r in fin})}): "
             + (f"**{wall['wall_s'] / 60:.1f} min** wall clock (`/usr/bin/time`), alone on the machine below; "
                if wall else "") + "stages: " + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in t.items())
             + f". Exported under the {job['budget']} budget: `{job['best']['key']}`.", "",
             "| point | solver | steps | GBitOPs | proxy FID@128 | FID per seed | FID (mean) | FP FID on its schedule "
             "(mean) | FID / FP on its schedule | class accuracy | from seed |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    by: dict = {}
    for r in fin:
        by.setdefault(r["key"], []).append(r)
    for key, rs in sorted(by.items(), key=lambda kv: kv[1][0]["bitops"]):
        r0 = rs[0]
        fid = sum(r["fid"] for r in rs) / len(rs)
        fps = [r["fid"] for r in fp if r["timesteps"] == r0["timesteps"] and r["solver"] == r0.get("solver", "ddim")
               and r["order"] == r0.get("order", 1) and r["n"] == r0["n"] and r["seed"] in {x["seed"] for x in rs}]
        fpm = sum(fps) / len(fps) if len(fps) == len(rs) else float("nan")
        acc = sum(r.get("class_accuracy", float("nan")) for r in rs) / len(rs)
        d = dist.get(key)
        seed_txt = "-" if d is None else "a seed" if d == 0 else f"{d} gene{'s' if d > 1 else ''}"
        mark = " (exported)" if key == job["best"]["key"] else ""
        lines.append(f"| `{key}`{mark} | {r0.get('solver', 'ddim')}-{r0.get('order', 1)} | {len(r0['timesteps'])} | "
                     f"{r0['bitops'] / 1e9:.3g} | {r0['fid_proxy']:.4g} | "
                     + " / ".join(f"{r['fid']:.4f}" for r in sorted(rs, key=lambda r: r["seed"]))
                     + f" | {fid:.4f} | {fpm:.4f} | {fid / fpm:.2f}x | {acc:.3f} | {seed_txt} |")
    lines += ["", "Raw rows: `raw/evaluations.jsonl.gz` (every evaluation), `raw/final-rows.jsonl` (validation), "
              "`raw/final-fp_rows.jsonl` (the FP model on each point's schedule, same N and noise), "
              "`raw/main_job.json`, `raw/config.resolved.json`, `raw/search_space.json`.", ""]
    return lines


def write_report(out: Path, log: RowLog) -> None:
    rows = list(log.rows.values())
    man_path = Path("tmpq/assets/mnist16-flow/manifest.json")
    man = json.loads(man_path.read_text()) if man_path.is_file() else None
    lines = ["# The embedded flow-matching model", "", *findings(out)]
    if man:
        lines += [f"Model: `tmpq/assets/mnist16-flow`, an `SD3Transformer2DModel` (MMDiT, joint attention of the image "
                  f"and text streams) in pixel space on the 16x16 digits, {man['parameters'] / 1e6:.2f} M parameters "
                  f"with its class tokens, rectified flow (velocity, shift {man['config']['shift']:g}), trained by "
                  f"`{man['command']}` (EMA weights, final loss {man['metrics']['final_loss_mean_last100']:.4f}, "
                  f"{man['metrics']['train_wall_s'] / 60:.0f} min wall clock on {man['machine']}, shared with other "
                  "work: not a timing). Its digit class is fed as its family takes text: 4 learned tokens into the "
                  "joint attention and a learned pooled vector into the timestep embedding (row 10: the null label "
                  "of classifier-free guidance, learned with label dropout "
                  f"{man['data'].get('label_dropout', 0.1)}).", ""]
    lines += ["Every row: FID against the 5,000 real digits in the domain classifier's feature space (its "
              "`tmpq/assets/mnist16-classifier`), class accuracy = the classifier's accuracy on the generated digits "
              "against the requested class; schedule `trailing` (sigmas 1, 1 - 1/n, ..., 1/n, then 0). Rules in "
              "`benchmarks/flow.py`, committed before the runs.", ""]
    g = sorted((r for r in rows if r["kind"] == "guidance"), key=lambda r: r["guidance"])
    if g:
        lines += ["## Guidance scale", "", f"FP Euler, {g[0]['steps']} steps, N = {g[0]['n']}, noise seed "
                  f"{g[0]['seed']}. Tuned scale (lowest FID among the guided ones): **{tuned_scale(rows):g}**. "
                  "Images/s: the sampling's own wall clock, taken beside other jobs on the same cores (not a timing; "
                  "guidance doubles the denoiser calls).", "",
                  "| guidance | FID | class accuracy | images/s |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['guidance']:g} | {r['fid']:.4f} | {r['class_accuracy']:.3f} | {r['images_per_s']:.0f} |"
                  for r in g]
        lines.append("")
    lines += _main_job_lines(out)
    fp = [r for r in rows if r["kind"] == "fp"]
    if fp:
        scales = sorted({r["guidance"] for r in fp})
        steps = sorted({r["steps"] for r in fp})
        solvers = [s for s in SOLVERS if any(r["solver"] == s for r in fp)]
        lines += ["## FP baseline per flow solver", "", f"N = {fp[0]['n']}, noise seed {fp[0]['seed']}; each cell "
                  "FID / class accuracy (Heun: 2 denoiser calls per step but the last).", ""]
        for sc in scales:
            lines += [f"Guidance {sc:g}:", "", "| steps | " + " | ".join(solvers) + " |",
                      "|---:|" + "---:|" * len(solvers)]
            for st in steps:
                cells = []
                for so in solvers:
                    r = next((r for r in fp if r["guidance"] == sc and r["steps"] == st and r["solver"] == so), None)
                    cells.append("-" if r is None else f"{r['fid']:.3f} / {r['class_accuracy']:.3f}")
                lines.append(f"| {st} | " + " | ".join(cells) + " |")
            lines.append("")
    if (out / "supernet" / "README.md").is_file():
        lines += ["## Further reports", "", "- [supernet/README.md](supernet/README.md): uniform W8A8 / W6A6 against FP "
                  "at 28 Euler steps over two noise seeds, ranking fidelity, fake-quant cost, per-stream vs shared "
                  "joint-attention ranges", ""]
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    if machines:
        lines += ["## Machine", "", *(f"- {m}" for m in machines), "",
                  "Raw rows: `rows.jsonl` (command, machine, timestamp on each).", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", required=True, choices=("guidance", "fp", "keep", "report"))
    ap.add_argument("--run", default="", help="part keep: the finished run directory")
    ap.add_argument("--wall-s", type=float, default=None, help="part keep: its measured wall clock, seconds")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--solvers", type=lambda s: s.split(","), default=list(SOLVERS))
    ap.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=list(STEPS))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    cpu_setup(args.threads)
    run(args)


if __name__ == "__main__":
    main()
