"""Final benchmark (issue 5): search -> validate at large N -> export -> real speed, on the embedded default, against
the FP 100-step model. Resumable (the search run, validation rows and the speed file are reused when present).

    .venv/bin/python -m benchmarks.final --config configs/final.toml

- Budget: BitOPs x steps <= ``--budget-frac`` (default 1 %) of the FP model at 100 steps (32-bit weights and
  activations, every quantizable layer's MACs, 100 denoiser calls).
- Validation: the ``--top-k`` best proxies under that budget plus ``--spread`` front points spread over BitOPs (so
  the proxy-vs-FID rank correlation covers the whole front), each re-calibrated at its own allocation along its own
  schedule and scored by FID / KID at ``--n`` over ``--seeds``.
- Reference: the FP uniform DDIM 100-step FID of ``results/baseline/rows.jsonl`` (N = 10,000, seed 0).
- Speed: ``tmpq speed`` on the export of the best validated point under the budget, or (``--speed-pick
  cheapest-within-target``) of the validated point with the fewest BitOPs whose FID is within ``--target`` x the FP
  100-step FID (``--speed-target``, default ``--target``: speed at equal quality).
- ``--extra-budget-frac F --extra-target R``: a second, tighter budget whose ``--top-k`` best proxies are validated
  too and whose best validated point is held against R x FP 100 steps (issue 21: 1 % / 1.05x and 0.5 % / 1.3x).
- A run with a solver gene: every point samples with its own solver, and the FP model on the best point's schedule
  uses that solver too.

Writes results/final/README.md, validated.png and speed.json, and keeps the run's files the report reads (its config,
search space, evaluation log and validation rows, gzip) under ``OUT/raw/``: ``--report-only`` rebuilds the report
from them on a fresh clone, where the run directory (git-ignored) is absent, sampling nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RowLog,
    baseline_fp_row,
    cpu_setup,
    findings,
    keep_gzip,
    read_gzip,
)
from tmpq.core.candidate import DEFAULT_SOLVER, Solver, reuse_of

RAW_FILES = ("config.resolved.json", "search_space.json", "evaluations.jsonl", "final/rows.jsonl")


def _kept(raw: Path, name: str) -> Path:
    return raw / (name.replace("/", "-") + ".gz")


def keep_run_files(run_path: Path, raw: Path) -> None:
    """Commit-ready gzip copies (``keep_gzip``) of the run files the report reads."""
    for name in RAW_FILES:
        keep_gzip(run_path / name, _kept(raw, name), "run file")


def restore_run(raw: Path, into: Path) -> Path:
    """A run directory rebuilt from ``keep_run_files``' copies (for ``--report-only`` where the run is not here)."""
    from tmpq.core.errors import TmpqError

    run = into / "run"
    for name in RAW_FILES:
        src = _kept(raw, name)
        if not src.is_file():
            raise TmpqError(f"neither the run directory nor its kept copy {src} is here")
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(read_gzip(src, "kept run file"))
    return run


def _search_finished(run_path: Path, generations: int) -> bool:
    from tmpq.jobs.run import load_run

    if not (run_path / "pareto.parquet").is_file():
        return False
    ev = load_run(run_path).evaluations
    return len(ev) > 0 and int(ev["generation"].max()) >= generations - 1


