"""Deploy-aware picking: the ``fastest-within`` rule on hand-made frames (within / outside / ties / none within), then
end to end on tiny validated runs: ``tmpq export RUN --pick fastest-within R`` on a latency run (the pick and its
figures in the manifest's provenance, an export by key unchanged), a BitOPs run that gets its latency table measured
once and reused, the main job's ``pick`` option, the report's latency column and mark, and the refusals."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError
from tmpq.search.pick import REPORT_RATIO, fastest_within, parse_pick


def _frame(rows):
    return pd.DataFrame(rows, columns=["key", "fid_mean", "fp_fid_mean", "latency_s"])


POINTS = _frame([("a", 10.0, 9.0, 0.030), ("b", 10.8, 10.0, 0.020), ("c", 12.0, 11.0, 0.010),
                 ("d", 9.5, 9.2, 0.040)])


# -- the rule on hand-made frames ------------------------------------------------------------------------------------
def test_the_fastest_point_within_the_ratio_of_the_best_fp_fid():
    # reference: the lowest fp_fid_mean (9.0); within 1.10 x 9.0 = 9.9: d only; within 1.2 (10.8): a, b and d
    assert fastest_within(POINTS, 1.10)["key"] == "d"
    p = fastest_within(POINTS, 1.2)
    assert p == {"rule": "fastest-within", "ratio": 1.2, "key": "b", "reference_fid": 9.0, "reference": "fp",
                 "fid_mean": 10.8, "fid_ratio": pytest.approx(1.2), "latency_s": 0.020}
    # at the bound exactly: within (fid_mean <= ratio x reference); c is outside until 12 / 9
    assert fastest_within(POINTS, 12.0 / 9.0)["key"] == "c"
    # a given reference replaces the FP one (and needs no fp_fid_mean column)
    p = fastest_within(POINTS.drop(columns="fp_fid_mean"), 1.0, reference=12.0)
    assert (p["key"], p["reference"], p["reference_fid"]) == ("c", "given", 12.0)
    # a point without a FID (NaN) is never picked, nor sets the bound
    with_nan = pd.concat([POINTS, _frame([("e", float("nan"), 1.0, 0.001)])], ignore_index=True)
    assert fastest_within(with_nan, 1.2)["key"] == "b"


def test_ties_on_latency_go_to_the_lower_fid_then_the_key():
    tied = _frame([("z", 10.5, 10.0, 0.02), ("y", 10.2, 10.0, 0.02), ("x", 10.2, 10.0, 0.02), ("w", 10.0, 10.0, 0.03)])
    assert fastest_within(tied, 1.1)["key"] == "x"
    assert fastest_within(tied.iloc[::-1], 1.1)["key"] == "x"  # not by row order


def test_none_within_and_missing_inputs_are_one_line_errors():
    with pytest.raises(TmpqError, match=r"no validated point has FID within 1.05 x the reference 9 .*the best reaches "
                                        r"1.056 x \(d\)") as exc:
        fastest_within(POINTS, 1.05)
    assert "\n" not in str(exc.value)
    with pytest.raises(TmpqError, match="no FP reference FID.*--reference FID"):
        fastest_within(POINTS.assign(fp_fid_mean=float("nan")), 1.1)
    with pytest.raises(TmpqError, match="no validated points"):
        fastest_within(POINTS.iloc[:0], 1.1)
    for bad in (0, -1, float("nan"), "x", True):
        with pytest.raises(TmpqError, match="--pick: the FID ratio"):
            fastest_within(POINTS, bad)
    with pytest.raises(TmpqError, match="--reference: the reference FID"):
        fastest_within(POINTS, 1.1, reference=-2)
    with pytest.raises(TmpqError, match="no predicted latency for the point d"):
        fastest_within(POINTS.assign(latency_s=float("nan")), 1.1)
    assert parse_pick("fastest-within 1.10") == parse_pick(("fastest-within", "1.1")) == ("fastest-within", 1.1)
    with pytest.raises(TmpqError, match="unknown pick rule 'slowest'"):
        parse_pick("slowest 1.1")
    with pytest.raises(TmpqError, match="expected a rule and a FID ratio"):
        parse_pick("fastest-within")


# -- tiny runs ---------------------------------------------------------------------------------------------------------
VALIDATE = dict(n=16, seeds=(1,), calib_per_step=4, batch_size=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny latency search over 2, 3 or 6 steps (its front's top 3 validated: the step count trades FID for time on
    any machine, so the front holds several points) and a tiny BitOPs search of one model (2 points validated)."""
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    root = tmp_path_factory.mktemp("pick")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    lat = tiny_cfg(root / "tiny-ddpm", cost="latency", generations=3, population=8).with_(
        **{"proxy.batch_size": 8, "supernet.w_bits": [16, 8, 4], "search.step_choices": [2, 3, 6]})
    run_search(lat, root / "latency", progress=False)
    validate_run(root / "latency", ValidateConfig(top_k=3, **VALIDATE), progress=False)
    bit = tiny_cfg(root / "tiny-ddpm", generations=2, population=6).with_(**{"proxy.batch_size": 8})
    run_search(bit, root / "bitops", progress=False)
    return {"model": root / "tiny-ddpm", "latency": root / "latency", "bitops": root / "bitops", "bitops_cfg": bit}


