"""Hostile config values: every key of the run-config schema (found by walking the dataclasses) against negative, zero,
NaN, infinite, huge, wrong-typed and garbage-string values gives either a genuinely valid config or one line naming
the key; and the CLI refuses such configs and flags with exit 2 before any run directory exists."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_cli
from tmpq.core.errors import TmpqError
from tmpq.jobs.config import RunConfig, config_from_dict, load_config
from tmpq.jobs.main import MainJobConfig, export_budget, main_job


def _schema(cls=RunConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotated type) of every leaf of the run config."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += _schema(hints[f.name], key + ".")
        else:
            out.append((key, hints[f.name]))
    return out


SCHEMA = _schema()
# keys whose strings are free text (paths, fnmatch patterns, regexes, class names, prompts, a database URL): any
# printable text is a valid config value there (whether the file exists is the loader's check, also before any run
# directory)
FREE_TEXT = {"model.path", "model.prompts", "supernet.include", "supernet.exclude", "supernet.block_types",
             "supernet.tie", "calibration.supernet_file", "proxy.reference", "proxy.inception_weights",
             "search.storage"}
GARBAGE = "\u2603\u202e\u00e9\U0001f600"  # snowman, right-to-left override, e-acute, emoji
# values no key may accept (as the value or, for a list key, as its entry)
NEVER = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge int": 10**30, "huge float": 1e300,
         "int64 max": 2**63 - 1, "negative": -7, "table": {"x": 1}, "NUL text": "a\x00b", "long text": "x" * 100_000}
# values some keys accept (then the config must be genuinely valid)
MAYBE = {"zero": 0, "zero float": 0.0, "true": True, "garbage text": GARBAGE, "empty text": "", "empty list": []}


def _nest(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _is_valid_value(key: str, tp, value) -> bool:
    """An accepted value is of its annotated type, finite and small, and text only where text is free."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        return isinstance(value, tuple) and all(_is_valid_value(key, item, v) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and -1 <= value < 2**32
    if tp is float:
        return isinstance(value, float) and math.isfinite(value) and abs(value) < 1e12
    if tp is str:
        return isinstance(value, str) and "\x00" not in value and len(value) < 10_000 and (
            value.isascii() or key in FREE_TEXT)
    return isinstance(value, (dict, str))  # supernet.pin: its class checks the entries


def _assert_clean(key: str, value, tp) -> None:
    """``config_from_dict`` on ``{key: value}`` either refuses it in one line naming the key (a TmpqError, nothing
    else) or gives a config that holds a valid value and survives its own round trip."""
    try:
        cfg = config_from_dict(_nest(key, value))
    except TmpqError as exc:
        msg = str(exc)
        assert "\n" not in msg and len(msg) < 600, msg
        assert msg.startswith(key), f"{key} = {value!r:.60}: message does not name the key: {msg}"
        return
    got = _get(cfg, key)
    assert _is_valid_value(key, tp, got), f"{key} accepted {value!r:.60} as {got!r:.60}"
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("key,tp", SCHEMA, ids=[k for k, _ in SCHEMA])
def test_every_key_refuses_hostile_values_in_one_line(key, tp):
    is_list = typing.get_origin(tp) is tuple
    for label, value in NEVER.items():
        for v in ([value], value) if is_list else (value,):
            with pytest.raises(TmpqError) as err:
                config_from_dict(_nest(key, v))
            msg = str(err.value)
            assert msg.startswith(key) and "\n" not in msg and len(msg) < 600, (label, msg)
    for value in MAYBE.values():
        for v in ([value], value) if is_list else (value,):
            _assert_clean(key, v, tp)
    if tp not in (bool, str) and not is_list:  # a number given as text or a bool is a wrong type
        for wrong in ("8", True) if tp is not dict | str else (7,):
            with pytest.raises(TmpqError, match=f"^{key}"):
                config_from_dict(_nest(key, wrong))


