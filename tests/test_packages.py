"""The card's top-level packages must come from this repository, not from some other installed distribution."""
import importlib
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.parametrize("name", ["tmpq", "quant", "supernet", "search", "evaluators"])
def test_package_is_imported_from_this_repo(name):
    mod = importlib.import_module(name)
    path = Path(mod.__file__).resolve()
    assert path.parent == REPO / name, f"{name} imported from {path}, not from {REPO}"


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert eps.get("tmpq") == "tmpq.cli:main"
