"""The ``tmpq`` command line. Every user error is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from tmpq.core.errors import TmpqError
from tmpq.jobs.config import CHOICES


def _cmd_train(args: argparse.Namespace) -> None:
    from tmpq.jobs.train import UNetTrainConfig, train_unet

    cfg = UNetTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          resolution=args.resolution, threads=args.threads, ema_decay=args.ema_decay)
    out = Path(args.out)
    manifest = train_unet(cfg, out, command=_command_line())
    print(f"saved the trained EMA model to {out} (final loss {manifest['metrics']['final_loss_mean_last100']:.4f})")


def _parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise TmpqError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise TmpqError(f"{what}: empty list")
    return vals


def _schedules(args: argparse.Namespace, num_train_timesteps: int) -> list[tuple[str, tuple[int, ...]]]:
    """(label, timesteps) pairs from --timesteps, or from every --schedule x --steps combination."""
    from tmpq.core.schedules import make_timesteps, validate_timesteps

    if getattr(args, "timesteps", None):
        ts = validate_timesteps(_parse_int_list(args.timesteps, "timesteps"), num_train_timesteps)
        return [("custom", ts)]
    names = [s for s in args.schedule.replace(" ", "").split(",") if s]
    steps = _parse_int_list(str(args.steps), "steps")
    return [(name, make_timesteps(name, n, num_train_timesteps)) for name in names for n in steps]


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise TmpqError(f"threads: must be >= 1, got {n}")
    torch.set_num_threads(n)


def _cmd_sample(args: argparse.Namespace) -> None:
    from tmpq.core.grid import save_grid
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler, sample_images

    _set_threads(args.threads)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise TmpqError(f"--out must be a .png or .jpg file, got {out}")
    if args.export:
        if args.model:
            raise TmpqError("sample: give an export directory or --model, not both")
        from tmpq.deploy.bundle import load_export

        unet, sched, ts, _manifest = load_export(args.export)
        label = "exported"
        if args.timesteps:
            raise TmpqError("sample: an export brings its own searched timesteps; --timesteps does not apply")
    else:
        m = load_model(args.model)
        (label, ts), *rest = _schedules(args, m.num_train_timesteps)
        if rest:
            raise TmpqError("sample: give one schedule and one step count")
        unet, sched = m.unet, make_scheduler(m.scheduler_config)
    imgs = sample_images(unet, sched, ts, args.n, seed=args.seed, batch_size=args.batch_size, eta=args.eta,
                         desc=f"sample {label} {len(ts)} steps")
    save_grid(imgs, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out} ({args.n} images, {label} schedule, timesteps {list(ts)})")


def _build_reference(args: argparse.Namespace, extractor, sample_shape: tuple[int, int, int]):
    """--ref if given; otherwise the embedded real digits, which only fit a 1-channel model."""
    from tmpq.evaluators.quality import embedded_reference, load_reference

    if args.ref:
        return load_reference(args.ref, extractor)
    if sample_shape[0] != 1:
        raise TmpqError(f"--ref: the model makes {sample_shape[0]}-channel images; the embedded MNIST reference does "
                        "not fit, give reference statistics (.npz)")
    return embedded_reference(extractor, args.ref_split, args.resolution)


def _cmd_fid(args: argparse.Namespace) -> None:
    import json

    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import evaluate_schedule

    _set_threads(args.threads)
    if args.n < 2:
        raise TmpqError(f"--n: must be >= 2 for FID, got {args.n}")
    m = load_model(args.model)
    schedules = _schedules(args, m.num_train_timesteps)
    extractor = make_extractor(args.extractor, args.inception_weights)
    ref = _build_reference(args, extractor, m.sample_shape)
    scheduler = make_scheduler(m.scheduler_config)
    rows = []
    for label, ts in schedules:
        row = evaluate_schedule(m.unet, scheduler, ts, args.n, extractor, ref, seed=args.seed,
                                batch_size=args.batch_size, eta=args.eta, desc=f"{label} {len(ts)} steps")
        row = {"schedule": label, **row}
        rows.append(row)
        print(_format_row(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": _command_line(), "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")


def _format_row(row: dict) -> str:
    kid = f"  KID {row['kid']:.5f} +- {row['kid_std']:.5f}" if "kid" in row else ""
    return (f"{row['schedule']:>8} {row['steps']:>4} steps  N={row['n']}  FID({row['extractor']}) {row['fid']:.3f}"
            f"{kid}  [{row['images_per_s']:.1f} img/s]")


def _cmd_ref_stats(args: argparse.Namespace) -> None:
    from tmpq.evaluators.features import make_extractor
    from tmpq.evaluators.quality import embedded_reference

    extractor = make_extractor(args.extractor, args.inception_weights)
    ref = embedded_reference(extractor, args.ref_split, args.resolution)
    path = ref.stats.save(args.out)
    print(f"wrote {path} and {path.name}.json (N={ref.stats.n}, extractor {extractor.name})")


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from tmpq.evaluators.classifier import ClassifierTrainConfig, train_classifier

    _set_threads(args.threads)
    cfg = ClassifierTrainConfig(epochs=args.epochs, seed=args.seed, resolution=args.resolution)
    man = train_classifier(cfg, Path(args.out), command=_command_line())
    print(f"saved the domain classifier to {args.out} (held-out accuracy {man['metrics']['heldout_accuracy']:.4f})")


def _supernet_config(args: argparse.Namespace):
    from tmpq.supernet import SupernetConfig
    from tmpq.supernet.config import TIE_QKV

    w_bits = (8, 7, 6, 5) if args.preset == "paper" else tuple(_parse_int_list(args.w_bits, "--w-bits"))
    a_bits = (8, 7, 6, 5) if args.preset == "paper" else tuple(_parse_int_list(args.a_bits, "--a-bits"))
    tie = (TIE_QKV,) if args.tie_qkv else ()
    return SupernetConfig(w_bits=w_bits, a_bits=a_bits, tie=tie, w_rounding=args.rounding,
                          w_granularity=args.w_granularity, group_size=args.group_size,
                          time_groups=args.time_groups)


def _cmd_profile(args: argparse.Namespace) -> None:
    from tmpq.core.model import load_model
    from tmpq.supernet import QuantSupernet

    m = load_model(args.model)
    net = QuantSupernet(m.unet, _supernet_config(args))
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


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import json
    import time

    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.supernet import QuantSupernet
    from tmpq.supernet.calib_data import calibrate_to_file

    _set_threads(args.threads)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise TmpqError(f"--out must end in .safetensors, got {out}")
    m = load_model(args.model)
    cfg = _supernet_config(args)
    net = QuantSupernet(m.unet, cfg)
    t0 = time.perf_counter()
    info = calibrate_to_file(net, make_scheduler(m.scheduler_config), out, strategy=args.strategy,
                             n_steps=args.calib_steps, per_step=args.calib_per_step, sampler_steps=args.sampler_steps,
                             data_seed=args.seed, batch_size=args.batch_size, mode=args.mode, seed=args.seed,
                             recon_iters=args.recon_iters)
    wall = time.perf_counter() - t0
    side = {"command": _command_line(), "config": json.loads(cfg.to_json()), "mode": args.mode,
            "strategy": args.strategy, "calib_pairs": info["calib_pairs"], "wall_s": round(wall, 1),
            "reconstruction": info["reconstruction"]}
    out.with_name(out.name + ".json").write_text(json.dumps(side, indent=2) + "\n")
    print(f"wrote {out} ({len(net.layers)} layers x {len(cfg.w_bits)} W / {len(cfg.a_bits)} A options, "
          f"{info['calib_pairs']} calibration pairs, {wall:.0f} s)")


def _cmd_search(args: argparse.Namespace) -> None:
    import dataclasses

    from tmpq.jobs.config import config_from_dict, load_config
    from tmpq.jobs.search import run_search

    if args.resume:
        from tmpq.core.fileio import malformed, read_json

        run_path = Path(args.resume)
        cfg_file = run_path / "config.resolved.json"
        if not cfg_file.is_file():
            raise TmpqError(f"--resume: not a tmpq run directory (no config.resolved.json): {run_path}")
        data = read_json(cfg_file, "run config")
        data.pop("fingerprint", None)
        with malformed(cfg_file, "run config"):
            cfg = config_from_dict(data)
        if args.config:
            cfg = load_config(args.config)
    else:
        cfg = load_config(args.config)
    overrides = {}
    if args.engine:
        overrides["search"] = dataclasses.replace(cfg.search, engine=args.engine)
    if args.executor or args.ray_address:
        overrides["executor"] = dataclasses.replace(cfg.executor, kind=args.executor or "ray",
                                                    address=args.ray_address or cfg.executor.address)
    cfg = config_from_dict({**cfg.to_dict(), **{k: dataclasses.asdict(v) for k, v in overrides.items()}})
    _set_threads(args.threads)
    run_path = Path(args.resume) if args.resume else Path(args.run_dir)
    run = run_search(cfg, run_path, resume=bool(args.resume))
    print(f"run directory: {run.path} (evaluations.parquet, pareto.parquet, pareto.csv)")


def _cmd_validate(args: argparse.Namespace) -> None:
    from tmpq.jobs.validate import ValidateConfig, validate_run

    _set_threads(args.threads)
    cfg = ValidateConfig(top_k=args.top_k, n=args.n, seeds=tuple(_parse_int_list(args.seeds, "seeds")),
                         calib_per_step=args.calib_per_step, recon_iters=args.recon_iters,
                         distill_iters=args.distill_iters, batch_size=args.batch_size,
                         keys=tuple(args.candidate or ()))
    df = validate_run(args.run, cfg, progress=True)

    print(df[["key", "fid_mean", "fid_std", "seeds", "fid_proxy", "bitops"]].to_string(index=False))
    from tmpq.core.fileio import read_json

    summary = read_json(Path(args.run) / "final.json", "validation summary")
    tau = summary.get("kendall_tau_proxy_vs_fid")
    print(f"wrote {args.run}/final.parquet ({len(df)} points, N = {cfg.n} x {len(cfg.seeds)} seeds)"
          + (f"; Kendall tau proxy vs final FID = {tau:.3f}" if tau is not None else ""))


def _cmd_run(args: argparse.Namespace) -> None:
    from tmpq.jobs.config import load_config
    from tmpq.jobs.main import MainJobConfig, main_job

    _set_threads(args.threads)
    cfg = load_config(args.config)
    job = MainJobConfig(top_k=args.top_k, validate_n=args.validate_n,
                        seeds=tuple(_parse_int_list(args.seeds, "seeds")), budget=args.budget)
    s = main_job(cfg, Path(args.run_dir), job)
    b = s["best"]
    print(f"\ndone in {sum(s['timings'].values()):.0f} s: best point under {args.budget}: {b['key']} "
          f"(FID {b['fid_mean']:.3f} at N = {args.validate_n}, {b['bitops'] / 1e9:.3g} GBitOPs, "
          f"timesteps {list(b['timesteps'])})")
    print(f"report: {s['report']}")
    print(f"export: {s['export']}  (tmpq sample {s['export']}; tmpq.apply_export(pipeline, \"{s['export']}\"))")


def _cmd_speed(args: argparse.Namespace) -> None:
    import json

    from tmpq.deploy.int8 import measure_speed

    _set_threads(args.threads)
    from tmpq.deploy.int8 import CHECK_TOL, describe_cpu_int8

    print(f"CPU: {describe_cpu_int8()}", flush=True)
    rows = measure_speed(args.export, n=args.n, batch_size=args.batch_size, fid_n=args.fid_n)
    rows["threads"] = args.threads
    layers = rows["layers"]
    print(f"{'FP, uniform DDIM 100 steps':36s} {rows['fp_100_uniform_s']:8.2f} s")
    print(f"{'FP, exported schedule':36s} {rows['fp_export_schedule_s']:8.2f} s")
    print(f"{'fake quantization, exported':36s} {rows['fakequant_export_s']:8.2f} s")
    print(f"{'real int8 kernels, exported':36s} {rows['int8_export_s']:8.2f} s  "
          f"({rows['int8_layers']}/{len(layers)} layers int8, {rows['split_weight_layers']} of them on split weights)")
    print(f"int8 check against fake quantization on real inputs: worst error {rows['check_worst_err_int8']:.1e} of "
          f"the exact magnitude among the int8 layers ({rows['check_worst_err']:.1e} among all checked; "
          f"tolerance {CHECK_TOL:.0e}); int8 vs fake-quant images: pixel MSE {rows['int8_vs_fakequant_pixel_mse']:.1e}")
    sh = rows["op_shares"]
    print(f"conv + Linear share of one denoiser call: FP {sh['fp']['conv_linear_share']:.0%} of "
          f"{sh['fp']['total_ms']:.0f} ms, int8 {sh['int8']['conv_linear_share']:.0%} of "
          f"{sh['int8']['total_ms']:.0f} ms; speed-up bound vs FP 100 steps with free convs / Linears: "
          f"{rows['speedup_bound_vs_fp100']:.1f}x")
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


def _cmd_report(args: argparse.Namespace) -> None:
    from tmpq.jobs.report import write_report

    _set_threads(args.threads)
    path = write_report(args.run, baselines=not args.no_baselines, grids=not args.no_grids, progress=True)
    print(f"wrote {path} (open it in a browser)")


def _cmd_export(args: argparse.Namespace) -> None:
    from tmpq.jobs.export import export_candidate

    _set_threads(args.threads)
    man = export_candidate(args.run, args.candidate, args.out, command=_command_line())
    n_layers = len(man["layers"])
    print(f"exported candidate {args.candidate} to {args.out}: {len(man['sampler']['timesteps'])} steps "
          f"{man['sampler']['timesteps']}, {n_layers} quantized layers; render it with: tmpq sample {args.out}")


def _cmd_pareto(args: argparse.Namespace) -> None:
    import pandas as pd

    from tmpq.jobs.run import load_run

    front = load_run(args.run).pareto()
    if front.empty:
        print("no successful evaluations yet")
        return
    cols = [c for c in ("key", "fid_proxy", "bitops", "size_mb", "steps", "timesteps", "generation") if c in front]
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(front[cols].to_string(index=False))


def _command_line() -> str:
    return "tmpq " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _add_threads(q: argparse.ArgumentParser) -> None:
    q.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``tmpq: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_model_and_schedule(q: argparse.ArgumentParser, steps_default: str, many: bool) -> None:
    q.add_argument("--model", default=None, help="local diffusers model directory: a DDPMPipeline directory "
                   "(model_index.json, unet/, scheduler/) or a bare UNet2DModel directory (default: the embedded "
                   "MNIST model)")
    q.add_argument("--steps", default=steps_default, help="number of denoising steps" +
                   (", or a comma-separated list" if many else "") + " (default: %(default)s)")
    q.add_argument("--schedule", default="quad", help="timestep spacing: uniform (DDIM) or quad (quadratic DDIM)"
                   + (", or a comma-separated list" if many else "") + " (default: %(default)s)")
    q.add_argument("--timesteps", default=None, help="explicit strictly descending timesteps, e.g. 800,450,200,"
                   "50,0 (overrides --steps / --schedule)")
    q.add_argument("--seed", type=int, default=0, help="noise-bank seed: image i always gets the same noise "
                   "(default: %(default)s)")
    q.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=256, help="images per UNet batch (default: %(default)s)")
    _add_threads(q)


def _add_supernet_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", default=None, help="local diffusers model directory (default: the embedded model)")
    q.add_argument("--w-bits", default="8,6,4", help="weight bit options (default: %(default)s)")
    q.add_argument("--a-bits", default="8,6", help="activation bit options (default: %(default)s)")
    q.add_argument("--preset", default=None, choices=("paper",), help="paper: W and A in {8,7,6,5}")
    q.add_argument("--tie-qkv", action="store_true", help="one gene for the q, k, v projections of each attention")
    q.add_argument("--rounding", default="nearest", choices=("nearest", "adaround"),
                   help="weight rounding: nearest, or adaround with BRECQ block reconstruction (default: %(default)s)")
    q.add_argument("--w-granularity", default="channel", choices=("channel", "group", "tensor"),
                   help="weight quantizer granularity (default: %(default)s)")
    q.add_argument("--group-size", type=int, default=None, help="inputs per group for --w-granularity group")
    q.add_argument("--time-groups", type=int, default=4, help="activation ranges and bias corrections per "
                   "contiguous group of calibration timesteps, switched by timestep; 1 with --rounding adaround "
                   "(default: %(default)s, as a search run's supernet.time_groups)")


def _parser_train(sub) -> None:
    t = sub.add_parser("train", help="train the embedded MNIST DDPM (reproduces the committed weights)",
                       description="Train the embedded 16x16 MNIST DDPM (epsilon loss, 1000 linear-beta steps, EMA) "
                                   "and save it as a DDPMPipeline directory with a manifest. The training state is "
                                   "checkpointed every 250 steps into OUT/.train-checkpoint.pt; rerunning the same "
                                   "command resumes from it.")
    t.add_argument("--out", default="results/train/mnist16-ddpm", help="output pipeline directory (default: %(default)s)")
    t.add_argument("--steps", type=int, default=6000, help="optimisation steps (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate, cosine decay (default: %(default)s)")
    t.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of all randomness (default: %(default)s)")
    t.add_argument("--resolution", type=int, default=16, choices=(16, 28), help="image size (default: %(default)s)")
    _add_threads(t)
    t.set_defaults(func=_cmd_train)


def _parser_train_classifier(sub) -> None:
    c = sub.add_parser("train-classifier", help="train the embedded domain classifier (FID feature extractor)",
                       description="Train the small MNIST CNN whose penultimate layer is the domain FID feature space "
                                   "(train split 4,000 digits; held-out split 1,000 digits for its accuracy).")
    c.add_argument("--out", default="results/train/mnist16-classifier", help="output directory (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    c.add_argument("--resolution", type=int, default=16, choices=(16, 28), help="image size (default: %(default)s)")
    _add_threads(c)
    c.set_defaults(func=_cmd_train_classifier)


def _parser_sample(sub) -> None:
    s = sub.add_parser("sample", help="render a grid of samples along a schedule",
                       description="Sample images with respaced DDIM along a uniform / quadratic / explicit schedule "
                                   "and save them as a PNG grid.")
    _add_model_and_schedule(s, "10", many=False)
    s.add_argument("--n", type=int, default=64, help="number of images (default: %(default)s)")
    s.add_argument("--nrow", type=int, default=8, help="images per grid row (default: %(default)s)")
    s.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid (default: %(default)s)")
    s.add_argument("--out", default="results/samples/grid.png", help="output PNG (default: %(default)s)")
    s.add_argument("export", nargs="?", default=None, help="optional export directory (tmpq export): sample the "
                   "exported quantized model along its searched timesteps")
    s.set_defaults(func=_cmd_sample)


def _parser_fid(sub) -> None:
    f = sub.add_parser("fid", help="FID / KID of schedules against reference statistics",
                       description="Sample N images per schedule from the seeded noise bank and report FID (and KID "
                                   "where reference features are known) against the reference statistics.")
    _add_model_and_schedule(f, "10", many=True)
    f.add_argument("--n", type=int, default=10000, help="generated images per schedule (default: %(default)s)")
    f.add_argument("--extractor", default="domain", help="feature extractor: domain (embedded MNIST classifier), "
                   "inception (pytorch-fid InceptionV3, needs --inception-weights), random (tests) (default: %(default)s)")
    f.add_argument("--inception-weights", default=None, help="local pytorch-fid Inception weights file "
                   "(pt_inception-2015-12-05-*.pth or .safetensors); never downloaded")
    f.add_argument("--ref", default=None, help="reference statistics .npz (mu, sigma; pytorch-fid format). Default: "
                   "computed from the embedded real MNIST digits")
    f.add_argument("--ref-split", default="all", help="embedded digits split for the reference (default: %(default)s, "
                   "N=5000)")
    f.add_argument("--resolution", type=int, default=16, choices=(16, 28), help="embedded reference resolution "
                   "(default: %(default)s)")
    f.add_argument("--out", default=None, help="write the result rows as JSON here")
    f.set_defaults(func=_cmd_fid)



def _parser_profile(sub) -> None:
    pr = sub.add_parser("profile", help="per-layer MAC table, genes and uniform BitOPs of the supernet",
                        description="Wrap the model as a supernet and print every quantized layer with its MACs per "
                                    "denoiser call, its gene or pin, and the BitOPs / size of each uniform option.")
    _add_supernet_options(pr)
    pr.set_defaults(func=_cmd_profile)


def _parser_calibrate(sub) -> None:
    ca = sub.add_parser("calibrate", help="calibrate every bit option of the supernet once and save it",
                        description="Capture calibration data along FP trajectories, calibrate every weight and "
                                    "activation option of every layer, and save the quantizer state (safetensors). "
                                    "An interrupted run resumes per activation option.")
    _add_supernet_options(ca)
    ca.add_argument("--mode", default="per-option", choices=("per-option", "random-path"),
                    help="per-option: whole model at one option (authors' code); random-path: random per-layer "
                         "options per batch (paper text) (default: %(default)s)")
    ca.add_argument("--strategy", default="uniform", choices=("uniform", "ndtc", "eda"),
                    help="calibration data: uniform over steps (Q-Diffusion), ndtc (PTQ4DM), eda (density + "
                         "diversity) (default: %(default)s)")
    ca.add_argument("--calib-steps", type=int, default=20, help="timesteps of calibration data (default: %(default)s)")
    ca.add_argument("--calib-per-step", type=int, default=32, help="samples per timestep (default: %(default)s)")
    ca.add_argument("--sampler-steps", type=int, default=100, help="FP DDIM steps of the captured trajectories "
                    "(default: %(default)s)")
    ca.add_argument("--recon-iters", type=int, default=200, help="reconstruction iterations per block and option "
                    "with --rounding adaround (default: %(default)s)")
    ca.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default: %(default)s)")
    ca.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    _add_threads(ca)
    ca.add_argument("--out", default="results/supernet/supernet.safetensors", help="output file (default: %(default)s)")
    ca.set_defaults(func=_cmd_calibrate)


def _parser_search(sub) -> None:
    se = sub.add_parser("search", help="joint timestep x bit-width search (writes a run directory)",
                        description="Calibrate the supernet once, then search schedules and per-layer bits with an "
                                    "evolutionary engine; every evaluation is logged as it finishes and the run "
                                    "resumes from its log.")
    se.add_argument("--config", default=None, help="TOML config (default: built-in defaults; see configs/)")
    se.add_argument("--engine", default=None, choices=CHOICES["search.engine"],
                    help="override search.engine")
    se.add_argument("--executor", default=None, choices=("local", "ray"), help="override executor.kind")
    se.add_argument("--ray-address", default=None, help="join a Ray cluster: auto or HOST:PORT (implies --executor ray)")
    se.add_argument("--run-dir", default="results/runs/default", help="new run directory (default: %(default)s)")
    se.add_argument("--resume", default=None, metavar="RUN", help="resume the run in directory RUN")
    se.add_argument("--threads", type=int, default=2, help="torch CPU threads of the driver (default: %(default)s)")
    se.set_defaults(func=_cmd_search)


def _parser_validate(sub) -> None:
    va = sub.add_parser("validate", help="re-calibrate and score Pareto points with large-N FID",
                        description="For each Pareto point (or the top K by proxy, or --candidate keys): "
                                    "re-calibrate at exactly its allocation with calibration data captured along "
                                    "its own schedule, optionally reconstruct (BRECQ/AdaRound) and distil "
                                    "quantizer scales from the FP teacher, then FID/KID at N over several seeds. "
                                    "Writes RUN/final.parquet and RUN/final.json; resumable per point and seed.")
    va.add_argument("run", help="run directory")
    va.add_argument("--top-k", type=int, default=0, help="validate the K best points by proxy (default: the whole "
                    "front)")
    va.add_argument("--candidate", action="append", help="validate this key (repeatable; overrides --top-k)")
    va.add_argument("--n", type=int, default=10000, help="generated images per seed (default: %(default)s)")
    va.add_argument("--seeds", default="1,2", help="noise-bank seeds, comma-separated (default: %(default)s)")
    va.add_argument("--calib-per-step", type=int, default=64, help="calibration inputs per step of the point's "
                    "schedule (default: %(default)s)")
    va.add_argument("--recon-iters", type=int, default=0, help="BRECQ/AdaRound iterations per block, 0 = off "
                    "(default: %(default)s)")
    va.add_argument("--distill-iters", type=int, default=0, help="quantizer-scale distillation steps, 0 = off "
                    "(default: %(default)s)")
    va.add_argument("--batch-size", type=int, default=256, help="images per UNet batch (default: %(default)s)")
    _add_threads(va)
    va.set_defaults(func=_cmd_validate)


def _parser_run(sub) -> None:
    rn = sub.add_parser("run", help="the main job: calibrate, search, validate, export, report (resumable)",
                        description="Run the whole pipeline on a config: calibrate the supernet, search, validate "
                                    "the best points under the export budget with large-N FID, export the best "
                                    "validated point and write the HTML report. Rerun the same command to resume.")
    rn.add_argument("--config", default="configs/demo.toml", help="TOML config (default: %(default)s)")
    rn.add_argument("--run-dir", default="results/runs/demo", help="run directory (default: %(default)s)")
    rn.add_argument("--top-k", type=int, default=3, help="points to validate (default: %(default)s)")
    rn.add_argument("--validate-n", type=int, default=2000, help="FID images per seed in validation "
                    "(default: %(default)s)")
    rn.add_argument("--seeds", default="1,2", help="validation noise-bank seeds (default: %(default)s)")
    rn.add_argument("--budget", default="w6a6", help="export budget: BitOPs <= this uniform option at the "
                    "config's search.steps (w6a6), a share of the FP model ('1%% fp100': 1 %% of its BitOPs at 100 "
                    "steps), a number, or none (default: %(default)s)")
    _add_threads(rn)
    rn.set_defaults(func=_cmd_run)


def _parser_speed(sub) -> None:
    sp = sub.add_parser("speed", help="wall-clock of an export: FP 100 steps vs fake quantization vs real int8",
                        description="Time sampling with the exported model: FP at 100 uniform DDIM steps, FP and "
                                    "fake quantization at the exported schedule, and real int8 CPU kernels "
                                    "(oneDNN static int8 conv / Linear) for every layer they run exactly. Prints the "
                                    "CPU's int8 instruction sets; every int8 layer is checked against fake "
                                    "quantization on real inputs at conversion, and the layers that fall back are "
                                    "named with why.")
    sp.add_argument("export", help="export directory (tmpq export)")
    sp.add_argument("--n", type=int, default=256, help="images per timing (default: %(default)s)")
    sp.add_argument("--batch-size", type=int, default=256, help="images per UNet batch (default: %(default)s)")
    sp.add_argument("--fid-n", type=int, default=0, help="also FID of fake-quant vs int8 at this N (default: off)")
    sp.add_argument("--out", default=None, help="write the numbers as JSON here")
    _add_threads(sp)
    sp.set_defaults(func=_cmd_speed)


def _parser_report(sub) -> None:
    rp = sub.add_parser("report", help="write RUN/report/report.html (Pareto plot, sample grids, tables)",
                        description="Write an HTML report of a run: the Pareto plot with uniform baselines (scored "
                                    "with the run's supernet and proxy) and validated FIDs, a sample grid for every "
                                    "front point beside the FP reference, and the tables.")
    rp.add_argument("run", help="run directory")
    rp.add_argument("--no-baselines", action="store_true", help="skip scoring the uniform baselines")
    rp.add_argument("--no-grids", action="store_true", help="skip the sample grids")
    _add_threads(rp)
    rp.set_defaults(func=_cmd_report)


def _parser_export(sub) -> None:
    ex = sub.add_parser("export", help="export one candidate of a run for deployment",
                        description="Write a deployable export of one evaluated candidate: a DDPMPipeline directory "
                                    "(FP weights) plus tmpq_export.json (searched timesteps, per-layer bits, "
                                    "provenance, file hashes) and quantizers.safetensors. Apply it to a stock "
                                    "pipeline with tmpq.apply_export(pipe, DIR); render it with tmpq sample DIR.")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--candidate", required=True, help="candidate key (the key column of tmpq pareto RUN)")
    ex.add_argument("--out", required=True, help="new export directory")
    _add_threads(ex)
    ex.set_defaults(func=_cmd_export)


def _parser_pareto(sub) -> None:
    pa = sub.add_parser("pareto", help="print the Pareto front of a run",
                        description="Print the non-dominated evaluations (proxy vs BitOPs) of a run directory.")
    pa.add_argument("run", help="run directory")
    pa.set_defaults(func=_cmd_pareto)


def _parser_ref_stats(sub) -> None:
    r = sub.add_parser("ref-stats", help="save reference statistics of the embedded digits (.npz + .json sidecar)",
                       description="Compute feature statistics of the real embedded digits and save them in "
                                   "pytorch-fid's .npz format with a JSON provenance sidecar.")
    r.add_argument("--out", required=True, help="output .npz path")
    r.add_argument("--extractor", default="domain", help="domain, inception or random (default: %(default)s)")
    r.add_argument("--inception-weights", default=None, help="local Inception weights file (for --extractor inception)")
    r.add_argument("--ref-split", default="all", help="split: all, train, heldout, half0, half1 (default: %(default)s)")
    r.add_argument("--resolution", type=int, default=16, choices=(16, 28), help="image size (default: %(default)s)")
    r.set_defaults(func=_cmd_ref_stats)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tmpq", description="Timestep x mixed-precision co-optimisation of diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (INFO level) to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    for add in (_parser_train, _parser_train_classifier, _parser_sample, _parser_fid, _parser_profile,
                _parser_calibrate, _parser_search, _parser_validate, _parser_run, _parser_speed, _parser_report,
                _parser_export, _parser_pareto, _parser_ref_stats):  # one small function per command
        add(sub)
    return p


def _library_errors() -> tuple[type[Exception], ...]:
    """User-error types of tmpq's own libraries, printed like ``TmpqError`` (only those already imported: an error
    of a module never loaded cannot have been raised)."""
    quant = sys.modules.get("tmpq.quant.quantizer")
    return (quant.QuantError,) if quant is not None else ()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (TmpqError, OSError, *_library_errors()) as exc:
        text = str(exc)
        if isinstance(exc, OSError) and exc.filename is not None:  # a file the command could not read or write
            text = f"{exc.filename}: {exc.strerror or exc}"
        print("tmpq: error: " + " ".join(text.split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tmpq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
