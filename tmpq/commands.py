"""What each ``tmpq`` command does (the parser and the error handling live in :mod:`tmpq.cli`, which imports
this module only once a command has been parsed, so that ``tmpq --help`` and argument errors stay instant)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from tmpq.core.adapters import decoder_cost, set_conditioning
from tmpq.core.choices import BIT_PRESETS
from tmpq.core.cost import WINOGRAD_TILES
from tmpq.core.devices import cpu_allocator, resolve_device, tune_cpu_allocator
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import malformed, read_json
from tmpq.core.grid import save_grid
from tmpq.core.model import ModelConfig, load_model, resolve_model_dir
from tmpq.core.runlock import lock_inside
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import SCHEDULES, make_timesteps, validate_timesteps
from tmpq.core.solvers import parse_solver, sched_order
from tmpq.deploy.bundle import load_export
from tmpq.deploy.int8 import CHECK_TOL, describe_cpu_int8, measure_speed
from tmpq.deploy.torchao_int8 import describe_device, measure_speed_torchao
from tmpq.evaluators.classifier import ClassifierTrainConfig, train_classifier
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import (
    embedded_reference,
    evaluate_schedule,
    load_reference,
)
from tmpq.jobs.config import check_budget_spec, config_from_dict, config_with, parse_override, resolve_config
from tmpq.jobs.export import export_candidate
from tmpq.jobs.main import MainJobConfig, main_job
from tmpq.jobs.pick import pick_fastest_within, pick_key
from tmpq.jobs.report import write_report
from tmpq.jobs.run import load_run
from tmpq.jobs.runinfo import print_status, winograd_summary
from tmpq.jobs.search import dp_schedules, run_search
from tmpq.jobs.train import DenoiserTrainConfig, train_denoiser
from tmpq.jobs.validate import ValidateConfig, validate_run
from tmpq.search.pick import check_reference, parse_pick
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import CalibrationConfig, calibrate_to_file


def cmd_train(args: argparse.Namespace) -> None:
    cfg = DenoiserTrainConfig(**_given(args, {k: k for k in ("arch", "steps", "batch_size", "lr", "ema_decay",
                                                              "label_dropout", "seed", "resolution", "threads",
                                                              "objective", "shift")}))
    name = f"{cfg.arch}-flow" if cfg.objective == "flow" else ("ddpm" if cfg.arch == "unet" else cfg.arch)
    out = Path(args.out or f"results/train/mnist16-{name}")
    manifest = train_denoiser(cfg, out, command=_command_line())
    print(f"saved the trained EMA model to {out} (final loss {manifest['metrics']['final_loss_mean_last100']:.4f})")


def _parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise TmpqError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise TmpqError(f"{what}: empty list")
    return vals


def _schedules(args: argparse.Namespace, m) -> list[tuple[str, tuple[int, ...]]]:
    """(label, timesteps) pairs from --timesteps, or from every --schedule x --steps combination; ``dp``: the optimal
    steps of the model ``m`` by dynamic programming over its FP teacher trajectory (tmpq.jobs.search.dp_schedules)."""

    if getattr(args, "timesteps", None):
        ts = validate_timesteps(_parse_int_list(args.timesteps, "timesteps"), m.num_train_timesteps)
        return [("custom", ts)]
    names = [s for s in args.schedule.replace(" ", "").split(",") if s]
    steps = _parse_int_list(str(args.steps), "steps")
    dp = dp_schedules(m.unet, m.scheduler_config, steps, guidance_scale=m.guidance_scale) if "dp" in names else {}
    return [(name, dp[n] if name == "dp" else make_timesteps(name, n, m.num_train_timesteps))
            for name in names for n in steps]


def _set_threads(n: int) -> None:
    if not 1 <= n <= 1024:  # torch crashes on absurd counts
        raise TmpqError(f"threads: must be in [1, 1024], got {n}")
    torch.set_num_threads(n)
    tune_cpu_allocator()


def cmd_sample(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise TmpqError(f"--out must be a .png or .jpg file, got {out}")
    if args.export:
        if args.model:
            raise TmpqError("sample: give an export directory or --model, not both")
        if args.dtype not in (None, "fp32"):
            raise TmpqError(f"sample: --dtype {args.dtype} applies to --model sampling, not to an export")

        if args.timesteps:
            raise TmpqError("sample: an export brings its own searched timesteps; --timesteps does not apply")
        if args.solver or args.order:
            raise TmpqError("sample: an export brings its own sampler; --solver / --order do not apply")
        unet, sched, ts, manifest = load_export(args.export, device=resolve_device(args.device, "--device"),
                                                prompts=args.prompt, backend=args.backend)
        label, guidance = "exported", float(manifest["sampler"].get("guidance_scale", 1.0))
        b = unet.tmpq_backend
        if b["requested"] != "fake":
            why = f" ({b['why']})" if b["why"] else ""
            print(f"backend: {b['requested']} installed {b['installed']} on {b['device']}{why}: "
                  f"{b['int8_layers']} layers on real int8 kernels, {b['fallbacks']} left fake-quant", flush=True)
    else:
        if args.backend != "fake":
            raise TmpqError(f"sample: --backend {args.backend} applies to an export (the FP model has no quantized "
                            f"layers)")
        if args.dtype not in (None, "fp32") and not args.timesteps and "dp" in args.schedule.replace(" ", "").split(","):
            raise TmpqError(f"--dtype {args.dtype}: --schedule dp profiles the model in fp32 only (use uniform or quad)")
        m = load_model(dataclasses.replace(_model_config(args), **({"dtype": args.dtype} if args.dtype else {})),
                       device=resolve_device(args.device, "--device"))
        (label, ts), *rest = _schedules(args, m)
        if rest:
            raise TmpqError("sample: give one schedule and one step count")
        unet, sched, guidance = m.unet, _solver(args, m.scheduler_config), m.guidance_scale
    if args.null_label is not None:
        set_conditioning(unet, null_label=args.null_label)
    labels = None
    if args.label is not None:
        labels = _parse_int_list(args.label, "--label")
        labels = labels[0] if len(labels) == 1 else labels
    imgs = sample_images(unet, sched, ts, args.n, seed=args.seed, batch_size=args.batch_size, eta=args.eta,
                         desc=f"sample {label} {len(ts)} steps", labels=labels,
                         guidance_scale=guidance if args.guidance is None else args.guidance)
    save_grid(imgs, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out} ({args.n} images, {label} schedule, timesteps {list(ts)})")


def _build_reference(args: argparse.Namespace, extractor, sample_shape: tuple[int, int, int]):
    """--ref if given; otherwise the embedded real digits, which only fit a 1-channel model."""

    if args.ref:
        return load_reference(args.ref, extractor)
    if sample_shape[0] != 1:
        raise TmpqError(f"--ref: the model makes {sample_shape[0]}-channel images; the embedded MNIST reference does "
                        "not fit, give reference statistics (.npz)")
    return embedded_reference(extractor, args.ref_split, args.resolution)


def cmd_fid(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    if args.n < 2:
        raise TmpqError(f"--n: must be >= 2 for FID, got {args.n}")
    if args.dtype not in (None, "fp32") and not args.timesteps and "dp" in args.schedule.replace(" ", "").split(","):
        raise TmpqError(f"--dtype {args.dtype}: --schedule dp profiles the model in fp32 only (use uniform or quad)")
    m = load_model(dataclasses.replace(_model_config(args), **({"dtype": args.dtype} if args.dtype else {})),
                   device=resolve_device(args.device, "--device"))
    schedules = _schedules(args, m)
    extractor = make_extractor(args.extractor, args.inception_weights)
    ref = _build_reference(args, extractor, (m.image_channels,))
    scheduler = _solver(args, m.scheduler_config)
    rows = []
    for label, ts in schedules:
        row = evaluate_schedule(m.unet, scheduler, ts, args.n, extractor, ref, seed=args.seed,
                                batch_size=args.batch_size, eta=args.eta, desc=f"{label} {len(ts)} steps",
                                guidance_scale=m.guidance_scale)
        row = {"schedule": label, **({"solver": args.solver, "order": sched_order(scheduler)} if args.solver else {}),
               **row}
        rows.append(row)
        print(_format_row(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": _command_line(), "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")


def _format_row(row: dict) -> str:
    kid = f"  KID {row['kid']:.5f} +- {row['kid_std']:.5f}" if "kid" in row else ""
    acc = f"  class accuracy {row['class_accuracy']:.3f}" if "class_accuracy" in row else ""
    solver = f" {row['solver']}" + (f"-{row['order']}" if row.get("order") else "") if "solver" in row else ""
    return (f"{row['schedule']:>8}{solver} {row['steps']:>4} steps  N={row['n']}  FID({row['extractor']}) "
            f"{row['fid']:.3f}"
            f"{kid}{acc}  [{row['images_per_s']:.1f} img/s]")


def cmd_ref_stats(args: argparse.Namespace) -> None:
    extractor = make_extractor(args.extractor, args.inception_weights)
    ref = embedded_reference(extractor, args.ref_split, args.resolution)
    path = ref.stats.save(args.out)
    print(f"wrote {path} and {path.name}.json (N={ref.stats.n}, extractor {extractor.name})")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    cfg = ClassifierTrainConfig(epochs=args.epochs, seed=args.seed, resolution=args.resolution)
    man = train_classifier(cfg, Path(args.out), command=_command_line())
    print(f"saved the domain classifier to {args.out} (held-out accuracy {man['metrics']['heldout_accuracy']:.4f})")


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """The options given on the command line (argument -> config key); the others keep the config class's defaults."""
    return {key: getattr(args, arg) for arg, key in names.items() if getattr(args, arg) is not None}


