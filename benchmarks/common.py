"""Helpers shared by the benchmark scripts (the row log lives in :mod:`tmpq.core.rowlog`, which the final evaluator uses
too)."""
import json
from pathlib import Path

from tmpq.core.rowlog import RowLog, command_line, machine

__all__ = ["RowLog", "baseline_fp_row", "calibrated_supernet", "command_line", "findings", "keep_gzip", "keep_raw", "log_proxy", "machine",
           "kept_evaluations", "read_gzip", "run_evaluations"]


def findings(out: Path) -> list[str]:
    """The hand-written reading of a report's numbers (``OUT/FINDINGS.md``), kept across report rewrites: placed
    under the report's title when present."""
    f = Path(out) / "FINDINGS.md"
    return [f.read_text().strip(), ""] if f.is_file() else []


def baseline_fp_row(rows: Path, steps: int, n: int | None = None, seed: int | None = None,
                    guidance: float = 1.0) -> dict:
    """The FP uniform DDIM FID row at ``steps`` and guidance scale ``guidance`` of ``benchmarks.baseline`` (the first
    one, or the one at ``n`` / ``seed`` when given; a row without ``guidance_scale`` was sampled without guidance);
    exits naming the file when there is none."""
    for line in Path(rows).read_text().splitlines():
        r = json.loads(line)
        if (r.get("kind"), r.get("schedule"), r.get("steps")) == ("fid", "uniform", steps) and \
                float(r.get("guidance_scale", 1.0)) == float(guidance) and \
                (n is None or r.get("n") == n) and (seed is None or r.get("seed") == seed):
            return r
    raise SystemExit(f"{rows}: no FP uniform {steps}-step row" + (f" at N = {n}" if n else "")
                     + (f", seed {seed}" if seed is not None else "")
                     + (f", guidance {guidance}" if guidance != 1.0 else "")
                     + " (run python -m benchmarks.baseline first)")


def _raw_path(run_path: Path) -> Path:
    """``OUT/raw/NAME.jsonl.gz`` for the run directory ``OUT/runs/NAME``: the committed copy of its evaluation log."""
    run_path = Path(run_path)
    return run_path.parent.parent / "raw" / f"{run_path.name}.jsonl.gz"


def keep_gzip(src: Path, dst: Path, what: str) -> None:
    """Commit-ready gzip copy of ``src`` (no timestamp: the same file gives the same bytes), written atomically."""
    import gzip

    from tmpq.core.fileio import atomic_write_bytes, read_bytes

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(dst), gzip.compress(read_bytes(Path(src), what), mtime=0))


def read_gzip(src: Path, what: str) -> bytes:
    """The bytes of a ``keep_gzip`` copy; a damaged one is a one-line ``TmpqError`` naming it."""
    import gzip

    from tmpq.core.fileio import malformed, read_bytes

    with malformed(Path(src), what):
        return gzip.decompress(read_bytes(Path(src), what))


def keep_raw(run_path: Path) -> Path:
    """Commit-ready copy of a finished run's evaluation log (``keep_gzip``), so that a report rebuilds from a fresh
    clone, where the run directories (git-ignored) are absent."""
    raw = _raw_path(run_path)
    keep_gzip(Path(run_path) / "evaluations.jsonl", raw, "evaluation log")
    return raw


def run_evaluations(run_path: Path):
    """Every evaluation of a benchmark run as ``tmpq.load_run(...).evaluations`` gives it: from the run directory when
    it is here, else from its committed raw log (``keep_raw``)."""
    from tmpq.core.errors import TmpqError
    from tmpq.jobs.run import load_run

    run_path = Path(run_path)
    if (run_path / "config.resolved.json").is_file():
        return load_run(run_path).evaluations
    raw = _raw_path(run_path)
    if not raw.is_file():
        raise TmpqError(f"neither the run {run_path} nor its raw log {raw} is here")
    return kept_evaluations(raw)


def kept_evaluations(raw: Path):
    """The evaluations frame of a gzip-kept evaluation log (``keep_raw``, or ``benchmarks.final``'s kept run files)."""
    from tmpq.core.fileio import parse_jsonl
    from tmpq.search.rundir import EvalResult, results_frame

    data = read_gzip(raw, "raw evaluation log")
    return results_frame(parse_jsonl(data, raw, EvalResult.from_json, "raw evaluation log")[0])


def log_proxy(p):
    """(proxy, GBitOPs) rows with the proxy on log10: the proxy spans an order of magnitude."""
    import numpy as np

    p = np.asarray(p, dtype=np.float64)
    return np.stack([np.log10(p[:, 0]), p[:, 1]], axis=1)


def cpu_setup(threads: int) -> None:
    """Torch threads and the CPU allocator as the ``tmpq`` commands set them (``tune_cpu_allocator``)."""
    import torch

    from tmpq.core.devices import tune_cpu_allocator

    torch.set_num_threads(threads)
    tune_cpu_allocator()


def calibrated_supernet(cfg, path: Path, label: str = "") -> Path:
    """The supernet of run config ``cfg`` (its model, supernet and calibration settings) calibrated once into
    ``path`` (resumable per option) and kept for every search of a benchmark; an existing file is returned as is.
    ``label`` names it in the timing line (nothing printed without one)."""
    import time

    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.supernet import QuantSupernet
    from tmpq.supernet.calib_data import calibrate_to_file

    path = Path(path)
    if path.is_file():
        return path
    m = load_model(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calibrate_to_file(QuantSupernet(m.unet, cfg.supernet), make_scheduler(m.scheduler_config), path, cfg.calibration)
    if label:
        print(f"calibrated the {label} supernet in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return path
