"""The benchmarks' selection rules on small hand-made inputs: which point each rule picks, including ties, a point
exactly at a budget or target, failed rows, NaN proxies and empty sets. No models and no runs: the frames are built
by the search library's own ``results_frame`` and the row logs are written as the benchmarks write them. Four of them
were written first against rules that got it wrong (a failed-only or NaN-only run, a NaN reference point, the speed
pick choosing among five of six points), then the rules were fixed."""
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from benchmarks import demo_config, search as search_bench, solvers
from benchmarks.common import RowLog, log_proxy
from benchmarks.final import choose_keys
from tmpq.core.candidate import Candidate
from tmpq.core.solverbase import parse_solver
from tmpq.search.budget import fp_bitops
from tmpq.search.pareto import hypervolume_2d
from tmpq.search.rundir import EvalResult, results_frame

SOLVERS_KEYS = ("kind", "name", "solver", "schedule", "steps", "n", "seed")  # benchmarks.solvers' row-log key


def _result(i: int, proxy=None, bitops=None, status="ok", timesteps=None, bits=((8, 8), (6, 6)), generation=0):
    """One evaluation row: a distinct candidate per ``i`` (its schedule), objectives only where given."""
    objectives = {k: v for k, v in (("fid_proxy", proxy), ("bitops", bitops)) if v is not None}
    cand = Candidate(tuple(timesteps or (900 - i, 400, 0)), bits)
    return EvalResult(key=cand.key, status=status, candidate=cand, objectives=objectives, generation=generation,
                      error="" if status == "ok" else "boom")


def _frame(*results):
    return results_frame(list(results))


# -- benchmarks.solvers._proxy_best / _best_under --------------------------------------------------------------------
def test_proxy_best_takes_the_lowest_proxy_of_the_ok_rows_at_or_under_the_bound():
    rows = [_result(0, 3.0, 100.0), _result(1, 0.5, 101.0),  # the best proxy, one BitOP over
            _result(2, 0.1, 50.0, status="failed"),  # a failed row with numbers: never a pick
            _result(3, 2.0, 100.0),  # exactly at the bound: eligible
            _result(4, 2.5, 20.0)]
    ev = _frame(*rows)
    best = solvers._proxy_best(ev, 100.0)
    assert best["key"] == rows[3].key and best["fid_proxy"] == 2.0
    # one BitOP more allowed: the row over the bound wins
    assert solvers._proxy_best(ev, 101.0)["key"] == rows[1].key
    # the bound just below the at-the-bound row: it drops out, the next best under the bound is picked
    assert solvers._proxy_best(ev, np.nextafter(100.0, 0.0))["key"] == rows[4].key


def test_proxy_best_ties_go_to_the_earlier_row_and_nan_proxies_are_never_picked():
    rows = [_result(0, float("nan"), 10.0), _result(1, 1.0, 30.0), _result(2, 1.0, 20.0), _result(3, 4.0, 5.0)]
    best = solvers._proxy_best(_frame(*rows), 100.0)
    assert best["key"] == rows[1].key  # equal proxies: the first in log order, not the cheaper one


def test_proxy_best_is_none_when_nothing_is_under_the_bound():
    ev = _frame(_result(0, 1.0, 10.0), _result(1, 0.5, 20.0, status="failed"))
    assert solvers._proxy_best(ev, 9.0) is None
    assert solvers._proxy_best(ev.iloc[0:0], 1e9) is None  # an empty frame with the objective columns


def test_proxy_best_is_none_for_a_run_whose_every_evaluation_failed():
    ev = _frame(_result(0, status="failed"), _result(1, status="failed"))
    assert solvers._proxy_best(ev, 1e9) is None


def test_proxy_best_is_none_when_every_proxy_under_the_bound_is_nan():
    ev = _frame(_result(0, float("nan"), 10.0), _result(1, float("nan"), 20.0), _result(2, 1.0, 500.0))
    assert solvers._proxy_best(ev, 100.0) is None


def _fake_run(ev, path="runs/x"):
    """What _best_under reads of a run: its evaluations, its space's layer MACs (fp_bitops) and its path."""
    space = SimpleNamespace(layers=[SimpleNamespace(macs=10), SimpleNamespace(macs=40)])
    return SimpleNamespace(evaluations=ev, space=space, path=Path(path))