def test_the_walk_covers_every_section():
    sections = {k.split(".")[0] for k, _ in SCHEMA}
    assert sections == {f.name for f in dataclasses.fields(RunConfig)}
    assert len(SCHEMA) > 60 and "search.seed" in dict(SCHEMA) and "executor.timeout_s" in dict(SCHEMA)


_hostile = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.booleans(), st.none(),
                     st.text(max_size=12), st.lists(st.one_of(st.integers(-3, 40), st.floats(), st.text(max_size=4)),
                                                    max_size=3),
                     st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry=st.sampled_from(SCHEMA), value=_hostile)
def test_random_values_are_valid_or_one_line(entry, value):
    key, tp = entry
    _assert_clean(key, value, tp)


@pytest.mark.parametrize("data,needle", [
    ({"search": {"seed": -1}}, "search.seed: must be >= 0, got -1"),
    ({"proxy": {"seed": 2**32}}, "proxy.seed: must be <= 4294967295 (the bound on this key)"),
    ({"proxy": {"n_images": 9999999999999}}, "proxy.n_images: must be <= 1000000 (the bound on this key)"),
    ({"executor": {"timeout_s": math.nan}}, "executor.timeout_s: must be a finite number, got nan"),
    ({"search": {"storage": "nosuch://host/db"}}, "search.storage: must be empty"),
    ({"search": {"storage": "sqlite:/x.db"}}, "search.storage: must be empty"),
    ({"search": {"storage": "postgresql://u:secret@h:port/db"}},
     "got 'postgresql://u:***@h:port/db' (invalid literal"),
    ({"supernet": {"w_bits": [8, 4]}}, "supernet.w_bits: [8, 4] lacks the weight width of the default "
     "search.bitops_budget 'w6a6'"),
    ({"search": {"bitops_budget": "w6a6"}, "supernet": {"w_bits": [8, 4]}},
     "search.bitops_budget: w6a6 is not a uniform option of the supernet"),
    ({"search": {"axes": "time", "fixed_bits": "w6a6"}, "supernet": {"a_bits": [8]}},
     "supernet.a_bits: [8] lacks the activation width of the default search.bitops_budget 'w6a6'"),
    ({"search": {"axes": "time", "fixed_bits": "w6a8", "bitops_budget": "none"}, "supernet": {"w_bits": [8]}},
     "search.fixed_bits: w6a8 is not a uniform option of the supernet"),
    ({"calibration": {"steps": 30, "sampler_steps": 10}}, "calibration.steps: 30 must be <= calibration.sampler_steps"),
    ({"executor": {"address": "not an address"}}, "executor.address: must be empty"),
    ({"supernet": {"tie": ["(unclosed"]}}, "supernet.tie: '(unclosed' is not a regular expression"),
    ({"search": {"bitops_budget": "inf"}}, "search.bitops_budget: must be 'none'"),
])
def test_named_faults(data, needle):
    with pytest.raises(TmpqError) as err:
        config_from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("url", ["", "sqlite:///optuna.db", "sqlite:////abs/optuna.db",
                                 "postgresql+psycopg2://user@host:5432/db", "mysql://user@host/db"])
def test_good_storage_urls_pass_without_connecting(url):
    assert config_from_dict({"search": {"engine": "optuna", "storage": url}}).search.storage == url


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(TmpqError, match="is a directory"):
        load_config(tmp_path)


