"""A real (tiny) search end to end with the local executor: log, compaction, resume by replay."""
import pandas as pd
import pytest

from tmpq.core.errors import TmpqError
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.search import run_search


def tiny_cfg(model_dir, **search):
    return config_from_dict({
        "model": {"path": str(model_dir)},
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6]},
        "calibration": {"steps": 2, "per_step": 4, "sampler_steps": 4, "batch_size": 8},
        "search": {"engine": "pymoo", "steps": 3, "population": 6, "generations": 2, "seed": 1,
                   "bitops_budget": "none", **search},
        "proxy": {"n_images": 4, "teacher_steps": 6},
    })


def test_local_search_writes_a_front_and_resume_repeats_nothing(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir)
    run = run_search(cfg, tmp_path / "run", progress=False)
    ev = pd.read_parquet(run.path / "evaluations.parquet")
    assert len(ev) >= 6 and set(ev["status"]) == {"ok"}
    front = pd.read_parquet(run.path / "pareto.parquet")
    assert 1 <= len(front) <= len(ev)
    assert all(len(t) == 3 for t in front["timesteps"])
    n_lines = len(run.log_path.read_text().splitlines())
    again = run_search(cfg, tmp_path / "run", resume=True, progress=False)  # everything served from the log
    assert len(again.log_path.read_text().splitlines()) == n_lines
    assert pd.read_parquet(again.path / "pareto.parquet")["key"].tolist() == front["key"].tolist()


def test_resume_with_changed_config_is_refused(tiny_model_dir, tmp_path):
    run_search(tiny_cfg(tiny_model_dir, generations=1), tmp_path / "run", progress=False)
    with pytest.raises(TmpqError, match="refusing to resume"):
        run_search(tiny_cfg(tiny_model_dir, generations=1, seed=2), tmp_path / "run", resume=True, progress=False)


@pytest.mark.parametrize("kind", ["sensitivity", "error"])
def test_data_driven_grouping_search_and_resume_reuse_stored_groups(tiny_model_dir, tmp_path, monkeypatch, kind):
    import json

    import tmpq.evaluators.profile as probes

    cfg = tiny_cfg(tiny_model_dir, grouping=kind, generations=1)
    run = run_search(cfg, tmp_path / "run", progress=False)
    groups = json.loads((run.path / "search_space.json").read_text())["groups"]
    assert groups["kind"] == kind and len(groups["starts"]) == 3 and groups["starts"][0] == 0
    ev = pd.read_parquet(run.path / "evaluations.parquet")
    from tmpq.search.groups import TimeGroups

    tg = TimeGroups.from_dict(groups)
    for ts in ev["timesteps"]:  # one timestep per data-driven group (offsets() raises otherwise)
        assert len(tg.offsets(ts)) == 3

    def no_profile(*a, **k):
        raise AssertionError("a resumed run must reuse its stored groups, not re-profile")

    for k in probes.RATES:
        monkeypatch.setitem(probes.RATES, k, no_profile)
    run_search(cfg, tmp_path / "run", resume=True, progress=False)


def test_dp_grouping_seeds_each_step_count_with_its_dp_schedule_and_resume_keeps_the_groups(tiny_model_dir, tmp_path,
                                                                                           monkeypatch):
    """``grouping = "dp"``: each step count's groups lie around its DP-optimal timesteps, the first generation holds
    the uniform options on exactly those schedules, every evaluated schedule fits its groups, and a resumed run
    reads its stored groups instead of running the FP teacher again."""
    import json

    import tmpq.jobs.search as js
    from tmpq.core.model import load_model
    from tmpq.jobs.run import load_run
    from tmpq.search.groups import TimeGroups

    cfg = tiny_cfg(tiny_model_dir, grouping="dp", steps=3, step_choices=[2, 3, 4], engine="random", generations=1)
    run = run_search(cfg, tmp_path / "run", progress=False)
    m = load_model(cfg.model)
    best = js.dp_schedules(m.unet, m.scheduler_config, [2, 3, 4])
    stored = [TimeGroups.from_dict(g) for g in json.loads((run.path / "search_space.json").read_text())["step_groups"]]
    assert sorted(g.n for g in stored) == [2, 3, 4]
    for g in stored:
        assert g.kind == "dp" and g.schedule(g.seed_offsets()) == best[g.n]
    ev = load_run(run.path).evaluations
    uniform = {tuple(int(t) for t in ts) for ts, b in zip(ev["timesteps"], ev["bits"]) if len({tuple(x) for x in b}) == 1}
    assert uniform and uniform <= set(best.values())  # the seeds: uniform bits on the DP schedules
    by_n = {g.n: g for g in stored}
    for ts in ev["timesteps"]:
        assert len(by_n[len(ts)].offsets(ts)) == len(ts)

    def no_teacher(*a, **k):
        raise AssertionError("a resumed run must reuse its stored groups, not run the FP teacher again")

    monkeypatch.setattr(js, "dp_costs", no_teacher)
    n_lines = len(run.log_path.read_text().splitlines())
    run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(run.log_path.read_text().splitlines()) == n_lines


