"""``tmpq report RUN``: one self-contained HTML page (``RUN/report/report.html`` with its PNGs beside it).

- the Pareto plot: every evaluation (proxy vs GBitOPs), the front, uniform W/A baselines at the run's schedule
  scored with the same supernet and proxy, and (when ``tmpq validate`` ran) the final FID of the validated points;
- a sample grid for every front point beside the FP reference (same noise-bank images);
- a heat map of the per-layer weight / activation bits of every front point;
- the front table (each point named P1, P2, ... by BitOPs, its predicted latency per image when the run has a
  latency table, its final FID when validated, the exported point marked, the point ``tmpq export --pick
  fastest-within 1.10`` would choose marked, and the ``tmpq export`` command of every other point);
- a run with the algorithm gene (``supernet.winograd``) only: per front point and validated point, how many convs
  run Winograd at which tile ("F(4,3) x 7, F(2,3) x 3").

Baselines and grids are computed once and cached under ``RUN/report/`` (a rerun only rewrites the page).
"""
from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

import numpy as np

from tmpq.core import runlock
from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes, malformed, read_json, read_parquet
from tmpq.core.grid import save_grid
from tmpq.core.schedules import make_timesteps
from tmpq.jobs.pick import validated_points
from tmpq.jobs.run import load_run
from tmpq.jobs.runinfo import winograd_summary
from tmpq.jobs.search import WorkerSpec, first_generation_seeds
from tmpq.search.pick import REPORT_RATIO, fastest_within
from tmpq.search.rundir import RunDir

GRID_N = 16


def _fmt(v, spec=".4g") -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return html.escape(str(v))


def _evaluator(run_path: Path, cfg: dict):
    spec = WorkerSpec(cfg["model"], str(run_path / "supernet.safetensors"), cfg["proxy"], 2, companions=False,
                      reuse_branch=int(cfg.get("search", {}).get("reuse_branch", 0)))
    return spec()


def _baselines(space, ev_factory, out: Path, logged=None, progress: bool = False) -> list[dict]:
    """Uniform W{max}A{max} / W6A6 / W{min}A{max} at every step choice. A baseline the search already evaluated (its
    uniform seeds are these candidates) is read from the log, the same measurement, not recomputed."""
    cache = out / "baselines.json"
    if cache.is_file():
        rows = read_json(cache, "baselines cache (delete it to recompute)", list)
        with malformed(cache, "baselines cache (delete it to recompute)"):
            for b in rows:
                b["name"], float(b["fid_proxy"]), float(b["bitops"]), int(b["w"]), int(b["a"])
        return rows
    from tqdm.auto import tqdm

    known = {} if logged is None or logged.empty else \
        logged[logged["status"] == "ok"].drop_duplicates("key").set_index("key")["fid_proxy"].to_dict()
    todo = [(w, a, n) for w in space.w_bits for a in space.a_bits
            if (w, a) in {(max(space.w_bits), max(space.a_bits)), (6, 6), (min(space.w_bits), max(space.a_bits))}
            for n in space.step_choices]  # every step count the search could pick
    rows = []
    for w, a, n in tqdm(todo, desc="report: uniform baselines", disable=not progress, leave=False):
        cand = space.uniform_candidate(w, a, steps=n)
        proxy = known.get(cand.key)
        if proxy is None:
            proxy = ev_factory().evaluate(cand)["fid_proxy"]
        rows.append({"name": f"W{w}A{a} {space.groups.kind} DDIM {n}", "w": w, "a": a, "fid_proxy": float(proxy),
                     "bitops": space.bitops(cand)})

    atomic_write_bytes(cache, json.dumps(rows, indent=2).encode())
    return rows


def _grids(front, ev_factory, out: Path, progress: bool = False) -> dict[str, str]:
    """PNG grid per front key (and 'fp' for the teacher), cached by file name."""
    from tqdm.auto import tqdm


    names = {"fp": "grid_fp.png", **{k: f"grid_{k}.png" for k in front["key"]}}
    if all((out / f).is_file() for f in names.values()):
        return names
    ev = ev_factory()

    teacher_ts = make_timesteps(ev.cfg.teacher_schedule, ev.cfg.teacher_steps, ev.scheduler.config.num_train_timesteps)
    save_grid(ev.images(Candidate.fp(teacher_ts), n=GRID_N), out / names["fp"], nrow=8, scale=3)
    for _, p in tqdm(list(front.iterrows()), desc="report: sample grids", disable=not progress, leave=False):
        f = out / names[p["key"]]
        if f.is_file():
            continue
        imgs = ev.images(Candidate.from_dict(p), n=GRID_N)
        save_grid(imgs, f, nrow=8, scale=3)
    return names


