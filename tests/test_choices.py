"""One source per enumeration: the parser's ``choices`` and the config checks read the owners' tuples, and the
torch-importing modules that act on them import the torch-free names of ``tmpq.core.choices``."""
from __future__ import annotations

import ast

import tmpq.core.choices as names
from conftest import REPO
from tmpq.core import data, model
from tmpq.jobs import config, train
from tmpq.quant import layers, quantizer
from tmpq.search.engines import ENGINES
from tmpq.search.executors import EXECUTORS
from tmpq.search.groups import GROUPINGS
from tmpq.search.space import AXES, COSTS
from tmpq.supernet import calib_data, calibration
from tmpq.supernet import config as supernet_config


def test_the_parser_spells_out_no_choices():
    tree = ast.parse((REPO / "tmpq" / "cli.py").read_text())
    literal = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "choices"
               and isinstance(node.value, (ast.Tuple, ast.List, ast.Set))]
    assert not literal, f"tmpq/cli.py: choices spelled out on lines {literal}; read the owner's tuple"


def test_the_config_checks_and_the_owners_use_the_same_tuples():
    assert config.CHOICES == {"search.engine": ENGINES, "search.grouping": GROUPINGS, "search.axes": AXES,
                              "search.cost": COSTS, "executor.kind": EXECUTORS}
    assert all(config.CHOICES[k] is v for k, v in (("search.engine", ENGINES), ("search.grouping", GROUPINGS),
                                                    ("search.axes", AXES), ("search.cost", COSTS),
                                                    ("executor.kind", EXECUTORS)))
    assert tuple(model.DTYPES) == names.DTYPES and data.RESOLUTIONS is names.RESOLUTIONS
    assert train.ARCHS is names.ARCHS
    assert quantizer.GRANULARITIES is names.GRANULARITIES and quantizer.OBSERVERS is names.OBSERVERS
    assert layers.ROUNDINGS is names.ROUNDINGS and layers.TWO_BIT is names.TWO_BIT
    assert supernet_config.GUIDANCE_RANGES is names.GUIDANCE_RANGES
    assert calib_data.STRATEGIES is names.STRATEGIES and calibration.MODES is names.MODES