def _solver(args: argparse.Namespace, scheduler_config: dict):
    """The respaced scheduler of ``--solver`` / ``--order`` (default: DDIM) for a model's noise schedule."""
    return make_scheduler(scheduler_config, args.solver or "ddim", args.order)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The model options given (``--model``, and where the command has them ``--guidance``, ``--null-label``,
    ``--prompt``); the others keep ``ModelConfig``'s defaults."""
    names = {"model": "path", "guidance": "guidance_scale", "null_label": "null_label", "prompt": "prompts"}
    kw = _given(args, {a: k for a, k in names.items() if hasattr(args, a)})
    return ModelConfig(**kw)


def supernet_config(args: argparse.Namespace) -> SupernetConfig:
    """The ``SupernetConfig`` of ``tmpq profile`` / ``tmpq calibrate``: the options given, the class's defaults for
    the rest (those of a run config's ``[supernet]``)."""
    kw = _given(args, {"tie_qkv": "tie_qkv", "rounding": "w_rounding", "w_granularity": "w_granularity",
                       "group_size": "group_size", "time_groups": "time_groups",
                       "guidance_ranges": "guidance_ranges", "stream_ranges": "stream_ranges"})
    if args.preset is not None:
        kw["w_bits"] = kw["a_bits"] = BIT_PRESETS[args.preset]
    for arg in ("w_bits", "a_bits"):
        if getattr(args, arg) is not None and args.preset is None:
            kw[arg] = tuple(_parse_int_list(getattr(args, arg), "--" + arg.replace("_", "-")))
    if getattr(args, "winograd", None) is not None:
        kw["winograd"] = _winograd_tiles(args.winograd)
    return SupernetConfig(**kw)