def test_per_group_bits_search_runs_and_loads(tiny_model_dir, tmp_path):
    from tmpq.jobs.run import load_run

    run = run_search(tiny_cfg(tiny_model_dir, per_group_bits=True, generations=1), tmp_path / "run", progress=False)
    ev = load_run(run.path).evaluations
    assert set(ev["status"]) == {"ok"}
    bits = ev["bits"].iloc[0]
    assert len(bits) == 3 and all(len(block) == len(bits[0]) and len(block[0]) == 2 for block in bits)


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_single_axis_searches_hold_the_other_axis(tiny_model_dir, tmp_path, engine):
    from tmpq.jobs.run import load_run
    from tmpq.search.groups import quadratic_groups

    quad = list(quadratic_groups(3).schedule(quadratic_groups(3).seed_offsets()))
    run = run_search(tiny_cfg(tiny_model_dir, axes="bits", engine=engine, generations=1, grouping="quad"),
                     tmp_path / "b", progress=False)
    ev = load_run(run.path).evaluations
    assert len(ev) >= 2 and all(list(t) == quad for t in ev["timesteps"])
    run = run_search(tiny_cfg(tiny_model_dir, axes="time", fixed_bits="w4a8", engine=engine, generations=1),
                     tmp_path / "t", progress=False)
    ev = load_run(run.path).evaluations
    assert len({tuple(t) for t in ev["timesteps"]}) >= 2
    assert all(tuple(p) == (4, 8) for bits in ev["bits"] for p in bits)


