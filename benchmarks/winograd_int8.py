"""Per-conv CPU time of Winograd-domain int8 against FP and direct int8, on the embedded UNet's 3x3 stride-1 convs.

    .venv/bin/python -m benchmarks.winograd_int8          # results/winograd/int8.jsonl + int8.md

For each distinct (Cin, Cout, H, W) of those convs (the first conv of that shape; ``count`` says how many share it),
its real input at batch ``--batch`` is captured from one denoiser call on Gaussian noise at t = 500. Variants:

- ``fp``: the FP ``nn.Conv2d`` (``F.conv2d``, oneDNN);
- ``direct_int8``: tmpq's oneDNN int8 conv (``tmpq.deploy.int8.Int8Conv2d``) built from a ``QuantConv2d`` at W8A8
  as ``tmpq.deploy.int8`` builds it (per-channel MSE-clipped weights, per-tensor asymmetric activations);
- ``wino_int8_F{m}``: ``WinogradInt8Conv2d`` from a group-wise W8A8 ``WinogradConv2d`` F(m, 3) calibrated on the
  same input.

Each int8 module is checked against its fake-quant twin on the input (``check_err``: largest error over the exact
magnitude). Timing: one warm-up round, then ``--repeats`` rounds; every round calls each variant once, interleaved
(fp, direct, F2, F4, F6, fp, ...), so that contention from other jobs on the shared cores hits all alike; the median
per variant. At 1 and 2 threads (``--threads``). Per-conv times only: not end-to-end sampling time, not FID.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import command_line, cpu_setup, machine
from benchmarks.winograd import direct_w8a8
from tmpq.core.adapters import adapter_for, denoise, denoiser_of, sample_shape
from tmpq.core.fileio import atomic_write_bytes
from tmpq.core.model import load_model
from tmpq.core.rowlog import cpu_info
from tmpq.deploy.int8 import Int8Conv2d, check_layer
from tmpq.deploy.winograd_int8 import convert
from tmpq.quant.winograd import TILES, WinogradConv2d

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
READING = "## Reading"


def conv_inputs(unet: nn.Module, batch: int, seed: int) -> dict[str, tuple[nn.Conv2d, torch.Tensor]]:
    """The first 3x3 stride-1 conv of every distinct (Cin, Cout, H, W) with its input on one denoiser call, and how
    many convs share that shape (``{shape_key: (conv, x, count)}``)."""
    convs = {k: c for k, c in unet.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
             and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1}
    seen: dict[str, torch.Tensor] = {}
    hooks = [c.register_forward_pre_hook(lambda mod, args, k=k: seen.setdefault(k, args[0].detach().clone()))
             for k, c in convs.items()]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape(unet), generator=g)
    try:
        with torch.no_grad():
            denoise(unet, x, torch.full((batch,), 500), adapter_for(unet).example(denoiser_of(unet), batch, x.device))
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, list] = {}
    for k, c in convs.items():
        xi = seen[k].contiguous()
        key = f"{c.in_channels}x{c.out_channels}@{xi.shape[2]}x{xi.shape[3]}"
        if key in out:
            out[key][3] += 1
        else:
            out[key] = [k, c, xi, 1]
    return {key: tuple(v) for key, v in out.items()}


def direct_int8(conv: nn.Conv2d, x: torch.Tensor) -> tuple[nn.Module, float]:
    """The oneDNN int8 conv of a W8A8 ``QuantConv2d`` calibrated on ``x`` and its check error."""
    q = direct_w8a8(conv, [x])
    scale = q.w_quant[q.w_index].scale.detach().reshape(-1).float()
    w = q.quantized_weight().detach().float().contiguous()
    bias = q.active_bias()
    mod = Int8Conv2d(conv, w, scale.expand(w.shape[0]).contiguous() if scale.numel() == 1 else scale,
                     None if bias is None else bias.detach().float().contiguous(), q.a_quant[q.a_index])
    return mod, check_layer(q, mod, [x])["err"]


def timed(fn, x) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/winograd")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.time()
    cpu_setup(max(args.threads))
    torch.manual_seed(args.seed)
    unet = load_model("embedded").unet.eval()
    shapes = conv_inputs(unet, args.batch, args.seed)
    model_name, flags = cpu_info()
    isa = [f for f in INT8_FLAGS if f in flags]
    rows: list[dict] = []
    for key, (name, conv, x, count) in shapes.items():
        variants: dict[str, nn.Module] = {"fp": conv}
        checks: dict[str, float | None] = {"fp": None}
        variants["direct_int8"], checks["direct_int8"] = direct_int8(conv, x)
        for m in TILES:
            layer = WinogradConv2d(conv, m, 8, 8, "group")
            layer.calibrate([x])
            mod, row = convert(layer, [x], name=name)
            if not row["int8"]:
                raise SystemExit(f"{name} F({m}, 3): fell back: {row['why']}")
            variants[f"wino_int8_F{m}"], checks[f"wino_int8_F{m}"] = mod, row["check_err"]
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(1 + args.repeats):  # round 0 warms up
                for v, mod in variants.items():
                    t = timed(mod, x)
                    if r:
                        times[v].append(t)
            for v, ts in times.items():
                rows.append({"shape": key, "layer": name, "count": count, "cin": conv.in_channels,
                             "cout": conv.out_channels, "hw": list(x.shape[2:]), "batch": args.batch,
                             "threads": threads, "variant": v, "median_ms": statistics.median(ts),
                             "times_ms": [round(t, 4) for t in ts], "check_err": checks[v]})
            print(f"{key} x{count} {threads}t: " + ", ".join(f"{r['variant']} {r['median_ms']:.2f}" for r in rows
                                                          if r["shape"] == key and r["threads"] == threads),
                  flush=True)
    meta = {"command": command_line(), "machine": machine(), "cpu": model_name, "int8_isa": isa,
            "batch": args.batch, "repeats": args.repeats, "seconds": round(time.time() - t_start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "int8.jsonl", "".join(json.dumps({**r, **meta}) + "\n" for r in rows).encode())
    md = out / "int8.md"
    reading = md.read_text().split(READING, 1)[1] if md.is_file() and READING in md.read_text() else "\n\n(to do)\n"
    atomic_write_bytes(md, (report(rows, meta, args.threads) + READING + reading).encode())
    print(f"wrote {out / 'int8.jsonl'} and {md} ({meta['seconds']} s)")


def report(rows: list[dict], meta: dict, threads: list[int]) -> str:
    """The markdown table: median ms per conv shape and variant, per thread count, and the count-weighted totals."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["# Winograd-domain int8 vs FP and direct int8 (per-conv CPU time)", "",
             f"Command: `.venv/bin/{meta['command']}` ({meta['seconds']} s). Machine: {meta['machine']}. "
             f"CPU: {meta['cpu']}; int8 ISA flags in /proc/cpuinfo: {', '.join(meta['int8_isa']) or 'none'}. "
             f"Batch {meta['batch']}; median of {meta['repeats']} interleaved rounds after one warm-up round. "
             "The 2 cores are shared with other jobs: timings are noisy; the interleaving spreads contention over "
             "all variants alike. Rows: `int8.jsonl`. Per-conv times only: end-to-end sampling time, the solver "
             "gene and FID are out of scope.", ""]
    for t in threads:
        lines += [f"### {t} thread{'s' if t > 1 else ''} (median ms per call)", "",
                  "| Cin x Cout @ HxW | convs | " + " | ".join(variants) + " |",
                  "|---" * (2 + len(variants)) + "|"]
        sel = [r for r in rows if r["threads"] == t]
        total = dict.fromkeys(variants, 0.0)
        for key in dict.fromkeys(r["shape"] for r in sel):
            by = {r["variant"]: r for r in sel if r["shape"] == key}
            for v in variants:
                total[v] += by[v]["median_ms"] * by[v]["count"]
            lines.append(f"| {key} | {by['fp']['count']} | " + " | ".join(f"{by[v]['median_ms']:.2f}"
                                                                         for v in variants) + " |")
        lines.append("| **all convs (x count)** | | " + " | ".join(f"**{total[v]:.1f}**" for v in variants) + " |")
        lines.append("| speed-up vs fp | | " + " | ".join(f"{total['fp'] / total[v]:.2f}x" for v in variants) + " |")
        lines.append("")
    errs = [r["check_err"] for r in rows if r["check_err"] is not None]
    lines += [f"Every int8 module was checked against its fake-quant twin on the timed input: worst error "
              f"{max(errs):.1e} of the exact magnitude behind an output (tolerance 1e-5).", "", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