def _plot(ev_df, front, baselines, final, out: Path, exported: frozenset[str] = frozenset()) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ev_df[ev_df["status"] == "ok"]
    fig, axes = plt.subplots(1, 2 if final is not None else 1, figsize=(11 if final is not None else 6.5, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    ax.scatter(ok["bitops"] / 1e9, ok["fid_proxy"], s=8, color="0.75", label="evaluated")
    f = front.sort_values("bitops")
    ax.step(f["bitops"] / 1e9, f["fid_proxy"], where="post", color="C0", lw=1.5, label="Pareto front")
    ax.scatter(f["bitops"] / 1e9, f["fid_proxy"], s=18, color="C0")
    ex = f[f["key"].isin(exported)]
    if len(ex):
        ax.scatter(ex["bitops"] / 1e9, ex["fid_proxy"], marker="*", s=160, color="C1", edgecolor="k", zorder=5,
                   label="exported")
    for b in baselines:
        ax.scatter(b["bitops"] / 1e9, b["fid_proxy"], marker="x", s=50, color="C3")
        ax.annotate(f"W{b['w']}A{b['a']}", (b["bitops"] / 1e9, b["fid_proxy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GBitOPs per image (whole schedule)")
    ax.set_ylabel("search proxy (lower is better)")
    ax.set_yscale("log")
    ax.set_title("search: proxy vs BitOPs (x: uniform baselines)")
    ax.legend(fontsize=8)
    if final is not None:
        ax2 = axes[0][1]
        fs = final.sort_values("bitops")
        ax2.errorbar(fs["bitops"] / 1e9, fs["fid_mean"], yerr=fs["fid_std"].fillna(0), fmt="o-", color="C2",
                     label=f"validated FID (N = {int(fs['n'].iloc[0])})")
        ax2.set_xlabel("GBitOPs per image (whole schedule)")
        ax2.set_ylabel("FID (domain extractor)")
        ax2.set_title("validated points: final FID vs BitOPs")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return "pareto.png"


def _point_names(front) -> dict[str, str]:
    """P1, P2, ... for the front points in order of BitOPs (the names the table and the heat map share)."""
    return {k: f"P{i + 1}" for i, k in enumerate(front.sort_values("bitops")["key"])}


def _bits_heatmap(bits, names: dict[str, str], exported: frozenset[str], out: Path) -> str:
    """``bits.png``: weight and activation bits of every searched layer (rows, model order) at every front point
    (columns, by BitOPs; per time group with per-group bits), the exported point's columns outlined. Pinned layers
    (held at their pins, not searched) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    b = bits[~bits["pinned"]]
    layers = list(dict.fromkeys(b["layer"]))
    groups = sorted(b["group"].unique()) if "group" in b else [None]
    cols = [(k, g) for k in names for g in groups]
    col = {c: j for j, c in enumerate(cols)}
    row = {name: i for i, name in enumerate(layers)}
    w = np.full((len(layers), len(cols)), np.nan)
    a = np.full_like(w, np.nan)
    for r in b.itertuples(index=False):
        ij = row[r.layer], col[(r.key, r.group if groups != [None] else None)]
        w[ij], a[ij] = r.w_bits, r.a_bits
    labels = [f"{names[k]} {k[:8]}" + (f" g{g}" if g is not None else "") + (" (exported)" if k in exported else "")
              for k, g in cols]
    height = min(60.0, 1.8 + 0.14 * len(layers))
    width = min(24.0, 2 * (2.5 + 0.35 * len(cols))) + 3.0
    fig, axes = plt.subplots(1, 2, figsize=(width, height), sharey=True, squeeze=False)
    for ax, m, title in ((axes[0][0], w, "weight bits"), (axes[0][1], a, "activation bits")):
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(cols)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=6 if len(layers) <= 120 else 3)
        ax.set_title(title, fontsize=9)
        if m.size <= 3000:
            for (i, j), v in np.ndenumerate(m):
                if v == v:
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=5,
                            color="white" if v <= np.nanmean(m) else "black")
        for j, (k, _) in enumerate(cols):
            if k in exported:
                ax.add_patch(Rectangle((j - 0.5, -0.5), 1, len(layers), fill=False, edgecolor="C3", lw=2))
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, ticks=sorted({int(v) for v in m.flat if v == v}))
    fig.tight_layout()
    fig.savefig(out / "bits.png", dpi=100)
    plt.close(fig)
    return "bits.png"


def seed_distances(space, cfg: dict, front) -> dict[str, int]:
    """Per front point, how many genes it differs in from the nearest seed of the search's first generation (the
    uniform options the engine started from, :meth:`SearchSpace.uniform_seeds`): 0 is a seed itself, 1 one gene
    away. Empty when the search started without seeds."""
    search = cfg.get("search", {})
    seeds = first_generation_seeds(space, int(search.get("population", 2)), search.get("uniform_seeds", True))
    if not seeds:
        return {}
    grid = np.stack(seeds)
    out = {}
    for _, p in front.iterrows():
        try:
            out[p["key"]] = int((grid != space.encode(Candidate.from_dict(p))).sum(axis=1).min())
        except TmpqError:  # a point this space cannot encode (an older run's layout): no distance shown
            continue
    return out


def _seed_text(d: int | None) -> str:
    return "–" if d is None else "a seed" if d == 0 else "1 gene" if d == 1 else f"{d} genes"


def _front_rows(front, run_path: Path, names: dict[str, str], grids: dict[str, str], fin, exports,
                seeds: dict[str, int], latency: dict[str, float] | None = None, picked: str | None = None,
                wino: bool = False) -> list[str]:
    """The front table's rows (by BitOPs): name and key (``picked``: marked as the fastest-within point),
    objectives, the predicted latency in ms per image (``latency``: seconds per key, where the run has a table),
    final FID (and the FP model's on the point's own schedule), the distance to the nearest search seed, the export
    (its directory when exported, else the ``tmpq export`` command that writes it where ``tmpq status`` and the
    report find it), the schedule and the sample grid (``wino``: a run with the algorithm gene, whose points also
    say how many convs run Winograd at which tile)."""
    exported = dict(zip(exports["key"], exports["path"]))
    rows = []
    for _, p in front.sort_values("bitops").iterrows():
        k = p["key"]
        fid = (f"{_fmt(fin.loc[k, 'fid_mean'])} ± {_fmt(fin.loc[k, 'fid_std'], '.2g')}"
               if fin is not None and k in fin.index else "–")
        fp = fin.loc[k, "fp_fid_mean"] if fin is not None and k in fin.index and "fp_fid_mean" in fin else None
        if fp is not None and fp == fp:
            fid += f"<br><small>FP on its schedule {_fmt(fp)} ({fin.loc[k, 'fid_mean'] / fp:.2f}x)</small>"
        img = f'<img src="{grids[k]}" alt="samples of {k}">' if k in grids else ""
        if k in exported:
            export = f'<b>exported</b>: <code>{html.escape(exported[k])}</code>'
        else:
            cmd = shlex.join(["tmpq", "export", str(run_path), "--candidate", k, "--out",
                              str(run_path / "exports" / k[:8])])
            export = f"<code>{html.escape(cmd)}</code>"
        style = ' class="exported"' if k in exported else ""
        mark = f"<br><small><b>fastest within {REPORT_RATIO:.2f}×</b></small>" if k == picked else ""
        ms = f"<td>{_fmt(latency[k] * 1e3, '.3g')}</td>" if latency is not None else ""
        algo = f"<td>{html.escape(winograd_summary(p.get('algos')))}</td>" if wino else ""
        rows.append(f"<tr{style}><td><b>{names[k]}</b><br><code>{html.escape(k)}</code>{mark}</td>"
                    f"<td>{_fmt(p['fid_proxy'])}</td><td>{_fmt(p['bitops'] / 1e9)}</td>{ms}"
                    f"<td>{_fmt(p.get('size_mb', float('nan')), '.3f')}</td><td>{fid}</td>"
                    f"<td>{_seed_text(seeds.get(k))}</td>{algo}"
                    f"<td>{html.escape(str(list(p['timesteps'])))}</td><td>{export}</td><td>{img}</td></tr>")
    return rows


def _wino_header(space) -> str:
    """The front table's column of a run with the algorithm gene: its tiles and how many convs could use them."""
    tiles = ", ".join(f"F({m},3)" for m in space.wino_tiles)
    return (f'<th title="tiles {html.escape(tiles)}">Winograd convs<br><small>of {len(space.wino_layers)} '
            f'eligible</small></th>')


def _validated_algos(final, names: dict[str, str]) -> str:
    """A run with the algorithm gene: each validated point's Winograd convs beside its final FID (a point off the
    current front included)."""
    rows = "".join(f"<tr><td>{html.escape(names.get(p['key'], 'off the front'))} <code>{html.escape(p['key'])}"
                   f"</code></td><td>{_fmt(p['fid_mean'])}</td><td>{_fmt(p['bitops'] / 1e9)}</td>"
                   f"<td>{html.escape(winograd_summary(p.get('algos')))}</td></tr>"
                   for _, p in final.sort_values("bitops").iterrows())
    return ("<h3>Validated points: convolution algorithms</h3><table><tr><th>point</th><th>final FID</th>"
            f"<th>GBitOPs</th><th>Winograd convs</th></tr>{rows}</table>")


def _fastest_note(run, final, has_table: bool, names: dict[str, str]) -> tuple[str | None, str]:
    """The key ``tmpq export --pick fastest-within 1.10`` would choose (``None`` when there is none: no validation,
    no latency table, no point within) and the page's line about it."""
    if final is None:
        return None, ""
    cmd = f"tmpq export {shlex.quote(str(run.path))} --pick fastest-within {REPORT_RATIO:.2f} --out DIR"
    if not has_table:
        return None, (f"<p>Fastest within {REPORT_RATIO:.2f}× the FP reference FID: this run has no latency table "
                      f"(a BitOPs search); <code>{html.escape(cmd)}</code> measures one and picks.</p>")
    try:
        p = fastest_within(validated_points(run), REPORT_RATIO)
    except TmpqError as exc:
        return None, f"<p>Fastest within {REPORT_RATIO:.2f}×: {html.escape(str(exc))}.</p>"
    name = names.get(p["key"], "a point off the current front")
    return p["key"], (f"<p>Fastest within {REPORT_RATIO:.2f}× the reference FID {_fmt(p['reference_fid'])} (the FP "
                      f"model on its best validated schedule): <b>{html.escape(name)}</b> "
                      f"<code>{html.escape(p['key'])}</code>, FID {_fmt(p['fid_mean'])} ({p['fid_ratio']:.2f}×), "
                      f"predicted {_fmt(p['latency_s'] * 1e3, '.3g')} ms per image; export it with "
                      f"<code>{html.escape(cmd)}</code>.</p>")


def write_report(run_path: str | Path, baselines: bool = True, grids: bool = True, progress: bool = False) -> Path:
    """Write ``RUN/report/report.html`` and return its path (a damaged run file fails before anything is written).
    Holds the run's writer lock throughout: refused with one line while a search or another job writes the run."""
    with runlock.acquire(RunDir.open(run_path).path, "report"):
        return _write_report(run_path, baselines, grids, progress)


def _write_report(run_path: str | Path, baselines: bool, grids: bool, progress: bool) -> Path:

    # every run file is read (read-only) before anything is written
    run = load_run(run_path)
    evaluations = run.evaluations
    front = run.pareto()
    if front.empty:
        raise TmpqError(f"{run.path}: no successful evaluations to report")
    cfg = run.config
    with malformed(run.path / "config.resolved.json", "run config"):
        proxy = {k: cfg["proxy"][k] for k in ("name", "n_images", "teacher_schedule", "teacher_steps")}
    space = run.space
    exports = run.exports
    names_of = _point_names(front)
    bits = run.bits_table(list(names_of))
    final = summary = None
    if (run.path / "final.parquet").exists():
        final = read_parquet(run.path / "final.parquet", "validation summary",
                             ("key", "fid_mean", "fid_std", "bitops", "n"))
    if (run.path / "final.json").exists():
        summary = read_json(run.path / "final.json", "validation summary")
        with malformed(run.path / "final.json", "validation summary"):
            tau = summary.get("kendall_tau_proxy_vs_fid")
            summary = {"points": int(summary["points"]), "n": int(summary["n"]), "seeds": list(summary["seeds"]),
                       "tau": float("nan") if tau is None else float(tau)}
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    cache: dict = {}

    def ev_factory():
        if "ev" not in cache:
            cache["ev"] = _evaluator(run.path, cfg)
        return cache["ev"]

    base = _baselines(space, ev_factory, out, evaluations, progress) if baselines else []
    exported = frozenset(exports["key"])
    plot = _plot(evaluations, front, base, final, out, exported)
    heat = _bits_heatmap(bits, names_of, exported, out)
    names = _grids(front, ev_factory, out, progress) if grids else {}
    fin = final.set_index("key") if final is not None else None
    latency = ({p["key"]: space.latency(Candidate.from_dict(p)) for _, p in front.iterrows()}
               if space.latency_table is not None else None)
    picked, pick_note = _fastest_note(run, final, latency is not None, names_of)
    wino = bool(space.wino_tiles)
    rows = _front_rows(front, run.path, names_of, names, fin, exports, seed_distances(space, cfg, front), latency,
                       picked, wino)
    pinned = sorted(set(bits.loc[bits["pinned"], "layer"]))
    base_rows = "".join(f"<tr><td>{html.escape(b['name'])}</td><td>{_fmt(b['fid_proxy'])}</td>"
                        f"<td>{_fmt(b['bitops'] / 1e9)}</td></tr>" for b in base)
    final_note = ""
    if summary is not None:
        s, tau = summary, summary["tau"]
        final_note = (f"<p>Validated: {s['points']} points, FID at N = {s['n']} over seeds {s['seeds']}"
                      + (f"; Kendall τ between the search proxy and the final FID: <b>{tau:.3f}</b>" if tau == tau
                         else "") + ".</p>")
    fp_img = f'<img src="{names["fp"]}" alt="FP reference samples">' if "fp" in names else ""
    peak = float(evaluations["peak_mib"].max()) if "peak_mib" in evaluations else 0.0
    memory_note = (f" Evaluating workers' peak resident memory: {peak:.0f} MiB (the largest any row logged)."
                   if peak > 0 else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tmpq report: {html.escape(run.path.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:middle}}img{{image-rendering:pixelated}}
code{{font-size:12px}}tr.exported{{background:#fff3d6}}</style></head><body>
<h1>tmpq search report: {html.escape(run.path.name)}</h1>
<p>{len(evaluations)} evaluations, {len(front)} Pareto points; {'/'.join(map(str, space.step_choices))} steps
({html.escape(space.groups.kind)} time groups); bits W{list(space.w_bits)} × A{list(space.a_bits)}; proxy <code>{html.escape(str(proxy['name']))}</code>
at N = {proxy['n_images']}.{memory_note}</p>
{final_note}{pick_note}
<h2>Pareto front</h2><img src="{plot}" alt="Pareto plot">
<h2>Uniform baselines (same supernet, same proxy)</h2>
<table><tr><th>config</th><th>proxy</th><th>GBitOPs</th></tr>{base_rows}</table>
<h2>Front points</h2>
<p>FP reference (teacher: {html.escape(str(proxy['teacher_schedule']))} DDIM {proxy['teacher_steps']} steps,
the same {GRID_N} noise-bank images as every grid below):</p>{fp_img}
<p>Final FID: validated at large N (mean ± std over its seeds), with the FP model's FID on the point's own schedule
and solver under it (same N and noise: the ratio is what quantization and reuse add). From seed: how many genes the
point differs in from the nearest uniform option the search started from ("a seed": it is one).</p>
<table><tr><th>point</th><th>proxy</th><th>GBitOPs</th>{'<th>ms / image</th>' if latency is not None else ''}<th>size MB</th><th>final FID</th><th>from seed</th>
{_wino_header(space) if wino else ''}<th>timesteps</th><th>export</th><th>samples</th></tr>{''.join(rows)}</table>
{_validated_algos(final, names_of) if wino and final is not None else ''}<h2>Per-layer bits of the front points</h2>
<p>Weight and activation bits of every searched layer (rows) at every front point (columns, named as in the table;
the exported point outlined). {len(pinned)} pinned layers, held at their pins, are not shown{
': ' + html.escape(', '.join(pinned)) if pinned else ''}. In Python: <code>tmpq.load_run(RUN).bits_table()</code>.</p>
<img src="{heat}" alt="per-layer bits heat map">
<script>
// marks the page for automated checks: how many images decoded
window.addEventListener('load', () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
}});
</script>
</body></html>
"""
    path = out / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
