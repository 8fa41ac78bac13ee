"""The run reader: a search run directory opened read-only (``tmpq.load_run`` re-exports it).

Example:
    >>> import tmpq
    >>> run = tmpq.load_run("results/runs/default")   # doctest: +SKIP
    >>> run.results(front=True)[["key", "fid_proxy", "gbitops", "timesteps"]]   # doctest: +SKIP
    >>> run.bits_table(run.pareto()["key"]).pivot(index="layer", columns="key", values="w_bits")   # doctest: +SKIP
    >>> run.export(run.pareto()["key"][0])   # -> RUN/exports/<key[:8]>   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tmpq.core.cost import LATENCY_FILE, latency_entries
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import malformed, read_json
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.runinfo import find_exports, run_status, status_text, validated_frame
from tmpq.search.rundir import RunDir, pareto_frame, results_frame, run_objectives
from tmpq.search.space import SearchSpace

# the run's log fields that are not objectives (results_frame's own columns)
_LOG_FIELDS = {"key", "status", "timesteps", "bits", "steps", "proxy", "proxy_version", "n_images", "seed", "wall_s",
               "worker", "error", "generation", "origin", "solver", "order", "reuse", "algos"}
# objective columns of the log renamed for people (the unit in the name) or left out of ``results`` (a repeat)
_READABLE = {"bitops": "gbitops", "kid_small": "kid_proxy"}
_REPEATS = {"fid_small", "eval_s"}  # the fid proxy's own value again; the evaluator's share of wall_s


class Run:
    """A search run directory opened for analysis, read-only: nothing here opens a run file for writing (only
    :meth:`export` writes, a new export directory). A missing, unreadable or damaged file is a one-line ``TmpqError``
    naming it (and the line, for the evaluation log)."""

    def __init__(self, path: Path):
        self._dir = RunDir.open(path)
        self.path = self._dir.path
        cfg = self._dir.config()
        cfg_file = self.path / "config.resolved.json"
        with malformed(cfg_file, "run config"):
            if not isinstance(cfg["fingerprint"], str):  # written with every run: its absence is damage
                raise TypeError(f"fingerprint: expected a string, got {type(cfg['fingerprint']).__name__}")
            config_from_dict({k: v for k, v in cfg.items() if k != "fingerprint"})
            self._objectives = run_objectives(cfg)
        self._config = cfg

    @property
    def config(self) -> dict:
        return copy.deepcopy(self._config)

    @property
    def space(self):
        """The run's ``SearchSpace`` (``search_space.json``), with its measured latency table (``latency.json``)
        where the run has one (``search.cost = "latency"``), so ``space.latency(candidate)`` predicts any point."""

        path = self.path / "search_space.json"
        with malformed(path, "search space"):
            space = SearchSpace.from_dict(read_json(path, "search space"))
        table = self.path / LATENCY_FILE
        if table.is_file():
            with malformed(table, "latency table"):
                space = dataclasses.replace(space, latency_table=latency_entries(read_json(table, "latency table")))
        return space

    @property
    def evaluations(self):
        """Every logged evaluation as a DataFrame, every field as logged (list-valued ``timesteps`` and ``bits``,
        one ``(w, a)`` pair per bit gene; ``proxy``: the proxy's name; ``bitops``; ``fid_small`` = ``fid_proxy``
        with the fid proxy), read from the log: what the jobs and benchmarks compute on. For reading, see
        :meth:`results` and :meth:`bits_table`."""

        return results_frame(self._dir.replay())

    def candidate(self, key: str):
        """The logged candidate of ``key``, whole (:class:`tmpq.core.candidate.Candidate`: schedule, bits, solver,
        reuse, bits layout); a key the run never evaluated is a one-line error."""
        for r in self._dir.replay():
            if r.key == key:
                return r.candidate
        raise TmpqError(f"{self.path}: no evaluation with key {key!r}")

    def pareto(self, objectives: tuple[str, ...] | None = None):
        """Non-dominated ``ok`` evaluations, sorted by the last objective; ``objectives`` default to the run's own
        (proxy and BitOPs, plus size_mb when it searched with ``search.size_objective``)."""

        return pareto_frame(self.evaluations, objectives or self._objectives)

    def results(self, front: bool = False):
        """The evaluations for people (``front``: the Pareto points only), one row per logged evaluation: key, status,
        generation, origin, steps, timesteps (solver / order / reuse / algos where the run has them), one column per
        objective with its unit (``fid_proxy``: the search proxy's value, ``gbitops``: GBitOPs per image over the
        whole schedule, ``size_mb``: weights in MB; ``kid_proxy`` and the paired companions where logged),
        ``fid_final`` (the validated mean FID, NaN where not validated), ``export`` (its directory, "" if none),
        wall_s and error. Per-layer bits: :meth:`bits_table`. ``attrs`` name the proxy and its N. The complete log,
        with every field as logged, is :attr:`evaluations`."""
        ev = self.evaluations
        df = pareto_frame(ev, self._objectives) if front else ev
        proxy = self._config.get("proxy", {})
        repeats = set(_REPEATS) | ({"paired_feat"} if proxy.get("name") == "paired-feat" else set())
        objectives = [c for c in df.columns if c not in _LOG_FIELDS and c not in repeats]
        objectives.sort(key=lambda c: (self._objectives + (c,)).index(c))  # the run's own objectives first
        out = df[[c for c in ("key", "status", "generation", "origin", "steps", "timesteps", "solver", "order",
                              "reuse", "algos") if c in df]].copy()
        for c in objectives:
            out[_READABLE.get(c, c)] = df[c] / 1e9 if c == "bitops" else df[c]
        fin = self.validated.set_index("key")["fid_mean"]
        out["fid_final"] = [float(fin[k]) if k in fin.index else float("nan") for k in out["key"]]
        exported = dict(zip(self.exports["key"], self.exports["path"]))
        out["export"] = [exported.get(k, "") for k in out["key"]]
        for c in ("wall_s", "error"):
            if c in df:
                out[c] = df[c]
        out = out.reset_index(drop=True)
        out.attrs = {"proxy": proxy.get("name"), "proxy_n_images": proxy.get("n_images"),
                     "objectives": [_READABLE.get(o, o) for o in self._objectives]}
        return out

    def bits_table(self, keys: Iterable[str] | None = None):
        """Per-layer bits, tidy: one row per (candidate, quantized layer) with the layer's module name (from
        ``search_space.json``), ``w_bits``, ``a_bits``, ``pinned`` (held by the supernet config, not searched) and,
        for a run with bits per time group, ``group`` (the time group, ascending time). ``keys``: these candidates
        in this order (default: every key of the log, in log order)."""
        space = self.space
        first = self.evaluations.drop_duplicates("key").set_index("key")
        keys = list(first.index) if keys is None else list(keys)
        missing = [k for k in keys if k not in first.index]
        if missing:
            raise TmpqError(f"bits_table: no evaluation with key {missing[0]} in {self.path}")
        rows = []
        for key in keys:
            bits = first.loc[key, "bits"]
            blocks = bits if space.per_group_bits else [bits]
            for g, block in enumerate(blocks):
                if len(block) != space.num_genes:
                    raise TmpqError(f"{self.path / 'evaluations.jsonl'}: candidate {key} has {len(block)} bit genes, "
                                    f"its search space {space.num_genes}")
                for lay in space.layers:
                    if lay.pinned is None and lay.gene is None:
                        continue
                    w, a = lay.pinned if lay.pinned is not None else block[lay.gene]
                    rows.append({"key": key, "layer": lay.fqn, "w_bits": int(w), "a_bits": int(a),
                                 "pinned": lay.pinned is not None, **({"group": g} if space.per_group_bits else {})})
        cols = ["key", "layer", "w_bits", "a_bits", "pinned"] + (["group"] if space.per_group_bits else [])
        return pd.DataFrame(rows, columns=cols)

    @property
    def validated(self):
        """The points ``tmpq validate`` scored (``final.parquet``): key, fid_mean / fid_std over seeds at N images,
        kid_mean, seeds, n, the search proxy, gbitops, steps and timesteps; empty before any validation."""
        return validated_frame(self.path)

    @property
    def exports(self):
        """The exports of this run found in ``RUN/export`` (``tmpq run``) and ``RUN/exports/*``: key, path and the
        source of their quantizers."""
        return find_exports(self.path, self._config.get("fingerprint"))

    def export(self, key: str, out: str | Path | None = None, command: str = "tmpq.Run.export") -> Path:
        """Write the deployable export of candidate ``key`` (``tmpq export``) to ``out``, by default
        ``RUN/exports/<key[:8]>`` where :attr:`exports`, ``tmpq status`` and the report find it; returns ``out``.
        The one method here that writes (a new directory, never a run file)."""
        out = Path(out) if out is not None else self.path / "exports" / key[:8]
        _export_job.export_candidate(self.path, key, out, command=command)
        return out

    def status(self) -> dict:
        """Where the run stands (see :func:`tmpq.jobs.runinfo.run_status`)."""
        return run_status(self.path)


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``tmpq search`` (read-only)."""
    return Run(Path(path))


__all__ = ["Run", "load_run", "run_status", "status_text"]

# last: the export job reads runs through load_run above (importing it first would be circular)
from tmpq.jobs import export as _export_job  # noqa: E402