def test_the_main_job_takes_the_configs_budget_and_checks_it_before_the_search(tmp_path):
    tiny = load_config(REPO / "configs" / "tiny.toml")  # w_bits [8, 4], bitops_budget "none"
    assert export_budget(tiny, MainJobConfig()) == "none"  # no default overrides the config's "none"
    assert export_budget(tiny, MainJobConfig(budget="w8a8")) == "w8a8"
    with pytest.raises(TmpqError, match=r"^--budget: w6a6 is not a uniform option of the supernet"):
        export_budget(tiny, MainJobConfig(budget="w6a6"))
    for job, needle in ((MainJobConfig(budget="w6a6"), "--budget"), (MainJobConfig(top_k=0), "--top-k"),
                        (MainJobConfig(validate_n=10**9), "--validate-n"), (MainJobConfig(seeds=(-1,)), "--seeds"),
                        (MainJobConfig(budget="cheap"), "--budget")):
        with pytest.raises(TmpqError, match=f"^{needle}"):
            main_job(tiny, tmp_path / "run", job, progress=False)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,needle", [
    (["search", "--config", "{dir}"], "is a directory"),
    (["search", "--config", "{n_images}"], "proxy.n_images: must be <= 1000000"),
    (["search", "--config", "{timeout}"], "executor.timeout_s: must be a finite number"),
    (["search", "--config", "{storage}"], "search.storage: must be empty"),
    (["search", "--workers", "100000"], "executor.workers: must be <= 4096"),
    (["search", "--gpus-per-worker", "nan"], "executor.gpus_per_worker: must be a finite number"),
    (["search", "--threads", "100000000"], "threads: must be in [1, 1024]"),
    (["run", "--config", "configs/tiny.toml", "--seeds", "1,-2"], "--seeds: each seed must be in [0, 2**32)"),
    (["run", "--config", "configs/tiny.toml", "--budget", "w5a5"], "--budget: w5a5 is not a uniform option"),
])
def test_cli_refuses_before_writing(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "n.toml").write_text("[proxy]\nn_images = 9999999999999\n")
    (tmp_path / "t.toml").write_text("[executor]\ntimeout_s = nan\n")
    (tmp_path / "s.toml").write_text('[search]\nengine = "optuna"\nstorage = "postgres:/nohost"\n')
    argv = [a.format(dir=tmp_path, n_images=tmp_path / "n.toml", timeout=tmp_path / "t.toml",
                     storage=tmp_path / "s.toml") for a in argv]
    code, out, err = run_cli([*argv, "--run-dir", tmp_path / "R"], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "R").exists()


def _tmpq(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tmpq", *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_search_with_a_bad_config_is_one_line_and_writes_nothing(tmp_path):
    """In a fresh interpreter, as a user runs it (the other faults go through the same ``main`` in process above)."""
    (tmp_path / "bad.toml").write_text("[search]\nseed = -1\n")
    r = _tmpq("search", "--config", tmp_path / "bad.toml", "--run-dir", tmp_path / "R")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tmpq: error: search.seed: must be >= 0, got -1"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "R").exists()


def test_run_with_a_budget_the_supernet_lacks_fails_before_the_search(tmp_path):
    """The search would create the run directory before its first generation: none exists, so none ran."""
    r = _tmpq("run", "--config", "configs/tiny.toml", "--budget", "w6a6", "--run-dir", tmp_path / "R")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("tmpq: error: --budget: w6a6 is not a uniform option of the supernet"), r.stderr
    assert not (tmp_path / "R").exists()


def test_output_into_a_closed_pipe_ends_quietly():
    """``tmpq status RUN | head -1``: the reader is gone before tmpq writes; no traceback, no error line."""
    p = subprocess.Popen([sys.executable, "-m", "tmpq", "status", "tests/data/run-3f4b168"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader leaves at once: every write of tmpq meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err


@pytest.mark.parametrize("flags,needle", [
    (["--n", "1000000000"], "--n: must be <= 1000000 (the bound on this flag)"),
    (["--seeds", "1,1"], "--seeds: repeated seed"),
    (["--seeds", "-3"], "--seeds: each seed must be in [0, 2**32)"),
    (["--recon-iters", "-1"], "--recon-iters: must be >= 0"),
])
def test_validate_flags_are_checked_before_the_run_is_touched(flags, needle, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "data" / "run-3f4b168", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli(["validate", run, *flags], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
