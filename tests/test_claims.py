"""Claims of the benchmark reports: a uniform baseline that a search evaluated itself (every engine starts from the
uniform-bit seeds) is weakly dominated by its own copy on the front, so "dominates the baselines" is counted strictly
(a front point <= in every objective and < in one), with the weak count beside it."""
from types import SimpleNamespace

import numpy as np

from tmpq.search.pareto import dominates_all


def test_a_front_holding_the_baseline_itself_does_not_dominate_it_strictly():
    base = np.array([[2.0, 5.0], [3.0, 3.0], [6.0, 1.0]])
    front = np.array([[2.0, 5.0], [2.5, 3.0], [6.0, 1.0]])  # two copies of baselines, one point better than the 2nd
    assert dominates_all(front, base).tolist() == [True, True, True]
    assert dominates_all(front, base, strict=True).tolist() == [False, True, False]
    # better in one objective and equal in the other is strict; better in one and worse in the other is neither
    assert dominates_all([[2.0, 4.0]], base[:1], strict=True).tolist() == [True]
    assert dominates_all([[1.0, 6.0]], base[:1]).tolist() == [False]
    assert dominates_all([[1.0, 6.0]], base[:1], strict=True).tolist() == [False]
    assert dominates_all(np.zeros((0, 2)), base, strict=True).tolist() == [False] * 3


def test_the_search_report_counts_baseline_dominance_strictly_and_weakly(tmp_path, monkeypatch):
    import benchmarks.search as bs
    from benchmarks.common import RowLog

    base = {"W8A8 uniform 10": (2.0, 5.0), "W6A6 uniform 10": (3.0, 3.0), "W4A8 uniform 10": (6.0, 1.0)}
    runs = {"pymoo-s0": np.array([*base.values(), [2.5, 3.0], [9.0, 9.0]]),  # seeds + one point beating W6A6
            "random-s0": np.array([[1.5, 4.0], [2.0, 2.5], [5.0, 0.5]])}  # beats all three strictly
    log = RowLog(tmp_path / "rows.jsonl", ("kind", "name"))
    for name, (proxy, gbitops) in base.items():
        log.append({"kind": "baseline", "name": name, "schedule": "uniform", "fid_proxy": proxy, "gbitops": gbitops})
    for name in runs:
        log.append({"kind": "search", "name": name})
    monkeypatch.setattr(bs, "points", lambda path: runs[path.name])
    monkeypatch.setattr(bs, "seed_points", lambda path: np.array(list(base.values())))
    args = SimpleNamespace(out=str(tmp_path), step_choices=[10], steps=10, grouping="uniform", time_groups=4,
                           proxy="fid", proxy_n=8, seeds=1, seed=0, cmd_doc="python -m benchmarks.search")
    bs.write_report(args, log)
    text = (tmp_path / "README.md").read_text()
    assert "uniform baselines dominated: strictly (weakly)" in text
    rows = {ln.split("|")[1].strip(): ln.split("|")[-2].strip() for ln in text.splitlines()
            if ln.startswith(("| pymoo-s0 |", "| random-s0 |"))}
    assert rows == {"pymoo-s0": "1/3 (3)", "random-s0": "3/3 (3)"}
