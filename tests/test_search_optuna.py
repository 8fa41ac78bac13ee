"""The Optuna engine: NSGAIISampler through ask / tell on an RDB study (in memory, SQLite, and a real PostgreSQL
server started on loopback), analytic feasibility before evaluation, failed evaluations, and resume by continuation
(engine level and through ``run_search``)."""
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from test_search_engines import run, synthetic
from test_search_space import make_space

from tmpq.core.errors import TmpqError
from tmpq.jobs.config import CHOICES, config_from_dict
from tmpq.search.engines import (
    ENGINES,
    FAILED_VALUE,
    OptunaNSGA2,
    make_engine,
    optuna_study_for_run,
)


def budget_space(n=6, genes=4):
    """A W6A6 BitOPs budget: about half the random genomes are over it."""
    sp0 = make_space(n=n, genes=genes)
    return make_space(n=n, genes=genes, bitops_budget=sp0.bitops(sp0.uniform_candidate(6, 6)))


def complete_by_generation(study):
    """tmpq generation -> COMPLETE trials (and a check that Optuna's own NSGA-II generation agrees)."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        gen = t.user_attrs["tmpq_generation"]
        assert t.system_attrs["NSGAIISampler:generation"] == gen  # Optuna breeds generation g+1 from exactly g
        out.setdefault(gen, []).append(t)
    return out


# -- (a) the engine on a synthetic objective ---------------------------------------------------------------------

def test_optuna_asks_only_feasible_genomes_and_is_deterministic(tmp_path):
    sp = budget_space()
    seed_genome = sp.encode(sp.uniform_candidate(6, 6))
    a = run(make_engine("optuna", sp, seed=3, population=10, seeds=[seed_genome]), sp, 3)  # run() asserts feasible
    b = run(make_engine("optuna", sp, seed=3, population=10, seeds=[seed_genome]), sp, 3)
    c = run(make_engine("optuna", sp, seed=3, population=10, seeds=[seed_genome],
                        storage=f"sqlite:///{tmp_path / 'o.db'}"), sp, 3)
    assert len(a) == 30 and np.array_equal(a[0][0], seed_genome)  # the seed is enqueued and asked first
    for other in (b, c):  # same seed, same sequence, in memory or on SQLite
        assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, other))
    d = run(make_engine("optuna", sp, seed=4, population=10), sp, 3)
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, d))


def test_infeasible_proposals_are_told_fail_and_generations_stay_whole():
    sp = budget_space()
    eng = OptunaNSGA2(sp, seed=0, population=8, max_rejects=3)  # a low cap: repairs are enqueued
    run(eng, sp, 4)
    trials = eng.study.get_trials(deepcopy=False)
    rejected = [t for t in trials if t.user_attrs.get("tmpq_infeasible")]
    assert rejected and all(t.state == TrialState.FAIL for t in rejected)
    assert all(t.constraints["bitops"] > 0 for t in rejected)
    repaired = [t for t in trials if t.user_attrs.get("tmpq_origin") == "repair"]
    assert repaired and all(t.state == TrialState.COMPLETE for t in repaired)
    by_gen = complete_by_generation(eng.study)
    assert sorted(by_gen) == [0, 1, 2, 3] and all(len(v) == 8 for v in by_gen.values())
    assert all(t.constraints["bitops"] <= 0 for v in by_gen.values() for t in v)
    assert eng.generation == 4 and eng.study.user_attrs["tmpq_generations"] == 4


def test_failed_evaluations_are_dominated_and_do_not_stop_the_search():
    sp = make_space(genes=4)
    eng = make_engine("optuna", sp, seed=1, population=6)
    for gen in range(3):
        genomes = eng.ask()
        F = np.array([synthetic(sp, g) for g in genomes])
        F[: 3 if gen == 0 else 1] = np.inf  # failed evaluations (the service tells inf)
        F[-1, 0] = np.nan
        eng.tell(genomes, F)
    by_gen = complete_by_generation(eng.study)
    assert [len(by_gen[g]) for g in range(3)] == [6, 6, 6]
    failed = [t for v in by_gen.values() for t in v if FAILED_VALUE in t.values]
    assert len(failed) == 4 + 2 + 2 and all(np.isfinite(t.values).all() for t in failed)


def test_ask_tell_misuse_is_an_error():
    sp = make_space(genes=3)
    eng = make_engine("optuna", sp, seed=0, population=4)
    genomes = eng.ask()
    with pytest.raises(TmpqError, match="ask\\(\\) called again"):
        eng.ask()
    with pytest.raises(TmpqError, match="exactly the genomes"):
        eng.tell(genomes[::-1], np.zeros((4, 2)))
    eng.tell(genomes, np.zeros((4, 2)))


def test_resume_continues_the_study_and_reserves_the_interrupted_generation(tmp_path):
    sp = budget_space()
    url = f"sqlite:///{tmp_path / 'o.db'}"
    eng = OptunaNSGA2(sp, seed=2, population=8, storage=url, study_name="s")
    run(eng, sp, 2)
    interrupted = eng.ask()  # generation 2 handed out, never told: the driver was killed
    del eng
    again = OptunaNSGA2(sp, seed=2, population=8, storage=url, study_name="s")
    assert again.generation == 2
    first = again.ask()
    assert all(np.array_equal(x, y) for x, y in zip(first, interrupted))  # the same candidates, served from the log
    again.tell(first, np.array([synthetic(sp, g) for g in first]))
    run(again, sp, 1)
    by_gen = complete_by_generation(again.study)
    assert sorted(by_gen) == [0, 1, 2, 3] and all(len(v) == 8 for v in by_gen.values())
    assert not again.study.get_trials(states=(TrialState.RUNNING,))
    with pytest.raises(TmpqError, match="stored population 8 differs"):
        OptunaNSGA2(sp, seed=2, population=10, storage=url, study_name="s")


def test_a_stale_trial_of_a_partial_ask_is_failed_and_the_generation_topped_up(tmp_path):
    sp = make_space(genes=3)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    eng = OptunaNSGA2(sp, seed=0, population=5, storage=url)
    run(eng, sp, 1)
    eng.study.ask()  # a trial with no parameters (killed inside ask): stale
    again = OptunaNSGA2(sp, seed=0, population=5, storage=url)
    assert [t.state for t in again.study.get_trials()][-1] == TrialState.FAIL
    run(again, sp, 1)
    assert [len(v) for _, v in sorted(complete_by_generation(again.study).items())] == [5, 5]


def test_bad_storage_is_one_line_naming_the_key():
    with pytest.raises(TmpqError, match="search.storage: cannot open") as err:
        make_engine("optuna", make_space(genes=2), population=4, storage="nosuchdialect://u:secret@h/db")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_config_storage_key_and_engine_choices():
    assert set(CHOICES["search.engine"]) == set(ENGINES) and "optuna" in ENGINES
    assert config_from_dict({"search": {"engine": "optuna"}}).search.storage == ""
    url = "postgresql+psycopg2://tmpq@127.0.0.1:5432/tmpq"
    assert config_from_dict({"search": {"storage": url}}).search.storage == url
    for bad, needle in (("optuna.db", "search.storage: must be empty"), (3, "search.storage: must be a string")):
        with pytest.raises(TmpqError, match=needle):
            config_from_dict({"search": {"storage": bad}})
    from tmpq.cli import build_parser

    assert build_parser().parse_args(["search", "--engine", "optuna"]).engine == "optuna"


def test_study_for_run_relative_dir_and_stable_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run").mkdir()
    url, name = optuna_study_for_run(Path("run"))
    assert url == f"sqlite:///{tmp_path / 'run' / 'optuna.db'}" and name.startswith("tmpq-run-")
    assert optuna_study_for_run(Path("run")) == (url, name)  # kept in run/optuna.json for resume
    assert optuna_study_for_run(Path("run"), "postgresql://h/db") == ("postgresql://h/db", name)


# -- (b) a real tiny search through the service, interrupted and resumed -----------------------------------------

class _Killed(Exception):
    pass


class _KillInSecondGeneration:
    """Wraps the local executor: the first evaluation fails; the driver dies after one evaluation of generation 2."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def map(self, tasks):
        from tmpq.search.executors import Outcome

        self.calls += 1
        for i, (task, out) in enumerate(self.inner.map(tasks)):
            if self.calls == 1 and i == 0:
                out = Outcome("failed", {}, 0.0, "test", "RuntimeError: injected")
            yield task, out
            if self.calls == 2:
                break
        if self.calls == 2:
            raise _Killed

    def close(self):
        self.inner.close()