def choose_keys(front, budget: float, top_k: int, spread: int, extra_budget: float = 0.0) -> list[str]:
    under = front[front["bitops"] <= budget].sort_values("fid_proxy")
    keys = list(under["key"].head(top_k))
    if extra_budget:  # the tighter budget's own best proxies
        tight = front[(front["bitops"] <= extra_budget) & ~front["key"].isin(keys)].sort_values("fid_proxy")
        keys += list(tight["key"].head(top_k))
    rest = front[~front["key"].isin(keys)].sort_values("bitops")
    if spread and len(rest):
        idx = np.unique(np.linspace(0, len(rest) - 1, min(spread, len(rest))).round().astype(int))
        keys += list(rest.iloc[idx]["key"])
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/final.toml")
    ap.add_argument("--out", default="results/final")
    ap.add_argument("--budget-frac", type=float, default=0.01)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--spread", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--distill-iters", type=int, default=0)
    ap.add_argument("--speed-n", type=int, default=256)
    ap.add_argument("--speed-fid-n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default="results/baseline/rows.jsonl")
    ap.add_argument("--target", type=float, default=1.15, help="FID target under the budget, x FP 100 steps")
    ap.add_argument("--extra-budget-frac", type=float, default=0.0, help="a second, tighter budget (0: none)")
    ap.add_argument("--extra-target", type=float, default=1.3, help="FID target under the extra budget")
    ap.add_argument("--speed-pick", default="best-under-budget", choices=("best-under-budget", "cheapest-within-target"),
                    help="which validated point tmpq speed times")
    ap.add_argument("--speed-target", type=float, default=0.0,
                    help="cheapest-within-target: the FID bound, x FP 100 steps (0: --target)")
    ap.add_argument("--title", default="Final evaluation on the embedded default (issue 5)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from the run (or its kept copy under OUT/raw/): no search, no sampling")
    args = ap.parse_args()
    cpu_setup(args.threads)

    from tmpq.jobs.config import load_config
    from tmpq.jobs.search import run_search

    out = Path(args.out)
    run_path = out / "run"
    cfg = load_config(args.config)
    if args.report_only:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            if not (run_path / "config.resolved.json").is_file():
                run_path = restore_run(out / "raw", Path(tmp))
            _evaluate(args, cfg, out, run_path, 0.0)
        return
    t0 = time.perf_counter()
    if not _search_finished(run_path, cfg.search.generations):  # a finished run is not replayed (the engine's
        run_search(cfg, run_path, resume=(run_path / "config.resolved.json").is_file(), progress=True)  # code may
    search_s = time.perf_counter() - t0  # have changed since, and a replay would then search again)
    _evaluate(args, cfg, out, run_path, search_s)


def _evaluate(args, cfg, out: Path, run_path: Path, search_s: float) -> None:
    """Validate (resuming: a point and seed with its row is not sampled again), export and time the pick, find the
    FP gap, write the report; under ``--report-only`` every number must already be here (else one line says which)."""
    from tmpq.core.errors import TmpqError
    from tmpq.core.rowlog import command_line, machine
    from tmpq.deploy.int8 import measure_speed
    from tmpq.jobs.export import ensure_export
    from tmpq.jobs.run import load_run
    from tmpq.jobs.validate import ValidateConfig, validate_run
    from tmpq.search.budget import fp_bitops

    run = load_run(run_path)
    fp100_bitops = fp_bitops(run.space, 100)
    budget = args.budget_frac * fp100_bitops
    ref = baseline_fp_row(Path(args.baseline), 100)
    front = run.pareto()
    extra_budget = args.extra_budget_frac * fp100_bitops
    keys = choose_keys(front, budget, args.top_k, args.spread, extra_budget)
    vcfg = ValidateConfig(n=args.n, seeds=tuple(int(s) for s in args.seeds.split(",")), keys=tuple(keys),
                          distill_iters=args.distill_iters,
                          # the report's FP gap is fp_schedule.json's; a report rebuilt from the kept copies samples
                          # nothing
                          fp_reference=not args.report_only)
    if args.report_only:
        _check_validated(run_path / "final" / "rows.jsonl", keys, vcfg)
    t0 = time.perf_counter()
    final = validate_run(run_path, vcfg, progress=True)
    validate_s = time.perf_counter() - t0
    if not args.report_only:
        keep_run_files(run_path, out / "raw")
    summary = json.loads((run_path / "final.json").read_text())
    final["bitops_frac"] = final["bitops"] / fp100_bitops
    final["fid_vs_fp100"] = final["fid_mean"] / ref["fid"]
    under = final[final["bitops"] <= budget].sort_values("fid_mean")

    speed = None
    if args.speed_pick == "cheapest-within-target":
        pick = final[final["fid_vs_fp100"] <= (args.speed_target or args.target)].sort_values("bitops")
    else:
        pick = under
    if len(pick):
        best = pick.iloc[0]
        speed_file = out / "speed.json"
        speed = json.loads(speed_file.read_text()) if speed_file.is_file() else None
        if args.report_only and (speed is None or speed.get("candidate") != best["key"]):
            raise TmpqError(f"{speed_file}: no timing of the pick {best['key']} (run without --report-only)")
        if speed is None or speed.get("candidate") != best["key"]:
            export_dir = ensure_export(run_path, best["key"], out / "export", command="python -m benchmarks.final")
            speed = measure_speed(export_dir, n=args.speed_n, batch_size=args.speed_n, fid_n=args.speed_fid_n)
            speed.update({"candidate": best["key"], "threads": args.threads, "pick": args.speed_pick})
            speed_file.write_text(json.dumps(speed, indent=2) + "\n")
    gap = fp_on_schedule(out, under.iloc[0], args) if len(under) else None
    produced = out / "raw" / "produced.json"  # how the numbers were produced: a rebuilt report keeps the command
    if args.report_only:
        if not produced.is_file():
            raise TmpqError(f"{produced}: missing (run without --report-only)")
        how = json.loads(produced.read_text())
    else:
        how = {"command": command_line(), "machine": machine(), "search_s": round(search_s, 1),
               "validate_s": round(validate_s, 1)}
        produced.write_text(json.dumps(how, indent=2) + "\n")
    _plot(out, final, budget, fp100_bitops, ref, args.target)
    _write(out, args, cfg, final, under, ref, summary, speed, fp100_bitops, budget, extra_budget,
           {"search_s": how["search_s"], "validate_s": how["validate_s"]}, how["command"], how["machine"], gap)
    print(json.dumps({"report": str(out / "README.md")}))


def _check_validated(rows: Path, keys: list[str], vcfg) -> None:
    """``--report-only``: every chosen point has its validation rows at this N and these seeds (else one line)."""
    from tmpq.core.errors import TmpqError

    log = RowLog(rows, ("key", "seed", "n"))  # reads only
    missing = [f"{k} seed {s}" for k in keys for s in vcfg.seeds if not log.has(key=k, seed=s, n=vcfg.n)]
    if missing:
        raise TmpqError(f"{rows}: no validation row at N = {vcfg.n} for {', '.join(missing)} (run without "
                        "--report-only)")


def fp_on_schedule(out: Path, best, args) -> dict:
    """FID of the FP model on the best point's own schedule (same N, same seeds as its validation): splits the gap to
    the FP 100-step FID into the part that fewer steps cost and the part that quantization adds. Cached in
    ``OUT/fp_schedule.json`` per schedule."""
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import embedded_reference, evaluate_schedule

    path = out / "fp_schedule.json"
    ts = [int(t) for t in best["timesteps"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    cached = json.loads(path.read_text()) if path.is_file() else {}
    solver = Solver.of(best)
    if cached.get("timesteps") == ts and cached.get("n") == args.n and cached.get("seeds") == seeds and \
            tuple(cached.get("solver", DEFAULT_SOLVER)) == solver:
        return cached
    if args.report_only:
        from tmpq.core.errors import TmpqError

        raise TmpqError(f"{path}: no FP run on the schedule of {best['key']} (run without --report-only)")
    m = load_model(None)
    ext = make_extractor("domain")
    ref = embedded_reference(ext)
    fids = [evaluate_schedule(m.unet, make_scheduler(m.scheduler_config, *solver), ts, args.n, ext, ref, seed=sd,
                              desc=f"FP on the best schedule, seed {sd}")["fid"] for sd in seeds]
    row = {"timesteps": ts, "n": args.n, "seeds": seeds, "fid": float(np.mean(fids)), "fids": fids,
           "key": best["key"], **({"solver": list(solver)} if solver != DEFAULT_SOLVER else {})}
    path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _plot(out: Path, final, budget: float, fp100: float, ref: dict, target: float = 1.15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = 100 * final["bitops"] / fp100
    ax.errorbar(x, final["fid_mean"], yerr=final["fid_std"].fillna(0), fmt="o", label="validated points")
    for xi, yi, steps in zip(x, final["fid_mean"], final["timesteps"]):
        ax.annotate(f"{len(steps)} st", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(ref["fid"], color="gray", ls="--", label=f"FP uniform DDIM 100 steps ({ref['fid']:.3f})")
    ax.axhline(target * ref["fid"], color="gray", ls=":", label=f"{target:g} x FP 100 steps")
    ax.axvline(100 * budget / fp100, color="red", ls=":", label="budget")
    ax.set_xlabel("BitOPs x steps, % of the FP 100-step model")
    ax.set_ylabel("FID (domain extractor)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "validated.png", dpi=120)
    plt.close(fig)


def _write(out, args, cfg, final, under, ref, summary, speed, fp100, budget, extra_budget, timings, cmd, mach,
           gap=None) -> None:
    s = cfg.search
    solvers = getattr(s, "solvers", None) or []
    lines = [f"# {args.title}", "", *findings(out),
             f"Search: `{args.config}` ({s.engine}, "
             + (f"steps {'/'.join(map(str, s.step_choices))}" if s.step_choices else f"{s.steps} steps")
             + (f", solvers {' / '.join(solvers)} as a gene" if solvers else "")
             + (f", reuse of deep features as a gene (branch {s.reuse_branch})" if getattr(s, "reuse_branch", 0) else "")
             + f" on {s.grouping} time groups, population "
             f"{s.population} x {s.generations} generations, proxy {cfg.proxy.name} at N = {cfg.proxy.n_images}); "
             f"search wall {timings['search_s']:.0f} s in this invocation (0 if resumed from a finished run).", "",
             f"Reference: FP uniform DDIM 100 steps, FID **{ref['fid']:.3f}** (N = {ref['n']}, noise seed "
             f"{ref['seed']}, `results/baseline/`). Budget: BitOPs x steps <= {100 * args.budget_frac:g} % of the FP "
             f"100-step model = {budget / 1e9:.3g} GBitOPs per image ({fp100 / 1e9:.4g} GBitOPs at FP 100 steps, "
             "32-bit weights and activations).", "",
             f"## Validated points (N = {args.n} per seed, seeds {args.seeds}; re-calibrated at their own allocation "
             f"along their own schedule{', distillation ' + str(args.distill_iters) + ' iterations' if args.distill_iters else ''})",
             "", "| key | steps | % FP100 BitOPs | proxy | FID mean ± std | x FP100 | KID x1e3 | under budget |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    if solvers:
        lines[-2:] = ["| key | solver | steps | reused calls | % FP100 BitOPs | proxy | FID mean ± std | x FP100 | "
                      "KID x1e3 | under budget |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in final.sort_values("bitops").iterrows():
        std = "-" if r["fid_std"] != r["fid_std"] else f"{r['fid_std']:.3f}"
        name, order = Solver.of(r)
        reuse = reuse_of(r)
        steps = (f" {name}{'' if name in ('ddim', 'euler', 'heun') else f' (order {order})'} | "
                 f"{len(r['timesteps'])} | {len(reuse)} |") if solvers else f" {len(r['timesteps'])} |"
        lines.append(f"| {r['key']} |{steps} {100 * r['bitops_frac']:.3f} | {r['fid_proxy']:.4g} | "
                     f"{r['fid_mean']:.3f} ± {std} | {r['fid_vs_fp100']:.2f} | {1e3 * r['kid_mean']:.2f} | "
                     f"{'yes' if r['bitops'] <= budget else 'no'} |")
    tau = summary.get("kendall_tau_proxy_vs_fid")
    lines += ["", f"Kendall tau, search proxy vs validated FID over {len(final)} points: "
              + (f"**{tau:.3f}**" if tau is not None else "n/a (fewer than 3 points)"), ""]
    if len(under):
        b = under.iloc[0]
        verdict = "meets" if b["fid_vs_fp100"] <= args.target else "misses"
        lines += [f"Best point under the budget: `{b['key']}`, {len(b['timesteps'])} steps {list(b['timesteps'])}"
                  + (f" ({Solver.of(b)[0]})" if solvers else "") + ", "
                  f"{100 * b['bitops_frac']:.3f} % of FP 100-step BitOPs, FID {b['fid_mean']:.3f} = "
                  f"{b['fid_vs_fp100']:.2f} x FP 100 steps: it **{verdict}** the {args.target:g} x target.", ""]
        if gap:
            how = (f" with its solver ({Solver.of(b)[0]})" if solvers else "") + (
                ", every call in full (no reuse)" if getattr(s, "reuse_branch", 0) else "")
            lines += [f"Where the gap comes from: the FP model on that same schedule{how} reaches FID {gap['fid']:.3f} "
                      f"(N = {gap['n']}, seeds {gap['seeds']}) = {gap['fid'] / ref['fid']:.2f} x FP 100 steps (the "
                      f"cost of {len(b['timesteps'])} steps), and quantization"
                      f"{' with the reuse' if getattr(s, 'reuse_branch', 0) else ''} multiplies it by "
                      f"{b['fid_mean'] / gap['fid']:.2f}.", ""]
    else:
        lines += ["No validated point lies under the budget.", ""]
    if extra_budget:
        tight = final[final["bitops"] <= extra_budget].sort_values("fid_mean")
        if len(tight):
            b = tight.iloc[0]
            verdict = "meets" if b["fid_vs_fp100"] <= args.extra_target else "misses"
            lines += [f"Best validated point under the tighter budget ({100 * args.extra_budget_frac:g} % = "
                      f"{extra_budget / 1e9:.3g} GBitOPs per image): `{b['key']}`, {len(b['timesteps'])} steps"
                      + (f" ({Solver.of(b)[0]})" if solvers else "") + f", {100 * b['bitops_frac']:.3f} % of FP "
                      f"100-step BitOPs, FID {b['fid_mean']:.3f} = {b['fid_vs_fp100']:.2f} x FP 100 steps: it "
                      f"**{verdict}** the {args.extra_target:g} x target.", ""]
        else:
            lines += [f"No validated point lies under the tighter budget ({100 * args.extra_budget_frac:g} %).", ""]
    lines += ["![validated points](validated.png)", ""]
    if speed is None and args.speed_pick == "cheapest-within-target":
        lines += [f"No validated point is within {args.speed_target or args.target:g} x FP 100 steps: speed not "
                  "measured.", ""]
    if speed:
        pick = (", the validated point with the fewest BitOPs among those within "
                f"{args.speed_target or args.target:g} x FP 100 steps" if speed.get("pick") == "cheapest-within-target"
                else "")
        lines += [f"## Speed (`tmpq speed` on the export of `{speed['candidate']}`{pick}; {speed['images']} "
                  f"images, batch {speed['batch_size']}, {speed['threads']} threads, median of 3)", "",
                  "| path | wall s | speed-up vs FP 100 steps |", "|---|---:|---:|",
                  f"| FP, uniform DDIM 100 steps | {speed['fp_100_uniform_s']:.2f} | 1.00x |",
                  f"| FP, exported schedule ({speed['steps']} steps) | {speed['fp_export_schedule_s']:.2f} | "
                  f"{speed['fp_100_uniform_s'] / speed['fp_export_schedule_s']:.2f}x |",
                  f"| fake quantization, exported | {speed['fakequant_export_s']:.2f} | "
                  f"{speed['speedup_fakequant_vs_fp100']:.2f}x |",
                  f"| real int8 kernels, exported | {speed['int8_export_s']:.2f} | {speed['speedup_int8_vs_fp100']:.2f}x |",
                  "", f"Real int8 vs fake quantization at the same schedule: **{speed['speedup_int8_vs_fakequant']:.2f}x**; "
                  f"{speed['int8_layers']} layers run int8 kernels, {speed['fallback_layers']} fall back to fake "
                  f"quantization: " + ("; ".join(sorted({r['why'] for r in speed['layers'] if not r['int8']})) or "none")
                  + f". Pixel MSE int8 vs fake-quant on the same noise: {speed['int8_vs_fakequant_pixel_mse']:.2e}."]
        if speed.get("reuse"):
            ru = speed["reuse"]
            lines.append(f"The export reuses deep features on denoiser calls {ru['calls']} (branch {ru['branch']}); "
                         "the fake-quant and int8 timings above ran with that reuse.")
        fids = {k: v for k, v in speed.items() if "_fid_n" in k}
        if fids:
            lines.append("FID at the speed benchmark's N (seed 1): " + ", ".join(f"{k}: {v:.3f}" for k, v in fids.items())
                         + ".")
        if "op_shares" in speed:
            sh = speed["op_shares"]
            lines += ["", f"Where one denoiser call's time goes (torch.profiler, batch {speed['batch_size']}): convs + "
                      f"Linears are {sh['fp']['conv_linear_share']:.0%} of the FP call ({sh['fp']['total_ms']:.0f} ms) "
                      f"and {sh['int8']['conv_linear_share']:.0%} of the int8 call ({sh['int8']['total_ms']:.0f} ms). "
                      "Even free convs and Linears would leave the rest (norms, activations, additions, "
                      f"concatenations, attention), so on this schedule the speed-up vs FP 100 steps is bounded by "
                      f"**{speed['speedup_bound_vs_fp100']:.1f}x** (Amdahl)."]
        lines.append("")
    lines += ["## How it was produced", "", f"- command: `{cmd}` (resumable)", f"- machine: {mach}",
              f"- validation wall {timings['validate_s']:.0f} s in this invocation", ""]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    from tmpq.core.errors import TmpqError

    try:
        main()
    except TmpqError as exc:  # a missing or damaged input: one line, non-zero exit
        raise SystemExit(f"benchmarks.final: {exc}") from None
