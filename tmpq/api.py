"""The Python face's jobs: search, validate, export and the main job, from a model in memory or on disk.

``import tmpq`` exposes every name here lazily (``tmpq.search``, ``tmpq.run``, ...); this module imports the jobs
(torch, diffusers) and is loaded on first use. ``model`` everywhere is a live diffusers pipeline, a
:class:`~tmpq.core.handle.DiffusionModel`, a local model directory (or ``"embedded"``), or ``None`` (the config's
``model.path``); ``config`` a :class:`~tmpq.jobs.config.RunConfig`, a preset name, a TOML path, a dict or ``None``.

Example:
    >>> import tmpq
    >>> from diffusers import DDPMPipeline
    >>> pipe = DDPMPipeline.from_pretrained(tmpq.DiffusionModel.embedded_dir())   # doctest: +SKIP
    >>> run = tmpq.search(pipe, tmpq.RunConfig.preset("tiny"), "runs/quick")   # doctest: +SKIP
    >>> tmpq.apply_export(pipe, tmpq.export(run, out="runs/quick-export"))   # doctest: +SKIP
    >>> images = pipe(batch_size=4).images   # the searched schedule and bits   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from tmpq.core.adapters import DenoiserAdapter, register_adapter
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import malformed, read_json
from tmpq.core.handle import DiffusionModel
from tmpq.deploy.bundle import EXPORT_JSON, apply_export, load_export, read_export
from tmpq.jobs.config import RunConfig, resolve_config
from tmpq.jobs.export import ensure_export, export_candidate
from tmpq.jobs.main import MainJobConfig, main_job
from tmpq.jobs.pick import pick_fastest_within, pick_key
from tmpq.jobs.run import Run, load_run
from tmpq.jobs.search import run_search
from tmpq.jobs.validate import ValidateConfig, validate_run
from tmpq.search.pick import check_rule
from tmpq.supernet.store import read_supernet_file

__all__ = ["DenoiserAdapter", "DiffusionModel", "Run", "RunConfig", "apply_export", "export", "load_export",
           "load_run", "pick", "read_export", "register_adapter", "run", "search", "validate"]


def _handle(model) -> DiffusionModel | str | None:
    """A model argument as a handle (held in memory), a directory path (loaded by the jobs) or None."""
    if model is None or isinstance(model, DiffusionModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return DiffusionModel.from_pipeline(model)


def _bind(model, config) -> tuple[RunConfig, contextlib.AbstractContextManager]:
    """The run config with ``model`` in its ``[model]`` section, and the context that serves a model in memory."""
    cfg = resolve_config(config)
    handle = _handle(model)
    if handle is None:
        return cfg, contextlib.nullcontext()
    if isinstance(handle, str):
        return cfg.with_(**{"model.path": handle}), contextlib.nullcontext()
    cfg = dataclasses.replace(cfg, model=handle.config(cfg.model))
    if handle.live and cfg.executor.kind == "ray":
        raise TmpqError(f"executor.kind: Ray workers load the model from model.path, and {handle.source} lives only "
                        "in this Python session; use the local executor, or save the pipeline and pass its directory")
    return cfg, handle.serving()


def _run_path(run) -> Path:
    return Path(run.path if isinstance(run, Run) else run)


def _serve_for(run_path: Path, model) -> contextlib.AbstractContextManager:
    """The context that serves ``model`` to a job over an existing run: it must be the run's model (its source and,
    against the run's supernet file, its weights)."""
    handle = _handle(model)
    if handle is None:
        return contextlib.nullcontext()
    if isinstance(handle, str):
        handle = DiffusionModel.load(handle)
    cfg = load_run(run_path).config
    if handle.source != cfg["model"]["path"]:
        raise TmpqError(f"model: the run {run_path} searched model.path {cfg['model']['path']}, not {handle.source}")
    sn_file = run_path / "supernet.safetensors"
    meta, _ = read_supernet_file(sn_file, tensors=False)
    if meta.get("model_fingerprint") != handle.fingerprint:
        raise TmpqError(f"model: its weights differ from those the run {run_path} searched (fingerprint "
                        f"{handle.fingerprint[:12]} vs {str(meta.get('model_fingerprint'))[:12]})")
    return handle.serving()


def search(model, config=None, run_dir: str | os.PathLike = "results/runs/default", *, progress: bool = True) -> Run:
    """Calibrate the supernet and search (``tmpq search``); a ``run_dir`` that already holds a run resumes it (a run
    of another config or model is refused). Returns the run, read-only (:class:`tmpq.jobs.run.Run`)."""
    cfg, served = _bind(model, config)
    run_path = Path(run_dir)
    with served:
        run_search(cfg, run_path, resume=(run_path / "config.resolved.json").is_file(), progress=progress)
    return load_run(run_path)


