"""Final evaluator (``tmpq validate``): re-calibrate each chosen Pareto point at exactly its allocation, with
calibration data captured along its own schedule, optionally reconstruct (BRECQ / AdaRound) and briefly re-train
(distillation from the FP teacher of the quantizer scales, and of the multi-basis binarizer's scales for 1- / 2-bit
weight options, BinaryDM-style), then score FID / KID at large N over several seeds.

Resumable per (point, seed): rows go to ``RUN/final/rows.jsonl`` as they finish; each point's calibrated quantizers
are kept as ``RUN/final/<key>.safetensors`` (a pinned supernet file, which ``tmpq export`` prefers over the search
supernet). ``RUN/final.parquet`` (one row per point: mean / std over seeds) and ``RUN/final.json`` (rank correlation
of the search proxy with the final FID) are rewritten atomically after every point.

Beside each point the FP model is scored on the point's own schedule and solver (same N, noise seeds, extractor and
reference; ``RUN/final/fp_rows.jsonl``, shared by points that sample the same schedule): ``fp_fid`` in its rows and
``fp_fid_mean`` in the summary, so that a point's FID splits into what its steps cost and what its quantization
(and reuse) adds, ``fid_mean / fp_fid_mean``, its compression loss.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tmpq.core import runlock
from tmpq.core.adapters import bind_like, conditioning_of, predict, rows
from tmpq.core.candidate import Candidate, Solver, algos_of, reuse_of
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write, atomic_write_bytes, read_parquet
from tmpq.core.model import ModelConfig, load_model
from tmpq.core.reuse import reusing
from tmpq.core.fileio import parse_row
from tmpq.core.rowlog import RowLog
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.evaluators.candidate import (
    check_reference,
    quality_reference,
    scoring_extractor,
)
from tmpq.evaluators.quality import digit_class_accuracy, score_features
from tmpq.jobs.run import load_run
from tmpq.jobs.runinfo import final_row
from tmpq.quant.distill import distill_scales, frozen_copy
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import CalibData, capture_along
from tmpq.supernet.store import read_supernet_file

FINAL_VERSION = 1


@dataclass(frozen=True)
class ValidateConfig:
    top_k: int = 0                  # 0: every Pareto point; else the K points with the best proxy
    n: int = 10_000                 # generated images per seed
    seeds: tuple[int, ...] = (1, 2)  # noise-bank seeds (the search proxy used seed 0)
    calib_per_step: int = 64        # calibration inputs captured at each step of the point's own schedule
    calib_seed: int = 20_000
    recon_iters: int = 0            # > 0: BRECQ block reconstruction with AdaRound weights
    distill_iters: int = 0          # > 0: distil quantizer (and binarizer) scales from the FP teacher
    distill_lr: float = 1e-4
    batch_size: int = 256
    keys: tuple[str, ...] = field(default_factory=tuple)  # explicit candidate keys (overrides top_k)
    fp_reference: bool = True       # also score the FP model on each point's own schedule (fp_fid)

    def validate(self) -> None:
        if self.top_k < 0:
            raise TmpqError(f"--top-k: must be >= 0, got {self.top_k}")
        if self.n < 2:
            raise TmpqError(f"--n: must be >= 2, got {self.n}")
        if not self.seeds:
            raise TmpqError("--seeds: give at least one seed")
        for seed in self.seeds:
            if not 0 <= seed < 2**32:
                raise TmpqError(f"--seeds: each seed must be in [0, 2**32), got {seed}")
        if len(set(self.seeds)) != len(self.seeds):
            raise TmpqError(f"--seeds: repeated seed in {list(self.seeds)}")
        for key, high in (("n", 1_000_000), ("calib_per_step", 1 << 20), ("batch_size", 1 << 16),
                          ("recon_iters", 10_000_000), ("distill_iters", 10_000_000), ("top_k", 100_000)):
            if getattr(self, key) > high:  # a typo's extra digits: refused, not run for days
                raise TmpqError(f"--{key.replace('_', '-')}: must be <= {high} (the bound on this flag), got "
                                f"{getattr(self, key)}")
        for key in ("recon_iters", "distill_iters"):
            if getattr(self, key) < 0:
                raise TmpqError(f"--{key.replace('_', '-')}: must be >= 0, got {getattr(self, key)}")
        for key in ("calib_per_step", "batch_size"):
            if getattr(self, key) < 1:
                raise TmpqError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")


def choose_points(front, cfg: ValidateConfig):
    if cfg.keys:
        missing = [k for k in cfg.keys if k not in set(front["key"])]
        if missing:
            raise TmpqError(f"--candidate {missing[0]}: not a Pareto point of this run")
        return front[front["key"].isin(cfg.keys)]
    if cfg.top_k:
        return front.sort_values("fid_proxy").head(cfg.top_k)
    return front


def _capture_along(unet, scheduler, timesteps, n: int, seed: int, batch: int = 64):
    """(x_t, t[, cond]) batches of the FP sampler along exactly ``timesteps`` (n trajectories; every step kept), in
    the order of ``batch``-trajectory chunks, each step by step; guided as the model's conditioning says."""
    xs, ts, cond = capture_along(unet, scheduler, timesteps, n, seed, batch)  # [steps, n, ...]
    x = torch.cat([xs[:, s:s + batch].flatten(0, 1) for s in range(0, n, batch)])
    t = torch.cat([ts.repeat_interleave(min(batch, n - s)) for s in range(0, n, batch)])
    image = torch.cat([torch.arange(s, min(s + batch, n)).repeat(len(ts)) for s in range(0, n, batch)])
    data = CalibData(x, t, "along", rows(cond, image))
    if conditioning_of(unet).guidance_scale != 1.0:  # guided sampling runs both passes: calibrate on both
        data = data.with_null_pass(unet)
    return list(data.batches(batch))


