"""Where does a uniform option's error come from? Paired pixel MSE to the FP model on the same noise (uniform DDIM,
``--steps``, ``--n`` images) of the default supernet with: only weights quantized, only activations quantized, both,
and the activations of one layer at a time. Rows go to ``<out>/diag.jsonl`` (resumable, one row per setting).

    .venv/bin/python -m benchmarks.supernet_diag --bits 8 --pins 8,8       # the old default pins (W8A8 first/last)
    .venv/bin/python -m benchmarks.supernet_diag --bits 8 --pins 8,16      # the default pins (16-bit inputs)
    .venv/bin/python -m benchmarks.supernet_diag --bits 6 --pins 8,16 --per-layer
    .venv/bin/python -m benchmarks.supernet_diag --bits 8 --pins 8,16 --per-layer-weights
    .venv/bin/python -m benchmarks.supernet_diag --bits 8 --pins 8,16/16,16 --steps 100 --n 256 --time-groups 1,2,4 \
        --a-observer minmax [--fid-n 2000]

``--time-groups``: an experiment towards timestep-aware quantization (TDQ-style). The calibration timesteps are cut
into G contiguous groups of equal count; one supernet is calibrated (activation ranges and bias correction) on each
group's inputs alone, and every denoiser call runs the supernet of the group its timestep falls in. G = 1 is the
default supernet.

Calibration data and settings are those of ``benchmarks.supernet`` (uniform, 20 steps x 32 inputs from a 100-step
FP trajectory, seed 10000; per-option calibration).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.common import RowLog, cpu_setup


def main() -> None:
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.core.sampler import make_scheduler, sample_images
    from tmpq.core.schedules import make_timesteps
    from tmpq.supernet import QuantSupernet, SupernetConfig
    from tmpq.supernet.calib_data import make_calib_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=8, help="the uniform option: W{bits}A{bits} (A8 when A{bits} is "
                    "not an option)")
    ap.add_argument("--pins", default="8,16", help="w_bits,a_bits of conv_in and conv_out, or IN/OUT for each "
                    "(8,16/16,16) (default: %(default)s)")
    ap.add_argument("--per-layer", action="store_true", help="also the activations of one layer at a time")
    ap.add_argument("--per-layer-weights", action="store_true", help="also the weights of one layer at a time")
    ap.add_argument("--a-observer", default="mse", help="activation observer (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-groups", default="", help="comma list of G: W{bits} with per-time-group calibration "
                    "(see above) instead of the weight / activation split")
    ap.add_argument("--fid-n", type=int, default=0, help="with --time-groups: also FID / KID at this N (noise seed "
                    "0, domain extractor, as the supernet benchmark's quality part)")
    ap.add_argument("--out", default="results/supernet/diag")
    ap.add_argument("--model", default="embedded", help="model.path (another model: its adapter's default pins, "
                    "--pins ignored; not with --time-groups)")
    ap.add_argument("--guidance", type=float, default=1.0, help="model.guidance_scale of calibration and sampling")
    ap.add_argument("--supernet-time-groups", type=int, default=1, help="supernet.time_groups of the supernet the "
                    "weight / activation split measures (default 1)")
    ap.add_argument("--extra-pin", action="append", default=[], metavar="PATTERN=W,A",
                    help="another model: pin the layers matching PATTERN (fnmatch) at W,A beside its adapter's pins")
    args = ap.parse_args()
    cpu_setup(args.threads)
    if args.time_groups and args.model != "embedded":
        raise SystemExit("--time-groups: the embedded UNet only (use --supernet-time-groups)")
    pins = [[int(b) for b in part.split(",")] for part in args.pins.split("/")]
    pin = {"conv_in": pins[0], "conv_out": pins[-1]} if args.model == "embedded" else "auto"
    extra = {pat: [int(b) for b in wa.split(",")] for pat, wa in (e.rsplit("=", 1) for e in args.extra_pin)}
    cfg = SupernetConfig(time_groups=args.supernet_time_groups, pin=pin, a_observer=args.a_observer)
    tag = "" if args.a_observer == "mse" else f" [{args.a_observer} observer]"
    log = RowLog(Path(args.out) / "diag.jsonl", ("pins", "setting", "bits", "steps", "n"))
    key = {"pins": args.pins, "bits": args.bits, "steps": args.steps, "n": args.n}

    mcfg = ModelConfig(path=args.model, guidance_scale=args.guidance)
    base = load_model(mcfg)
    if extra:
        from tmpq.core.adapters import adapter_for

        cfg = dataclasses.replace(cfg, pin={**(cfg.pin if isinstance(cfg.pin, dict) else
                                                adapter_for(base.unet).default_pins(base.unet)), **extra})
        tag = f" [pins {', '.join(f'{k}={v[0]},{v[1]}' for k, v in extra.items())}]" + tag
    sched = make_scheduler(base.scheduler_config)
    ts = make_timesteps("uniform", args.steps)
    gs = args.guidance
    teacher = sample_images(base.unet, sched, ts, args.n, seed=0, progress=False, guidance_scale=gs)
    data = make_calib_data(base.unet, sched, "uniform", n_steps=20, per_step=32, sampler_steps=100, seed=10_000,
                           guidance_scale=gs)
    if args.time_groups:
        for g in (int(v) for v in args.time_groups.split(",")):
            setting = f"W{args.bits} per-time-group calibration, G = {g}{tag}" + (
                f", FID at N = {args.fid_n}" if args.fid_n else "")
            if log.has(setting=setting, **key):
                continue
            model = _time_grouped(data, cfg, g, args.bits)
            mse = float((sample_images(model, sched, ts, args.n, seed=0, progress=False) - teacher).pow(2).mean())
            row = {"setting": setting, **key, "paired_mse": mse, "group_starts": model.starts}
            if args.fid_n:  # the protocol of benchmarks.supernet's quality part: noise seed 0, domain extractor
                from tmpq.evaluators.features import make_extractor
                from tmpq.evaluators.quality import embedded_reference, score_features

                ext = make_extractor("domain")
                imgs = sample_images(model, sched, ts, args.fid_n, seed=0, desc=f"G = {g}")
                scores = score_features(ext(imgs), embedded_reference(ext))
                row.update({f"{k}_n{args.fid_n}": v for k, v in scores.items()})
            log.append(row)
            print(f"{mse:.6f}  {setting}", flush=True)
        return
    net = QuantSupernet(load_model(mcfg).unet, cfg)
    t0 = time.perf_counter()
    net.calibrate(list(data.batches(64)), progress=False)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    wi = cfg.w_bits.index(args.bits)
    ai = cfg.a_bits.index(args.bits if args.bits in cfg.a_bits else 8)

    def measure(setting: str, setup) -> None:
        setting += tag
        if log.has(setting=setting, **key):
            return
        net.set_uniform(args.bits, cfg.a_bits[ai])  # pinned layers at their pins
        setup()
        mse = float((sample_images(net.unet, sched, ts, args.n, seed=0, progress=False, guidance_scale=gs)
                     - teacher).pow(2).mean())
        log.append({"setting": setting, **key, "paired_mse": mse})
        print(f"{mse:.6f}  {setting}", flush=True)

    pinned = {i.fqn for i in net.infos if i.pinned}

    def only(w: bool, a: bool, names=None):
        def setup():
            for name, layer in net.layers.items():
                if names is not None and name not in names:
                    layer.set_bits(None, None)
                elif name in pinned:  # a pinned layer has one option of each kind: index 0
                    layer.set_bits(0 if w else None, 0 if a else None)
                else:
                    layer.set_bits(wi if w else None, ai if a else None)
        return setup

    measure("weights only", only(True, False))
    measure("activations only", only(False, True))
    measure("weights and activations", lambda: None)
    if args.per_layer:
        for name in net.layers:
            measure(f"activations of {name}", only(False, True, {name}))
    if args.per_layer_weights:
        for name in net.layers:
            measure(f"weights of {name}", only(True, False, {name}))


class _ByTime(torch.nn.Module):
    """Routes each denoiser call to the supernet of its timestep's group (one timestep per call, as the sampler)."""

    def __init__(self, nets, starts: list[int]):
        super().__init__()
        self.nets, self.starts, self.config = torch.nn.ModuleList(nets), starts, nets[0].unet.config

    def forward(self, x, t, **kwargs):
        tt = int(torch.as_tensor(t).reshape(-1)[0])
        return self.nets[sum(tt >= s for s in self.starts)](x, t, **kwargs)


def _time_grouped(data, cfg, groups: int, bits: int) -> _ByTime:
    import numpy as np

    from tmpq.core.model import load_model
    from tmpq.supernet import QuantSupernet

    parts = np.array_split(np.unique(data.t.numpy()), groups)
    nets = []
    for part in parts:
        keep = torch.isin(data.t, torch.as_tensor(part))
        x, t = data.x[keep], data.t[keep]
        net = QuantSupernet(load_model(None).unet, cfg)
        net.calibrate([(x[i:i + 64], t[i:i + 64]) for i in range(0, len(t), 64)], progress=False)
        net.set_uniform(bits, bits if bits in cfg.a_bits else 8)
        nets.append(net)
    return _ByTime(nets, [int(p[0]) for p in parts[1:]])


if __name__ == "__main__":
    main()
