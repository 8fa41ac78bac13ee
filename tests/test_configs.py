"""The shipped configs load, and default.toml documents exactly the built-in defaults."""
from pathlib import Path

from tmpq.jobs.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_toml_equals_builtin_defaults():
    assert load_config(CONFIGS / "default.toml").to_dict() == RunConfig().to_dict()


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.toml")):
        assert load_config(path).search.population >= 2, path


def test_default_toml_lists_every_key():
    import tomllib

    listed = tomllib.loads((CONFIGS / "default.toml").read_text())
    for section, values in RunConfig().to_dict().items():
        assert set(listed[section]) == set(values), section
