"""The GPU check (issue 22 item 5): one script, sized for a few minutes on one GPU, run when a GPU machine is lent.

    .venv/bin/python -m benchmarks.gpu --out results/gpu                 # on the GPU machine
    .venv/bin/python -m benchmarks.gpu --device cpu --small --out /tmp/g  # the same code paths on a CPU (a smoke run)

Writes ``OUT/rows.jsonl`` (one row per measurement, resumable) and ``OUT/README.md``:

- ``env``: the GPU's name, driver, CUDA and torch versions, the CPU;
- ``agreement``: the objectives (proxy FID, paired pixel MSE) of 8 candidates (uniform and random allocations of the
  default supernet, calibrated once on the CPU and loaded on both devices) on the CPU and on the device, and their
  differences;
- ``sampling``: FP and fake-quantized (uniform W8A8) sampling time on the device at 10 steps, in fp32 (and FP in bf16);
- ``actors``: evaluation throughput of 1, 2 and 4 Ray actors sharing the device (``gpus_per_worker = 1 / k``);
- ``kernels``: torchao's int8 matmuls (``tmpq.deploy.torchao_int8``) on the uniform W8A8 model at 10 steps:
  layers converted, the conversion check's worst error against fake quantization, each fallback named, the
  sampling time of fake quantization and of the int8 model (each also ``torch.compile``'d, except in a CPU
  ``--small`` smoke run or with ``--no-compile``) and the pixel MSE
  between their images on the same noise.

Every timing synchronises the device before reading the clock.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RowLog, command_line, machine
from tmpq.core.candidate import Candidate
from tmpq.core.devices import resolve_device
from tmpq.core.model import load_model
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
from tmpq.evaluators.candidate import (
    CandidateEvaluator,
    ProxyConfig,
    proxy_reference,
    scoring_extractor,
)
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calib_data import CalibrationConfig, calibrate_to_file


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env_row(device: str) -> dict:
    row = {"kind": "env", "name": "env", "device": device, "torch": torch.__version__, "machine": machine(),
           "python": platform.python_version()}
    if device.startswith("cuda"):
        row.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=list(torch.cuda.get_device_capability(device)))
        if shutil.which("nvidia-smi"):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
            row["driver_memory"] = out
    return row


def supernet_file(out: Path, small: bool) -> Path:
    """The default supernet on the embedded model, calibrated once on the CPU (the same file for every device)."""
    path = out / "supernet.safetensors"
    if not path.is_file():
        m = load_model(None)
        cal = CalibrationConfig(steps=4, per_step=8, sampler_steps=20) if small else CalibrationConfig()
        calibrate_to_file(QuantSupernet(m.unet, SupernetConfig()), make_scheduler(m.scheduler_config), path, cal)
    return path


def evaluator(sn: Path, device: str, n: int) -> CandidateEvaluator:
    m = load_model(None, device=device)
    net = QuantSupernet.from_file(m.unet, sn)
    cfg = ProxyConfig(n_images=n)
    ext = scoring_extractor(m.image_channels)
    return CandidateEvaluator(net, make_scheduler(m.scheduler_config), ext, proxy_reference(cfg, ext, 1), cfg)


def candidates(net: QuantSupernet, k: int = 8, seed: int = 0) -> list[tuple[tuple[int, ...], list]]:
    """Uniform W8A8 / W6A6 / W4A8 and random allocations on 10-step quadratic DDIM and 20-step uniform."""
    rng = np.random.default_rng(seed)
    out = [(make_timesteps("quad", 10), [(w, a)] * net.num_genes) for w, a in ((8, 8), (6, 6), (4, 8))]
    while len(out) < k:
        alloc = [(int(rng.choice(net.config.w_bits)), int(rng.choice(net.config.a_bits))) for _ in
                 range(net.num_genes)]
        out.append((make_timesteps("uniform" if len(out) % 2 else "quad", 20 if len(out) % 2 else 10), alloc))
    return out


def part_agreement(args, log: RowLog, sn: Path) -> None:
    if log.has(kind="agreement", name="cpu-vs-device"):
        return
    rows = {}
    for dev in ("cpu", args.device):
        ev = evaluator(sn, dev, args.proxy_n)
        cands = candidates(ev.net)
        rows[dev] = []
        for ts, bits in cands:
            _sync(dev)
            t0 = time.perf_counter()
            obj = ev.evaluate(Candidate(ts, bits))
            _sync(dev)
            rows[dev].append({"fid_proxy": obj["fid_proxy"], "paired_pixel_mse": obj.get("paired_pixel_mse"),
                              "s": time.perf_counter() - t0})
    a, b = rows["cpu"], rows[args.device]
    d_fid = [abs(x["fid_proxy"] - y["fid_proxy"]) / max(abs(x["fid_proxy"]), 1e-12) for x, y in zip(a, b)]
    log.append({"kind": "agreement", "name": "cpu-vs-device", "candidates": len(a), "n": args.proxy_n,
                "fid_rel_diff_max": float(max(d_fid)), "fid_rel_diff_median": float(np.median(d_fid)),
                "cpu": a, "device": b})


def part_sampling(args, log: RowLog, sn: Path) -> None:
    ts = make_timesteps("quad", 10)
    n = args.sample_n
    sched = None

    def timed(unet, dtype=None):
        runs = []
        for _ in range(3):
            _sync(args.device)
            t0 = time.perf_counter()
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                sample_images(unet, sched, ts, n, batch_size=min(n, 1024), progress=False)
            _sync(args.device)
            runs.append(time.perf_counter() - t0)
        return float(np.median(runs)), runs

    for name in ("fp32", "bf16", "fakequant-w8a8"):
        if log.has(kind="sampling", name=name):
            continue
        m = load_model(None, device=args.device)
        sched = sched or make_scheduler(m.scheduler_config)
        unet, dtype = m.unet, (torch.bfloat16 if name == "bf16" else None)
        if name.startswith("fakequant"):
            net = QuantSupernet.from_file(m.unet, sn)
            net.set_uniform(8, 8)
            unet = net.unet
        med, runs = timed(unet, dtype)
        log.append({"kind": "sampling", "name": name, "n": n, "steps": len(ts), "median_s": round(med, 4),
                    "runs_s": [round(r, 4) for r in runs], "images_per_s": round(n / med, 1)})


def part_actors(args, log: RowLog, sn: Path) -> None:
    from tmpq.jobs.search import WorkerSpec
    from tmpq.search.executors import RayExecutor, Task

    spec = WorkerSpec({"path": "embedded"}, str(sn.resolve()), {"name": "fid", "n_images": args.proxy_n}, 1,
                      companions=False, device=args.device)
    gpu = args.device.startswith("cuda")
    for k in (1, 2, 4):
        if log.has(kind="actors", name=f"{k} actors"):
            continue
        net = QuantSupernet.from_file(load_model(None).unet, sn)
        rng = np.random.default_rng(k)
        tasks = []
        for i in range(args.actor_tasks):
            bits = tuple((int(rng.choice(net.config.w_bits)), int(rng.choice(net.config.a_bits)))
                         for _ in range(net.num_genes))
            tasks.append(Task(f"t{i}", Candidate(make_timesteps("quad", 10), bits)))
        tmp = tempfile.mkdtemp(prefix="tmpq-gpu-ray-")
        ex = RayExecutor(spec, workers=k, threads_per_worker=1, temp_dir=tmp, gpus_per_worker=(1.0 / k if gpu else 0))
        try:
            list(ex.map(tasks[:k]))  # every actor built and warm
            t0 = time.perf_counter()
            outs = list(ex.map(tasks))
            wall = time.perf_counter() - t0
        finally:
            ex.close()
            shutil.rmtree(tmp, ignore_errors=True)
        ok = sum(o.status == "ok" for _, o in outs)
        log.append({"kind": "actors", "name": f"{k} actors", "actors": k, "tasks": len(tasks), "ok": ok,
                    "wall_s": round(wall, 2), "evals_per_s": round(len(tasks) / wall, 3),
                    "gpus_per_worker": 1.0 / k if gpu else 0})


def part_kernels(args, log: RowLog, sn: Path) -> None:
    from tmpq.deploy.int8 import compiled_timings, int8_summary, time_sampling
    from tmpq.deploy.torchao_int8 import to_torchao_int8, torchao_version

    if log.has(kind="kernels", name="torchao-w8a8"):
        return
    if importlib.util.find_spec("torchao") is None:
        print("kernels: torchao is not installed (pip install -e '.[gpu]'): no row", flush=True)
        return
    ts, n = make_timesteps("quad", 10), args.sample_n
    m = load_model(None, device=args.device)
    sched = make_scheduler(m.scheduler_config)
    net = QuantSupernet.from_file(m.unet, sn)
    net.set_uniform(8, 8)
    unet, batch = net.unet, min(n, 1024)
    fq_s = time_sampling(unet, sched, ts, n, batch)
    fq = sample_images(unet, sched, ts, n, batch_size=batch, progress=False)
    unet, layers = to_torchao_int8(unet, lambda u: sample_images(u, sched, ts, 4, seed=2, batch_size=4,
                                                                  progress=False), device=args.device)
    i8_s = time_sampling(unet, sched, ts, n, batch)
    i8 = sample_images(unet, sched, ts, n, batch_size=batch, progress=False)
    row = {"kind": "kernels", "name": "torchao-w8a8", "torchao": torchao_version(), "n": n, "steps": len(ts),
           "fakequant_s": round(fq_s, 4), "torchao_int8_s": round(i8_s, 4),
           "pixel_mse_vs_fakequant": float((i8 - fq).pow(2).mean()), **int8_summary(layers),
           "fallbacks": {r["fqn"]: r["why"] for r in layers if not r["int8"]}}
    if not (args.no_compile or (args.small and args.device == "cpu")):  # a CPU smoke run skips the compiles
        fresh = QuantSupernet.from_file(load_model(None, device=args.device).unet, sn)
        fresh.set_uniform(8, 8)
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in compiled_timings(
            {"fakequant": (fresh.unet, sched, ts), "torchao_int8": (unet, sched, ts)}, n, batch).items()})
    log.append(row)


def write_report(out: Path, log: RowLog, args) -> None:
    rows = list(log.rows.values())
    lines = ["# GPU check (issue 22)", "", f"- command: `{command_line()}`", ""]
    env = next((r for r in rows if r["kind"] == "env"), None)
    if env:
        lines += [f"- device: {env.get('gpu', env['device'])}, driver / memory {env.get('driver_memory', '-')}, "
                  f"CUDA {env.get('cuda', '-')}, torch {env['torch']}; host {env['machine']}", ""]
    ag = next((r for r in rows if r["kind"] == "agreement"), None)
    if ag:
        lines += [f"## CPU vs device objectives ({ag['candidates']} candidates, N = {ag['n']})", "",
                  f"proxy FID relative difference: max {ag['fid_rel_diff_max']:.2e}, median "
                  f"{ag['fid_rel_diff_median']:.2e}", ""]
    samp = [r for r in rows if r["kind"] == "sampling"]
    if samp:
        lines += ["## Sampling on the device (10 quadratic DDIM steps)", "", "| model | images | median s | img/s |",
                  "|---|---:|---:|---:|"] + [f"| {r['name']} | {r['n']} | {r['median_s']} | {r['images_per_s']} |"
                                             for r in samp] + [""]
    act = [r for r in rows if r["kind"] == "actors"]
    if act:
        lines += ["## Evaluation throughput, Ray actors sharing the device", "", "| actors | GPUs per actor | tasks | "
                  "evals/s |", "|---:|---:|---:|---:|"] + [
            f"| {r['actors']} | {r['gpus_per_worker']:.2f} | {r['tasks']} | {r['evals_per_s']} |" for r in act] + [""]
    kern = next((r for r in rows if r["kind"] == "kernels"), None)
    if kern:
        comp = {k: kern.get(f"{k}_compiled_s") for k in ("fakequant", "torchao_int8")}
        lines += [f"## Real int8 kernels on the device (torchao {kern['torchao']}, uniform W8A8, {kern['steps']} "
                  f"steps, {kern['n']} images)", "",
                  f"{kern['int8_layers']} layers on torchao's int8 matmul, {kern['fallback_layers']} fake-quant; "
                  f"worst check error {kern['check_worst_err_int8']:.1e} of the exact magnitude; pixel MSE vs fake "
                  f"quantization {kern['pixel_mse_vs_fakequant']:.1e}", "",
                  "| model | median s | compiled s |", "|---|---:|---:|",
                  f"| fake quantization | {kern['fakequant_s']} | {comp['fakequant'] or '-'} |",
                  f"| torchao int8 | {kern['torchao_int8_s']} | {comp['torchao_int8'] or '-'} |", ""]
        lines += [f"- fallback {k}: {v}" for k, v in kern["fallbacks"].items()] + [""]
        lines += [f"- torch.compile failed for {k}: {v}" for k, v in kern.get("compile_errors", {}).items()]
    else:
        lines += ["## Real int8 kernels on the device", "", "No row (the kernels part was not run, or torchao is not "
                  "installed).", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--small", action="store_true", help="a smoke run: small calibration, few images and tasks")
    ap.add_argument("--parts", default="env,agreement,sampling,actors,kernels")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings of the kernels part")
    args = ap.parse_args()
    args.device = resolve_device(args.device, "--device")
    args.proxy_n = 16 if args.small else 128
    args.sample_n = 32 if args.small else 1024
    args.actor_tasks = 4 if args.small else 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RowLog(out / "rows.jsonl", ("kind", "name"))
    parts = args.parts.split(",")
    if "env" in parts and not log.has(kind="env", name="env"):
        log.append(env_row(args.device))
    sn = supernet_file(out, args.small)
    for name, fn in (("agreement", part_agreement), ("sampling", part_sampling), ("actors", part_actors),
                     ("kernels", part_kernels)):
        if name in parts:
            t0 = time.perf_counter()
            fn(args, log, sn)
            print(json.dumps({"part": name, "s": round(time.perf_counter() - t0, 1)}), flush=True)
    write_report(out, log, args)
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