def _winograd_tiles(values: list[str]) -> tuple[int, ...]:
    """``--winograd 2 4`` (or ``2,4``): the tile sizes, ascending; a tile F(m, 3) does not have is one line."""
    tiles = _parse_int_list(",".join(values), "--winograd")
    bad = [m for m in tiles if m not in WINOGRAD_TILES]
    if bad:
        raise TmpqError(f"--winograd: no Winograd F({bad[0]}, 3); tile sizes are "
                        f"{', '.join(map(str, WINOGRAD_TILES))}")
    return tuple(sorted(set(tiles)))


def cmd_profile(args: argparse.Namespace) -> None:
    m = load_model(args.model)
    net = QuantSupernet(m.unet, supernet_config(args))
    print(f"{'layer':<48} {'kind':<7} {'MACs':>10} {'params':>8}  gene / pin")
    for info in net.infos:
        tag = f"pinned W{info.pinned[0]}A{info.pinned[1]}" if info.pinned else f"gene {info.gene}"
        split = f" split@{info.split}" if info.split else ""
        print(f"{info.fqn:<48} {info.kind:<7} {info.macs:>10,} {info.params:>8,}  {tag}{split}")
    total = sum(i.macs for i in net.infos)
    print(f"{len(net.infos)} quantized layers, {net.num_genes} genes, {total:,} MACs per sample per denoiser call")
    for w in net.config.w_bits:
        for a in net.config.a_bits:
            alloc = [(w, a)] * net.num_genes
            print(f"uniform W{w}A{a}: {net.bitops(alloc) / 1e9:.4f} GBitOPs per call, {net.size_mb(alloc):.3f} MB")
    dec = decoder_cost(m.unet)
    if dec is not None:  # a latent model: its VAE decodes once per image, in FP, outside the search
        print(f"VAE decoder ({dec['class']}, FP, not searched): {dec['macs']:,} MACs per image, "
              f"{dec['bitops_fp32'] / 1e9:.4f} GBitOPs at 32 x 32 bits, once per image (not per step)")


