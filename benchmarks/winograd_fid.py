"""Winograd-domain W8A8 against direct W8A8 and FP, measured by FID on the embedded UNet (protocol:
results/winograd/FID_PROTOCOL.md).

    .venv/bin/python -m benchmarks.winograd_fid --steps 10 --n 10000 --seeds 0,1      # rows -> results/winograd/fid.jsonl
    .venv/bin/python -m benchmarks.winograd_fid --steps 10 --measure 64              # images/s per arm, no FID
    .venv/bin/python -m benchmarks.winograd_fid --report                              # README section from the rows

The 25 3x3 stride-1 convs of the UNet compute as the arm says (:data:`ARMS`); every other module stays FP, so arms
differ only in those convs. Calibration: the FP model samples ``--calib-images`` images (noise seed
``--calib-seed``, distinct from the FID seeds) along the arm's own schedule, and every call's input to each conv is
fed, as it happens, to every arm's layer of that conv. FID as ``benchmarks.baseline`` computes it (domain extractor,
all 5,000 embedded digits). One row per (arm, steps, N, seed), appended as it finishes (resumable).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import RowLog, cpu_setup
from benchmarks.winograd import direct_w8a8
from tmpq.core.model import load_model
from tmpq.core.rowlog import cpu_info
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
from tmpq.deploy.winograd_int8 import convert
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import embedded_reference, score_features
from tmpq.quant.layers import QuantConv2d
from tmpq.quant.winograd import WinogradConv2d

# arm -> (tile m, granularity, tuned scales, fully quantized); fp / direct / int8 are built apart
ARMS: dict[str, tuple | None] = {
    "fp": None, "direct": None,
    "F4-a": (4, "tensor", False, True), "F4-b": (4, "group", False, True), "F4-c": (4, "group", True, True),
    "F6-a": (6, "tensor", False, True), "F6-b": (6, "group", False, True), "F6-c": (6, "group", True, True),
    "twin-F4": (4, "group", False, False), "int8-F4": (4, "group", False, False),
}
# the state a WinogradConv2d's observe() records: identical for every granularity / bit setting at one m
OBSERVED = ("x_lo", "x_hi", "v_lo", "v_hi", "m_lo", "m_hi", "x_mean", "x_std", "observed")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "vnni")
SECTION = "## FID on the embedded UNet"


def target_convs(unet: nn.Module) -> dict[str, nn.Conv2d]:
    """The 3x3, stride-1, dilation-1, groups-1 convs (the ones Winograd can compute), by qualified name."""
    return {k: c for k, c in unet.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
            and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1}


def new_layer(arm: str, conv: nn.Conv2d) -> nn.Module:
    """The uncalibrated layer of ``arm`` around ``conv`` (the FP conv itself for ``fp``)."""
    if arm == "fp":
        return conv
    if arm == "direct":
        q = QuantConv2d(conv, w_bits=(8,), a_bits=(8,), w_granularity="channel", w_observer="mse",
                        a_symmetric=False, a_observer="minmax")
        q.calibrate_weights()
        q.set_bits(0, 0)
        q.observing = True
        return q
    m, gran, _, full = ARMS[arm]
    return WinogradConv2d(conv, m, 8, 8, gran, x_bits=8 if full else None, m_bits=8 if full else None)


@contextlib.contextmanager
def swapped(unet: nn.Module, layers: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """``unet`` with the named submodules replaced by ``layers`` for the duration, then restored."""
    old = {}
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        owner = unet.get_submodule(parent) if parent else unet
        old[name] = getattr(owner, leaf)
        setattr(owner, leaf, layer)
    try:
        yield unet
    finally:
        for name, mod in old.items():
            parent, _, leaf = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, leaf, mod)


@torch.no_grad()
def calibrate_arms(unet: nn.Module, scheduler_config: dict, arms: list[str], timesteps, images: int, seed: int,
                   tune_steps: int = 50) -> tuple[dict[str, dict[str, nn.Module]], dict]:
    """Every arm's calibrated layers ``{arm: {conv name: layer}}`` from one FP sampling pass (``images`` images,
    noise seed ``seed``) along ``timesteps``: each conv input is observed, as it happens, by one Winograd observer per
    tile size and by the direct layer; the observed state is copied into every Winograd arm of that tile size, which
    is then frozen (and its scales tuned, for the tuned arms). ``int8-F4`` is its calibrated twin converted to int8
    GEMMs, checked on the first and last captured input of each conv. Returns the layers and an info dict (seconds,
    the int8 conversion rows)."""
    t0 = time.time()
    convs = target_convs(unet)
    layers = {a: {k: new_layer(a, c) for k, c in convs.items()} for a in arms if a not in ("int8-F4",)}
    tiles = sorted({ARMS[a][0] for a in arms if ARMS.get(a)})
    observers = {m: {k: WinogradConv2d(c, m, None, None) for k, c in convs.items()} for m in tiles}
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in convs}

    def hook(mod, args, k):
        x = args[0]
        for m in tiles:
            observers[m][k].observe(x)
        if "direct" in layers:
            layers["direct"][k](x)
        if kept[k]:  # the first and the latest input, for the int8 check
            kept[k][1] = x.detach().clone()
        else:
            kept[k] = [x.detach().clone(), x.detach().clone()]

    hooks = [c.register_forward_pre_hook(lambda mod, args, k=k: hook(mod, args, k)) for k, c in convs.items()]
    try:
        sample_images(unet, make_scheduler(scheduler_config), timesteps, images, seed=seed, batch_size=images, progress=False)
    finally:
        for h in hooks:
            h.remove()
    if "direct" in layers:
        for q in layers["direct"].values():
            q.observing = False
            q.freeze_activations()
    info: dict = {"int8": []}
    for a in list(layers):
        if not ARMS.get(a):
            continue
        m, _, tuned, _ = ARMS[a]
        for k, layer in layers[a].items():
            for b in OBSERVED:
                getattr(layer, b).copy_(getattr(observers[m][k], b))
            layer.freeze()
            if tuned:
                with torch.enable_grad():
                    layer.tune_scales(steps=tune_steps, seed=0)
    if "int8-F4" in arms:
        twins = layers.get("twin-F4") or {}
        if not twins:
            raise SystemExit("--arms: int8-F4 needs twin-F4 in the same run (it converts the twin)")
        layers["int8-F4"] = {}
        for k, twin in twins.items():
            mod, row = convert(twin, kept[k], name=k)
            layers["int8-F4"][k] = mod
            info["int8"].append(row)
    info["calib_s"] = round(time.time() - t0, 1)
    return layers, info


def int8_isa() -> list[str]:
    return sorted(f for f in cpu_info()[1] if f in INT8_FLAGS)


def fid_rows(unet: nn.Module, scheduler_config: dict, arms: list[str], steps: int, n: int, seeds: list[int], *,
             log: RowLog, calib_images: int = 32, calib_seed: int = 1000, tune_steps: int = 50,
             batch_size: int = 250, extractor=None, ref=None, measure: int = 0) -> list[dict]:
    """FID rows (or, with ``measure`` > 0, images/s rows from ``measure`` images) of ``arms`` at ``steps`` uniform
    DDIM steps; rows already in ``log`` are skipped. Returns the rows appended."""
    ts = make_timesteps("uniform", steps, scheduler_config.get("num_train_timesteps", 1000))
    kind = "throughput" if measure else "fid"
    n_row = measure or n
    todo = [a for a in arms if not all(log.has(kind=kind, arm=a, steps=steps, n=n_row, seed=s) for s in seeds)]
    if not todo:
        return []
    if "int8-F4" in todo and "twin-F4" not in todo:
        todo.insert(todo.index("int8-F4"), "twin-F4")
    layers, info = calibrate_arms(unet, scheduler_config, todo, ts, calib_images, calib_seed, tune_steps)
    if extractor is None:
        extractor = make_extractor("domain")
    if ref is None and not measure:
        ref = embedded_reference(extractor, "all", 16)
    out = []
    convs = target_convs(unet)
    base = {"schedule": "uniform", "steps": steps, "calib_images": calib_images, "calib_seed": calib_seed,
            "threads": torch.get_num_threads(), "int8_isa": int8_isa()}
    for a in todo:
        for s in seeds:
            if log.has(kind=kind, arm=a, steps=steps, n=n_row, seed=s):
                continue
            with swapped(unet, layers[a]):
                t = time.perf_counter()
                imgs = sample_images(unet, make_scheduler(scheduler_config), ts, n_row, seed=s,
                                     batch_size=min(batch_size, n_row), progress=False)
                wall = time.perf_counter() - t
            row = {"kind": kind, "arm": a, "steps": steps, "n": n_row, "seed": s, **base,
                   "replaced": sum(v is not convs[k] for k, v in layers[a].items()),
                   "sample_s": round(wall, 1), "images_per_s": round(n_row / wall, 2),
                   "calib_s": info["calib_s"], **({"tune_steps": tune_steps} if ARMS.get(a) and ARMS[a][2] else {})}
            if a == "int8-F4":
                row["int8_layers"] = sum(r["int8"] for r in info["int8"])
                row["int8_fallbacks"] = [f"{r['fqn']}: {r['why']}" for r in info["int8"] if not r["int8"]]
                row["int8_max_check_err"] = max((r["check_err"] or 0.0) for r in info["int8"])
            if not measure:
                row.update(score_features(extractor(imgs), ref))
            out.append(log.append(row))
    return out


def rows_log(out: Path) -> RowLog:
    return RowLog(out / "fid.jsonl", ("kind", "arm", "steps", "n", "seed"))


def write_report(out: Path, log: RowLog) -> None:
    """Replace (or add) the FID section at the end of ``OUT/README.md``: one table per (steps, N), one row per arm,
    per-seed FID, their spread, the ratio to direct W8A8 per seed and the protocol's verdict."""
    rows = [r for r in log.rows.values() if r["kind"] == "fid"]
    tput = [r for r in log.rows.values() if r["kind"] == "throughput"]
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    head = text.split(SECTION)[0].rstrip() + "\n\n"
    lines = [SECTION, ""]
    findings = out / "FID_FINDINGS.md"
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    lines += ["Protocol, arms and decision rule (fixed before any FID was seen): [FID_PROTOCOL.md](FID_PROTOCOL.md). "
              "Rows: `fid.jsonl`. FID / KID: domain extractor vs all 5,000 embedded digits (as "
              "`benchmarks.baseline`); DDIM eta 0, uniform steps; noise seeds paired across arms. near-lossless = "
              "FID <= 1.10 x direct W8A8's on both seeds.", ""]
    for steps, n in sorted({(r["steps"], r["n"]) for r in rows}):
        rs = {(r["arm"], r["seed"]): r for r in rows if r["steps"] == steps and r["n"] == n}
        seeds = sorted({s for _, s in rs})
        c0 = next(iter(rs.values()))
        lines += [f"### {steps} uniform DDIM steps, N = {n:,} per seed (calibration: {c0['calib_images']} images, "
                  f"seed {c0['calib_seed']})", "",
                  "| arm | " + " | ".join(f"FID seed {s}" for s in seeds) + " | spread | "
                  + " | ".join(f"/ direct s{s}" for s in seeds) + " | KID x1e3 s" + str(seeds[0])
                  + " | near-lossless |",
                  "|---|" + "---:|" * (2 * len(seeds) + 2) + "---|"]
        for a in ARMS:
            got = [rs.get((a, s)) for s in seeds]
            if not any(got):
                continue
            fids = [f"{r['fid']:.3f}" if r else "-" for r in got]
            vals = [r["fid"] for r in got if r]
            spread = f"{max(vals) - min(vals):.3f}" if len(vals) == len(seeds) and len(seeds) > 1 else "-"
            ratios, ok = [], True
            for s, r in zip(seeds, got):
                d = rs.get(("direct", s))
                if r and d:
                    ratios.append(f"{r['fid'] / d['fid']:.2f}")
                    ok = ok and r["fid"] <= 1.10 * d["fid"]
                else:
                    ratios.append("-")
                    ok = False
            k = f"{1e3 * got[0]['kid']:.2f} ± {1e3 * got[0]['kid_std']:.2f}" if got[0] and "kid" in got[0] else "-"
            verdict = "-" if a in ("fp", "direct") else ("yes" if ok else "no")
            lines.append(f"| {a} | " + " | ".join(fids) + f" | {spread} | " + " | ".join(ratios)
                         + f" | {k} | {verdict} |")
        lines += ["", f"Command: `{c0['command']}`.", ""]
        i8 = rs.get(("int8-F4", seeds[0]))
        if i8:
            lines += [f"int8-F4: {i8['int8_layers']} of {i8['replaced']} convs on int8 GEMMs (largest check error "
                      f"{i8['int8_max_check_err']:.1e} of the exact magnitude); fallbacks: "
                      f"{'; '.join(i8['int8_fallbacks']) or 'none'}.", ""]
    if tput:
        lines += ["### Images/s per arm (1 thread, 2 shared cores: indicative)", "",
                  "| steps | arm | images | images/s |", "|---:|---|---:|---:|"]
        for r in sorted(tput, key=lambda r: (r["steps"], list(ARMS).index(r["arm"]))):
            lines.append(f"| {r['steps']} | {r['arm']} | {r['n']} | {r['images_per_s']:.2f} |")
        lines.append("")
    anyr = next(iter(rows or tput), None)
    if anyr:
        lines += [f"Machine: {anyr['machine']}; int8 ISA flags {', '.join(anyr['int8_isa']) or 'none'}; "
                  f"{anyr['threads']} torch thread; 2 cores shared with other jobs (wall times are not comparable).",
                  ""]
    readme.write_text(head + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/winograd")
    ap.add_argument("--arms", default="fp,direct,F4-c,F6-c,F4-b,F6-b,F4-a,F6-a")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--calib-seed", type=int, default=1000)
    ap.add_argument("--tune-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", type=int, default=0, help="only time this many images per arm (no FID)")
    ap.add_argument("--report", action="store_true", help="only rewrite the README section from fid.jsonl")
    args = ap.parse_args()
    out = Path(args.out)
    log = rows_log(out)
    if not args.report:
        arms = args.arms.split(",")
        bad = [a for a in arms if a not in ARMS]
        if bad:
            raise SystemExit(f"--arms: unknown {', '.join(bad)}; choose from {', '.join(ARMS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.calib_seed in seeds:
            raise SystemExit("--calib-seed: must differ from the FID seeds")
        cpu_setup(args.threads)
        torch.manual_seed(0)
        model = load_model("embedded")
        fid_rows(model.unet.eval(), model.scheduler_config, arms, args.steps, args.n, seeds, log=log,
                 calib_images=args.calib_images, calib_seed=args.calib_seed, tune_steps=args.tune_steps,
                 batch_size=args.batch_size, measure=args.measure)
    write_report(out, log)


if __name__ == "__main__":
    main()
