"""``tmpq export``: write the deployable bundle of one searched candidate (format: :mod:`tmpq.deploy.bundle`)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from tmpq.core.adapters import adapter_for, bind_like, decoder_cost
from tmpq.core.candidate import Candidate, Solver
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_directory, file_sha256, malformed, read_json, read_parquet
from tmpq.core.model import ModelConfig, load_model, save_pipeline_dir
from tmpq.core.runlock import lock_inside
from tmpq.core.sampler import make_scheduler
from tmpq.core.flow_solvers import FlowRespaced
from tmpq.core.solvers import CLASSES, STOCK
from tmpq.core.version import __version__
from tmpq.deploy.bundle import EXPORT_FORMAT, EXPORT_JSON, EXPORT_VERSION, QUANT_FILE
from tmpq.jobs.run import load_run
from tmpq.supernet import QuantSupernet
from tmpq.supernet.store import read_supernet_file


def _select_state(net, layer_bits: dict[str, tuple[int, int]],
                  layer_algos: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Quantizer tensors of the chosen option of every layer, re-indexed to option 0 (a Winograd layer's: its tile's
    ``U`` grid of that weight option and ``V`` ranges of that activation option, as tile 0)."""
    state = net.quantizer_state()
    out = {}
    for fqn, layer in net.layers.items():
        w, a = layer_bits[fqn]
        wi, ai = list(layer.w_bits).index(w), list(layer.a_bits).index(a)
        for kind, idx in (("w_quant", wi), ("a_quant", ai), ("a_quant_split", ai)):
            prefix = f"{fqn}.{kind}.{idx}."
            for k, v in state.items():
                if k.startswith(prefix):
                    out[f"{fqn}.{kind}.0.{k[len(prefix):]}"] = v
        m = (layer_algos or {}).get(fqn)
        if m:
            ti = layer.wino_tiles.index(m)
            prefix = f"{fqn}.wino.{ti}.u_quant.{wi}."
            out.update({f"{fqn}.wino.0.u_quant.0.{k[len(prefix):]}": v for k, v in state.items()
                        if k.startswith(prefix)})
            for side in ("v_lo", "v_hi"):
                out[f"{fqn}.wino.0.{side}"] = state[f"{fqn}.wino.{ti}.{side}"][ai:ai + 1].clone()
    return out


def ensure_export(run_path: str | Path, key: str, out: str | Path, command: str = "", pick: dict | None = None) -> Path:
    """``out`` holding the export of candidate ``key``: kept when it already is, else (re)written (``pick``: as in
    :func:`export_candidate`). Resumable jobs (``tmpq run``, benchmarks) call this instead of re-exporting on every
    rerun."""
    out = Path(out)
    manifest = out / EXPORT_JSON
    if manifest.is_file():
        data = read_json(manifest, "export manifest")
        with malformed(manifest, "export manifest"):
            if data["provenance"]["candidate"] == key:
                return out
    with lock_inside(out, "export"):  # an export inside a run (tmpq run's RUN/export) is written by its one writer
        if out.exists():
            shutil.rmtree(out)
        export_candidate(run_path, key, out, command=command, pick=pick)
    return out