def _cli(argv, capsys):
    from tmpq.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _expected(run_path, ratio, reference=None):
    """The pick recomputed independently: every validated point's latency summed by the run's space."""
    from tmpq.jobs.run import load_run

    run = load_run(run_path)
    fin = pd.read_parquet(run_path / "final.parquet")
    fin["latency_s"] = [run.space.latency(run.candidate(k)) for k in fin["key"]]
    ref = fin["fp_fid_mean"].min() if reference is None else reference
    ok = fin[fin["fid_mean"] <= ratio * ref].sort_values(["latency_s", "fid_mean", "key"])
    return ok.iloc[0], fin, ref


def test_export_pick_on_a_latency_run_records_the_rule_and_its_figures(runs, tmp_path, capsys):
    run = runs["latency"]
    fin = pd.read_parquet(run / "final.parquet")
    assert len(fin) >= 2 and fin["fp_fid_mean"].notna().all()
    ratio = float(fin["fid_mean"].max() / fin["fp_fid_mean"].min()) * 1.01  # every validated point within
    best, fin, ref = _expected(run, ratio)
    assert fin["latency_s"].nunique() > 1  # the points differ in latency: the pick is not a tie-break
    # in a latency run the prediction is the logged objective
    ev = pd.read_parquet(run / "evaluations.parquet").drop_duplicates("key").set_index("key")
    assert ev.loc[best["key"], "latency_s"] == pytest.approx(best["latency_s"])
    table = (run / "latency.json").read_bytes()

    code, out, err = _cli(["export", run, "--pick", "fastest-within", f"{ratio!r}", "--out", tmp_path / "e",
                           "--threads", "1"], capsys)
    assert code == 0, err
    man = json.loads((tmp_path / "e" / "tmpq_export.json").read_text())
    pick = man["provenance"]["pick"]
    assert man["provenance"]["candidate"] == pick["key"] == best["key"]
    assert pick["rule"] == "fastest-within" and pick["ratio"] == ratio and pick["reference"] == "fp"
    assert pick["reference_fid"] == pytest.approx(ref) and pick["fid_mean"] == pytest.approx(best["fid_mean"])
    assert pick["latency_s"] == pytest.approx(best["latency_s"])
    assert pick["latency_table"]["backend"] == "cpu-onednn-int8" and pick["latency_table"]["batch"] == 8
    assert f"picked by fastest-within {ratio:g}" in out and f"exported candidate {best['key']}" in out
    assert (run / "latency.json").read_bytes() == table  # the run's own table, read as stored

    # a given reference: only the points within ratio x it; here the best-FID point alone
    lowest = fin.sort_values("fid_mean").iloc[0]
    code, _, err = _cli(["export", run, "--pick", "fastest-within", "1.0", "--reference", repr(float(lowest['fid_mean'])),
                         "--out", tmp_path / "r", "--threads", "1"], capsys)
    assert code == 0, err
    pick = json.loads((tmp_path / "r" / "tmpq_export.json").read_text())["provenance"]["pick"]
    assert (pick["key"], pick["reference"]) == (_expected(run, 1.0, lowest["fid_mean"])[0]["key"], "given")

    # an export by key is made as before: no pick entry in its provenance
    code, _, err = _cli(["export", run, "--candidate", best["key"], "--out", tmp_path / "k", "--threads", "1"], capsys)
    assert code == 0, err
    assert "pick" not in json.loads((tmp_path / "k" / "tmpq_export.json").read_text())["provenance"]

    # the API: the same key, and the existing signature still answers the budget pick
    import tmpq

    assert tmpq.pick(run, rule="fastest-within", ratio=ratio) == best["key"]
    assert tmpq.pick(run) == tmpq.pick(run, "none") == fin.sort_values("fid_mean").iloc[0]["key"]


