"""Config validation: every malformed config gives a one-line TmpqError naming the key."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmpq.core.errors import TmpqError
from tmpq.jobs.config import RunConfig, config_from_dict, load_config


def test_defaults_round_trip(tmp_path):
    cfg = load_config(None)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    p = tmp_path / "c.toml"
    p.write_text('[search]\npopulation = 8\nengine = "random"\n[supernet]\nw_bits = [8, 7, 6, 5]\n')
    c = load_config(p)
    assert c.search.population == 8 and c.search.engine == "random" and c.supernet.w_bits == (8, 7, 6, 5)


@pytest.mark.parametrize("data,needle", [
    ({"search": {"population": 0}}, "search.population: must be >= 2, got 0"),
    ({"search": {"populaton": 5}}, "search.populaton: unknown key"),
    ({"serch": {}}, "serch: unknown key"),
    ({"search": {"engine": "cma"}}, "search.engine: must be one of"),
    ({"search": {"population": "10"}}, "search.population: must be an integer"),
    ({"supernet": {"w_bits": [8, 0]}}, "supernet.w_bits: 0 is not a supported bit-width"),
    ({"supernet": {"a_bits": [8, 1]}}, "supernet.a_bits: 1 is not a supported bit-width (2..16 for activations)"),
    ({"supernet": {"w_two_bit": "ternary"}}, "supernet.w_two_bit: must be one of"),
    ({"supernet": {"a_observer": "kl"}}, "supernet.a_observer: must be one of minmax, percentile, mse"),
    ({"supernet": {"w_bits": []}}, "supernet.w_bits: must be a non-empty list"),
    ({"executor": {"retries": -1}}, "executor.retries: must be >= 0"),
    ({"search": {"bitops_budget": "cheap"}}, "search.bitops_budget"),
    ({"search": 3}, "search: must be a table"),
    ({"supernet": {"tie_qkv": 1}}, "supernet.tie_qkv: must be true or false"),
    ({"search": {"mutation_prob": 1.5}}, "search.mutation_prob: must be in [0, 1] (0 = the engine's default)"),
    ({"search": {"engine": "random", "mutation_prob": 0.3}},
     "search.mutation_prob: engine random does not mutate; leave it at 0 (got 0.3)"),
])
def test_bad_configs_name_the_key(data, needle):
    with pytest.raises(TmpqError) as err:
        config_from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(TmpqError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[search\npopulation = ")
    with pytest.raises(TmpqError, match="malformed config"):
        load_config(bad)


_scalar = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.floats(allow_nan=False, width=32),
                    st.lists(st.integers(-3, 20), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(["model", "supernet", "calibration", "search", "proxy", "executor", "bogus"]),
       key=st.sampled_from(["path", "w_bits", "mode", "steps", "population", "engine", "name", "kind", "retries",
                            "typo", "seed", "bitops_budget", "n_images", "tie_qkv"]),
       value=_scalar)
def test_random_configs_either_validate_or_fail_cleanly(section, key, value):
    try:
        cfg = config_from_dict({section: {key: value}})
    except TmpqError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.split(":")[0].startswith(section)
    else:
        assert isinstance(cfg, RunConfig)


def test_observer_keys_reach_the_supernet_config():
    sc = config_from_dict({"supernet": {"w_observer": "minmax", "a_observer": "mse"}}).supernet
    assert (sc.w_observer, sc.a_observer) == ("minmax", "mse")
    assert config_from_dict({}).supernet.a_observer == "minmax"  # the default (results/supernet)