def test_run_search_optuna_on_sqlite_in_a_relative_run_dir_resumes(tiny_model_dir, tmp_path, monkeypatch):
    from test_search_service import tiny_cfg

    from tmpq.jobs.search import WorkerSpec, run_search
    from tmpq.search.executors import LocalExecutor

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tiny_model_dir, engine="optuna")
    spec = WorkerSpec(cfg.model.path, str(tmp_path / "run" / "supernet.safetensors"),
                      json.loads(json.dumps(cfg.proxy.__dict__)), 1)
    with pytest.raises(_Killed):
        run_search(cfg, Path("run"), executor=_KillInSecondGeneration(LocalExecutor(spec)), progress=False)
    assert (tmp_path / "run" / "optuna.db").is_file()
    url, name = optuna_study_for_run(tmp_path / "run")
    study = optuna.load_study(study_name=name, storage=url)
    assert study.user_attrs["tmpq_generations"] == 1
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == cfg.search.population  # generation 2 in flight
    lines_before = (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()

    run = run_search(cfg, Path("run"), resume=True, progress=False)
    records = [json.loads(x) for x in run.log_path.read_text().splitlines()]
    assert [json.loads(x) for x in lines_before] == records[: len(lines_before)]  # nothing logged is redone
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) and [r["status"] for r in records].count("failed") == 1
    study = optuna.load_study(study_name=name, storage=url)
    assert study.user_attrs["tmpq_generations"] == 2 and not study.get_trials(states=(TrialState.RUNNING,))
    by_gen = complete_by_generation(study)
    assert [len(by_gen[g]) for g in (0, 1)] == [cfg.search.population] * 2
    told = {t.user_attrs["tmpq_key"] for v in by_gen.values() for t in v}
    assert told == set(keys)  # every evaluation was told to Optuna, every told value came from the log
    gen1_logged = {r["key"] for r in records[: len(lines_before)] if r["generation"] == 1}
    assert gen1_logged and gen1_logged <= {t.user_attrs["tmpq_key"] for t in by_gen[1]}  # re-served, not re-asked
    assert any(FAILED_VALUE in t.values for t in by_gen[0])
    import pandas as pd

    assert not pd.read_parquet(run.path / "pareto.parquet").empty
    n_trials = len(study.trials)
    run_search(cfg, Path("run"), resume=True, progress=False)  # finished: nothing asked, nothing evaluated
    assert len(run.log_path.read_text().splitlines()) == len(records)
    assert len(optuna.load_study(study_name=name, storage=url).trials) == n_trials