def _model(run_cfg: dict):
    return load_model(ModelConfig(**run_cfg["model"]))


def recalibrate_point(run_path: Path, cand: Candidate, cfg: ValidateConfig, progress: bool = True):
    """A pinned supernet for exactly the candidate's allocation (and its Winograd layers), calibrated on data along its
    schedule with its solver (without its reuse); returns (net, scheduler, info)."""
    if cand.per_group:
        raise TmpqError("validate: per-time-group bits are not validated yet (one allocation per point)")

    m = _model(json.loads((run_path / "config.resolved.json").read_text()))
    teacher = frozen_copy(m.unet)
    bind_like(teacher, m.unet)  # a copy is unbound: the teacher samples as the model does
    sched = make_scheduler(m.scheduler_config, *cand.solver)
    meta, _ = read_supernet_file(run_path / "supernet.safetensors", tensors=False)
    base = SupernetConfig.from_json(meta["config"])
    over = {}
    if cfg.recon_iters > 0 and base.w_rounding != "adaround":
        over["w_rounding"] = "adaround"
    if (cfg.recon_iters > 0 or cfg.distill_iters > 0) and base.time_groups > 1:
        # reconstruction and scale distillation train one range per quantizer on mixed-timestep batches: the point
        # is re-calibrated with one set of ranges for all timesteps
        over["time_groups"] = 1
    if over:
        base = dataclasses.replace(base, **over)  # validated again by __post_init__
    probe = frozen_copy(m.unet)
    bind_like(probe, m.unet)  # profiled with the model's own conditioning
    probe = QuantSupernet(probe, base)
    # Winograd layers pinned to [w, a, m]: their V ranges re-observed along the point's schedule as well
    net = QuantSupernet(m.unet, probe.pinned_config(list(cand.bits), cand.algos))
    del probe
    t0 = time.perf_counter()
    data = _capture_along(teacher, sched, list(cand.timesteps), cfg.calib_per_step, cfg.calib_seed)
    net.calibrate(data, mode="per-option", progress=progress)
    info = {"calib_inputs": sum(len(b[1]) for b in data), "calib_s": round(time.perf_counter() - t0, 1),
            "time_groups": net.config.time_groups}
    net.set_bits([])
    if cfg.recon_iters > 0:
        t0 = time.perf_counter()
        # reconstruct() walks the weight options; with every layer pinned there is exactly one
        net.reconstruct(data, iters=cfg.recon_iters, progress=progress)
        net.set_bits([])
        info["recon_s"] = round(time.perf_counter() - t0, 1)
    if cfg.distill_iters > 0:
        t0 = time.perf_counter()
        rep = distill_scales(net.unet, teacher, data, iters=cfg.distill_iters, lr=cfg.distill_lr, progress=progress,
                           output=predict)
        if net.config.bias_correction:  # tuned scales moved the options' output means
            net.correct_bias(data)
            net.set_bits([])
        info.update({"distill_loss_before": rep["loss_before"], "distill_loss_after": rep["loss_after"],
                     "distill_s": round(time.perf_counter() - t0, 1)})
    return net, sched, info