def test_best_under_takes_a_fraction_of_the_fp_100_step_bitops_inclusively():
    space = _fake_run(None).space
    assert fp_bitops(space, 100) == 50 * 32 * 32 * 100
    at = 0.005 * fp_bitops(space, 100)  # exactly 0.5 %: the same expression as the rule's
    rows = [_result(0, 1.0, at), _result(1, 0.2, np.nextafter(at, np.inf)), _result(2, 3.0, at / 2)]
    assert solvers._best_under(_fake_run(_frame(*rows)), 0.005) == rows[0].key
    assert solvers._best_under(_fake_run(_frame(*rows)), 0.01) == rows[1].key


def test_best_under_names_the_run_and_the_fraction_when_nothing_qualifies():
    ev = _frame(_result(0, 1.0, 1e12))
    with pytest.raises(SystemExit) as info:
        solvers._best_under(_fake_run(ev, "runs/dp-grouping-s1"), 0.005)
    assert "runs/dp-grouping-s1" in str(info.value) and "0.5%" in str(info.value)


# -- benchmarks.solvers._reference_point (the gene and grouping sections' one point for all runs) ------------------
def test_reference_point_is_1_1_x_the_worst_proxy_and_largest_bitops_of_any_run():
    pts = {"a": np.array([[2.0, 5.0], [9.0, 1.0]]),  # the worst proxy, on a dominated-or-not point alike
           "b": np.array([[1.0, 30.0], [3.0, 2.0]])}  # the largest BitOPs, in another run
    refpt, logp = solvers._reference_point(pts)
    assert refpt.tolist() == [1.1 * 9.0, 1.1 * 30.0]
    assert logp.tolist() == [np.log10(1.1 * 9.0), 1.1 * 30.0]
    # the run order does not matter, and one run alone gives its own maxima
    assert solvers._reference_point(dict(reversed(pts.items())))[0].tolist() == refpt.tolist()
    assert solvers._reference_point({"b": pts["b"]})[0].tolist() == [1.1 * 3.0, 1.1 * 30.0]


def test_reference_point_of_no_points_is_an_error_not_a_point():
    with pytest.raises(ValueError):
        solvers._reference_point({})
    with pytest.raises(ValueError):
        solvers._reference_point({"a": np.array([[1.0, 2.0]]), "empty": np.zeros((0, 2))})


def test_reference_point_is_finite_or_refused_when_a_proxy_is_nan():
    pts = {"a": np.array([[np.nan, 1.0], [2.0, 3.0]]), "b": np.array([[4.0, 2.0]])}
    try:
        refpt, _ = solvers._reference_point(pts)
    except (ValueError, SystemExit):
        return  # a clear refusal is right too
    assert np.isfinite(refpt).all() and refpt.tolist() == [1.1 * 4.0, 1.1 * 3.0]


def test_proxy_gbitops_rows_and_their_hypervolume_against_the_reference_point():
    ev = _frame(_result(0, 2.0, 4e9), _result(1, 1.0, 8e9), _result(2, 3.0, 10e9))  # the last: dominated
    p = solvers._proxy_gbitops(ev)
    assert p.tolist() == [[2.0, 4.0], [1.0, 8.0], [3.0, 10.0]]
    refpt, logp = solvers._reference_point({"r": p})
    assert refpt.tolist() == [1.1 * 3.0, 1.1 * 10.0]
    # hand-computed union of the two boxes (2, 4) and (1, 8) up to (3.3, 11)
    want = (3.3 - 2.0) * (11.0 - 4.0) + (2.0 - 1.0) * (11.0 - 8.0)
    assert hypervolume_2d(p, refpt) == pytest.approx(want, rel=1e-12)
    assert hypervolume_2d(log_proxy(p), logp) == pytest.approx(
        (np.log10(3.3) - np.log10(2.0)) * 7.0 + (np.log10(2.0) - 0.0) * 3.0, rel=1e-12)


# -- benchmarks.solvers: the speed pick at equal quality (part grouping-speed) ------------------------------------
class _Picked(Exception):
    """Raised by the stand-in export: the rule's pick, and the run it would be exported from."""


def _speed_setup(tmp_path, monkeypatch, validated, ref_fid=2.0):
    out = tmp_path / "solvers"
    out.mkdir(parents=True)
    rows = [{"kind": "fp", "solver": "ddim", "schedule": "uniform", "steps": 100, "n": 100, "seed": 0,
             "fid": ref_fid}] if ref_fid is not None else []
    rows += [{"kind": "grouping-validated", "n": 100, **r} for r in validated]
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def export(run_path, key, *a, **k):
        raise _Picked(key, Path(run_path))

    monkeypatch.setattr("tmpq.jobs.export.ensure_export", export)
    return SimpleNamespace(out=str(out)), RowLog(out / "rows.jsonl", SOLVERS_KEYS)


