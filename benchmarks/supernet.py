"""Supernet benchmark (issue 3): fidelity of the shared supernet vs per-allocation calibration, quality of uniform
options, and cost. Resumable: finished rows live in <out>/rows.jsonl.

    .venv/bin/python -m benchmarks.supernet --n-alloc 20 --fid-n 2000
    .venv/bin/python -m benchmarks.supernet --model embedded-dit --guidance 2 --out results/dit/supernet  # any model

A class model whose classes are digits also gets class accuracy in every quality row. Part ``ranges``: separate vs
shared guidance-pass activation ranges (``supernet.guidance_ranges``) at W8A8 and W6A6, ``--quality-steps`` uniform.
Part ``streams``: a joint-attention transformer's per-stream vs shared activation ranges (``supernet.stream_ranges``),
the same options and steps (``--schedule``).

Fidelity: ``--n-alloc`` random allocations spanning the BitOPs range (stratified by BitOPs quantile), each scored
(paired pixel MSE to the FP teacher on the same noise, and FID at ``--fid-n``) with the shared supernet of each
calibration mode and with a supernet calibrated for that allocation alone; Kendall tau between the rankings.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RowLog, baseline_fp_row, cpu_setup, findings
from tmpq.core.adapters import adapter_for, sample_shape
from tmpq.core.model import ModelConfig, load_model
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import (
    digit_class_accuracy,
    embedded_reference,
    score_features,
)
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import make_calib_data


def random_allocations(net: QuantSupernet, k: int, seed: int, pool: int = 2000) -> list[list[tuple[int, int]]]:
    """k allocations at evenly spaced BitOPs quantiles of a random pool (per-gene uniform options)."""
    rng = np.random.default_rng(seed)
    cfg = net.config
    cands = []
    for _ in range(pool):
        # mix per-gene probabilities so the pool spans the whole BitOPs range, not just its middle
        p_low = rng.uniform(0, 1)
        alloc = []
        for _g in range(net.num_genes):
            w = cfg.w_bits[-1] if rng.uniform() < p_low else int(rng.choice(cfg.w_bits))
            a = cfg.a_bits[-1] if rng.uniform() < p_low else int(rng.choice(cfg.a_bits))
            alloc.append((int(w), int(a)))
        cands.append((net.bitops(alloc), alloc))
    cands.sort(key=lambda c: c[0])
    idx = np.linspace(0, len(cands) - 1, k).round().astype(int)
    return [cands[i][1] for i in idx]


def standalone(unet_loader, alloc, probe: QuantSupernet, batches, mode: str) -> QuantSupernet:
    """A supernet with every layer pinned to its allocated bits: calibration for that allocation alone."""
    net = QuantSupernet(unet_loader(), probe.pinned_config(alloc))
    net.calibrate(batches, mode=mode, progress=False)
    net.set_bits([])  # every layer pinned: no genes
    return net


def model_config(args) -> ModelConfig:
    return ModelConfig(path=args.model, guidance_scale=args.guidance)


def quality(unet, imgs, ext, ref) -> dict:
    """FID (KID) of ``imgs`` and, for a digit class model, their class accuracy (balanced labels)."""
    row = score_features(ext(imgs), ref)
    acc = digit_class_accuracy(unet, imgs)
    if acc is not None:
        row["class_accuracy"] = acc
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="model.path: embedded, embedded-dit or a model directory")
    ap.add_argument("--guidance", type=float, default=1.0, help="model.guidance_scale of every sampling")
    ap.add_argument("--guidance-ranges", default="shared", choices=("shared", "separate"),
                    help="supernet.guidance_ranges of the supernets (part ranges compares both)")
    ap.add_argument("--n-alloc", type=int, default=20)
    ap.add_argument("--fid-n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--schedule", default="quad")
    ap.add_argument("--modes", default="per-option,random-path")
    ap.add_argument("--strategy", default="uniform")
    ap.add_argument("--quality-steps", type=int, default=100)
    ap.add_argument("--quality-schedule", default="uniform", help="schedule of the quality, ranges and streams parts "
                    "(trailing: a flow model's sigmas from 1)")
    ap.add_argument("--quality-n", type=int, default=2000)
    ap.add_argument("--quality-options", default="", help="comma list of uniform options to score (e.g. W8A8; "
                    "default: W8A8, W6A6, W4A8 and the lowest)")
    ap.add_argument("--fp-from-baseline", default="", help="take the FP quality row from this baseline rows.jsonl "
                    "(e.g. results/baseline/rows.jsonl) instead of sampling it")
    ap.add_argument("--time-groups", type=int, default=1, help="supernet.time_groups of the quality and fidelity "
                    "parts' supernets (quality rows named e.g. 'W8A8, time_groups 4'; fidelity rows are not: give "
                    "them their own --out; with > 1 the cost part times sampling against one set of ranges)")
    ap.add_argument("--tg-list", default="1,4,2", help="timegroups part: the time_groups values to compare")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--calib-per-step", type=int, default=32)
    ap.add_argument("--sampler-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/supernet")
    ap.add_argument("--parts", default="quality,cost,fidelity,strategy",
                    help="comma list, run in this order: quality, cost, fidelity, strategy, timegroups, ranges")
    ap.add_argument("--report-only", action="store_true", help="only rewrite README.md from rows.jsonl")
    args = ap.parse_args()
    cpu_setup(args.threads)
    out = Path(args.out)
    log = RowLog(out / "rows.jsonl", ("kind", "mode", "alloc_id", "name", "n", "seed"))
    if args.report_only:
        write_report(out, log, args)
        return
    base = load_model(model_config(args))
    sched = make_scheduler(base.scheduler_config)
    ext = make_extractor("domain")
    ref = embedded_reference(ext)
    ts = make_timesteps(args.schedule, args.steps)
    cfg = SupernetConfig(time_groups=args.time_groups, guidance_ranges=args.guidance_ranges)

    def fresh_unet():
        return load_model(model_config(args)).unet

    def score(unet, n, timesteps, teacher=None):
        imgs = sample_images(unet, sched, timesteps, n, seed=args.seed, progress=False, guidance_scale=args.guidance)
        row = quality(unet, imgs, ext, ref)
        if teacher is not None:
            row["paired_mse"] = float((imgs - teacher[:n]).pow(2).mean())
        return row, imgs

    t0 = time.perf_counter()
    calib_kw = dict(n_steps=args.calib_steps, per_step=args.calib_per_step, sampler_steps=args.sampler_steps,
                    seed=10_000)
    args.calib_kw = calib_kw
    calib = make_calib_data(base.unet, sched, args.strategy, **calib_kw)  # guided as the model loaded with --guidance says
    batches = list(calib.batches(64))
    calib_capture_s = time.perf_counter() - t0
    parts = args.parts.split(",")
    teacher = None
    fp_key = dict(kind="fp", name=f"{args.schedule}{args.steps}", n=args.fid_n, seed=args.seed)
    if "fidelity" in parts or not log.has(**fp_key):
        teacher_row, teacher = score(base.unet, args.fid_n, ts)
        if not log.has(**fp_key):
            log.append({**fp_key, "calib_capture_s": round(calib_capture_s, 1), **teacher_row})
    if {"quality", "cost"} & set(parts):
        quality_and_cost(args, log, fresh_unet, sched, ext, ref, batches, parts)
    if "fidelity" in parts:
        fidelity(args, log, fresh_unet, cfg, batches, score, teacher)
    if "strategy" in parts:
        strategies(args, log, fresh_unet, sched, ext, ref)
    if "timegroups" in parts:
        time_groups_few_steps(args, log, fresh_unet, sched, ext, ref, batches)
    if "ranges" in parts:
        guidance_ranges(args, log, fresh_unet, sched, ext, ref, batches)
    if "streams" in parts:
        stream_ranges(args, log, fresh_unet, sched, ext, ref, batches)
    write_report(out, log, args)


def guidance_ranges(args, log: RowLog, fresh_unet, sched, ext, ref, batches) -> None:
    """Shared vs separate guidance-pass activation ranges: the same calibration data (guided, both passes), the same
    time groups, W8A8 and W6A6 at ``--quality-steps`` uniform DDIM, ``--quality-n`` images, the same noise."""
    if args.guidance == 1.0:
        raise SystemExit("part ranges: needs --guidance != 1 (the null pass exists only with guidance)")
    _range_arms(args, log, fresh_unet, sched, ext, ref, batches, "ranges", ("shared", "separate"),
                lambda r: SupernetConfig(time_groups=args.time_groups, guidance_ranges=r), "ranges", {})


def stream_ranges(args, log: RowLog, fresh_unet, sched, ext, ref, batches) -> None:
    """A joint-attention transformer's activation ranges per stream (``supernet.stream_ranges = "separate"``) vs one
    range per image / text projection pair (``"shared"``): the same calibration data and time groups, W8A8 and
    W6A6 at ``--quality-steps`` uniform steps, ``--quality-n`` images, the same noise."""
    _range_arms(args, log, fresh_unet, sched, ext, ref, batches, "streams", ("separate", "shared"),
                lambda r: SupernetConfig(time_groups=args.time_groups, stream_ranges=r,
                                         guidance_ranges=args.guidance_ranges),
                "stream ranges", {"schedule": args.quality_schedule})


def _range_arms(args, log: RowLog, fresh_unet, sched, ext, ref, batches, kind: str, modes, config, label: str,
                extra: dict) -> None:
    """One supernet per activation-range mode (``config(mode)``), calibrated on the same data, W8A8 and W6A6 sampled
    on the same noise at ``--quality-steps`` of ``--quality-schedule``; rows of ``kind`` (with ``extra`` fields)."""
    ts_q = make_timesteps(args.quality_schedule, args.quality_steps)
    for ranges in modes:
        todo = [(w, a) for w, a in ((8, 8), (6, 6))
                if not log.has(kind=kind, mode=ranges, name=f"W{w}A{a}", n=args.quality_n, seed=args.seed)]
        if not todo:
            continue
        net = QuantSupernet(fresh_unet(), config(ranges))
        net.calibrate(batches, mode="per-option")
        for w, a in todo:
            net.set_uniform(w, a)
            imgs = sample_images(net.unet, sched, ts_q, args.quality_n, seed=args.seed, guidance_scale=args.guidance,
                                 desc=f"W{w}A{a} {ranges} {label}")
            log.append({"kind": kind, "mode": ranges, "name": f"W{w}A{a}", "n": args.quality_n, "seed": args.seed,
                        "steps": args.quality_steps, **extra, "time_groups": args.time_groups,
                        "guidance_scale": args.guidance, **quality(net, imgs, ext, ref)})


def time_groups_few_steps(args, log: RowLog, fresh_unet, sched, ext, ref, batches) -> None:
    """supernet.time_groups at the search's step counts: uniform W6A6 / W4A6, quad DDIM 10 and 20 steps, FID at
    ``--fid-n`` (the strategy part's protocol), for G in ``--tg-list``."""
    for g in (int(v) for v in args.tg_list.split(",")):
        todo = [(steps, w, a) for steps in (10, 20) for w, a in ((6, 6), (4, 6))
                if not log.has(kind="timegroups", mode=f"G{g}", name=f"W{w}A{a} quad{steps}", n=args.fid_n,
                               seed=args.seed)]
        if not todo:
            continue
        net = QuantSupernet(fresh_unet(), SupernetConfig(time_groups=g, guidance_ranges=args.guidance_ranges))
        net.calibrate(batches, mode="per-option", progress=False)
        for steps, w, a in todo:
            net.set_uniform(w, a)
            imgs = sample_images(net.unet, sched, make_timesteps("quad", steps), args.fid_n, seed=args.seed,
                                 progress=False, guidance_scale=args.guidance)
            log.append({"kind": "timegroups", "mode": f"G{g}", "name": f"W{w}A{a} quad{steps}", "n": args.fid_n,
                        "seed": args.seed, "steps": steps, **score_features(ext(imgs), ref)})


def fidelity(args, log: RowLog, fresh_unet, cfg, batches, score, teacher) -> None:
    """Shared supernet (each mode) vs per-allocation calibration on ``--n-alloc`` random allocations."""
    ts = make_timesteps(args.schedule, args.steps)
    probe = QuantSupernet(fresh_unet(), cfg)
    allocs = random_allocations(probe, args.n_alloc, args.seed)
    for i, alloc in enumerate(allocs):
        if log.has(kind="standalone", alloc_id=i, n=args.fid_n, seed=args.seed):
            continue
        net = standalone(fresh_unet, alloc, probe, batches, "per-option")
        row, _ = score(net.unet, args.fid_n, ts, teacher)
        log.append({"kind": "standalone", "alloc_id": i, "n": args.fid_n, "seed": args.seed,
                    "bitops": probe.bitops(alloc), "bits": alloc, **row})
    for mode in args.modes.split(","):
        if all(log.has(kind="shared", mode=mode, alloc_id=i, n=args.fid_n, seed=args.seed) for i in range(len(allocs))):
            continue
        net = QuantSupernet(fresh_unet(), cfg)
        t0 = time.perf_counter()
        net.calibrate(batches, mode=mode)
        calib_s = time.perf_counter() - t0
        for i, alloc in enumerate(allocs):
            if log.has(kind="shared", mode=mode, alloc_id=i, n=args.fid_n, seed=args.seed):
                continue
            net.set_bits(alloc)
            row, _ = score(net.unet, args.fid_n, ts, teacher)
            log.append({"kind": "shared", "mode": mode, "alloc_id": i, "n": args.fid_n, "seed": args.seed,
                        "bitops": net.bitops(alloc), "calib_s": round(calib_s, 1), **row})


def quality_and_cost(args, log: RowLog, fresh_unet, sched, ext, ref, batches, parts) -> None:
    """Uniform options at ``--quality-steps`` uniform DDIM vs FP; timing and memory."""
    ts_q = make_timesteps(args.quality_schedule, args.quality_steps)
    fp_row = (baseline_fp_row(args.fp_from_baseline, args.quality_steps, args.quality_n, args.seed,
                              args.guidance)
              if args.fp_from_baseline else None)
    if fp_row is not None and not log.has(kind="quality", name="fp", n=args.quality_n, seed=args.seed):
        log.append({"kind": "quality", "name": "fp", "n": args.quality_n, "seed": args.seed,
                    "steps": args.quality_steps, "fid": fp_row["fid"], "kid": fp_row.get("kid"),
                    **({"class_accuracy": fp_row["class_accuracy"]} if "class_accuracy" in fp_row else {}),
                    "source": f"{args.fp_from_baseline} ({fp_row['command']}, {fp_row['finished']})"})
    if not log.has(kind="quality", name="fp", n=args.quality_n, seed=args.seed):
        fp = fresh_unet()
        imgs = sample_images(fp, sched, ts_q, args.quality_n, seed=args.seed, desc="FP quality",
                             guidance_scale=args.guidance)
        log.append({"kind": "quality", "name": "fp", "n": args.quality_n, "seed": args.seed,
                    "steps": args.quality_steps, **quality(fp, imgs, ext, ref)})
    tg = args.time_groups
    net = QuantSupernet(fresh_unet(), SupernetConfig(time_groups=tg, guidance_ranges=args.guidance_ranges))
    t0 = time.perf_counter()
    net.calibrate(batches, mode="per-option")
    calib_s = time.perf_counter() - t0
    lowest = (min(net.config.w_bits), min(net.config.a_bits))
    for w, a in [(8, 8), (6, 6), (4, 8), lowest]:
        name = f"W{w}A{a}"
        if args.quality_options and name not in args.quality_options.split(","):
            continue
        name += (f", time_groups {tg}" if tg > 1 else "") + (
            f", calibration {args.calib_steps} x {args.calib_per_step}" if (args.calib_steps, args.calib_per_step)
            != (20, 32) else "")
        if "quality" not in parts or log.has(kind="quality", name=name, n=args.quality_n, seed=args.seed):
            continue
        net.set_uniform(w, a)
        imgs = sample_images(net.unet, sched, ts_q, args.quality_n, seed=args.seed, desc=f"{name} quality",
                             guidance_scale=args.guidance)
        log.append({"kind": "quality", "name": name, "n": args.quality_n, "seed": args.seed,
                    "steps": args.quality_steps, "calib_s": round(calib_s, 1), **quality(net, imgs, ext, ref)})
    ts10 = make_timesteps("quad", 10)

    def timed(unet):
        sample_images(unet, sched, ts10, 32, batch_size=32, progress=False, guidance_scale=args.guidance)
        t0 = time.perf_counter()
        sample_images(unet, sched, ts10, 256, batch_size=256, progress=False, guidance_scale=args.guidance)
        return time.perf_counter() - t0

    if "cost" in parts and tg > 1:  # what the time groups cost: sampling against one set of ranges
        name = f"timing time_groups {tg} vs 1"
        if not log.has(kind="cost", name=name, n=256, seed=args.seed):
            one = QuantSupernet(fresh_unet(), SupernetConfig(time_groups=1, guidance_ranges=args.guidance_ranges))
            one.calibrate(batches, mode="per-option", progress=False)
            net.set_uniform(6, 6)
            one.set_uniform(6, 6)
            one_runs, tg_runs = [], []
            for _ in range(3):  # alternated, medians
                one_runs.append(timed(one.unet))
                tg_runs.append(timed(net.unet))
            log.append({"kind": "cost", "name": name, "n": 256, "seed": args.seed,
                        "ratio": round(float(np.median(tg_runs) / np.median(one_runs)), 3),
                        "one_set_runs_s": [round(v, 3) for v in one_runs],
                        "time_groups_runs_s": [round(v, 3) for v in tg_runs]})
    if "cost" in parts and not log.has(kind="cost", name="timing", n=256, seed=args.seed):
        fp_unet = fresh_unet()
        net.set_uniform(6, 6)
        fp_runs, fq_runs = [], []
        for _ in range(3):  # alternated, medians: one pair of runs on a shared 2-core machine is noisy
            fp_runs.append(timed(fp_unet))
            fq_runs.append(timed(net.unet))
        fp_s, fq_s = float(np.median(fp_runs)), float(np.median(fq_runs))
        x = torch.randn(256, *sample_shape(fp_unet))
        t = torch.full((256,), 500)
        a = adapter_for(fp_unet)
        cond = a.example(fp_unet, 256, "cpu")
        with torch.no_grad():
            a.eps(fp_unet, x, t, cond)
            t0 = time.perf_counter()
            a.eps(fp_unet, x, t, cond)
            fwd_s = time.perf_counter() - t0
        alloc = [(4, 6)] * net.num_genes
        t0 = time.perf_counter()
        for _ in range(100):
            net.set_bits(alloc)
        set_s = (time.perf_counter() - t0) / 100
        q_bytes = sum(v.numel() * v.element_size() for v in net.quantizer_state().values())
        fp_bytes = sum(p.numel() * p.element_size() for p in fp_unet.parameters())
        log.append({"kind": "cost", "name": "timing", "n": 256, "seed": args.seed, "time_groups": tg,
                    "guidance_scale": args.guidance, "fp_sample_s": round(fp_s, 3),
                    "fakequant_sample_s": round(fq_s, 3), "ratio": round(fq_s / fp_s, 3),
                    "fp_runs_s": [round(v, 3) for v in fp_runs], "fakequant_runs_s": [round(v, 3) for v in fq_runs],
                    "unet_forward_s": round(fwd_s, 4), "set_bits_s": set_s, "set_bits_frac": set_s / fwd_s,
                    "quantizer_state_bytes": q_bytes, "fp_param_bytes": fp_bytes, "calib_all_options_s": round(calib_s, 1)})


def strategies(args, log: RowLog, fresh_unet, sched, ext, ref) -> None:
    """Calibration-data strategies (uniform, NDTC, EDA-style) at W6A6 and the lowest option."""
    base = load_model(model_config(args))
    ts10 = make_timesteps(args.schedule, args.steps)
    cfg = SupernetConfig(time_groups=1, guidance_ranges=args.guidance_ranges)
    lowest = (min(cfg.w_bits), min(cfg.a_bits))
    for strategy in ("uniform", "ndtc", "eda"):
        if all(log.has(kind="strategy", mode=strategy, name=f"W{w}A{a}", n=args.fid_n, seed=args.seed)
               for w, a in [(6, 6), lowest]):
            continue
        data = make_calib_data(base.unet, sched, strategy, **args.calib_kw)
        snet = QuantSupernet(fresh_unet(), SupernetConfig(time_groups=1, guidance_ranges=args.guidance_ranges))
        snet.calibrate(list(data.batches(64)), mode="per-option")
        for w, a in [(6, 6), lowest]:
            snet.set_uniform(w, a)
            imgs = sample_images(snet.unet, sched, ts10, args.fid_n, seed=args.seed, progress=False,
                                 guidance_scale=args.guidance)
            log.append({"kind": "strategy", "mode": strategy, "name": f"W{w}A{a}", "n": args.fid_n,
                        "seed": args.seed, **score_features(ext(imgs), ref)})


def write_report(out: Path, log: RowLog, args) -> None:
    from scipy.stats import kendalltau

    rows = list(log.rows.values())
    alone = {r["alloc_id"]: r for r in rows if r["kind"] == "standalone"}
    model = getattr(args, "model", "embedded")
    guidance = getattr(args, "guidance", 1.0)
    lines = ["# Supernet benchmark (issue 3)" + (f": model `{model}`" if model != "embedded" else "")
             + (f", guidance {guidance:g}" if guidance != 1.0 else ""), "",
             *findings(out)]
    if alone:
        fid_n = sorted({r["n"] for r in alone.values()})
        lines += ["## Fidelity", "", f"{len(alone)} allocations, FID at N = {', '.join(map(str, fid_n))} (domain "
                  "extractor), "
                  f"{args.schedule} DDIM {args.steps} steps, noise seed {args.seed}.", "",
                  "| mode | Kendall tau (FID) | Kendall tau (paired MSE) | calibration s |", "|---|---:|---:|---:|"]
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["kind"] == "shared"))  # the modes the rows have
    for mode in modes if alone else ():
        shared = {r["alloc_id"]: r for r in rows if r["kind"] == "shared" and r.get("mode") == mode}
        ids = sorted(set(shared) & set(alone))
        if len(ids) < 3:
            continue
        tf = kendalltau([shared[i]["fid"] for i in ids], [alone[i]["fid"] for i in ids])[0]
        tm = kendalltau([shared[i]["paired_mse"] for i in ids], [alone[i]["paired_mse"] for i in ids])[0]
        lines.append(f"| {mode} | {tf:.3f} | {tm:.3f} | {shared[ids[0]]['calib_s']} |")
    qkeys = sorted({(r["n"], r["seed"]) for r in rows if r["kind"] == "quality"})
    for n, seed in qkeys:
        quality = {r["name"]: r for r in rows if r["kind"] == "quality" and r["n"] == n and r["seed"] == seed}
        fp = quality.get("fp")
        steps = next(iter(quality.values()))["steps"]
        acc = any("class_accuracy" in r for r in quality.values())
        lines += ["", f"## Quality: uniform options, {args.quality_schedule} DDIM (a flow model: Euler) {steps} steps, "
                  f"N = {n}, noise seed {seed}", "",
                  "| config | FID | vs FP | KID x1e3 |" + (" class accuracy |" if acc else ""),
                  "|---|---:|---:|---:|" + ("---:|" if acc else "")]
        for name, r in quality.items():
            rel = f"{r['fid'] / fp['fid']:.3f}x" if fp else "-"
            kid = f"{1e3 * r['kid']:.2f}" if r.get("kid") is not None else "-"
            ca = (f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else " - |") if acc else ""
            lines.append(f"| {name} | {r['fid']:.3f} | {rel} | {kid} |{ca}")
        if fp and fp.get("source"):
            lines.append(f"\nFP row from {fp['source']}.")
    for n in sorted({n for n, _ in qkeys}):  # several noise seeds: each option's FID over the FP one, per seed
        seeds = [sd for m, sd in qkeys if m == n]
        per = {sd: {r["name"]: r["fid"] for r in rows if r["kind"] == "quality" and r["n"] == n and r["seed"] == sd}
               for sd in seeds}
        names = [nm for nm in per[seeds[0]] if nm != "fp" and all(nm in per[sd] and "fp" in per[sd] for sd in seeds)]
        if len(seeds) < 2 or not names:
            continue
        lines += ["", f"Over noise seeds {', '.join(map(str, seeds))} (N = {n} each): option / FP FID per seed, and "
                  "the ratio of the mean FIDs", "", "| config | " + " | ".join(f"seed {sd}" for sd in seeds)
                  + " | mean FID / mean FP FID |", "|---|" + "---:|" * (len(seeds) + 1)]
        for nm in names:
            ratios = [per[sd][nm] / per[sd]["fp"] for sd in seeds]
            mean = sum(per[sd][nm] for sd in seeds) / sum(per[sd]["fp"] for sd in seeds)
            lines.append(f"| {nm} | " + " | ".join(f"{x:.3f}x" for x in ratios) + f" | {mean:.3f}x |")
    ranges = [r for r in rows if r["kind"] == "ranges"]
    if ranges:
        r0 = ranges[0]
        lines += ["", f"## Guidance-pass activation ranges: shared vs separate (guidance {r0['guidance_scale']}, "
                  f"uniform DDIM {r0['steps']} steps, time_groups {r0['time_groups']}, N = {r0['n']}, seed "
                  f"{r0['seed']})", "", "| option | ranges | FID | class accuracy |", "|---|---|---:|---:|"]
        for r in sorted(ranges, key=lambda r: (r["name"], r["mode"])):
            acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
            lines.append(f"| {r['name']} | {r['mode']} | {r['fid']:.3f} | {acc} |")
    streams = [r for r in rows if r["kind"] == "streams"]
    if streams:
        r0 = streams[0]
        lines += ["", f"## Joint-attention activation ranges: per stream vs shared per projection pair (guidance "
                  f"{r0['guidance_scale']}, {r0['schedule']} {r0['steps']} steps, time_groups {r0['time_groups']}, "
                  f"N = {r0['n']})", "", "| option | stream ranges | noise seed | FID | class accuracy |",
                  "|---|---|---:|---:|---:|"]
        for r in sorted(streams, key=lambda r: (r["name"], r["mode"], r["seed"])):
            acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
            lines.append(f"| {r['name']} | {r['mode']} | {r['seed']} | {r['fid']:.3f} | {acc} |")
    strat = [r for r in rows if r["kind"] == "strategy"]
    if strat:
        lines += ["", f"## Calibration data strategies (per-option, {args.schedule} {args.steps} steps, N = {args.fid_n})",
                  "", "| strategy | config | FID |", "|---|---|---:|"]
        lines += [f"| {r['mode']} | {r['name']} | {r['fid']:.3f} |" for r in strat]
    tgs = [r for r in rows if r["kind"] == "timegroups"]
    if tgs:
        names = sorted({r["name"] for r in tgs}, key=lambda v: (v.split()[1], v))
        lines += ["", f"## time_groups at few steps (per-option, uniform calibration data, N = {tgs[0]['n']}, "
                  f"seed {tgs[0]['seed']}; FID)", "", "| time_groups | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for mode in sorted({r["mode"] for r in tgs}, key=lambda m: int(m[1:])):
            cells = [next((f"{r['fid']:.3f}" for r in tgs if r["mode"] == mode and r["name"] == nm), "-")
                     for nm in names]
            lines.append(f"| {mode[1:]} | " + " | ".join(cells) + " |")
    tg_cost = [r for r in rows if r["kind"] == "cost" and r["name"].startswith("timing time_groups")]
    cost = next((r for r in rows if r["kind"] == "cost" and r["name"] == "timing"), None)
    if cost:
        lines += ["", "## Cost", "",
                  f"- fake-quant (W6A6{', time_groups %d' % cost['time_groups'] if cost.get('time_groups', 1) > 1 else ''}"
                  f"{', guidance %g' % cost['guidance_scale'] if cost.get('guidance_scale', 1.0) != 1.0 else ''}) / FP "
                  "sampling time, quad 10 steps, 256 images in one batch (median of "
                  f"{len(cost.get('fp_runs_s', [0]))} alternated runs each): {cost['ratio']:.2f}",
                  f"- set_bits: {1e6 * cost['set_bits_s']:.0f} us = {100 * cost['set_bits_frac']:.2f} % of one UNet "
                  f"forward at batch 256 ({cost['unet_forward_s']:.3f} s)",
                  f"- quantizer state {cost['quantizer_state_bytes'] / 1e6:.2f} MB vs FP parameters "
                  f"{cost['fp_param_bytes'] / 1e6:.2f} MB",
                  f"- calibration of all options (per-option, nearest rounding): {cost['calib_all_options_s']} s"]
    for r in tg_cost:
        lines.append(f"- sampling with {r['name'].removeprefix('timing ')} (W6A6, quad 10 steps, 256 images in one "
                     f"batch, median of 3 alternated runs): {r['ratio']:.3f}x (`{r['command']}`)")
    any_row = next(iter(log.rows.values()), None)
    if any_row:
        cmds = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))  # first use order
        lines += ["", *(f"- command: `{c}`" for c in cmds), f"- machine: {any_row['machine']}"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