# -- (c) a real PostgreSQL server on loopback --------------------------------------------------------------------

def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl), one database, trust auth; stopped after."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed; `make setup` installs Debian's postgresql")
    base = Path(tempfile.mkdtemp(prefix="tmpq-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = base / "data", base / "server.log", _free_port()

    def pg(tool, *args, check=True):
        res = subprocess.run(as_user + [str(bindir / tool), *args], capture_output=True, text=True, timeout=120)
        if check and res.returncode != 0:
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.strip()}\n{tail}")
        return res

    try:
        pg("initdb", "-D", str(data), "-U", "tmpq", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off", "start")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tmpq", "tmpq_test")
            yield f"postgresql+psycopg2://tmpq@127.0.0.1:{port}/tmpq_test"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_optuna_engine_on_a_real_postgresql_server(postgres_url):
    sp = budget_space()
    eng = make_engine("optuna", sp, seed=5, population=6, storage=postgres_url, study_name="tmpq-pg")
    asked = run(eng, sp, 2)
    study = optuna.load_study(study_name="tmpq-pg", storage=postgres_url)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 12 and study.user_attrs["tmpq_generations"] == 2
    assert [np.array([t.params[f"g{i}"] for i in range(sp.genome_length)]).tolist() for t in done] == \
        [g.tolist() for g, _ in asked]
    assert np.allclose([t.values for t in done], [f for _, f in asked])
    again = make_engine("optuna", sp, seed=5, population=6, storage=postgres_url, study_name="tmpq-pg")
    assert again.generation == 2
    run(again, sp, 1)
    assert len(optuna.load_study(study_name="tmpq-pg", storage=postgres_url)
               .get_trials(states=(TrialState.COMPLETE,))) == 18
