"""Wall-clock of an export in its stock diffusers pipeline: FP, fake quantization (``apply_export``'s default) and
oneDNN int8 kernels (``apply_export(..., kernels="int8")``), on the same exported steps, batch and noise.

    .venv/bin/python -m benchmarks.deploy                      # an export under results/, else one built here
    .venv/bin/python -m benchmarks.deploy runs/demo/export --batch 64 --threads 2

Without an export argument it uses an export committed under ``results/`` (the first ``tmpq_export.json`` found),
or builds one as docs/deployment.md shows (``tmpq.search`` with the ``tiny`` preset on the embedded model, then
``tmpq.export``) into a temporary directory. Each of FP / fake / int8 is one warm-up call and ``--repeats`` timed
calls of ``pipe(batch_size=B, generator=noise_generators(B, 0))``; the row keeps the median and every wall. The FP
pipeline runs the exported scheduler (the same steps) on the same channels-last layout. Rows are appended to
``--out`` (default ``results/deploy/rows.jsonl``; a row already there for the same export, batch, threads and kind
is skipped) with the CPU model, its int8 instruction sets (``/proc/cpuinfo``: ``avx2``, ``avx512_vnni``,
``amx_int8``) and the int8 model's conversion summary. Timings taken while other processes share the cores are not
results: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RowLog, cpu_setup
from tmpq.core.rowlog import cpu_info
from tmpq.core.sampler import noise_generators
from tmpq.deploy.int8 import cpu_int8_features

ISA_FLAGS = ("avx2", "avx512_vnni", "amx_int8")
KINDS = ("fp", "fake", "int8")


def committed_export(root: Path = Path("results")) -> Path | None:
    """The first export directory committed under ``root`` (None: there is none)."""
    found = sorted(root.glob("**/tmpq_export.json"))
    return found[0].parent if found else None


def build_export(out: Path) -> Path:
    """An export of the embedded model, made as docs/deployment.md shows (the ``tiny`` preset: a smoke test, not a
    useful model, but the export format, its layers and its sampler are the real ones)."""
    from diffusers import DDPMPipeline

    import tmpq

    pipe = DDPMPipeline.from_pretrained(tmpq.DiffusionModel.embedded_dir())
    run = tmpq.search(pipe, tmpq.RunConfig.preset("tiny"), out / "run")
    return Path(tmpq.export(run, out=out / "export"))


def stock_pipelines(export: Path) -> dict:
    """FP, fake-quant and int8 pipelines of ``export`` (the stock class its ``model_index.json`` names); FP runs the
    exported scheduler on the layout apply_export gives the quantized ones."""
    from diffusers import DiffusionPipeline

    import tmpq

    def load():
        pipe = DiffusionPipeline.from_pretrained(str(export))
        if "batch_size" not in inspect.signature(type(pipe).__call__).parameters:
            raise SystemExit(f"{export}: {type(pipe).__name__} takes no batch_size; this benchmark times "
                             "unconditional stock pipelines (DDPMPipeline); tmpq speed times any export")
        if type(pipe).__name__ == "TmpqPipeline":
            raise SystemExit(f"{export}: no stock diffusers pipeline loads this export (it loads as TmpqPipeline); "
                             "tmpq speed times it")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fake = tmpq.apply_export(load(), export)
    int8 = tmpq.apply_export(load(), export, kernels="int8")
    fp = load()
    fp.unet.to(memory_format=torch.channels_last)
    fp.scheduler = copy.deepcopy(fake.scheduler)
    return {"fp": fp, "fake": fake, "int8": int8}


def time_pipe(pipe, batch: int, repeats: int) -> tuple[list[float], np.ndarray]:
    """Walls of ``repeats`` calls after one warm-up, and the last call's images."""
    call = lambda: np.asarray(pipe(batch_size=batch, generator=noise_generators(batch, 0),  # noqa: E731
                                   output_type="np").images)
    call()
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        images = call()
        walls.append(time.perf_counter() - t0)
    return walls, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", nargs="?", help="export directory (default: one under results/, else built here)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/deploy/rows.jsonl")
    args = ap.parse_args()
    if args.batch < 1 or args.repeats < 1:
        raise SystemExit("--batch and --repeats must be >= 1")
    cpu_setup(args.threads)
    log = RowLog(Path(args.out), ("kind", "candidate", "batch", "threads"))
    with tempfile.TemporaryDirectory(prefix="tmpq-deploy-") as tmp:
        given = Path(args.export) if args.export else committed_export()
        export = given if given is not None else build_export(Path(tmp))
        origin = str(given) if given is not None else "built: tiny preset on the embedded model"
        import tmpq

        manifest = tmpq.read_export(export)
        pipes = stock_pipelines(export)
        model, flags = cpu_info()
        common = {"export": origin, "candidate": manifest["provenance"].get("candidate"),
                  "pipeline": type(pipes["fp"]).__name__, "steps": len(manifest["sampler"]["timesteps"]),
                  "reuse": (manifest["sampler"].get("reuse") or {}).get("calls", []), "batch": args.batch,
                  "threads": torch.get_num_threads(), "cpu": model, "isa": {f: f in flags for f in ISA_FLAGS},
                  "cpu_int8": cpu_int8_features(), "torch": torch.__version__}
        images = {}
        for kind in KINDS:
            if log.has(kind=kind, candidate=common["candidate"], batch=args.batch, threads=common["threads"]):
                print(f"{kind}: already in {args.out}, skipped")
                continue
            walls, images[kind] = time_pipe(pipes[kind], args.batch, args.repeats)
            row = {"kind": kind, **common, "median_s": sorted(walls)[len(walls) // 2], "walls_s": walls}
            if kind == "int8":
                row.update({k: v for k, v in pipes["int8"].unet.tmpq_int8.items() if k not in ("layers", "cpu")},
                           fallbacks={r["fqn"]: r["why"] for r in pipes["int8"].unet.tmpq_int8["layers"]
                                      if not r["int8"]})
                if "fake" in images:
                    row["int8_vs_fake_pixel_mse"] = float(((images["int8"] - images["fake"]) ** 2).mean())
            log.append(row)


if __name__ == "__main__":
    main()
