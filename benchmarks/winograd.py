"""Winograd-domain W8A8 against direct W8A8, layer by layer, on the embedded UNet's 3x3 stride-1 convs.

    .venv/bin/python -m benchmarks.winograd                      # results/winograd/layers.jsonl + README table

Each conv's real inputs are captured from a few DDIM sampling steps (``--images`` images, ``--steps`` uniform
steps, seed ``--seed``); the even steps calibrate, the odd steps are measured. Metric: relative output MSE
``sum (y_q - y)^2 / sum y^2`` against the FP conv, per layer and pooled over all layers (``total`` rows). Variants:

- ``direct``: tmpq's ``QuantConv2d`` W8A8 (per-channel symmetric MSE-clipped weights, per-tensor asymmetric min-max
  activations: the supernet's defaults, without split / time groups / bias correction, so both sides are plain);
- ``fp``: FP32 Winograd F(4, 3), no quantization (the pipeline's own float error);
- ``tensor`` / ``group`` [``+tuned``]: Winograd W8A8 quantizing ``U`` and ``V`` (``quant.winograd``), with the
  transforms' diagonal scales tuned data-free or not;
- ``full-group`` [``+tuned``]: the fully quantized pipeline, the conv input and the Hadamard output ``M`` at 8 bits
  too (the setting of the group-wise fully quantized Winograd paper).

A layer-level measurement, not FID.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import command_line, cpu_setup, machine
from tmpq.core.fileio import atomic_write_bytes
from tmpq.core.model import load_model
from tmpq.core.rowlog import cpu_info
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
from tmpq.quant.layers import QuantConv2d
from tmpq.quant.winograd import TILES, WinogradConv2d

VARIANTS = [("tensor", False, False), ("group", False, False), ("group", True, False), ("tensor", True, False),
            ("group", False, True), ("group", True, True)]


def variant_name(gran: str, tuned: bool, full: bool) -> str:
    return ("full-" if full else "") + gran + ("+tuned" if tuned else "")


def capture_inputs(unet: nn.Module, convs: dict[str, nn.Conv2d], scheduler, timesteps, n: int, seed: int):
    """Every denoiser call's input to each conv, in call order."""
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in convs}
    hooks = [c.register_forward_pre_hook(lambda mod, args, k=k: seen[k].append(args[0].detach().clone()))
             for k, c in convs.items()]
    try:
        sample_images(unet, scheduler, timesteps, n, seed=seed, batch_size=n, progress=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def rel_err(layer: nn.Module, conv: nn.Conv2d, xs: list[torch.Tensor]) -> tuple[float, float]:
    """(sum of squared errors, sum of squared FP outputs) over ``xs``."""
    err = ref = 0.0
    with torch.no_grad():
        for x in xs:
            y = conv(x).double()
            err += float((layer(x).double() - y).pow(2).sum())
            ref += float(y.pow(2).sum())
    return err, ref


def direct_w8a8(conv: nn.Conv2d, calib: list[torch.Tensor]) -> QuantConv2d:
    q = QuantConv2d(conv, w_bits=(8,), a_bits=(8,), w_granularity="channel", w_observer="mse", a_symmetric=False,
                    a_observer="minmax")
    q.calibrate_weights()
    q.set_bits(0, 0)
    q.observing = True
    with torch.no_grad():
        for x in calib:
            q(x)
    q.observing = False
    q.freeze_activations()
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/winograd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tune-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on 2 busy shared cores: 20x slower spikes
    args = ap.parse_args()
    cpu_setup(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = load_model("embedded")
    unet = model.unet.eval()
    convs = {k: c for k, c in unet.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
             and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1}
    timesteps = make_timesteps("uniform", args.steps, model.scheduler_config.get("num_train_timesteps", 1000))
    seen = capture_inputs(unet, convs, make_scheduler(model.scheduler_config), timesteps, args.images, args.seed)
    rows: list[dict] = []
    for name, conv in convs.items():
        calib, test = seen[name][0::2], seen[name][1::2]
        base = {"layer": name, "cin": conv.in_channels, "cout": conv.out_channels, "hw": list(test[0].shape[-2:])}

        def add(variant: str, m: int | None, layer: nn.Module, **extra) -> None:
            e, r = rel_err(layer, conv, test)
            rows.append({**base, "variant": variant, "m": m, "rel_mse": e / r, "err": e, "ref": r, **extra})

        add("direct", None, direct_w8a8(conv, calib))
        add("fp", 4, WinogradConv2d(conv, 4, None, None))
        for m in TILES:
            for gran, tuned, full in VARIANTS:
                layer = WinogradConv2d(conv, m, 8, 8, gran, x_bits=8 if full else None, m_bits=8 if full else None)
                layer.calibrate(calib)
                extra = {}
                if tuned:
                    t = time.time()
                    r = layer.tune_scales(steps=args.tune_steps, seed=args.seed)
                    extra = {"tune_before": r["before"], "tune_balanced": r["balanced"], "tune_after": r["after"],
                             "tune_s": round(time.time() - t, 2)}
                add(variant_name(gran, tuned, full), m, layer, **extra)
        print(f"{name}: " + ", ".join(f"{r['variant']}@{r['m']} {r['rel_mse']:.2e}" for r in rows
                                      if r["layer"] == name), flush=True)
    totals = {}
    for r in rows:
        t = totals.setdefault((r["variant"], r["m"]), {"err": 0.0, "ref": 0.0, "per_layer": []})
        t["err"] += r["err"]
        t["ref"] += r["ref"]
        t["per_layer"].append(r["rel_mse"])
    model_name, flags = cpu_info()
    meta = {"command": command_line(), "machine": machine(), "seed": args.seed, "images": args.images,
            "steps": args.steps, "tune_steps": args.tune_steps, "seconds": round(time.time() - t0, 1),
            "int8_isa": sorted(f for f in flags if f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "vnni"))}
    for (variant, m), t in totals.items():
        per = sorted(t["per_layer"])
        rows.append({"layer": "total", "variant": variant, "m": m, "rel_mse": t["err"] / t["ref"],
                     "median_layer_rel_mse": per[len(per) // 2], "max_layer_rel_mse": per[-1], "layers": len(per),
                     **meta})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "layers.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    print(f"{model_name}; int8 ISA {', '.join(meta['int8_isa']) or 'none'}; {meta['seconds']} s")
    print(f"{'variant':18s} {'m':>3s} {'pooled':>10s} {'median':>10s} {'max':>10s}")
    for r in rows:
        if r["layer"] == "total":
            print(f"{r['variant']:18s} {str(r['m']):>3s} {r['rel_mse']:10.3e} {r['median_layer_rel_mse']:10.3e} "
                  f"{r['max_layer_rel_mse']:10.3e}")


if __name__ == "__main__":
    main()