def test_given_supernet_file_is_used_without_calibrating(tiny_model_dir, tmp_path, monkeypatch):
    from tmpq.jobs.run import load_run
    from tmpq.supernet import QuantSupernet

    first = run_search(tiny_cfg(tiny_model_dir, generations=1), tmp_path / "a", progress=False)

    def no_calibration(*a, **k):
        raise AssertionError("a given supernet file must not be recalibrated")

    monkeypatch.setattr(QuantSupernet, "calibrate", no_calibration)
    cfg = tiny_cfg(tiny_model_dir, generations=1)
    cfg = cfg.__class__(**{**cfg.__dict__, "calibration": cfg.calibration.__class__(
        **{**cfg.calibration.__dict__, "supernet_file": str(first.path / "supernet.safetensors")})})
    second = run_search(cfg, tmp_path / "b", progress=False)
    a, b = load_run(first.path).evaluations, load_run(second.path).evaluations
    assert a["key"].tolist() == b["key"].tolist() and a["fid_proxy"].tolist() == b["fid_proxy"].tolist()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a supernet")
    cfg = cfg.__class__(**{**cfg.__dict__, "calibration": cfg.calibration.__class__(
        **{**cfg.calibration.__dict__, "supernet_file": str(bad)})})
    with pytest.raises(TmpqError, match="corrupt or truncated supernet file"):
        run_search(cfg, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_step_count_gene_search_mixes_step_counts_and_resumes(tiny_model_dir, tmp_path):
    from tmpq.jobs.run import load_run

    cfg = tiny_cfg(tiny_model_dir, steps=3, step_choices=[2, 3, 4], generations=2)
    run = run_search(cfg, tmp_path / "run", progress=False)
    ev = load_run(run.path).evaluations
    assert set(ev["status"]) == {"ok"}
    assert len({len(t) for t in ev["timesteps"]}) >= 2  # the step count is searched
    import json

    from tmpq.search.space import Candidate, SearchSpace

    space = SearchSpace.from_dict(json.loads((run.path / "search_space.json").read_text()))
    assert space.step_choices == (2, 3, 4)
    for t, b, bits in zip(ev["timesteps"], ev["bitops"], ev["bits"]):  # cost of each row at its own step count
        c = Candidate(tuple(int(x) for x in t), tuple(tuple(int(v) for v in p) for p in bits))
        assert b == space.bitops(c) and space.decode(space.encode(c)) == c
    n_lines = len(run.log_path.read_text().splitlines())
    run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(run.log_path.read_text().splitlines()) == n_lines


def test_fid_proxy_without_a_reference_is_refused_before_any_run_directory(tiny_model_dir, tmp_path):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir

    rgb = tmp_path / "rgb-ddpm"
    save_pipeline_dir(tiny_unet(in_channels=3), embedded_scheduler_config(), rgb)
    cfg = tiny_cfg(rgb)
    cfg = config_from_dict({**cfg.to_dict(), "proxy": {"name": "fid", "n_images": 4}})
    with pytest.raises(TmpqError, match="proxy.reference: FID on a 3-channel model"):
        run_search(cfg, tmp_path / "run", progress=False)
    cfg = config_from_dict({**tiny_cfg(tiny_model_dir).to_dict(),
                            "proxy": {"name": "fid", "n_images": 4, "reference": str(tmp_path / "nope.npz")}})
    with pytest.raises(TmpqError, match="proxy.reference: no such file"):
        run_search(cfg, tmp_path / "run", progress=False)
    paired = {"name": "paired-feat", "n_images": 4}
    cfg = config_from_dict({**tiny_cfg(rgb).to_dict(), "proxy": {**paired, "extractor": "domain"}})
    with pytest.raises(TmpqError, match="proxy.extractor: the domain extractor reads 1-channel digits; this model "
                                        "has 3 channels"):
        run_search(cfg, tmp_path / "run", progress=False)
    cfg = config_from_dict({**tiny_cfg(rgb).to_dict(), "proxy": {**paired, "extractor": "inception",
                                                                "inception_weights": str(tmp_path / "pt.pth")}})
    with pytest.raises(TmpqError, match="proxy.inception_weights: no such file .*pt.pth"):
        run_search(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_fid_proxy_search_on_a_one_channel_model_scores_against_the_digits(tiny_model_dir, tmp_path):
    from tmpq.jobs.run import load_run

    cfg = config_from_dict({**tiny_cfg(tiny_model_dir, generations=1).to_dict(),
                            "proxy": {"name": "fid", "n_images": 8}})
    ev = load_run(run_search(cfg, tmp_path / "run", progress=False).path).evaluations
    assert set(ev["status"]) == {"ok"} and (ev["fid_proxy"] > 0).all()


def test_uniform_seeds_start_the_first_generation_and_can_be_turned_off(tiny_model_dir, tmp_path):
    from tmpq.jobs.run import load_run

    def first_gen_uniform(**search):
        cfg = tiny_cfg(tiny_model_dir, engine="random", generations=1, **search)
        ev = load_run(run_search(cfg, tmp_path / str(search), progress=False).path).evaluations
        assert len(ev) == 6 and set(ev["generation"]) == {0}
        return {tuple(b[0]) for b in ev["bits"] if len({tuple(x) for x in b}) == 1}

    # population 6 -> 3 seeds (half of it), each a different uniform option
    assert len(first_gen_uniform()) == 3
    # off: the first generation is the engine's own random draws (a 4-option space with tens of layers: a draw
    # that puts one option on every layer has probability ~1e-20)
    assert first_gen_uniform(uniform_seeds=False) == set()


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_size_objective_makes_a_three_objective_search_and_front(tiny_model_dir, tmp_path, engine):
    import numpy as np

    from tmpq.jobs.run import load_run
    from tmpq.search.pareto import non_dominated

    cfg = tiny_cfg(tiny_model_dir, engine=engine, size_objective=True)
    run = run_search(cfg, tmp_path / "run", progress=False)
    loaded = load_run(run.path)
    ev = loaded.evaluations
    ok = ev[ev["status"] == "ok"].drop_duplicates("key")
    three = ok[non_dominated(ok[["fid_proxy", "bitops", "size_mb"]].to_numpy(float))]
    # the run's front (file and API) is taken over the three objectives; it holds the two-objective front
    front = pd.read_parquet(run.path / "pareto.parquet")
    assert set(front["key"]) == set(three["key"]) == set(loaded.pareto()["key"])
    assert set(loaded.pareto(("fid_proxy", "bitops"))["key"]) <= set(front["key"])
    assert np.isfinite(front[["fid_proxy", "bitops", "size_mb"]].to_numpy(float)).all()
    if engine == "optuna":  # the study itself has three objectives, each told its value
        import optuna

        from tmpq.search.engines import optuna_study_for_run

        url, name = optuna_study_for_run(run.path)
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.directions) == 3
        told = {t.user_attrs["tmpq_key"]: t.values for t in study.get_trials() if t.values}
        row = ok.set_index("key").loc[next(iter(told))]
        assert told[row.name] == pytest.approx([row["fid_proxy"], row["bitops"], row["size_mb"]])
    # and it resumes (the engine's stored objective count matches)
    n_lines = len(run.log_path.read_text().splitlines())
    run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(run.log_path.read_text().splitlines()) == n_lines


def test_prepared_run_is_set_up_without_a_search_and_the_search_resumes_it_without_recalibrating(
        tiny_model_dir, tmp_path, monkeypatch):
    from tmpq.jobs.search import prepare_run, worker_spec
    from tmpq.supernet import QuantSupernet

    cfg = tiny_cfg(tiny_model_dir, generations=1)
    run, space, sn = prepare_run(cfg, tmp_path / "run", progress=False)
    assert sn == run.path / "supernet.safetensors" and sn.is_file() and list(run.replay()) == []
    calibrated = sn.read_bytes()

    def no_calibration(*a, **k):
        raise AssertionError("a prepared run's supernet must not be recalibrated")

    monkeypatch.setattr(QuantSupernet, "calibrate", no_calibration)
    again, space2, sn2 = prepare_run(cfg, tmp_path / "run", resume=True, progress=False)
    assert sn2.read_bytes() == calibrated and space2.to_dict() == space.to_dict()
    # the spec a benchmark evaluates one candidate with is the search workers' own
    spec = worker_spec(cfg, sn, threads=1)
    assert spec.companions is False and spec.supernet_file == str(sn.resolve()) and spec.threads == 1
    done = run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(list(done.replay())) >= cfg.search.population // 2
    assert sn.read_bytes() == calibrated
