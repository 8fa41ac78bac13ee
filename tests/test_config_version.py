"""The run config's version table: every key is of version 1 or listed with the version that added it, a run's
fingerprint is what the hand lists it replaced gave (so every existing run resumes), new runs record their version
and a newer one is refused in one line."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from tmpq.core.data import data_fingerprint
from tmpq.core.errors import TmpqError
from tmpq.core.model import ModelConfig
from tmpq.evaluators.candidate import ProxyConfig
from tmpq.jobs.config import CONFIG_VERSION, LATER_KEYS, RunConfig, config_from_dict, preset_names
from tmpq.jobs.search import run_fingerprint
from tmpq.supernet import SupernetConfig

# the keys of the first runs' configs (version 1), frozen (the executor section never counts)
V1 = {
    "model": {"path"},
    "supernet": {"w_bits", "a_bits", "tie_qkv", "w_rounding", "w_granularity", "group_size", "w_two_bit",
                 "bias_correction", "w_observer", "a_observer"},
    "calibration": {"mode", "strategy", "steps", "per_step", "sampler_steps", "batch_size", "seed", "recon_iters",
                    "supernet_file"},
    "search": {"engine", "steps", "grouping", "population", "generations", "seed", "per_group_bits", "bitops_budget",
               "size_budget_mb", "storage", "axes", "fixed_bits"},
    "proxy": {"name", "n_images", "seed", "teacher_steps", "teacher_schedule"},
}


def _hand_list_fingerprint(cfg: RunConfig, model_fp: str) -> str:
    """The fingerprint as the code before the version table computed it (its two hand lists, verbatim)."""
    before_19 = {
        "model": {"path"},
        "supernet": {"w_bits", "a_bits", "tie_qkv", "w_rounding", "w_granularity", "group_size", "w_two_bit",
                     "bias_correction", "w_observer", "a_observer", "time_groups"},
        "proxy": {"name", "n_images", "seed", "teacher_steps", "teacher_schedule", "reference", "extractor",
                  "inception_weights"},
    }
    config = {k: v for k, v in cfg.to_dict().items() if k != "executor"}
    for section, key, default in (("search", "step_choices", []), ("proxy", "reference", ""),
                                  ("search", "mutation_prob", 0.0), ("proxy", "extractor", "auto"),
                                  ("proxy", "inception_weights", ""), ("supernet", "time_groups", 1),
                                  ("search", "uniform_seeds", True),
                                  ("search", "size_objective", False), ("search", "solvers", []),
                                  ("search", "reuse_branch", 0), ("search", "cost", "bitops")):
        if config[section].get(key) == default:
            del config[section][key]
    for section, owner in (("model", ModelConfig()), ("supernet", SupernetConfig()), ("proxy", ProxyConfig())):
        for key in set(config[section]) - before_19[section]:
            if config[section][key] == json.loads(json.dumps(getattr(owner, key))):
                del config[section][key]
    blob = json.dumps({"config": config, "model": model_fp, "data": data_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_every_key_is_of_version_one_or_listed_with_its_version():
    keys = {f"{s}.{k}" for s, sec in RunConfig().to_dict().items() if s != "executor" for k in sec}
    v1 = {f"{s}.{k}" for s, ks in V1.items() for k in ks}
    assert not v1 & set(LATER_KEYS)
    assert keys == v1 | set(LATER_KEYS), "a new key needs an entry in tmpq.jobs.config.LATER_KEYS"
    assert {v for v, _ in LATER_KEYS.values()} <= set(range(2, CONFIG_VERSION + 1))


def _variants():
    """Today's defaults, every preset, and each later key moved off the value old runs behaved as."""
    yield RunConfig()
    for name in preset_names():
        yield RunConfig.preset(name)
    off = {"search.step_choices": [10, 12], "proxy.reference": "ref.npz", "search.mutation_prob": 0.5,
           "proxy.extractor": "random", "proxy.inception_weights": "w.pth", "supernet.time_groups": 1,
           "search.uniform_seeds": False, "search.size_objective": True, "search.solvers": ["ddim", "heun"],
           "search.reuse_branch": 1, "model.dtype": "bf16", "model.guidance_scale": 2.0, "model.null_label": 10,
           "model.prompts": ["a"], "supernet.a_symmetric": True, "supernet.block_types": ["Attention"],
           "supernet.exclude": ["conv_out"], "supernet.guidance_ranges": "separate", "supernet.include": ["down*"],
           "supernet.pin": {"conv_in": [8, 16]}, "supernet.split_skip": False, "supernet.tie": ["(a)\\.b"],
           "supernet.w_symmetric": False, "proxy.batch_size": 64, "supernet.stream_ranges": "shared",
           "search.cost": "latency", "supernet.winograd": [2, 4]}
    assert set(off) == set(LATER_KEYS)
    for key, value in off.items():
        yield RunConfig().with_(**{key: value})
    yield RunConfig().with_(**{"supernet.time_groups": 2, "search.engine": "optuna", "proxy.n_images": 8})


def test_the_fingerprint_is_the_hand_lists_for_every_config_expressible_before_the_table():
    seen = set()
    for cfg in _variants():
        fp = run_fingerprint(cfg, "model-fp")
        assert fp == _hand_list_fingerprint(cfg, "model-fp")
        seen.add(fp)
    assert len(seen) > len(LATER_KEYS)  # each later key moved off its old value is a fingerprint of its own
    # a key at the value old runs behaved as is left out; moved off it, it counts
    base = RunConfig()
    bf16 = dataclasses.replace(base, model=ModelConfig(dtype="bf16"))
    assert run_fingerprint(bf16, "m") != run_fingerprint(base, "m")


def test_new_runs_record_their_version_and_a_newer_one_is_refused(tiny_model_dir, tmp_path):
    from tests.test_search_service import tiny_cfg
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import prepare_run

    cfg = tiny_cfg(tiny_model_dir, generations=1)
    run, _space, _sn = prepare_run(cfg, tmp_path / "run", progress=False)
    run.lock.release()
    resolved = json.loads((run.path / "config.resolved.json").read_text())
    assert resolved["config_version"] == CONFIG_VERSION
    assert load_run(run.path).config["config_version"] == CONFIG_VERSION  # the reader validates it and drops it
    assert config_from_dict({k: v for k, v in resolved.items() if k != "fingerprint"}) == cfg
    for bad in (CONFIG_VERSION + 1, 0, "3", True):
        with pytest.raises(TmpqError, match=r"^config_version: this tmpq reads run configs of versions 1 to ") as e:
            config_from_dict({**cfg.to_dict(), "config_version": bad})
        assert "\n" not in str(e.value)