def export_candidate(run_path: str | Path, key: str, out: str | Path, command: str = "",
                     pick: dict | None = None) -> dict:
    """Write the export of candidate ``key`` of a search run to ``out`` (atomically: a crash leaves no half export).
    ``pick``: the rule that chose ``key`` and the figures it used (:func:`tmpq.jobs.pick.pick_fastest_within`),
    recorded as ``provenance.pick``; an export chosen by key or budget has no such entry (as before).

    Returns the export manifest (the content of ``tmpq_export.json``).
    """

    run = load_run(run_path)
    out = _checked_out(Path(out))
    ev = run.evaluations
    rows = ev[(ev["key"] == key) & (ev["status"] == "ok")] if len(ev) else ev
    if len(rows) == 0:
        known = ", ".join(run.pareto()["key"].head(5).tolist()) if len(ev) else "none"
        raise TmpqError(f"--candidate {key}: no successful evaluation with this key in {run.path} "
                        f"(Pareto keys: {known})")
    row = rows.iloc[-1]
    cfg = run.config
    sn_file = run.path / "supernet.safetensors"
    meta, _ = read_supernet_file(sn_file, tensors=False)
    model_cfg = ModelConfig(**cfg["model"])
    model_path = model_cfg.path
    cand = Candidate.from_dict(row)
    if cand.per_group:
        raise TmpqError("export: per-time-group bits are not exportable yet (format v1 has one allocation)")
    timesteps = list(cand.timesteps)
    branch = int(cfg.get("search", {}).get("reuse_branch", 0))
    m = load_model(model_cfg)
    adapter = adapter_for(m.unet)
    conditioning = {"kind": adapter.kind(m.unet), "null_label": adapter.null_label(m.unet),
                    "classes": adapter.classes(m.unet)}
    if conditioning["kind"] == "text":  # what tmpq sample conditions on (a stock pipeline takes its own prompts)
        conditioning["prompts"] = list(model_cfg.prompts)
    decoder = decoder_cost(m.unet)  # a latent model's FP VAE decoder, reported beside the searched denoiser
    fp_unet = copy.deepcopy(m.unet)  # the FP weights the export directory carries (m.unet gets wrapped below)
    bind_like(fp_unet, m.unet)  # with the model's VAE and text encoder (not copied)
    validated = run.path / "final" / f"{key}.safetensors"
    if validated.is_file():
        # tmpq validate re-calibrated this point at exactly its bits along its own schedule: export that state
        pinned = QuantSupernet.from_file(m.unet, validated)
        layer_bits = {fqn: tuple(wa[:2]) for fqn, wa in pinned.config.pin.items()}
        layer_algos = {fqn: int(wa[2]) for fqn, wa in pinned.config.pin.items() if len(wa) == 3}
        source = "validated (tmpq validate: re-calibrated at this allocation along this schedule)"
    else:
        net = QuantSupernet.from_file(copy.deepcopy(fp_unet), sn_file)
        bits = list(cand.bits)
        layer_bits = net.layer_bits(bits)
        layer_algos = net.layer_algos(cand.algos)
        state = _select_state(net, layer_bits, layer_algos)
        # the pinned single-option supernet over the FP model: its file verifies on load
        pinned = QuantSupernet(m.unet, net.pinned_config(bits, cand.algos))
        pinned.time_starts = list(net.time_starts)  # the same timestep groups (banks re-indexed with the options)
        missing, unexpected = pinned.unet.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".w_quant." in k or ".a_quant" in k or ".wino." in k]
        if missing or unexpected:  # pragma: no cover - a bug, not a user error
            raise TmpqError(f"export: quantizer state does not fit ({missing[:2]}, {unexpected[:2]})")
        source = "search supernet (shared weights, not re-calibrated)"

    wrapped = set(pinned.layers)
    convertible = [n for n, mod in pinned.unet.named_modules()
                   if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and not any(
                       n == w or n == f"{w}.module" for w in wrapped)]
    sched = make_scheduler(m.scheduler_config, *cand.solver)
    axis = m.time_axis
    # staged beside --out (missing parents created, plain directory modes), renamed into place; a failure leaves
    # nothing behind, and a full disk or read-only target is one line naming --out
    with lock_inside(out, "export"), atomic_directory(out, "export") as tmp:  # inside a run: its writer lock
        save_pipeline_dir(fp_unet, m.scheduler_config, tmp)
        pinned.save(tmp / QUANT_FILE)
        layers = {}
        for info in pinned.infos:
            lay = pinned.layers[info.fqn]
            w, a = layer_bits[info.fqn]
            layers[info.fqn] = {"w_bits": w, "a_bits": a, "granularity": lay.w_quant[0].granularity,
                                "w_symmetric": lay.w_quant[0].symmetric, "a_symmetric": lay.a_quant[0].symmetric,
                                "group_size": getattr(lay.w_quant[0], "group_size", None), "split": info.split,
                                "kind": info.kind, "macs": info.macs,
                                **({"winograd": layer_algos[info.fqn]} if info.fqn in layer_algos else {})}
        objectives = {k: float(row[k]) for k in ("fid_proxy", "bitops", "size_mb", "paired_feat",
                                                 "paired_pixel_mse") if k in row and row[k] == row[k]}
        final = run.path / "final.parquet"
        if validated.is_file() and final.is_file():
            fr = read_parquet(final, "validation summary", ("key", "fid_mean", "seeds", "n"))
            fr = fr[fr["key"] == key]
            if len(fr):
                r = fr.iloc[0]
                objectives.update({"final_fid_mean": float(r["fid_mean"]), "final_fid_seeds": int(r["seeds"]),
                                   "final_n": int(r["n"]),  # and every other metric validation computed
                                   **{f"final_{k}": float(r[k]) for k in ("fid_std", "kid_mean", "class_accuracy_mean")
                                      if k in r and r[k] is not None and r[k] == r[k]}})  # None: not computed
        manifest = {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "sampler": {**_sampler_classes(cand.solver, sched), "config": dict(sched.config), "timesteps": timesteps,
                        "eta": 0.0, "guidance_scale": m.guidance_scale, "denoiser_calls": cand.calls,
                        **({"reuse": {"branch": branch, "calls": list(cand.reuse)}} if cand.reuse else {}),
                        **({"time_axis": dataclasses.asdict(axis)} if axis.flow else {})},
            "conditioning": conditioning,
            **({"decoder": decoder} if decoder is not None else {}),
            "layers": layers,
            "modules_to_not_convert": convertible,
            "supernet_config": json.loads(pinned.config.to_json()),
            "metrics": {**objectives, "proxy": row.get("proxy") if "proxy" in row else None},
            "provenance": {"run": run.path.name,
                           "candidate": key, "run_fingerprint": cfg.get("fingerprint"), "quantizers": source,
                           "model_fingerprint": pinned.fingerprint, "model": model_path,
                           "search_supernet_format": meta.get("format"), "tmpq_version": __version__,
                           "command": command, **({"pick": pick} if pick is not None else {})},
        }
        manifest["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file()}
        (tmp / EXPORT_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n")
    return json.loads((out / EXPORT_JSON).read_text())


def _checked_out(out: Path) -> Path:
    """``--out`` as the export will be written to: refused (before any work) when it is a dangling symbolic link, a
    file, or a non-empty directory; a link to an empty directory is followed (staging happens beside its target)."""
    if out.is_symlink():
        if not out.exists():
            raise TmpqError(f"--out {out} is a dangling symbolic link (to {os.readlink(out)})")
        out = Path(os.path.realpath(out))
    if out.exists() and not out.is_dir():
        raise TmpqError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise TmpqError(f"--out {out} exists and is not empty")
    return out


def _sampler_classes(solver: Solver, sched) -> dict:
    """The export's sampler entry naming its classes (and, beyond DDIM, the solver and its order); a flow model's
    always names its flow solver (DDIM is Euler there)."""
    if isinstance(sched, FlowRespaced):
        stock = next(c for c in type(sched).__mro__[1:] if c.__module__.startswith("diffusers."))
        return {"class": f"{type(sched).__module__}.{type(sched).__name__}", "base_class": f"diffusers.{stock.__name__}",
                "solver": sched.solver, "order": int(getattr(sched.config, "solver_order", None) or solver.order)}
    if solver.is_default:  # as exports before solvers said
        return {"class": "tmpq.core.sampler.RespacedDDIMScheduler", "base_class": "diffusers.DDIMScheduler"}
    cls = CLASSES[solver.name]
    return {"class": f"{cls.__module__}.{cls.__name__}", "base_class": f"diffusers.{STOCK[solver.name].__name__}",
            **solver.fields()}


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