def validate(run, *, model=None, progress: bool = True, **options):
    """Re-calibrate and score points of a run with large-N FID (``tmpq validate``); ``options`` are
    :class:`tmpq.jobs.validate.ValidateConfig` fields (``top_k``, ``n``, ``seeds``, ``keys``, ...). A run of a
    ``live:`` model needs that ``model`` again. Returns the validated points (a DataFrame)."""
    run_path = _run_path(run)
    names = {f.name for f in dataclasses.fields(ValidateConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TmpqError(f"validate: unknown option {unknown[0]} (known: {', '.join(sorted(names))})")
    if "seeds" in options or "keys" in options:
        options = {**options, **{k: tuple(options[k]) for k in ("seeds", "keys") if k in options}}
    with _serve_for(run_path, model):
        return validate_run(run_path, ValidateConfig(**options), progress=progress)


def _picked(run, budget: str | None, rule: str | None, ratio, reference, progress: bool = False):
    """``(key, figures)`` of :func:`pick` (figures: the rule's, ``None`` for the budget pick)."""
    if rule is None:
        if ratio is not None or reference is not None:
            raise TmpqError("pick: ratio and reference apply to a rule (rule='fastest-within')")
        return pick_key(run, budget), None
    check_rule(rule, "rule")
    if budget is not None:
        raise TmpqError("pick: give a budget or a rule, not both")
    if ratio is None:
        raise TmpqError(f"pick: the rule {rule} needs a FID ratio (ratio=1.1)")
    figures = pick_fastest_within(run, ratio, reference, progress=progress)
    return figures["key"], figures


def pick(run, budget: str | None = None, *, rule: str | None = None, ratio: float | None = None,
         reference: float | None = None) -> str:
    """The key of the point to export. By default the main job's: under ``budget`` (``None``: the run's
    ``search.bitops_budget``) the validated point of lowest mean FID, or, before any validation, the point of lowest
    proxy on the front within it (the one the main job validates first).

    ``rule="fastest-within", ratio=R``: among the validated points whose mean FID is within ``R`` x the reference
    FID, the one of lowest predicted latency per image (the run's latency table; a BitOPs run gets one measured on
    this CPU and stored as ``RUN/latency.json``). The reference is ``reference`` when given, else the lowest FP FID
    on any validated point's own schedule (``fp_fid_mean``). See :func:`tmpq.search.pick.fastest_within`."""
    return _picked(run, budget, rule, ratio, reference)[0]


def export(run, key: str | None = None, out: str | os.PathLike | None = None, *, model=None,
           budget: str | None = None, rule: str | None = None, ratio: float | None = None,
           reference: float | None = None) -> Path:
    """Export candidate ``key`` of a run (``tmpq export``; ``None``: :func:`pick` under ``budget``, by default the
    run's ``search.bitops_budget`` as the main job, or by ``rule`` / ``ratio`` / ``reference``, recorded in the
    manifest's provenance) to ``out``
    (``None``: ``RUN/export``, where the main job puts it; an ``out`` that holds this key's export is kept, any
    other non-empty one refused). Returns the export directory, for :func:`tmpq.apply_export`."""
    run_path = _run_path(run)
    if key is not None and (budget is not None or rule is not None):
        raise TmpqError("export: give a key, a budget or a rule, not several")
    with _serve_for(run_path, model):
        figures = None
        if key is None:
            key, figures = _picked(run_path, budget, rule, ratio, reference)
        if out is None:
            return ensure_export(run_path, key, run_path / "export", command="tmpq.export", pick=figures)
        out = Path(out)
        manifest = out / EXPORT_JSON
        if manifest.is_file():
            with malformed(manifest, "export manifest"):
                if read_json(manifest, "export manifest")["provenance"]["candidate"] == key:
                    return out
        export_candidate(run_path, key, out, command="tmpq.export", pick=figures)
        return out


def run(model, config=None, run_dir: str | os.PathLike = "results/runs/demo", *, progress: bool = True,
        **job) -> dict:
    """The main job (``tmpq run``): calibrate, search, validate, export, report; resumable. ``job`` are
    :class:`tmpq.jobs.main.MainJobConfig` fields (``top_k``, ``validate_n``, ``seeds``, ``budget``, ``pick``:
    ``"fastest-within 1.10"`` exports the fastest validated point within 1.10 x the FP reference FID). Returns its
    summary: ``{"run", "report", "export", "best", "timings"}``."""
    names = {f.name for f in dataclasses.fields(MainJobConfig)}
    unknown = sorted(set(job) - names)
    if unknown:
        raise TmpqError(f"run: unknown option {unknown[0]} (known: {', '.join(sorted(names))})")
    if "seeds" in job:
        job = {**job, "seeds": tuple(job["seeds"])}
    cfg, served = _bind(model, config)
    with served:
        return main_job(cfg, Path(run_dir), MainJobConfig(**job), progress=progress)
