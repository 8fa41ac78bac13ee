"""Scaling benchmark: memory and time of every search-time stage against model size, on denoisers built with random
weights from the real published configs of their families (nothing downloaded: the configs are written here).

    .venv/bin/python -m benchmarks.scale --family sd15 --widths 0.125 0.25 0.5 1 --out results/scale
    .venv/bin/python -m benchmarks.scale --family pixart --blocks 2 7 28 --out results/scale

Each point runs in a fresh interpreter (``--one``) so that its peak resident memory is its own; within it the peak is
reset between stages (``/proc/self/clear_refs``), and each stage's row holds the peak resident set of that stage
(``VmHWM``) beside the resident set before it. Stages:

- ``build``: the FP denoiser from its config, random weights (seeded), in ``--dtype``;
- ``fp_sample``: FP sampling of ``--n`` samples over ``--steps`` DDIM steps (the reference of the two ratios);
- ``wrap``: the supernet (``--w-bits`` x ``--a-bits`` options on every Conv2d / Linear, min-max weight observers so
  that calibrating an 0.8 B model takes minutes, not hours; memory does not depend on the observer);
- ``calibrate``: every option calibrated on ``--calib`` captured inputs;
- ``search``: ``--candidates`` allocations visited as a search visits them (uniform ones until every weight and every
  activation option has run, then random
  per-gene mixes), each sampled like ``fp_sample``: peak memory over all of them and the median time per candidate.

The report's two ratios: ``search`` peak / ``fp_sample`` peak (the supernet's memory during a search against the FP
model sampling), and the median candidate time / the FP sampling time. Rows append to ``<out>/rows.jsonl`` with the
command, the machine and the code revision (``--label`` names the code measured: run the same script with an older
checkout first on ``PYTHONPATH`` to measure the old code on the same machine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tmpq.core.rowlog import RowLog
from tmpq.deploy.int8 import cpu_int8_features

# published configs (diffusers' config.json of each family's denoiser), the keys that set the size
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
PIXART_SIGMA = dict(sample_size=128, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
                    attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
                    use_additional_conditions=False, patch_size=2, interpolation_scale=None)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=list(range(13)))


def _family(name: str, scale: float):
    """(model, text tokens, text width) of a family at ``scale`` (sd15: width multiplier; the transformers: number
    of blocks)."""
    import diffusers

    if name == "sd15":
        cfg = dict(SD15_UNET, block_out_channels=[max(32, int(c * scale) // 32 * 32) for c in SD15_UNET["block_out_channels"]])
        return diffusers.UNet2DConditionModel(**cfg), 77, 768
    if name == "pixart":
        return diffusers.PixArtTransformer2DModel(**dict(PIXART_SIGMA, num_layers=int(scale))), 120, 4096
    if name == "sd35":
        n = int(scale)
        cfg = dict(SD35_MEDIUM, num_layers=n, dual_attention_layers=[i for i in SD35_MEDIUM["dual_attention_layers"] if i < n])
        return diffusers.SD3Transformer2DModel(**cfg), 77, 4096
    raise SystemExit(f"--family: unknown {name!r}; choose sd15, pixart or sd35")


def _rss() -> tuple[float, float]:
    """(resident MiB now, peak resident MiB since the last reset)."""
    s = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) / 1024, int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) / 1024)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def one(args) -> list[dict]:
    """Every stage of one point, in this process."""
    from tmpq.core.adapters import Conditioning, bind_conditioning, set_conditioning
    from tmpq.core.sampler import make_scheduler, sample_images
    from tmpq.core.schedules import make_timesteps
    from tmpq.supernet import QuantSupernet, SupernetConfig
    from tmpq.supernet.calib_data import make_calib_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows, t0 = [], time.perf_counter()

    def stage(name: str, start: float, **extra) -> None:
        rss, peak = _rss()
        rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 3), "rss_mib": round(rss, 1),
                     "peak_mib": round(peak, 1), **extra})
        print(json.dumps(rows[-1]), flush=True)
        _reset_peak()

    _reset_peak()
    stage("start", t0)  # the interpreter with torch and diffusers imported: the base every later peak includes
    t0 = time.perf_counter()
    model, tokens, width = _family(args.family, args.scale)
    model = model.to(dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    model.register_to_config(sample_size=args.latent)
    if args.family == "sd15":
        model.to(memory_format=torch.channels_last)
    bind_conditioning(model, Conditioning())
    g = torch.Generator().manual_seed(1)
    cond = {"prompt_embeds": torch.randn(1, tokens, width, generator=g).to(dtype)}
    if args.family == "sd35":
        cond["pooled_embeds"] = torch.randn(1, 2048, generator=g).to(dtype)
    if args.family == "pixart":
        cond["prompt_mask"] = torch.ones(1, tokens)
    set_conditioning(model, **cond)
    weight_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    stage("build", t0, params=params, weight_mib=round(weight_mib, 1))

    sched = make_scheduler({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                            "beta_end": 0.012, "prediction_type": "epsilon"})
    ts = make_timesteps("uniform", args.steps, 1000)

    def sample(net_model) -> float:
        s = time.perf_counter()
        sample_images(net_model, sched, ts, args.n, seed=0, batch_size=args.n, progress=False)
        return time.perf_counter() - s

    sample(model)  # warm-up (allocator, oneDNN primitives), not timed
    _reset_peak()
    t = time.perf_counter()
    fp_s = statistics.median(sample(model) for _ in range(args.repeats))
    stage("fp_sample", t, sample_s=round(fp_s, 3))

    t = time.perf_counter()
    cfg = SupernetConfig(w_bits=tuple(args.w_bits), a_bits=tuple(args.a_bits), w_observer="minmax",
                         a_observer="minmax", pin={})
    net = QuantSupernet(model, cfg)
    budget = getattr(net, "keep_weights", None)  # absent in the old code: it kept a copy per visited option
    stage("wrap", t, layers=len(net.layers), genes=net.num_genes,
          weight_budget=None if budget is None else args.budget)
    if budget is not None:
        net.keep_weights(args.budget)

    t = time.perf_counter()
    data = make_calib_data(model, sched, "uniform", n_steps=args.calib, per_step=1, sampler_steps=args.calib)
    net.calibrate(list(data.batches(args.calib)), mode="per-option", progress=False)
    stage("calibrate", t)

    gen = torch.Generator().manual_seed(2)
    # first every weight and every activation option at least once (uniform allocations), then per-gene mixes
    k = max(len(args.w_bits), len(args.a_bits))
    allocs = [[(args.w_bits[i % len(args.w_bits)], args.a_bits[i % len(args.a_bits)])] * net.num_genes
              for i in range(k)]
    while len(allocs) < args.candidates:
        allocs.append([(args.w_bits[int(torch.randint(len(args.w_bits), (1,), generator=gen))],
                        args.a_bits[int(torch.randint(len(args.a_bits), (1,), generator=gen))])
                       for _ in range(net.num_genes)])
    t, times = time.perf_counter(), []
    for alloc in allocs:
        net.set_bits(alloc)
        times.append(sample(model))
    kept = getattr(net, "kept_weight_bytes", lambda: None)()
    stage("search", t, candidates=len(times), candidate_s=round(statistics.median(times), 3),
          kept_weight_mib=None if kept is None else round(kept / 2 ** 20, 1))
    return rows


def table(rows: list[dict]) -> str:
    """The report's table (markdown) from the rows of ``rows.jsonl``, old and new side by side per size."""
    out = ["| code | UNet width | params | FP weights MiB | FP sampling peak MiB | search peak MiB | search / FP (process) "
           "| search / FP (above the interpreter) | kept quantized weights MiB | candidate / FP time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if "stages" in r), key=lambda r: (r["family"], r["scale"], r["label"])):
        s, kept = r["stages"], r["stages"]["search"].get("kept_weight_mib")
        out.append(f"| {r['label']} | x{r['scale']} | {r['params'] / 1e6:.0f} M | {r['weight_mib']:.0f} | "
                   f"{s['fp_sample']['peak_mib']:.0f} | {s['search']['peak_mib']:.0f} | "
                   f"{r['search_peak_over_fp_peak']:.2f} | {r['search_over_fp_above_base']:.2f} | "
                   f"{'a copy per visited option' if kept is None else kept} | {r['candidate_over_fp_time']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", help="sd15 (UNet, --widths), pixart or sd35 (DiTs, --blocks)")
    ap.add_argument("--widths", type=float, nargs="*", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--blocks", type=int, nargs="*", default=[2, 7, 28])
    ap.add_argument("--latent", type=int, default=32, help="latent height = width (SD 1.5 at 256 px: 32)")
    ap.add_argument("--n", type=int, default=1, help="samples per sampling call")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib", type=int, default=2, help="calibration inputs (one per timestep)")
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--w-bits", type=int, nargs="*", default=[4, 6, 8])
    ap.add_argument("--a-bits", type=int, nargs="*", default=[6, 8, 16])
    ap.add_argument("--budget", type=float, default=0.25, help="the supernet's kept-weight budget (new code)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="new", help="which code is measured (e.g. new, old)")
    ap.add_argument("--out", type=Path, default=Path("results/scale"))
    ap.add_argument("--table", action="store_true", help="print the report's table from <out>/rows.jsonl and stop")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in (args.out / "rows.jsonl").read_text().splitlines() if line.strip()]))
        return
    if args.one is not None:
        args.scale = args.one
        print("ROWS " + json.dumps(one(args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ("family", "scale", "label", "dtype", "latent", "n", "steps", "w_bits", "a_bits")
    log = RowLog(args.out / "rows.jsonl", keys)
    scales = args.widths if args.family == "sd15" else args.blocks
    for scale in scales:
        if log.has(family=args.family, scale=scale, label=args.label, dtype=args.dtype, latent=args.latent, n=args.n,
                   steps=args.steps, w_bits=args.w_bits, a_bits=args.a_bits):
            continue  # resumable: a finished point is not measured again
        argv = [a for a in sys.argv[1:]]
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", *argv, "--one", str(scale)],
                              capture_output=True, text=True, env=os.environ.copy())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            log.append({"family": args.family, "scale": scale, "label": args.label, "error": proc.stderr[-500:]})
            continue
        stages = {r["stage"]: r for r in json.loads(lines[0][5:])}
        row = {"family": args.family, "scale": scale, "label": args.label, "dtype": args.dtype, "latent": args.latent,
               "n": args.n, "steps": args.steps, "w_bits": args.w_bits, "a_bits": args.a_bits,
               "params": stages["build"]["params"], "weight_mib": stages["build"]["weight_mib"],
               "search_peak_over_fp_peak": round(stages["search"]["peak_mib"] / stages["fp_sample"]["peak_mib"], 3),
               # the same without the interpreter's own memory (torch and diffusers imported, no model)
               "search_over_fp_above_base": round((stages["search"]["peak_mib"] - stages["start"]["rss_mib"])
                                                  / (stages["fp_sample"]["peak_mib"] - stages["start"]["rss_mib"]), 3),
               "candidate_over_fp_time": round(stages["search"]["candidate_s"] / stages["fp_sample"]["sample_s"], 3),
               "stages": stages, "cpu_int8": cpu_int8_features()}
        log.append(row)
        print(f"{args.family} x{scale}: {row['params'] / 1e6:.0f} M params, search peak / FP peak "
              f"{row['search_peak_over_fp_peak']} ({row['search_over_fp_above_base']} above the interpreter's base), candidate / FP time {row['candidate_over_fp_time']}", flush=True)


if __name__ == "__main__":
    main()