def cmd_calibrate(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise TmpqError(f"--out must end in .safetensors, got {out}")
    model_cfg = _model_config(args)
    cfg = supernet_config(args)  # refused before the model loads
    m = load_model(model_cfg)
    net = QuantSupernet(m.unet, cfg)
    t0 = time.perf_counter()
    cal = CalibrationConfig(**_given(args, {"mode": "mode", "strategy": "strategy", "calib_steps": "steps",
                                            "calib_per_step": "per_step", "sampler_steps": "sampler_steps",
                                            "recon_iters": "recon_iters", "batch_size": "batch_size", "seed": "seed"}))
    with lock_inside(out, "calibrate"):  # --out inside a run directory: written by the run's one writer
        info = calibrate_to_file(net, make_scheduler(m.scheduler_config), out, cal)
        wall = time.perf_counter() - t0
        side = {"command": _command_line(), "model": dataclasses.asdict(model_cfg),
                "config": json.loads(cfg.to_json()), "calibration": dataclasses.asdict(cal), "mode": cal.mode,
                "strategy": cal.strategy, "calib_pairs": info["calib_pairs"], "wall_s": round(wall, 1),
                "reconstruction": info["reconstruction"]}
        out.with_name(out.name + ".json").write_text(json.dumps(side, indent=2) + "\n")
    wino = (f", Winograd {', '.join(f'F({m},3)' for m in cfg.winograd)} on "
            f"{len(net.wino_layers)} eligible convs" if cfg.winograd else "")
    print(f"wrote {out} ({len(net.layers)} layers x {len(cfg.w_bits)} W / {len(cfg.a_bits)} A options{wino}, "
          f"{info['calib_pairs']} calibration pairs, {wall:.0f} s)")


def cmd_search(args: argparse.Namespace) -> None:
    if args.resume:
        run_path = Path(args.resume)
        cfg_file = run_path / "config.resolved.json"
        if not cfg_file.is_file():
            raise TmpqError(f"--resume: not a tmpq run directory (no config.resolved.json): {run_path}")
        data = read_json(cfg_file, "run config")
        data.pop("fingerprint", None)
        with malformed(cfg_file, "run config"):
            cfg = config_from_dict(data)
        if args.config:
            cfg = resolve_config(args.config)
    else:
        cfg = resolve_config(args.config)
    over = _given(args, {"engine": "search.engine", "device": "executor.device", "workers": "executor.workers",
                         "gpus_per_worker": "executor.gpus_per_worker"})
    if args.executor or args.ray_address:
        over.update({"executor.kind": args.executor or "ray",
                     "executor.address": args.ray_address or cfg.executor.address})
    cfg = _run_config(args, cfg, over)
    _set_threads(args.threads)
    run_path = Path(args.resume) if args.resume else Path(args.run_dir)
    run = run_search(cfg, run_path, resume=bool(args.resume))
    print(f"run directory: {run.path} (evaluations.parquet, pareto.parquet, pareto.csv)")


def _run_config(args: argparse.Namespace, cfg, over: dict | None = None):
    """``cfg`` with the run-config flags of ``search`` / ``run`` applied: ``over`` (a command's own flags), then
    --model, --guidance, --null-label, then every --set in order (so a --set has the last word)."""
    over = {**(over or {}), **_given(args, {"model": "model.path", "guidance": "model.guidance_scale",
                                            "null_label": "model.null_label"})}
    over.update(parse_override(text) for text in args.set or ())
    return config_with(cfg, over) if over else cfg


def cmd_validate(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    cfg = ValidateConfig(top_k=args.top_k, n=args.n, seeds=tuple(_parse_int_list(args.seeds, "seeds")),
                         calib_per_step=args.calib_per_step, recon_iters=args.recon_iters,
                         distill_iters=args.distill_iters, batch_size=args.batch_size,
                         keys=tuple(args.candidate or ()), fp_reference=not args.no_fp_reference)
    df = validate_run(args.run, cfg, progress=True)

    cols = ["key", "fid_mean", "fid_std", "fp_fid_mean", "class_accuracy_mean", "seeds", "fid_proxy", "bitops"]
    print(df[[c for c in cols if c in df]].to_string(index=False))  # class accuracy: digit class models

    summary = read_json(Path(args.run) / "final.json", "validation summary")
    tau = summary.get("kendall_tau_proxy_vs_fid")
    print(f"wrote {args.run}/final.parquet ({len(df)} points, N = {cfg.n} x {len(cfg.seeds)} seeds)"
          + (f"; Kendall tau proxy vs final FID = {tau:.3f}" if tau is not None else ""))


def cmd_run(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    cfg = _run_config(args, resolve_config(args.config))
    job = MainJobConfig(**_given(args, {"top_k": "top_k", "validate_n": "validate_n", "budget": "budget"}),
                        **({"seeds": tuple(_parse_int_list(args.seeds, "seeds"))} if args.seeds else {}),
                        **({"pick": " ".join(args.pick)} if args.pick else {}))
    s = main_job(cfg, Path(args.run_dir), job)
    b = s["best"]
    fp = b.get("fp_fid_mean")
    fp = f", FP on the same schedule {fp:.3f}" if isinstance(fp, (int, float)) and fp == fp else ""
    which = f"{job.pick} point" if job.pick else "best point"
    print(f"\ndone in {sum(s['timings'].values()):.0f} s: {which} under {s['budget']}: {b['key']} "
          f"(FID {b['fid_mean']:.3f}{fp} at N = {job.validate_n}, {b['bitops'] / 1e9:.3g} GBitOPs, "
          f"timesteps {list(b['timesteps'])})")
    if "pick" in s:
        print(_pick_line(s["pick"]))
    print(f"report: {s['report']}")
    print(f"export: {s['export']}  (tmpq sample {s['export']}; tmpq.apply_export(pipeline, \"{s['export']}\"))")


def cmd_speed(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    device = resolve_device(args.device, "--device")  # a CUDA name without CUDA: one line, before any work
    backend = args.backend if args.backend != "auto" else "int8" if device == "cpu" else "torchao"
    if backend == "fake":
        raise TmpqError("speed: --backend fake: fake quantization is always timed; give the real backend to time "
                        "beside it (int8, torchao or auto)")
    if backend == "int8" and device != "cpu":
        raise TmpqError(f"speed: --backend int8 runs oneDNN's CPU kernels, but --device is {device}: use --backend "
                        f"torchao (or auto) there")
    labels = {"fp_100_uniform": "FP, uniform DDIM 100 steps", "fp_100_uniform_bf16": "FP bf16, uniform DDIM 100 steps",
              "fp_export_schedule": "FP, exported schedule", "fp_export_schedule_bf16": "FP bf16, exported schedule",
              "fakequant_export": "fake quantization, exported", "int8_export": "real int8 kernels, exported",
              "torchao_int8_export": "torchao int8 matmuls, exported"}

    def compiled_lines(rows: dict) -> None:
        for key, label in labels.items():
            if f"{key}_compiled_s" in rows:
                print(f"{label + ', compiled':36s} {rows[f'{key}_compiled_s']:8.2f} s")
        for key, err in rows.get("compile_errors", {}).items():
            print(f"  torch.compile failed for {labels.get(key, key)}: {err}")

    if backend == "torchao":  # torchao's int8 matmuls on the device (tmpq.deploy.torchao_int8)
        print(f"Device: {describe_device(device)}", flush=True)
        rows = measure_speed_torchao(args.export, device, n=args.n, batch_size=args.batch_size, fid_n=args.fid_n,
                                     compile=args.compile)
        rows["threads"] = args.threads
        layers = rows["layers"]
        for key in ("fp_100_uniform", "fp_100_uniform_bf16", "fp_export_schedule", "fp_export_schedule_bf16",
                    "fakequant_export"):
            print(f"{labels[key]:36s} {rows[key + '_s']:8.2f} s")
        print(f"{labels['torchao_int8_export']:36s} {rows['torchao_int8_export_s']:8.2f} s  "
              f"({rows['int8_layers']}/{len(layers)} layers int8 through torchao)")
        print(f"torchao int8 check against fake quantization on real inputs: worst error "
              f"{rows['check_worst_err_int8']:.1e} of the exact magnitude among the int8 layers "
              f"({rows['check_worst_err']:.1e} among all checked; tolerance {CHECK_TOL:.0e}); int8 vs fake-quant "
              f"images: pixel MSE {rows['torchao_int8_vs_fakequant_pixel_mse']:.1e}")
    else:
        print(f"CPU: {describe_cpu_int8()}", flush=True)
        print(f"CPU allocator (every timing below): {cpu_allocator()}", flush=True)
        rows = measure_speed(args.export, n=args.n, batch_size=args.batch_size, fid_n=args.fid_n,
                             compile=args.compile, fp_reference=_fp_reference(args.fp_reference, args.export))
        rows["threads"] = args.threads
        layers = rows["layers"]
        print(f"{'FP, uniform DDIM 100 steps':36s} {rows['fp_100_uniform_s']:8.2f} s")
        print(f"{'FP, exported schedule':36s} {rows['fp_export_schedule_s']:8.2f} s")
        print(f"{'fake quantization, exported':36s} {rows['fakequant_export_s']:8.2f} s")
        print(f"{'real int8 kernels, exported':36s} {rows['int8_export_s']:8.2f} s  "
              f"({rows['int8_layers']}/{len(layers)} layers int8, {rows['split_weight_layers']} of them on split "
              f"weights)")
        print(f"int8 check against fake quantization on real inputs: worst error {rows['check_worst_err_int8']:.1e} "
              f"of the exact magnitude among the int8 layers ({rows['check_worst_err']:.1e} among all checked; "
              f"tolerance {CHECK_TOL:.0e}); int8 vs fake-quant images: pixel MSE "
              f"{rows['int8_vs_fakequant_pixel_mse']:.1e}")
        if "fp_reference_s" in rows:
            print(f"{'FP reference, ' + rows['fp_reference']['label']:36s} {rows['fp_reference_s']:8.2f} s")
        print(_speed_summary(rows))
        sh = rows["op_shares"]
        print(f"conv + Linear share of one denoiser call: FP {sh['fp']['conv_linear_share']:.0%} of "
              f"{sh['fp']['total_ms']:.0f} ms, int8 {sh['int8']['conv_linear_share']:.0%} of "
              f"{sh['int8']['total_ms']:.0f} ms; speed-up bound vs FP 100 steps with free convs / Linears: "
              f"{rows['speedup_bound_vs_fp100']:.1f}x")
    compiled_lines(rows)
    fids = [k for k in rows if k.endswith(f"_fid_n{args.fid_n}")] if args.fid_n else []
    if fids:
        print("FID at N = " + f"{args.fid_n}: " + ", ".join(f"{k.split('_fid')[0]} {rows[k]:.4g}" for k in fids))
    for r in layers:
        if not r["int8"]:
            print(f"  fallback (fake-quant): {r['fqn']}: {r['why']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.out}")


def _fp_reference(spec: str | None, export: str) -> tuple | None:
    """``--fp-reference SOLVER:STEPS[:SPACING]`` as ``(label, solver, order, timesteps)`` on the export's model (spacing
    uniform, trailing, quad, or dp: the DP-optimal timesteps of that step count for the model)."""
    if spec is None:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise TmpqError(f"--fp-reference: expected SOLVER:STEPS[:SPACING] (e.g. unipc-2:7:dp), got {spec!r}")
    solver, steps, spacing = parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "trailing"
    if spacing not in (*SCHEDULES, "dp"):
        raise TmpqError(f"--fp-reference: spacing must be one of {', '.join((*SCHEDULES, 'dp'))}, got {spacing!r}")
    s = parse_solver(solver)
    if spacing == "dp":  # the DP needs the model's FP trajectory; the named spacings only its step count
        m = load_model(export)
        ts = dp_schedules(m.unet, m.scheduler_config, [steps], guidance_scale=m.guidance_scale)[steps]
    else:
        ts = make_timesteps(spacing, steps, int(resolve_model_dir(export)[2].get("num_train_timesteps", 1000)))
    return f"{solver} {steps} {spacing}", s.name, s.order, list(ts)


def _speed_summary(rows: dict) -> str:
    """One line of ratios: int8 against FP DDIM 100 steps, FP on the exported schedule, fake quantization and, when
    timed, the FP reference; with the small-batch check."""
    i8 = rows["int8_export_s"]
    parts = [f"{rows['fp_100_uniform_s'] / i8:.2f}x FP DDIM 100", f"{rows['fp_export_schedule_s'] / i8:.2f}x FP on "
             f"the exported schedule", f"{rows['fakequant_export_s'] / i8:.2f}x fake quantization"]
    if "fp_reference_s" in rows:
        parts.append(f"{rows['fp_reference_s'] / i8:.2f}x the FP reference ({rows['fp_reference']['label']})")
    check = (f"; suspect: int8 per image {i8 / rows['images'] * 1e3:.2f} ms at batch {rows['batch_size']} vs "
             f"{rows['int8_small_batch_s_per_image'] * 1e3:.2f} ms at batch {min(16, rows['images'])}, or slower than fake quantization "
             f"(shared cores? rerun)" if rows.get("int8_timing_suspect") else "")
    return "summary: int8 " + ", ".join(parts) + check


def cmd_report(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    path = write_report(args.run, baselines=not args.no_baselines, grids=not args.no_grids, progress=True)
    print(f"wrote {path} (open it in a browser)")


def _pick_line(p: dict) -> str:
    """The figures of a pick rule, for people."""
    ref = "the FP model on its best validated schedule" if p["reference"] == "fp" else "given"
    return (f"picked by {p['rule']} {p['ratio']:g}: FID {p['fid_mean']:.4g} = {p['fid_ratio']:.3f} x the reference "
            f"{p['reference_fid']:.4g} ({ref}), predicted {p['latency_s'] * 1e3:.3g} ms per image "
            f"({p['latency_table']['backend']}, {p['latency_table']['threads']} threads)")


def cmd_export(args: argparse.Namespace) -> None:
    if args.reference is not None and args.pick is None:
        raise TmpqError("--reference: applies to --pick only")
    figures = None
    if args.pick is not None:
        _rule, ratio = parse_pick(args.pick, "--pick")
        if args.reference is not None:
            check_reference(args.reference)
    if args.budget is not None:
        check_budget_spec(args.budget, "--budget")
    _set_threads(args.threads)
    if args.pick is not None:
        figures = pick_fastest_within(args.run, ratio, args.reference, progress=True)
        key = figures["key"]
    else:
        key = args.candidate if args.candidate is not None else pick_key(args.run, args.budget, "--budget")
    if figures is not None:
        print(_pick_line(figures))
    man = export_candidate(args.run, key, args.out, command=_command_line(), pick=figures)
    n_layers = len(man["layers"])
    print(f"exported candidate {key} to {args.out}: {len(man['sampler']['timesteps'])} steps "
          f"{man['sampler']['timesteps']}, {n_layers} quantized layers; render it with: tmpq sample {args.out}")


def cmd_pareto(args: argparse.Namespace) -> None:
    front = load_run(args.run).pareto()
    if front.empty:
        print("no successful evaluations yet")
        return
    cols = [c for c in ("key", "fid_proxy", "bitops", "latency_s", "size_mb", "steps", "solver", "algos",
                        "timesteps", "generation")
            if c in front]
    if "algos" in front:  # a run with the algorithm gene: its Winograd convs per point, not the raw per-conv list
        front = front.assign(algos=[winograd_summary(a) for a in front["algos"]])
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(front[cols].to_string(index=False))


def cmd_status(args: argparse.Namespace) -> None:
    print_status(args.run, args.json)  # tmpq.cli answers status without this module (no torch): see print_status


def _command_line() -> str:
    return "tmpq " + " ".join(shlex.quote(a) for a in sys.argv[1:])


COMMANDS = {"train": cmd_train, "train-classifier": cmd_train_classifier, "sample": cmd_sample, "fid": cmd_fid,
            "profile": cmd_profile, "calibrate": cmd_calibrate, "search": cmd_search, "validate": cmd_validate,
            "run": cmd_run, "speed": cmd_speed, "report": cmd_report, "export": cmd_export, "pareto": cmd_pareto,
            "status": cmd_status, "ref-stats": cmd_ref_stats}