def validate_run(run_path: str | Path, cfg: ValidateConfig, progress: bool = True):
    """Validate the chosen Pareto points of a run; returns the per-point DataFrame (also ``RUN/final.parquet``)."""

    cfg.validate()
    run = load_run(run_path)
    front = run.pareto()
    if front.empty:
        raise TmpqError(f"{run.path}: no successful evaluations to validate")
    points = choose_points(front, cfg)
    # scored like the run's proxy: the same extractor and reference (proxy.reference, else the embedded digits)
    run_cfg = run.config
    proxy = run_cfg.get("proxy", {})
    reference = proxy.get("reference", "")
    model = _model(run_cfg)
    channels = model.image_channels
    del model
    check_reference(reference, channels, hint="; validation scores against the run's proxy.reference")
    with runlock.acquire(run.path, "validate"):  # one writer: refused (one line) while a search or job holds it
        out = run.path / "final"
        log = RowLog(out / "rows.jsonl", ("key", "seed", "n", "settings"), parse=final_row)  # read before any write
        out.mkdir(exist_ok=True)
        settings = json.dumps({k: v for k, v in asdict(cfg).items()
                               if k not in ("top_k", "keys", "seeds", "batch_size", "fp_reference")}, sort_keys=True)
        fp_log = RowLog(out / "fp_rows.jsonl", ("timesteps", "solver", "order", "seed", "n"), parse=fp_row)
        ext = None
        ref = None
        for i, (_, p) in enumerate(points.iterrows()):
            key = p["key"]
            todo = [s for s in cfg.seeds if not log.has(key=key, seed=s, n=cfg.n, settings=settings)]
            cand = Candidate.from_dict(p)  # a point of a run with the reuse gene samples with its reuse
            fp_todo = [s for s in cfg.seeds if cfg.fp_reference and not fp_log.has(**_fp_key(cand, s, cfg.n))]
            if not todo and not fp_todo:
                continue
            if ext is None:
                ext = scoring_extractor(channels, proxy.get("extractor", "auto"), proxy.get("inception_weights", ""))
                ref = quality_reference(reference, ext, channels)
            if progress:
                print(f"validate point {i + 1}/{len(points)} {key}: {len(p['timesteps'])} steps, proxy "
                      f"{p['fid_proxy']:.4g}, {p['bitops'] / 1e9:.3g} GBitOPs", flush=True)
            if fp_todo:  # the FP model on this point's schedule and solver, without reuse
                _score_fp(run_cfg, cand, fp_todo, cfg, ext, ref, fp_log, progress)
            if not todo:
                _write_summary(run.path, log, settings, cfg, fp_log)
                continue
            branch = int(run_cfg.get("search", {}).get("reuse_branch", 0))
            net, sched, info = recalibrate_point(run.path, cand, cfg, progress)
            net.save(out / f"{key}.safetensors")
            for seed in todo:
                t0 = time.perf_counter()
                with reusing(net.unet, cand.reuse, branch, cand.calls) as dc:
                    imgs = sample_images(net.unet, sched, list(cand.timesteps), cfg.n, seed=seed,
                                         batch_size=cfg.batch_size, progress=progress, desc=f"{key} seed {seed}",
                                         on_step=dc.on_step)
                s = score_features(ext(imgs), ref)
                acc = digit_class_accuracy(net.unet, imgs)  # a digit class model: conditional quality
                log.append({"key": key, "seed": seed, "n": cfg.n, "settings": settings, "fid": s["fid"],
                            **({"class_accuracy": acc} if acc is not None else {}),
                            "kid": s.get("kid"), "kid_std": s.get("kid_std"), "timesteps": list(cand.timesteps),
                            "bits": cand.fields()["bits"], "bitops": float(p["bitops"]),
                            "fid_proxy": float(p["fid_proxy"]), "sample_s": round(time.perf_counter() - t0, 1),
                            **cand.fields(), **info})  # + solver / reuse / algos where not the defaults
            _write_summary(run.path, log, settings, cfg, fp_log)
        return _write_summary(run.path, log, settings, cfg, fp_log)


def _fp_key(cand: Candidate, seed: int, n: int) -> dict:
    return {"timesteps": list(cand.timesteps), "solver": cand.solver.name, "order": cand.solver.order, "seed": seed,
            "n": n}


def fp_row(line: str) -> dict:
    """One row of ``final/fp_rows.jsonl``; a row without the fields the summary reads raises (one line via RowLog)."""
    row = parse_row(line)
    for name, kind in (("timesteps", list), ("solver", str), ("order", int), ("seed", int), ("n", int),
                       ("fid", (int, float))):
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            raise TypeError(f"{name}: expected {getattr(kind, '__name__', 'a number')}, got {type(row[name]).__name__}")
    return row


