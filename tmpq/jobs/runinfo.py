"""Torch-free reads of a run directory's stages beyond the search log (calibration, validation, exports) and the
status of all of them (``tmpq status``).

The run reader (:mod:`tmpq.jobs.run`) serves these to users; ``tmpq status`` imports only this module, so that it
answers in about a second: the run reader validates the run config, whose classes import torch and diffusers
(seconds). Reading never writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tmpq.core.errors import TmpqError
from tmpq.core.fileio import malformed, parse_row, read_json, read_jsonl, read_parquet
from tmpq.search.rundir import RunDir, pareto_frame, results_frame, run_objectives

SUPERNET_FILE = "supernet.safetensors"
PARTIAL_FILE = "supernet.partial.safetensors"  # calibrate_to_file's resumable checkpoint beside it
EXPORT_MANIFEST = "tmpq_export.json"  # tmpq.deploy.bundle.EXPORT_JSON (that module imports torch)
VALIDATED_COLUMNS = ("key", "fid_mean", "fid_std", "kid_mean", "seeds", "n", "fid_proxy", "gbitops", "steps",
                     "timesteps")


def safetensors_metadata(path: Path, what: str) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no torch, no tensor bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n < 100_000_000:
                raise TmpqError(f"{path}: corrupt or truncated {what} (no safetensors header)")
            header = f.read(n)
    except OSError as exc:
        raise TmpqError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    with malformed(path, what):
        meta = json.loads(header).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise TypeError("__metadata__: expected an object")
    return meta


def calibration_state(run_path: Path, config: dict) -> dict:
    """``state``: calibrated (``supernet.safetensors`` complete), calibrating (a resumable checkpoint, with the
    activation-bit options or time groups done so far) or not started."""
    sn, partial = run_path / SUPERNET_FILE, run_path / PARTIAL_FILE
    a_bits = list(config.get("supernet", {}).get("a_bits", []))
    for path, name in ((sn, "supernet file"), (partial, "calibration checkpoint")):
        if not path.is_file():
            continue
        meta = safetensors_metadata(path, name)
        with malformed(path, name):
            prog = json.loads(meta.get("progress", '{"complete": true}'))
            done = {"a_bits_done": list(prog.get("done_a_bits", [])), "groups_done": len(prog.get("done_groups", []))}
        if path == sn and prog.get("complete", False):
            return {"state": "calibrated", "file": path.name}
        return {"state": "calibrating", "file": path.name, "a_bits": a_bits, **done}
    return {"state": "not started", "file": None}


def validated_frame(run_path: Path):
    """The validated points (``RUN/final.parquet``, written by ``tmpq validate``), one row each, readable columns:
    final FID mean / std over seeds at N images, KID, the search proxy, GBitOPs and the schedule (plus class accuracy,
    solver, reuse and the convolution algorithms ``algos`` where the run has them). Empty, with these columns,
    before any validation."""
    import pandas as pd

    path = run_path / "final.parquet"
    if not path.is_file():
        return pd.DataFrame(columns=list(VALIDATED_COLUMNS))
    df = read_parquet(path, "validation summary", ("key", "fid_mean", "fid_std", "bitops", "n", "timesteps"))
    with malformed(path, "validation summary"):
        df = df.assign(gbitops=df["bitops"] / 1e9, steps=[len(t) for t in df["timesteps"]])
    extra = [c for c in ("fp_fid_mean", "class_accuracy_mean", "solver", "order", "reuse", "algos") if c in df]
    return df[[c for c in VALIDATED_COLUMNS if c in df] + extra].reset_index(drop=True)


def winograd_summary(algos) -> str:
    """How many convs of a point run Winograd and at which tile, largest tile first: "F(4,3) x 7, F(2,3) x 3";
    "all direct" for none (``algos``: a row's list, one tile per eligible conv, 0 = direct; empty or NaN = all
    direct)."""
    vals = [int(m) for m in algos] if isinstance(algos, (list, tuple)) or hasattr(algos, "tolist") else []
    counts = {m: vals.count(m) for m in sorted(set(vals) - {0}, reverse=True)}
    return ", ".join(f"F({m},3) x {n}" for m, n in counts.items()) or "all direct"


ROW_FIELDS = {"key": str, "seed": int, "n": int, "settings": str, "fid": (int, float), "bitops": (int, float),
               "fid_proxy": (int, float), "timesteps": list, "bits": list}


def final_row(line: str) -> dict:
    """One row of ``final/rows.jsonl``; a row without the fields the summary reads raises (one line via RowLog)."""
    row = parse_row(line)
    for name, kind in ROW_FIELDS.items():
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            raise TypeError(f"{name}: expected {getattr(kind, '__name__', 'a number')}, got {type(row[name]).__name__}")
    if not isinstance(row.get("kid"), (int, float, type(None))):
        raise TypeError(f"kid: expected a number, got {type(row['kid']).__name__}")
    return row


def validation_rows(run_path: Path) -> list[dict]:
    """Rows of ``RUN/final/rows.jsonl`` (one per validated point and seed; a validation in progress appends them)."""
    path = run_path / "final" / "rows.jsonl"
    if not path.is_file():
        return []
    return read_jsonl(path, final_row, "validation rows")[0]


def export_dirs(run_path: Path) -> list[Path]:
    """Where a run's exports live: ``RUN/export`` (``tmpq run``) and ``RUN/exports/*`` (``Run.export``, and the
    commands the report gives)."""
    sub = run_path / "exports"
    return [run_path / "export", *(sorted(p for p in sub.iterdir() if p.is_dir()) if sub.is_dir() else [])]


def find_exports(run_path: Path, fingerprint: str | None):
    """The exports of this run (the manifest's run fingerprint is this run's), as a DataFrame: key, path, and where
    its quantizers came from (the validated re-calibration or the search supernet)."""
    import pandas as pd

    rows = []
    for d in export_dirs(run_path):
        manifest = d / EXPORT_MANIFEST
        if not manifest.is_file():
            continue
        data = read_json(manifest, "export manifest")
        with malformed(manifest, "export manifest"):
            prov = data["provenance"]
            if prov.get("run_fingerprint") != fingerprint:
                continue
            rows.append({"key": str(prov["candidate"]), "path": str(d), "quantizers": str(prov.get("quantizers", ""))})
    return pd.DataFrame(rows, columns=["key", "path", "quantizers"])


def run_status(run) -> dict:
    """Where a run stands, read-only: calibration, the search (evaluations done and failed, per generation: count,
    failures, evaluation seconds summed over workers, best proxy so far; the front's best points; how long ago the
    log was last written), validation (points and seeds scored) and exports. ``run``: a run directory or a ``Run``."""
    path = Path(getattr(run, "path", run))
    rd = RunDir.open(path)
    cfg = rd.config()
    ev = results_frame(rd.replay())
    gens = int(cfg.get("search", {}).get("generations", 0))
    per_gen = []
    best = float("inf")
    for g in sorted(ev["generation"].unique()) if len(ev) else []:
        rows = ev[ev["generation"] == g]
        ok = rows[rows["status"] == "ok"]
        if len(ok) and "fid_proxy" in ok:
            best = min(best, float(ok["fid_proxy"].min()))
        per_gen.append({"generation": int(g), "evaluations": int(len(rows)),
                        "failed": int((rows["status"] != "ok").sum()),
                        "eval_s": round(float(rows["wall_s"].sum()), 1), "best_proxy": best,
                        # the largest worker peak resident memory its rows recorded (0: rows before it was logged)
                        "peak_mib": float(rows["peak_mib"].max()) if "peak_mib" in rows else 0.0})
    front = pareto_frame(ev, run_objectives(cfg))
    cols = [c for c in ("key", "fid_proxy", "bitops", "latency_s", "steps", "solver") if c in front]
    age = time.time() - rd.log_path.stat().st_mtime if rd.log_path.is_file() else None
    done = len(per_gen) >= gens > 0 and per_gen[-1]["generation"] == gens - 1
    val_rows = validation_rows(path)
    validated = validated_frame(path)
    exports = find_exports(path, cfg.get("fingerprint"))
    return {"run": str(path), "engine": cfg.get("search", {}).get("engine"), "generations": gens,
            "calibration": calibration_state(path, cfg),
            "generations_logged": len(per_gen), "evaluations": int(len(ev)),
            "failed": int((ev["status"] != "ok").sum()) if len(ev) else 0, "per_generation": per_gen,
            "front_size": int(len(front)), "best": front.sort_values("fid_proxy")[cols].head(5).to_dict("records")
            if len(front) else [], "last_write_s_ago": None if age is None else round(age, 1),
            "state": "finished" if done else "running or stopped",
            "validation": {"points": int(len(validated)), "points_scored": len({r["key"] for r in val_rows}),
                           "rows": len(val_rows),
                           "best": validated.sort_values("fid_mean")[["key", "fid_mean", "gbitops"]].head(1)
                           .to_dict("records")[0] if len(validated) else None},
            "exports": exports.to_dict("records")}


def status_text(st: dict) -> str:
    """``tmpq status`` for a person: one line per stage, then the generations and the front's best points."""
    import pandas as pd

    cal = st["calibration"]
    if cal["state"] == "calibrating":
        part = (f"{len(cal['a_bits_done'])}/{len(cal['a_bits'])} activation-bit options" if cal["a_bits_done"]
                else f"{cal['groups_done']} time groups")
        cal_line = f"calibrating ({part} done, {cal['file']})"
    else:
        cal_line = f"{cal['state']}" + (f" ({cal['file']})" if cal["file"] else "")
    age = "" if st["last_write_s_ago"] is None else f", log written {st['last_write_s_ago']:.0f} s ago"
    val = st["validation"]
    if val["points"]:
        b = val["best"]
        val_line = (f"{val['points']} points validated ({val['rows']} point-seed rows); best final FID "
                    f"{b['fid_mean']:.4g} at {b['gbitops']:.3g} GBitOPs ({b['key']})")
    elif val["rows"]:
        val_line = f"in progress: {val['points_scored']} points scored ({val['rows']} point-seed rows)"
    else:
        val_line = "none yet (tmpq validate RUN)"
    exp_line = ", ".join(f"{e['key']} in {e['path']}" for e in st["exports"]) or "none yet (tmpq export RUN ...)"
    lines = [f"{st['run']}:",
             f"  calibration: {cal_line}",
             f"  search: {st['engine']}, generation {st['generations_logged']}/{st['generations']} logged, "
             f"{st['evaluations']} evaluations ({st['failed']} failed), front {st['front_size']}; {st['state']}{age}",
             f"  validation: {val_line}",
             f"  exports: {exp_line}"]
    for g in st["per_generation"]:
        peak = f", worker peak memory {g['peak_mib']:.0f} MiB" if g.get("peak_mib") else ""
        lines.append(f"  generation {g['generation'] + 1}: {g['evaluations']} evaluations ({g['failed']} failed), "
                     f"{g['eval_s']:.0f} evaluation-s, best proxy so far {g['best_proxy']:.4g}{peak}")
    if st["best"]:
        lines.append("best points (lowest proxy on the front):")
        lines.append(pd.DataFrame(st["best"]).to_string(index=False))
    return "\n".join(lines)


def print_status(run_path: str | Path, as_json: bool = False) -> None:
    """What ``tmpq status RUN [--json]`` prints."""
    st = run_status(Path(run_path))
    print(json.dumps(st, indent=2) if as_json else status_text(st))

