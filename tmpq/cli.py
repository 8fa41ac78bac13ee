"""The ``tmpq`` command line. Every user error is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tmpq.core.choices import (
    ARCHS,
    BACKENDS,
    BIT_PRESETS,
    DTYPES,
    GRANULARITIES,
    GUIDANCE_RANGES,
    MODES,
    OBJECTIVES,
    RESOLUTIONS,
    ROUNDINGS,
    STRATEGIES,
    STREAM_RANGES,
)
from tmpq.core.errors import TmpqError
from tmpq.search.engines import ENGINES
from tmpq.search.executors import EXECUTORS


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
    q.add_argument("--schedule", default="quad", help="timestep spacing: uniform (DDIM leading), trailing (from T-1, "
                   "diffusers' trailing), quad (quadratic DDIM) or dp "
                   "(optimal steps by dynamic programming over the FP model's 100-step trajectory)"
                   + (", or a comma-separated list" if many else "") + " (default: %(default)s)")
    q.add_argument("--timesteps", default=None, help="explicit strictly descending timesteps, e.g. 800,450,200,"
                   "50,0 (overrides --steps / --schedule)")
    q.add_argument("--seed", type=int, default=0, help="noise-bank seed: image i always gets the same noise "
                   "(default: %(default)s)")
    q.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default: %(default)s)")
    q.add_argument("--solver", default=None, help="sampler over the timesteps: ddim, dpm++, unipc, euler or heun "
                   "(default: ddim; an export's own)")
    q.add_argument("--order", type=int, default=None, help="solver order: dpm++ and unipc 1-3 (default 2)")
    q.add_argument("--batch-size", type=int, default=256, help="images per UNet batch (default: %(default)s)")
    _add_device(q)
    _add_threads(q)


def _add_device(q: argparse.ArgumentParser) -> None:
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: "
                   "%(default)s)")


def _add_prompt(q: argparse.ArgumentParser) -> None:
    q.add_argument("--prompt", action="append", default=None, help="text-conditional models: a prompt (repeat for "
                   "several; image i gets prompt i mod count) (default: model.prompts; an export's own)")


def _add_supernet_options(q: argparse.ArgumentParser) -> None:
    """The supernet options; one left out takes the default of ``SupernetConfig`` (the same as a run config's
    ``[supernet]``, listed in configs/default.toml)."""
    q.add_argument("--model", default=None, help="local diffusers model directory (default: the embedded model)")
    q.add_argument("--w-bits", default=None, help="weight bit options, e.g. 8,6,4 (default: supernet.w_bits)")
    q.add_argument("--a-bits", default=None, help="activation bit options, e.g. 8,6 (default: supernet.a_bits)")
    q.add_argument("--preset", default=None, choices=tuple(BIT_PRESETS), help="paper: W and A in {8,7,6,5}")
    q.add_argument("--tie-qkv", action=argparse.BooleanOptionalAction, default=None,
                   help="one gene for the q, k, v projections of each attention (default: supernet.tie_qkv)")
    q.add_argument("--rounding", default=None, choices=ROUNDINGS,
                   help="weight rounding: nearest, or adaround with BRECQ block reconstruction (needs --time-groups "
                        "1 and --recon-iters) (default: supernet.w_rounding)")
    q.add_argument("--w-granularity", default=None, choices=GRANULARITIES,
                   help="weight quantizer granularity (default: supernet.w_granularity)")
    q.add_argument("--group-size", type=int, default=None, help="inputs per group for --w-granularity group")
    q.add_argument("--time-groups", type=int, default=None, help="activation ranges and bias corrections per "
                   "contiguous group of calibration timesteps, switched by timestep (default: supernet.time_groups)")
    q.add_argument("--guidance-ranges", default=None, choices=GUIDANCE_RANGES, help="with guidance: one set "
                   "of activation ranges for both passes, or a separate one for the null pass (default: "
                   "supernet.guidance_ranges)")
    q.add_argument("--stream-ranges", default=None, choices=STREAM_RANGES, help="joint attention (SD3): each "
                   "stream's projections their own activation ranges, or one shared by each image / text pair "
                   "(default: supernet.stream_ranges)")


def _parser_train(sub) -> None:
    t = sub.add_parser("train", help="train an embedded MNIST denoiser (reproduces the committed weights)",
                       description="Train an embedded 16x16 MNIST denoiser (epsilon loss on 1000 linear-beta steps, or the "
                                   "rectified-flow "
                                   "velocity with --objective flow; EMA): "
                                   "--arch unet, the unconditional DDPM (tmpq/assets/mnist16-ddpm), --arch dit, the "
                                   "class-conditional pixel DiT with label dropout for guidance "
                                   "(tmpq/assets/mnist16-dit), or --arch mmdit --objective flow, the class-conditional "
                                   "rectified-flow MMDiT (Stable Diffusion 3's transformer, its class given as learned "
                                   "text tokens; tmpq/assets/mnist16-flow), and save it as a pipeline directory with a "
                                   "manifest. "
                                   "The training state is checkpointed every 250 steps into OUT/.train-checkpoint.pt; "
                                   "rerunning the same command resumes from it. Options left out take the defaults of "
                                   "tmpq.jobs.train.DenoiserTrainConfig.")
    t.add_argument("--arch", default=None, choices=ARCHS, help="denoiser (default: unet)")
    t.add_argument("--out", default=None, help="output pipeline directory (default: results/train/mnist16-ARCH, "
                   "-ARCH-flow with --objective flow)")
    t.add_argument("--steps", type=int, default=None, help="optimisation steps (default: 6000)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default: 128)")
    t.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate, cosine decay (default: 1e-3)")
    t.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the saved weights (default: 0.999)")
    t.add_argument("--label-dropout", type=float, default=None, help="dit, mmdit: share of labels replaced by the null "
                   "label (default: 0.1)")
    t.add_argument("--seed", type=int, default=None, help="seed of all randomness (default: 0)")
    t.add_argument("--resolution", type=int, default=None, choices=RESOLUTIONS, help="image size (default: 16)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2)")
    t.add_argument("--objective", default=None, choices=OBJECTIVES, help="ddpm (epsilon, linear betas) or flow "
                   "(rectified flow, velocity; saved with FlowMatchEulerDiscreteScheduler) (default: ddpm)")
    t.add_argument("--shift", type=float, default=None, help="flow: the sigma shift of the time grid (default: 1)")


def _parser_train_classifier(sub) -> None:
    c = sub.add_parser("train-classifier", help="train the embedded domain classifier (FID feature extractor)",
                       description="Train the small MNIST CNN whose penultimate layer is the domain FID feature space "
                                   "(train split 4,000 digits; held-out split 1,000 digits for its accuracy).")
    c.add_argument("--out", default="results/train/mnist16-classifier", help="output directory (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    c.add_argument("--resolution", type=int, default=16, choices=RESOLUTIONS, help="image size (default: %(default)s)")
    _add_threads(c)


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
    s.add_argument("--label", default=None, help="class-conditional models: one class for every image, or a "
                   "comma-separated list of one per image (default: balanced, image i gets class i mod classes)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: an "
                   "export's searched one, else 1 = none)")
    s.add_argument("--null-label", type=int, default=None, help="class-conditional UNets: the label the model "
                   "was trained to treat as unconditional (a DiT's is its extra embedding row)")
    s.add_argument("--backend", default="fake", choices=BACKENDS,
                   help="what an export's quantized layers run on: fake (default: fake quantization, tmpq's own "
                        "samples bit for bit), int8 (oneDNN int8 kernels on the CPU), torchao (torchao's int8 "
                        "matmuls on --device), auto (int8 on the CPU, torchao on CUDA when installed, else fake); "
                        "every real-kernel layer is checked against fake quantization at conversion, the others "
                        "stay fake-quant and are counted")
    _add_prompt(s)
    _add_dtype(s)


def _add_dtype(q: argparse.ArgumentParser) -> None:
    q.add_argument("--dtype", default=None, choices=DTYPES, help="what the FP model computes in "
                   "(model.dtype; the sampler's state and steps stay fp32) (default: fp32)")


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
    f.add_argument("--resolution", type=int, default=16, choices=RESOLUTIONS, help="embedded reference resolution "
                   "(default: %(default)s)")
    f.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 1 = none)")
    f.add_argument("--null-label", type=int, default=None, help="class-conditional UNets: the label the model "
                   "was trained to treat as unconditional")
    f.add_argument("--out", default=None, help="write the result rows as JSON here")
    _add_dtype(f)



def _parser_profile(sub) -> None:
    pr = sub.add_parser("profile", help="per-layer MAC table, genes and uniform BitOPs of the supernet",
                        description="Wrap the model as a supernet and print every quantized layer with its MACs per "
                                    "denoiser call, its gene or pin, and the BitOPs / size of each uniform option.")
    _add_supernet_options(pr)


def _parser_calibrate(sub) -> None:
    ca = sub.add_parser("calibrate", help="calibrate every bit option of the supernet once and save it",
                        description="Capture calibration data along FP trajectories, calibrate every weight and "
                                    "activation option of every layer, and save the quantizer state (safetensors). "
                                    "An interrupted run resumes per activation option. Options left out take the "
                                    "defaults of a run config's [supernet] and [calibration] sections "
                                    "(configs/default.toml), so the file fits a run with those sections.")
    _add_supernet_options(ca)
    ca.add_argument("--winograd", nargs="+", default=None, metavar="M", help="Winograd F(m, 3) tile sizes (2, 4, "
                    "6; e.g. --winograd 2 4): every eligible 3x3 stride-1 conv gets a calibrated Winograd option per "
                    "tile beside direct convolution, and a search an algorithm gene per such conv (default: "
                    "supernet.winograd, none)")
    ca.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale of the captured "
                    "trajectories; calibration then covers both passes (default: model.guidance_scale, 1 = none)")
    ca.add_argument("--null-label", type=int, default=None, help="class-conditional UNets: the label the model was "
                    "trained to treat as unconditional (default: model.null_label)")
    _add_prompt(ca)
    ca.add_argument("--mode", default=None, choices=MODES,
                    help="per-option: whole model at one option (authors' code); random-path: random per-layer "
                         "options per batch (paper text) (default: calibration.mode)")
    ca.add_argument("--strategy", default=None, choices=STRATEGIES,
                    help="calibration data: uniform over steps (Q-Diffusion), ndtc (PTQ4DM), eda (density + "
                         "diversity) (default: calibration.strategy)")
    ca.add_argument("--calib-steps", type=int, default=None, help="timesteps of calibration data (default: "
                    "calibration.steps)")
    ca.add_argument("--calib-per-step", type=int, default=None, help="samples per timestep (default: "
                    "calibration.per_step)")
    ca.add_argument("--sampler-steps", type=int, default=None, help="FP DDIM steps of the captured trajectories "
                    "(default: calibration.sampler_steps)")
    ca.add_argument("--recon-iters", type=int, default=None, help="reconstruction iterations per block and option "
                    "with --rounding adaround, e.g. 200 (default: calibration.recon_iters)")
    ca.add_argument("--batch-size", type=int, default=None, help="calibration batch size (default: "
                    "calibration.batch_size)")
    ca.add_argument("--seed", type=int, default=None, help="noise-bank seed of the calibration trajectories "
                    "(default: calibration.seed)")
    _add_threads(ca)
    ca.add_argument("--out", default="results/supernet/supernet.safetensors", help="output file (default: %(default)s)")


def _add_run_config(q: argparse.ArgumentParser, default_help: str, default: str | None = None) -> None:
    """The run config of ``search`` and ``run``: a preset or TOML file, then the model and any key overridden (in
    this order: --model, --guidance, --null-label, then each --set)."""
    q.add_argument("--config", default=default, metavar="PRESET|FILE",
                   help="a packaged preset (default, demo, tiny, dit, final, solvers, solvers-dp; the files of "
                        f"configs/) or a TOML file ({default_help})")
    q.add_argument("--model", default=None, help="local diffusers model directory, embedded or embedded-dit "
                   "(sets model.path)")
    q.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (sets "
                   "model.guidance_scale)")
    q.add_argument("--null-label", type=int, default=None, help="class-conditional models: the unconditional label "
                   "(sets model.null_label)")
    q.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="set any config key, the value read as TOML (a bare word is a string), e.g. --set "
                        "search.population=8 --set supernet.w_bits=[8,6] (repeatable)")


def _parser_search(sub) -> None:
    se = sub.add_parser("search", help="joint timestep x bit-width search (writes a run directory)",
                        description="Calibrate the supernet once, then search schedules and per-layer bits with an "
                                    "evolutionary engine; every evaluation is logged as it finishes and the run "
                                    "resumes from its log.")
    _add_run_config(se, "default: the built-in defaults, the default preset")
    se.add_argument("--engine", default=None, choices=ENGINES,
                    help="override search.engine")
    se.add_argument("--executor", default=None, choices=EXECUTORS, help="override executor.kind")
    se.add_argument("--ray-address", default=None, help="join a Ray cluster: auto or HOST:PORT (implies --executor ray)")
    se.add_argument("--device", default=None, help="override executor.device: auto, cpu, cuda or cuda:N")
    se.add_argument("--workers", type=int, default=None, help="override executor.workers (Ray actors)")
    se.add_argument("--gpus-per-worker", type=float, default=None,
                    help="override executor.gpus_per_worker (fractional: 0.25 puts four actors on one GPU)")
    se.add_argument("--run-dir", default="results/runs/default", help="new run directory (default: %(default)s)")
    se.add_argument("--resume", default=None, metavar="RUN", help="resume the run in directory RUN")
    se.add_argument("--threads", type=int, default=2, help="torch CPU threads of the driver (default: %(default)s)")


def _parser_validate(sub) -> None:
    va = sub.add_parser("validate", help="re-calibrate and score Pareto points with large-N FID",
                        description="For each Pareto point (or the top K by proxy, or --candidate keys): "
                                    "re-calibrate at exactly its allocation with calibration data captured along "
                                    "its own schedule, optionally reconstruct (BRECQ/AdaRound) and distil "
                                    "quantizer scales from the FP teacher, then FID/KID at N over several seeds, "
                                    "beside the FP model's FID on the point's own schedule and solver (fp_fid_mean). "
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
    va.add_argument("--no-fp-reference", action="store_true", help="skip the FP model's FID on each point's own "
                    "schedule (the reference that shows what quantization adds)")
    _add_threads(va)


def _parser_run(sub) -> None:
    rn = sub.add_parser("run", help="the main job: calibrate, search, validate, export, report (resumable)",
                        description="Run the whole pipeline on a config: calibrate the supernet, search, validate "
                                    "the best points under the export budget with large-N FID, export the best "
                                    "validated point and write the HTML report. Rerun the same command to resume.")
    _add_run_config(rn, "default: demo", default="demo")
    rn.add_argument("--run-dir", default="results/runs/demo", help="run directory (default: %(default)s)")
    rn.add_argument("--top-k", type=int, default=None, help="points to validate (default: MainJobConfig.top_k)")
    rn.add_argument("--validate-n", type=int, default=None, help="FID images per seed in validation "
                    "(default: MainJobConfig.validate_n)")
    rn.add_argument("--seeds", default=None, help="validation noise-bank seeds, comma-separated (default: "
                    "MainJobConfig.seeds)")
    rn.add_argument("--budget", default=None, help="export budget: BitOPs <= this uniform option at the "
                    "config's search.steps (w6a6), a share of the FP model ('1%% fp100': 1 %% of its BitOPs at 100 "
                    "steps), a number, or none (default: the config's search.bitops_budget)")
    rn.add_argument("--pick", nargs=2, metavar=("RULE", "RATIO"), default=None,
                    help="export by rule instead of the lowest FID: 'fastest-within 1.10' = among the validated "
                         "points within the budget whose mean FID is within 1.10 x the FP reference FID, the one of "
                         "lowest predicted latency per image (the run's latency table, measured for a BitOPs run)")
    _add_threads(rn)


def _parser_speed(sub) -> None:
    sp = sub.add_parser("speed", help="wall-clock of an export: FP 100 steps vs fake quantization vs real int8",
                        description="Time sampling with the exported model: FP at 100 uniform DDIM steps, FP and "
                                    "fake quantization at the exported schedule, and real int8 CPU kernels "
                                    "(oneDNN static int8 conv / Linear) for every layer they run exactly. Prints the "
                                    "CPU's int8 instruction sets; every int8 layer is checked against fake "
                                    "quantization on real inputs at conversion, and the layers that fall back are "
                                    "named with why. With --device cuda: FP (float32 and bf16 autocast), fake "
                                    "quantization and torchao's int8 matmuls (static exported activation quantizers, "
                                    "exported weight grid; convs as im2col) on the GPU, checked the same way.")
    sp.add_argument("export", help="export directory (tmpq export)")
    sp.add_argument("--n", type=int, default=256, help="images per timing (default: %(default)s)")
    sp.add_argument("--batch-size", type=int, default=256, help="images per UNet batch (default: %(default)s)")
    sp.add_argument("--fid-n", type=int, default=0, help="also FID of fake-quant vs int8 at this N (default: off)")
    sp.add_argument("--out", default=None, help="write the numbers as JSON here")
    sp.add_argument("--device", default="cpu",
                    help="cpu (default: oneDNN int8 kernels), cuda or cuda:N (torchao int8 matmuls on the GPU, FP also "
                         "under bf16 autocast; needs the gpu extra, pip install 'tmpq[gpu]'), or auto")
    sp.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="the real backend timed beside fake quantization: auto (default: int8 on the CPU, torchao "
                         "on CUDA), int8 (oneDNN, CPU only) or torchao (on --device, the CPU included); fake is "
                         "refused (fake quantization is always timed)")
    sp.add_argument("--fp-reference", default=None, metavar="SOLVER:STEPS[:SPACING]",
                    help="also time this FP sampler in the same run (e.g. unipc-2:7:dp, the fastest FP configuration "
                         "of the export's quality in your FP grid; spacing uniform, trailing (default), quad or dp) "
                         "and print int8's ratio to it")
    sp.add_argument("--compile", action="store_true",
                    help="also time each model with a torch.compile'd forward (the warm-up batch compiles; a model "
                         "that does not compile is named with its error)")
    _add_threads(sp)


def _parser_report(sub) -> None:
    rp = sub.add_parser("report", help="write RUN/report/report.html (Pareto plot, sample grids, tables)",
                        description="Write an HTML report of a run: the Pareto plot with uniform baselines (scored "
                                    "with the run's supernet and proxy) and validated FIDs, a sample grid for every "
                                    "front point beside the FP reference, and the tables.")
    rp.add_argument("run", help="run directory")
    rp.add_argument("--no-baselines", action="store_true", help="skip scoring the uniform baselines")
    rp.add_argument("--no-grids", action="store_true", help="skip the sample grids")
    _add_threads(rp)


def _parser_export(sub) -> None:
    ex = sub.add_parser("export", help="export one candidate of a run for deployment",
                        description="Write a deployable export of one evaluated candidate (named by --candidate, or "
                                    "chosen by --pick or --budget): a DDPMPipeline directory "
                                    "(FP weights) plus tmpq_export.json (searched timesteps, per-layer bits, "
                                    "provenance, file hashes) and quantizers.safetensors. Apply it to a stock "
                                    "pipeline with tmpq.apply_export(pipe, DIR); render it with tmpq sample DIR.")
    ex.add_argument("run", help="run directory")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", help="candidate key (the key column of tmpq pareto RUN)")
    which.add_argument("--pick", nargs=2, metavar=("RULE", "RATIO"), default=None,
                       help="choose by rule: 'fastest-within 1.10' = among the validated points (tmpq validate) whose "
                            "mean FID is within 1.10 x the reference FID, the one of lowest predicted latency per "
                            "image (the run's latency table; a BitOPs run gets one measured on this CPU and stored as "
                            "RUN/latency.json); recorded in the manifest's provenance")
    which.add_argument("--budget", default=None, help="the main job's choice under this BitOPs budget (as tmpq run "
                       "--budget): the validated point of lowest mean FID within it, before validation the front "
                       "point of lowest proxy")
    ex.add_argument("--reference", type=float, default=None, metavar="FID",
                    help="with --pick: the reference FID (default: the lowest FP FID on any validated point's own "
                         "schedule, fp_fid_mean of final.parquet)")
    ex.add_argument("--out", required=True, help="new export directory")
    _add_threads(ex)


def _parser_pareto(sub) -> None:
    pa = sub.add_parser("pareto", help="print the Pareto front of a run",
                        description="Print the non-dominated evaluations (proxy vs BitOPs) of a run directory.")
    pa.add_argument("run", help="run directory")


def _parser_status(sub) -> None:
    st = sub.add_parser("status", help="where a running or finished search stands (read-only)",
                        description="Evaluations done and failed, time and best proxy per generation, the front's best "
                                    "points and the age of the log, of a run directory (local or on shared storage).")
    st.add_argument("run", help="run directory")
    st.add_argument("--json", action="store_true", help="print the status as JSON")


def _parser_ref_stats(sub) -> None:
    r = sub.add_parser("ref-stats", help="save reference statistics of the embedded digits (.npz + .json sidecar)",
                       description="Compute feature statistics of the real embedded digits and save them in "
                                   "pytorch-fid's .npz format with a JSON provenance sidecar.")
    r.add_argument("--out", required=True, help="output .npz path")
    r.add_argument("--extractor", default="domain", help="domain, inception or random (default: %(default)s)")
    r.add_argument("--inception-weights", default=None, help="local Inception weights file (for --extractor inception)")
    r.add_argument("--ref-split", default="all", help="split: all, train, heldout, half0, half1 (default: %(default)s)")
    r.add_argument("--resolution", type=int, default=16, choices=RESOLUTIONS, help="image size (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tmpq", description="Timestep x mixed-precision co-optimisation of diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (INFO level) to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    for add in (_parser_train, _parser_train_classifier, _parser_sample, _parser_fid, _parser_profile,
                _parser_calibrate, _parser_search, _parser_validate, _parser_run, _parser_speed, _parser_report,
                _parser_export, _parser_pareto, _parser_status, _parser_ref_stats):  # one small function per command
        add(sub)
    return p


def _library_errors() -> tuple[type[Exception], ...]:
    """User-error types of tmpq's own libraries, printed like ``TmpqError`` (only those already imported: an error
    of a module never loaded cannot have been raised)."""
    quant = sys.modules.get("tmpq.quant.quantizer")
    return (quant.QuantError,) if quant is not None else ()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help or a usage error: its text flushed here, where a closed pipe can end quietly
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _quiet_closed_pipe()
        raise
    except BrokenPipeError:
        return _quiet_closed_pipe()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":  # read-only and torch-free: answers in about a second
            from tmpq.jobs.runinfo import print_status

            print_status(args.run, args.json)
        else:
            from tmpq.commands import (
                COMMANDS,  # after parsing: --help and usage errors need no torch
            )

            COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's flush at exit
    except BrokenPipeError:
        return _quiet_closed_pipe()
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


def _quiet_closed_pipe() -> int:
    """Output into a closed pipe (``tmpq status RUN | head -1``) ends quietly, as Unix tools do: no message, exit
    status 141 (128 + SIGPIPE). Standard output is pointed at /dev/null so that the interpreter's final flush cannot
    report the broken pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        return 141
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