def _score_fp(run_cfg: dict, cand: Candidate, seeds, cfg: ValidateConfig, ext, ref, fp_log, progress: bool):
    """FP FID (and class accuracy) of the run's model on ``cand``'s timesteps and solver, ``cfg.n`` images of each
    noise seed in ``seeds`` (the model loaded once for them): the reference that shows what the point's quantization
    adds to what its schedule costs."""
    m = _model(run_cfg)
    sched = make_scheduler(m.scheduler_config, *cand.solver)
    for seed in seeds:
        t0 = time.perf_counter()
        imgs = sample_images(m.unet, sched, list(cand.timesteps), cfg.n, seed=seed, batch_size=cfg.batch_size,
                             progress=progress, desc=f"FP on its schedule, seed {seed}")
        s = score_features(ext(imgs), ref)
        acc = digit_class_accuracy(m.unet, imgs)
        fp_log.append({**_fp_key(cand, seed, cfg.n), "fid": s["fid"], "kid": s.get("kid"),
                       **({"class_accuracy": acc} if acc is not None else {}),
                       "sample_s": round(time.perf_counter() - t0, 1)})


def _write_summary(run_path: Path, log, settings: str, cfg: ValidateConfig, fp_log=None):
    import pandas as pd
    from scipy.stats import kendalltau, spearmanr


    rows = [r for r in log.rows.values() if r["settings"] == settings and r["n"] == cfg.n]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    extra = {"class_accuracy_mean": ("class_accuracy", "mean")} if "class_accuracy" in df else {}
    agg = df.groupby("key").agg(fid_mean=("fid", "mean"), fid_std=("fid", "std"), kid_mean=("kid", "mean"),
                                seeds=("seed", "count"), fid_proxy=("fid_proxy", "first"),
                                bitops=("bitops", "first"), **extra).reset_index()
    first = df.drop_duplicates("key").set_index("key")
    agg["timesteps"] = [first.loc[k, "timesteps"] for k in agg["key"]]
    agg["bits"] = [first.loc[k, "bits"] for k in agg["key"]]
    if "solver" in first:  # points of a run with a solver gene
        solvers = [Solver.of(first.loc[k]) for k in agg["key"]]
        agg["solver"], agg["order"] = [s.name for s in solvers], [s.order for s in solvers]
    if "reuse" in first:  # points of a run with the reuse gene
        agg["reuse"] = [list(reuse_of(first.loc[k])) for k in agg["key"]]
    if "algos" in first:  # points of a run with the algorithm gene
        agg["algos"] = [list(algos_of(first.loc[k])) for k in agg["key"]]
    agg["n"] = cfg.n
    if fp_log is not None and fp_log.rows:  # the FP model on each point's own schedule, over the same seeds
        fp = []
        for k in agg["key"]:
            c = Candidate.from_dict(first.loc[k])
            got = [fp_log.rows.get(fp_log.key(_fp_key(c, sd, cfg.n))) for sd in df[df["key"] == k]["seed"]]
            fp.append(sum(r["fid"] for r in got) / len(got) if got and all(got) else float("nan"))
        agg["fp_fid_mean"] = fp
    agg = agg.sort_values("bitops").reset_index(drop=True)
    atomic_write(run_path / "final.parquet", lambda f: agg.to_parquet(f, index=False))
    summary = {"version": FINAL_VERSION, "points": len(agg), "n": cfg.n, "seeds": list(cfg.seeds),
               "settings": json.loads(settings)}
    if len(agg) >= 3:
        summary["kendall_tau_proxy_vs_fid"] = float(kendalltau(agg["fid_proxy"], agg["fid_mean"])[0])
        summary["spearman_proxy_vs_fid"] = float(spearmanr(agg["fid_proxy"], agg["fid_mean"])[0])
    atomic_write_bytes(run_path / "final.json", (json.dumps(summary, indent=2) + "\n").encode())
    return agg


def best_validated(run_path: str | Path, bitops_budget: float | None = None) -> dict | None:
    """The validated point with the lowest mean FID (under an optional BitOPs budget), or None."""
    p = Path(run_path) / "final.parquet"
    if not p.is_file():
        return None

    df = read_parquet(p, "validation summary", ("bitops", "fid_mean"))
    if bitops_budget is not None:
        df = df[df["bitops"] <= bitops_budget]
    if df.empty:
        return None
    return df.sort_values("fid_mean").iloc[0].to_dict()

