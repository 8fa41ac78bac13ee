"""The speed-at-equal-quality restatement: the rule that picks the fastest FP sampler of equal or better quality (on
hand-made rows), how its time is found, and that the committed report rebuilds from the committed rows."""
from __future__ import annotations

import json

import pytest

from benchmarks import honest
from conftest import REPO


def fp(solver, schedule, steps, fid, seed=0):
    return {"solver": solver, "schedule": schedule, "steps": steps, "timesteps": list(range(steps)), "n": 100,
            "seed": seed, "fid": fid, "source": f"grid ({solver} {schedule} {steps})"}


def point(fid_seeds, solver="unipc-2", steps=7, fp100=20.0, sched=1.5, int8=1.0, machine="cpu A"):
    return {"claim": "c", "report": "r", "key": "k", "solver": solver, "steps": steps,
            "timesteps": list(range(steps)), "reused": 0, "rebuildable": True, "n": 100, "sources": {},
            "fid_seeds": fid_seeds,
            "timing": {"fp100_s": fp100, "fp_sched_s": sched, "int8_s": int8, "machine": machine, "source": "run"}}


def test_the_fastest_qualifying_config_wins_by_calls_with_heun_counted_twice_but_the_last():
    grid = [fp("ddim", "uniform", 100, 0.25), fp("heun", "dp", 5, 0.10), fp("unipc-2", "dp", 10, 0.05),
            fp("dpm++-2", "dp", 7, 0.40)]
    assert honest.calls("heun", 5) == 9 and honest.calls("unipc-2", 5) == 5
    # heun 5 steps = 9 calls beats unipc 10 steps; dpm++ 7 steps is faster but worse than the point
    assert honest.fastest_fp(grid, 0.2)["solver"] == "heun"
    assert honest.fastest_fp(grid, 0.40)["solver"] == "dpm++-2"  # equal FID qualifies
    assert honest.fastest_fp(grid, 0.07)["solver"] == "unipc-2"
    assert honest.fastest_fp(grid, 0.01) is None


def test_ties_on_calls_go_to_the_lower_fid_whatever_the_row_order():
    grid = [fp("dpm++-2", "dp", 7, 0.16), fp("unipc-2", "dp", 7, 0.09), fp("heun", "trailing", 4, 0.08)]  # 7 calls
    for rows in (grid, grid[::-1]):
        assert honest.fastest_fp(rows, 0.2)["fid"] == 0.08
    assert honest.fastest_fp(grid[:2], 0.2)["solver"] == "unipc-2"


def test_a_point_no_fp_config_reaches_says_so_and_keeps_only_its_fp100_figure():
    row = honest.restate(point({"1": 0.01, "2": 0.03}), [fp("ddim", "uniform", 100, 0.25)], [])
    assert row["fastest_fp"] is None and row["x_fastest_fp"] is None
    assert "no FP configuration of the grid reaches FID <= 0.020" in row["why"]
    assert row["x_fp_ddim100"] == 20.0 and row["qualifying"] == []
    assert "none: no FP configuration" in honest.render([row])


def test_the_fp_time_is_measured_in_the_same_run_then_another_run_of_the_machine_then_estimated():
    grid = [fp("unipc-2", "dp", 7, 0.09)]
    p = point({"1": 0.10, "2": 0.12}, fp100=20.0, sched=1.5, int8=1.0)
    same = honest.restate(p, grid, [])  # the point's own schedule is that config: its FP time is in the run
    assert same["fastest_fp"]["how"].startswith("measured in the point's own") and same["x_fastest_fp"] == 1.5
    other_sched = dict(p, timesteps=[9, 8, 7, 6, 5, 4, 3])
    timed = [{"solver": "unipc-2", "timesteps": list(range(7)), "fp_s": 2.0, "fp100_s": 25.0, "machine": "cpu A",
              "source": "other"}]
    other = honest.restate(other_sched, grid, timed)  # speed-ups over FP 100 in each run: 20 / 12.5
    assert other["fastest_fp"]["time_source"] == "other" and other["x_fastest_fp"] == pytest.approx(1.6)
    assert other["x_fastest_fp_raw_times"] == 2.0
    elsewhere = [dict(timed[0], machine="cpu B")]  # another CPU kind's time is not used: estimated instead
    est = honest.restate(other_sched, grid, elsewhere)
    assert est["fastest_fp"]["how"] == "estimated from the per-call time of the same run"
    assert est["x_fastest_fp"] == pytest.approx(7 * 20.0 / 100 / 1.0)
    assert not est["like_for_like_noise"]  # grid seed 0, point seeds 1, 2


def test_the_committed_report_rebuilds_from_the_committed_rows(tmp_path):
    rows = honest.main(["--out", str(tmp_path)])
    committed = REPO / "results" / "speed"
    assert (tmp_path / "README.md").read_text() == (committed / "README.md").read_text()
    assert (tmp_path / "rows.jsonl").read_text() == (committed / "rows.jsonl").read_text()
    by_key = {r["key"]: r for r in rows}
    searched = by_key["dcf98705e7df9b82"]
    assert searched["fastest_fp"]["solver"] == "unipc-2" and searched["fastest_fp"]["schedule"] == "dp"
    assert not by_key["f425c9be9b495c7e"]["rebuildable"]
    # every input figure names the file it came from
    for r in rows:
        assert r["sources"]["fid_seeds"] and r["timing"]["source"] and r["fastest_fp"]["source"]
    # the top-level README quotes the restated ratios as rebuilt
    readme = (REPO / "README.md").read_text()
    for key in ("dcf98705e7df9b82", "93a0c7abfd340491", "f425c9be9b495c7e"):
        assert f"{honest.x(by_key[key]['x_fastest_fp'])} the fastest FP sampler" in readme, key
    assert json.loads((committed / "rows.jsonl").read_text().splitlines()[0])["grid_seeds"] == [0]