def test_export_pick_refusals_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    run = runs["latency"]
    fin = pd.read_parquet(run / "final.parquet")
    low = float(fin["fid_mean"].min() / fin["fp_fid_mean"].min()) * 0.99  # below the best point's ratio
    cases = [
        (["--pick", "fastest-within", f"{low!r}"], "no validated point has FID within"),
        (["--pick", "slowest", "1.1"], "--pick: unknown pick rule 'slowest'"),
        (["--pick", "fastest-within", "abc"], "--pick: the FID ratio must be a number"),
        (["--pick", "fastest-within", "1.1", "--reference", "0"], "--reference: the reference FID must be"),
        (["--candidate", fin["key"][0], "--reference", "3"], "--reference: applies to --pick only"),
        (["--budget", "w99a99"], "--budget"),
    ]
    for extra, message in cases:
        code, _, err = _cli(["export", run, *extra, "--out", tmp_path / "out", "--threads", "1"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "out").exists()
    # --candidate, --pick and --budget exclude one another, and one of them is needed (a usage error, exit 2)
    for extra in (["--candidate", "k", "--pick", "fastest-within", "1.1"], ["--budget", "none", "--candidate", "k"],
                  ["--pick", "fastest-within", "1.1", "--budget", "none"], []):
        with pytest.raises(SystemExit) as exc:
            _cli(["export", run, *extra, "--out", tmp_path / "out"], capsys)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "not allowed with argument" in err or "one of the arguments" in err
    assert not (tmp_path / "out").exists()
    # tmpq run checks its --pick before anything is written
    code, _, err = _cli(["run", "--config", "tiny", "--pick", "slowest", "1.1", "--run-dir", tmp_path / "rd"], capsys)
    assert code == 2 and "--pick: unknown pick rule 'slowest'" in err and err.count("\n") == 1
    assert not (tmp_path / "rd").exists()
    # the API refuses a rule beside a key or budget, and a rule without its ratio
    import tmpq

    for kw, message in ((dict(budget="none", rule="fastest-within", ratio=1.1), "a budget or a rule"),
                        (dict(rule="fastest-within"), "needs a FID ratio"), (dict(ratio=1.1), "apply to a rule")):
        with pytest.raises(TmpqError, match=message):
            tmpq.pick(run, **kw)
    with pytest.raises(TmpqError, match="not several"):
        tmpq.export(run, fin["key"][0], tmp_path / "out", rule="fastest-within", ratio=1.1)
    assert not (tmp_path / "out").exists()


def test_a_bitops_run_gets_its_latency_table_measured_once_by_the_main_job(runs, tmp_path, monkeypatch):
    """``tmpq.run(..., pick=...)`` over a BitOPs run: validates, measures and stores the run's latency table, exports
    the fastest point within the ratio; a second pick reuses the stored table (no measurement)."""
    import tmpq
    import tmpq.jobs.search as jsearch

    run = tmp_path / "bitops"
    shutil.copytree(runs["bitops"], run)
    assert not (run / "latency.json").exists()
    with pytest.raises(TmpqError, match="--pick: unknown pick rule"):  # refused before any work
        tmpq.run(runs["model"], runs["bitops_cfg"], run, pick="slowest 1.1")
    assert not (run / "final.parquet").exists()

    s = tmpq.run(runs["model"], runs["bitops_cfg"], run, top_k=2, validate_n=16, seeds=(1,),
                 pick="fastest-within 1000", progress=False)
    table = json.loads((run / "latency.json").read_text())
    assert table["format"] == "tmpq.latency-table" and table["fingerprint"]["batch"] == 8
    best, fin, _ref = _expected(run, 1000.0)
    assert len(fin) == 2 and s["pick"]["key"] == s["best"]["key"] == best["key"]
    man = json.loads((run / "export" / "tmpq_export.json").read_text())
    assert man["provenance"]["candidate"] == best["key"]
    assert man["provenance"]["pick"]["latency_s"] == pytest.approx(best["latency_s"])
    assert json.loads((run / "main_job.json").read_text())["pick"]["rule"] == "fastest-within"
    page = (run / "report" / "report.html").read_text()
    assert "<th>ms / image</th>" in page  # the measured table now predicts every front point

    def no_measuring(*a, **k):
        raise AssertionError("the stored latency table should have been reused")

    monkeypatch.setattr(jsearch, "measure_table", no_measuring)
    stored = (run / "latency.json").read_bytes()
    assert tmpq.pick(run, rule="fastest-within", ratio=1000) == best["key"]
    assert (run / "latency.json").read_bytes() == stored


def test_the_report_shows_latency_and_marks_the_fastest_within_point(runs, tmp_path):
    from tmpq.jobs.report import write_report

    run = tmp_path / "latency"
    shutil.copytree(runs["latency"], run, ignore=shutil.ignore_patterns("report"))
    # FP FIDs set equal to the points' own (a hand-edited copy): the best point is within 1.10 x the reference
    fin = pd.read_parquet(run / "final.parquet")
    fin.assign(fp_fid_mean=fin["fid_mean"]).to_parquet(run / "final.parquet", index=False)
    best, _fin, _ref = _expected(run, REPORT_RATIO)
    page = write_report(run, baselines=False, grids=False).read_text()
    assert "<th>ms / image</th>" in page
    assert page.count(f"fastest within {REPORT_RATIO:.2f}×</b></small>") == 1
    row = next(r for r in page.split("<tr") if "fastest within" in r and "<td>" in r)
    assert best["key"] in row and f"{best['latency_s'] * 1e3:.3g}" in page
    assert f"--pick fastest-within {REPORT_RATIO:.2f}" in page
    # no validation: no mark and no note
    (run / "final.parquet").unlink()
    (run / "final.json").unlink()
    page = write_report(run, baselines=False, grids=False).read_text()
    assert "fastest within" not in page.lower() and "<th>ms / image</th>" in page
