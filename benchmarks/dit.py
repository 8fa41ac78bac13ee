"""The embedded DiT's report (issue 20): results/dit/README.md rebuilt from committed rows only.

    .venv/bin/python -m benchmarks.dit --keep-run results/runs/dit   # copy a finished `tmpq run` of configs/dit.toml
    .venv/bin/python -m benchmarks.dit                               # rewrite README.md from the rows

Inputs (all under results/dit/): ``guidance/g*.json`` (``tmpq fid`` outputs of the guidance tuning), ``baseline/``
(``benchmarks.baseline --model embedded-dit``: its rows and README), ``raw/run.jsonl.gz`` + ``raw/run.final.jsonl`` +
``raw/main_job.json`` (the main job's evaluation log, validation rows and summary, copied by ``--keep-run``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

from benchmarks.common import findings

OUT = Path("results/dit")


def keep_run(run: Path, out: Path) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "run.jsonl.gz").write_bytes(gzip.compress((run / "evaluations.jsonl").read_bytes(), mtime=0))
    shutil.copyfile(run / "final" / "rows.jsonl", raw / "run.final.jsonl")
    shutil.copyfile(run / "main_job.json", raw / "main_job.json")
    shutil.copyfile(run / "config.resolved.json", raw / "config.resolved.json")


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def write_report(out: Path) -> None:
    man = json.loads(Path("tmpq/assets/mnist16-dit/manifest.json").read_text())
    lines = ["# The embedded class-conditional DiT (issue 20)", "", *findings(out),
             f"Model: `tmpq/assets/mnist16-dit`, a `DiTTransformer2DModel` in pixel space on the 16x16 digits "
             f"({man['parameters'] / 1e6:.2f} M parameters, patch 2, null label 10 from label dropout "
             f"{man['config']['label_dropout']}), trained by `{man['command']}` (EMA weights, final loss "
             f"{man['metrics']['final_loss_mean_last100']:.4f}; {man['metrics']['train_wall_s'] / 3600:.1f} h of "
             "wall clock summed over the sessions it resumed across, most of it on a shared CPU: not a timing). "
             "Class accuracy: the domain classifier's (`tmpq/assets/mnist16-classifier`, held-out accuracy "
             "0.978 on real digits) accuracy on generated digits against the requested class (image i asks for "
             "class i mod 10).", ""]
    g = sorted((json.loads(p.read_text()) for p in (out / "guidance").glob("g*.json")),
               key=lambda d: d["rows"][0].get("guidance_scale", 1.0))
    if g:
        r0 = g[0]["rows"][0]
        lines += ["## Guidance scale", "", f"FP model, uniform DDIM {r0['steps']} steps, N = {r0['n']}, noise seed "
                  f"{r0['seed']} (apart from the evaluation seed 0); decided before the runs: the scale of "
                  "`configs/dit.toml` is the lowest-FID one among 1.5, 2, 3, 4.", "",
                  "| guidance | FID | class accuracy |", "|---:|---:|---:|"]
        for d in g:
            r = d["rows"][0]
            lines.append(f"| {r.get('guidance_scale', 1.0):g} | {r['fid']:.4f} | {r['class_accuracy']:.3f} |")
        lines += ["", "Command per row: `" + g[0]["command"] + "` (with each `--guidance`).", ""]
    bl = out / "baseline" / "rows.jsonl"
    if bl.is_file():
        rows = sorted((r for r in _rows(bl) if r["kind"] == "fid"),
                      key=lambda r: (r.get("guidance_scale", 1.0), r["steps"]))
        if rows:
            lines += ["## FP baseline", "", f"Uniform DDIM, N = {rows[0]['n']}, noise seed {rows[0]['seed']}; full "
                      "report with KID, throughput and sample grids: [baseline/README.md](baseline/README.md).", "",
                      "| guidance | steps | FID | class accuracy |", "|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r.get('guidance_scale', 1.0):g} | {r['steps']} | {r['fid']:.4f} | "
                             f"{r.get('class_accuracy', float('nan')):.3f} |")
            lines.append("")
    mj = out / "raw" / "main_job.json"
    if mj.is_file():
        s = json.loads(mj.read_text())
        cfg = json.loads((out / "raw" / "config.resolved.json").read_text())
        ev = [json.loads(x) for x in gzip.decompress((out / "raw" / "run.jsonl.gz").read_bytes()).decode().splitlines()]
        fin = _rows(out / "raw" / "run.final.jsonl")
        t = s["timings"]
        lines += ["## The main job on the DiT", "", "`tmpq run --config configs/dit.toml --run-dir results/runs/dit` "
                  f"(guidance {cfg['model']['guidance_scale']:g}; {len(ev)} evaluations, "
                  f"{sum(r['status'] == 'ok' for r in ev)} ok; validation N = {fin[0]['n'] if fin else '-'} x seeds "
                  f"{sorted({r['seed'] for r in fin})}): **{sum(t.values()) / 60:.1f} min** wall clock alone on the "
                  "machine below (" + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in t.items()) + ").", "",
                  "| point | steps | GBitOPs | proxy FID@128 | FID (mean of seeds) | class accuracy |",
                  "|---|---:|---:|---:|---:|---:|"]
        by = {}
        for r in fin:
            by.setdefault(r["key"], []).append(r)
        for key, rs in sorted(by.items(), key=lambda kv: kv[1][0]["bitops"]):
            fid = sum(r["fid"] for r in rs) / len(rs)
            acc = sum(r.get("class_accuracy", float("nan")) for r in rs) / len(rs)
            best = " (exported)" if key == s["best"]["key"] else ""
            lines.append(f"| `{key}`{best} | {len(rs[0]['timesteps'])} | {rs[0]['bitops'] / 1e9:.3g} | "
                         f"{rs[0]['fid_proxy']:.4g} | {fid:.4f} | {acc:.3f} |")
        lines += ["", "Raw rows: `raw/run.jsonl.gz` (every evaluation), `raw/run.final.jsonl` (validation), "
                  "`raw/main_job.json` (timings, best point), `raw/config.resolved.json`.", ""]
    subs = [(d, title) for d, title in (
        ("supernet", "Supernet on the DiT without guidance: uniform W8A8 vs FP at 100 uniform DDIM steps"),
        ("supernet-g1.5", "Supernet on the DiT at guidance 1.5: fidelity (shared vs per-allocation calibration), "
                          "sampling cost, shared vs separate guidance-pass activation ranges"),
        ("search", "Search front on the DiT at guidance 1.5 vs the uniform baselines and random search, 3 seeds"),
        ("diag", "Where the DiT's W8A8 error comes from (paired pixel MSE per layer), before and after pinning its "
                 "conditioning path"))
        if (out / d / "README.md").is_file()]
    if subs:
        lines += ["## Further reports", "", *(f"- [{d}/README.md]({d}/README.md): {title}" for d, title in subs), ""]
    machine = next((r.get("machine") for r in (_rows(bl) if bl.is_file() else []) if r.get("machine")), None)
    if machine:
        lines += ["## Machine", "", f"- {machine}", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--keep-run", default="", help="copy this finished tmpq run's rows into OUT/raw first")
    args = ap.parse_args()
    out = Path(args.out)
    if args.keep_run:
        keep_run(Path(args.keep_run), out)
    write_report(out)
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