def _validated(name, solver, steps, reused, bitops_frac, fids, source=None):
    """One row of --part grouping-validate (``_point_record`` and the validated FID per seed)."""
    timesteps = list(range(900, 0, -900 // steps))[:steps]
    assert len(timesteps) == steps
    return {"name": name, "key": f"key-{name}", "solver": solver, "timesteps": timesteps, "reused": reused,
            "bitops_frac": bitops_frac, "fid_seeds": {"1": fids[0], "2": fids[1]}, "fid_proxy": 1.0,
            "source": source or f"runs/{name}"}


def test_speed_pick_takes_the_fewest_full_calls_within_the_target_then_the_fewest_bitops(tmp_path, monkeypatch):
    assert parse_solver("heun").calls(4) == 7 and parse_solver("ddim").calls(8) == 8
    val = [_validated("heun4", "heun", 4, 0, 0.0001, (1.0, 1.0)),  # 4 steps but 7 calls: steps are not calls
           _validated("ddim8-r2", "ddim", 8, 2, 0.002, (2.3, 2.3)),  # 6 full calls, exactly 1.15 x 2.0: within
           _validated("dpm6", "dpm++-2", 6, 0, 0.003, (1.5, 1.5)),  # 6 full calls too, more BitOPs
           _validated("ddim5-over", "ddim", 5, 0, 0.0005, (2.3, 2.31)),  # 5 calls, mean 2.305 > 2.3: out
           _validated("ddim4-nan", "ddim", 4, 0, 0.0004, (1.0, float("nan")))]  # a NaN seed: never within
    args, log = _speed_setup(tmp_path, monkeypatch, val)
    assert len(val[0]["timesteps"]) == 4 and len(val[1]["timesteps"]) == 8
    with pytest.raises(_Picked) as info:
        solvers.part_grouping_speed(args, log)
    key, run_path = info.value.args
    assert key == "key-ddim8-r2" and run_path == Path(args.out) / "runs" / "ddim8-r2"


def test_speed_pick_ties_on_calls_and_bitops_go_to_the_earlier_row(tmp_path, monkeypatch):
    val = [_validated("first", "ddim", 6, 0, 0.002, (1.0, 1.0)), _validated("second", "ddim", 6, 0, 0.002, (0.5, 0.5))]
    args, log = _speed_setup(tmp_path, monkeypatch, val)
    with pytest.raises(_Picked) as info:
        solvers.part_grouping_speed(args, log)
    assert info.value.args[0] == "key-first"


def test_speed_pick_without_a_point_within_the_target_or_without_its_inputs_stops_in_one_line(tmp_path,
                                                                                              monkeypatch):
    args, log = _speed_setup(tmp_path / "a", monkeypatch, [_validated("far", "ddim", 5, 0, 0.001, (3.0, 3.0))])
    with pytest.raises(SystemExit, match="no validated search point here within 1.15x"):
        solvers.part_grouping_speed(args, log)
    for val, ref in (([], 2.0), ([_validated("p", "ddim", 5, 0, 0.001, (1.0, 1.0))], None)):
        args, log = _speed_setup(tmp_path / f"b{len(val)}", monkeypatch, val, ref_fid=ref)
        with pytest.raises(SystemExit, match="needs the FP DDIM 100-step row and --part grouping-validate first"):
            solvers.part_grouping_speed(args, log)


def _six_grouping_points():
    """The grouping comparison's six validated points (seeds 0-2 x uniform / dp groups), as --part grouping-validate
    logs them: seed 0's uniform side is the final run's, read from final/raw, and here it has the fewest full
    calls."""
    val = [_validated("uniform-grouping-s0", "unipc", 10, 5, 0.003, (1.5, 1.5), "final/raw (benchmarks.final)"),
           _validated("dp-grouping-s0", "unipc", 7, 0, 0.003, (1.0, 1.0))]
    for s in (1, 2):
        val += [_validated(f"uniform-grouping-s{s}", "unipc", 7, 1, 0.002, (1.6, 1.6)),
                _validated(f"dp-grouping-s{s}", "unipc", 10, 0, 0.004, (1.2, 1.2))]
    return val


def test_the_six_points_are_all_within_the_target_and_seed_0_uniform_has_the_fewest_calls():
    val = _six_grouping_points()
    assert len(val) == 6 and len({v["name"] for v in val}) == 6
    assert all(np.mean(list(v["fid_seeds"].values())) <= 1.15 * 2.0 for v in val)
    calls = {v["name"]: parse_solver(v["solver"]).calls(len(v["timesteps"])) - v["reused"] for v in val}
    assert min(calls, key=calls.get) == "uniform-grouping-s0" and calls["uniform-grouping-s0"] == 5


def test_speed_pick_chooses_among_all_six_points_or_says_which_it_cannot_export(tmp_path, monkeypatch):
    args, log = _speed_setup(tmp_path, monkeypatch, _six_grouping_points())
    with pytest.raises((_Picked, SystemExit)) as info:
        solvers.part_grouping_speed(args, log)
    # either the pick is exported, or a one-line stop names the point it cannot export: never another point
    assert "uniform-grouping-s0" in str(info.value.args[0] if isinstance(info.value, _Picked) else info.value)


# -- benchmarks.solvers._validated_fids (the validation seeds a point's FID is read from) ----------------------------
def test_validated_fids_reads_only_this_point_at_this_n_and_these_seeds(tmp_path):
    rows = [{"key": "k", "n": 100, "seed": 1, "fid": 1.5}, {"key": "k", "n": 100, "seed": 2, "fid": 2.5},
            {"key": "k", "n": 100, "seed": 3, "fid": 9.0}, {"key": "k", "n": 50, "seed": 1, "fid": 8.0},
            {"key": "other", "n": 100, "seed": 2, "fid": 7.0}]
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert solvers._validated_fids(tmp_path, "k", 100) == {"1": 1.5, "2": 2.5}
    assert solvers._validated_fids(tmp_path, "k", 100, seeds=(3,)) == {"3": 9.0}
    assert solvers._validated_fids(tmp_path, "k", 50) == {"1": 8.0}  # seed 2 missing: grouping-validate stops on it
    assert solvers._validated_fids(tmp_path, "missing", 100) == {}


# -- benchmarks.final.choose_keys (which points are validated) -------------------------------------------------------
def _front(rows):
    return pd.DataFrame(rows, columns=["key", "fid_proxy", "bitops"])


def test_choose_keys_top_k_proxies_under_the_budget_inclusive_then_spread_over_the_rest():
    front = _front([("a", 5.0, 10.0), ("b", 1.0, 100.0),  # b: exactly at the budget
                    ("c", 3.0, 50.0), ("d", 0.5, 101.0), ("e", 0.4, 200.0), ("f", 0.3, 300.0), ("g", 0.2, 400.0),
                    ("h", 0.1, 500.0)])
    assert choose_keys(front, 100.0, 2, 0) == ["b", "c"]
    # spread: the rest by BitOPs (a, d, e, f, g, h), 3 points evenly (positions 0, 2.5 -> 2, 5): the cheapest, the
    # middle, the dearest
    assert choose_keys(front, 100.0, 2, 3) == ["b", "c", "a", "e", "h"]
    # more spread than rest: every remaining point once
    keys = choose_keys(front, 100.0, 2, 50)
    assert keys == ["b", "c", "a", "d", "e", "f", "g", "h"] and len(set(keys)) == len(keys)


def test_choose_keys_tighter_budget_adds_its_own_best_not_yet_chosen():
    front = _front([("a", 0.9, 10.0), ("b", 0.5, 20.0), ("c", 0.1, 80.0), ("d", 0.2, 90.0), ("e", 0.3, 15.0)])
    # budget 100: c, d; the tighter budget 20 (e at 15, b exactly at 20, a at 10), by proxy: e, b (a is third)
    assert choose_keys(front, 100.0, 2, 0, extra_budget=20.0) == ["c", "d", "e", "b"]
    # a point already chosen under the main budget is not chosen twice
    assert choose_keys(front, 100.0, 5, 0, extra_budget=20.0) == ["c", "d", "e", "b", "a"]


def test_choose_keys_with_nothing_under_the_budget_or_an_empty_front():
    front = _front([("a", 1.0, 200.0), ("b", 2.0, 150.0)])
    assert choose_keys(front, 100.0, 3, 0) == []
    assert choose_keys(front, 100.0, 3, 1) == ["b"]  # one spread point: the cheapest
    assert choose_keys(_front([]), 100.0, 3, 3, extra_budget=50.0) == []


# -- benchmarks.demo_config: the fixed reference points' hypervolume -------------------------------------------------
def test_demo_config_front_and_hypervolume_by_hand():
    pts = np.array([[10.0, 5.0], [20.0, 3.0], [20.0, 4.0], [30.0, 6.0], [10.0, 5.0]])  # (GBitOPs, proxy)
    assert demo_config._front(pts).tolist() == [[10.0, 5.0], [20.0, 3.0]]  # ties on BitOPs keep the lower proxy
    # against (40, 8): (20 - 10) x (8 - 5) + (40 - 20) x (8 - 3)
    assert demo_config.hypervolume(pts, (40.0, 8.0)) == 10 * 3 + 20 * 5
    # a point exactly on the reference point's BitOPs (the W6A6 budget) or proxy adds nothing; none at all: 0
    assert demo_config.hypervolume(np.array([[40.0, 1.0], [5.0, 8.0]]), (40.0, 8.0)) == 0.0
    assert demo_config.hypervolume(np.zeros((0, 2)), (40.0, 8.0)) == 0.0
    # a NaN proxy is never inside the box
    assert demo_config.hypervolume(np.array([[10.0, np.nan], [20.0, 3.0]]), (40.0, 8.0)) == 20 * 5


def test_demo_config_hypervolume_agrees_with_the_library_on_random_points():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = np.round(rng.uniform(0, 10, size=(rng.integers(1, 12), 2)), 1)  # rounding makes ties and duplicates
        ref = (8.0, 9.0)
        assert demo_config.hypervolume(pts, ref) == pytest.approx(hypervolume_2d(pts[:, ::-1], ref[::-1]), abs=1e-9)


# -- benchmarks.search: the front part's reference point (uniform baselines, else every run's points) -------------
def _keep_run(out: Path, name: str, pts):
    """A search run as a fresh clone has it: only its committed raw evaluation log (generation 0, uniform bits)."""
    raw = out / "raw" / f"{name}.jsonl.gz"
    raw.parent.mkdir(parents=True, exist_ok=True)
    lines = [_result(i, proxy, gb * 1e9, bits=((8, 8), (8, 8))).to_json() for i, (proxy, gb) in enumerate(pts)]
    raw.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def _search_report(tmp_path, baselines):
    out = tmp_path / "search"
    _keep_run(out, "pymoo-s0", [(5.0, 10.0), (50.0, 100.0)])  # the second lies beyond the baselines' box
    _keep_run(out, "random-s0", [(8.0, 4.0)])
    rows = [{"kind": "search", "name": n, "evaluations": 2, "machine": "test"} for n in ("pymoo-s0", "random-s0")]
    rows += [{"kind": "baseline", "name": f"W{w}A{a} quad 10", "schedule": "quad", "fid_proxy": p, "gbitops": g,
              "machine": "test"} for w, a, p, g in baselines]
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(out=str(out), model="embedded", guidance=1.0, step_choices=[5, 10], steps=10,
                           grouping="quad", time_groups=1, proxy="fid", proxy_n=128, seeds=1, seed=0, cmd_doc="test")
    search_bench.write_report(args, RowLog(out / "rows.jsonl", ("kind", "name")))
    return (out / "README.md").read_text()


def test_search_reference_point_bounds_the_uniform_baselines_not_the_runs(tmp_path):
    text = _search_report(tmp_path, [(8, 8, 4.0, 20.0), (6, 6, 10.0, 12.0)])
    assert "point (11, 22) = 1.1 x the uniform baselines' worst proxy and largest BitOPs" in text
    # pymoo-s0: (5, 10) gives (11 - 5) x (22 - 10) = 72; its (50, 100) point beyond the box adds nothing
    assert "| pymoo-s0 | 2 | 72 |" in text
    assert "| random-s0 | 1 | 54 |" in text  # (11 - 8) x (22 - 4)


def test_search_reference_point_without_baselines_bounds_every_run_point(tmp_path):
    text = _search_report(tmp_path, [])
    # 1.1 x the worst proxy (pymoo-s0's 50) and the largest BitOPs (its 100) of all the runs' points together
    assert "point (55, 110)" in text
    assert "| pymoo-s0 | 2 | 5000 |" in text  # (55 - 5) x (110 - 10): its (50, 100) point is dominated
    assert "| random-s0 | 1 | 4982 |" in text  # (55 - 8) x (110 - 4)
