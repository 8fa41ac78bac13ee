"""The run configuration: one validated tree of frozen dataclasses, TOML in, resolved JSON out.

Every error names the key at fault, e.g. ``search.population: must be >= 2, got 0``. Unknown keys are errors
(a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tmpq.core.devices import check_device_name
from tmpq.core.errors import TmpqError
from tmpq.core.model import ModelConfig
from tmpq.core.solvers import parse_solver
from tmpq.evaluators.candidate import ProxyConfig
from tmpq.search.budget import FP_FRACTION, UNIFORM_OPTION
from tmpq.search.engines import ENGINES
from tmpq.supernet.calib_data import CalibrationConfig
from tmpq.supernet.config import SupernetConfig


@dataclass(frozen=True)
class CalibrationSection(CalibrationConfig):
    # a supernet already calibrated (tmpq calibrate --out FILE) for this model and supernet config: copied into the
    # run instead of calibrating (the data settings are then not used)
    supernet_file: str = ""


@dataclass(frozen=True)
class SearchSection:
    engine: str = "pymoo"
    steps: int = 10
    # more than one step count: the step count becomes a gene (each choice with its own groups of the grouping
    # kind); ``steps`` must be one of them (the reference for budgets like w6a6 and for the bits-only search)
    step_choices: tuple[int, ...] = ()
    # "uniform" by measurement (results/search: on the embedded model its joint front weakly dominates all 18 uniform
    # baselines, quadratic groups' front 15, the sensitivity groups' fewer); "quad" is TMPQ-DM's; "dp" puts each step
    # count's groups around its DP-optimal timesteps (search.stepsel), which then seed the first generation
    grouping: str = "uniform"
    population: int = 50
    generations: int = 6
    seed: int = 0
    per_group_bits: bool = False
    bitops_budget: str = "w6a6"
    size_budget_mb: float = 0.0
    # engine optuna only: "" = SQLite optuna.db in the run directory, else an SQLAlchemy database URL such as
    # postgresql+psycopg2://user@host:5432/db (no password in it: libpq reads PGPASSWORD / ~/.pgpass)
    storage: str = ""
    # "joint" (timesteps x bits), "time" (bits held at fixed_bits for every layer) or "bits" (schedule held at the
    # groups' seed: quadratic DDIM for quad groups): the single-axis searches of the paper's ablation
    axes: str = "joint"
    fixed_bits: str = "w8a8"
    # per-gene mutation probability of the offspring; 0 = the engine's default: 1 / (number of free genes) for pymoo
    # and optuna (their convention), the paper's 0.25 for paper-ea; engine random does not mutate and refuses it
    mutation_prob: float = 0.0
    # the first generation starts from the uniform options at every step choice (at most half of it); false = none
    # (every engine then starts from its own random draws, the textbook random-search baseline)
    uniform_seeds: bool = True
    # true: the weight size (MB) is a third objective beside the proxy and BitOPs (pymoo and optuna optimise all three;
    # the Pareto front of the run is then taken over the three); the paper EA and random search ignore it
    size_objective: bool = False
    # the samplers the search may give a candidate: "ddim", "dpm++" (order 2; "dpm++-1" / "dpm++-3"), "unipc" (2;
    # "unipc-1" / "unipc-3"), "euler", "heun"; more than one makes the solver a gene; empty = DDIM alone
    solvers: tuple[str, ...] = ()
    # reuse of deep features (DeepCache) as a gene: 0 = never; k >= 1 gives every denoiser call after the first a
    # recompute / reuse gene, the shallow part being the first and last k blocks (tmpq.core.reuse)
    reuse_branch: int = 0


@dataclass(frozen=True)
class ExecutorSection:
    kind: str = "local"
    # where the model, the supernet and the sampling run: auto (CUDA when the machine has it), cpu, cuda, cuda:N;
    # resolved by each worker on its own machine
    device: str = "auto"
    # Ray: GPUs each evaluation actor asks for (fractional: 0.25 puts four actors on one GPU); 0 = CPU actors
    gpus_per_worker: float = 0.0
    # Ray: one remote call carries several candidates when evaluations are shorter than this (GPU), 0 = never
    min_task_s: float = 1.0
    address: str = ""
    workers: int = 2
    threads_per_worker: int = 1
    timeout_s: float = 600.0
    retries: int = 1


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # the components' own config classes, composed (their defaults and checks are theirs)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    search: SearchSection = field(default_factory=SearchSection)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    executor: ExecutorSection = field(default_factory=ExecutorSection)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# choices and minimums of the run's own sections (the supernet, calibration and proxy classes check theirs)
CHOICES = {
    "search.engine": ENGINES,
    "search.grouping": ("quad", "uniform", "sensitivity", "error", "dp"),
    "search.axes": ("joint", "time", "bits"),
    "executor.kind": ("local", "ray"),
}
MINIMUM = {
    "search.steps": 1, "search.population": 2, "search.generations": 1, "search.size_budget_mb": 0,
    "search.reuse_branch": 0, "executor.workers": 1, "executor.threads_per_worker": 1, "executor.timeout_s": 1, "executor.retries": 0,
}


# lists that may be empty (an empty list means "none")
EMPTY_OK = {"model.prompts", "search.solvers", "search.step_choices", "supernet.exclude", "supernet.tie",
            "supernet.block_types"}


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (not value and key not in EMPTY_OK):
            raise TmpqError(f"{key}: must be a {'' if key in EMPTY_OK else 'non-empty '}list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise TmpqError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TmpqError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TmpqError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TmpqError(f"{key}: must be a string, got {value!r}")
        return value
    if tp == (dict | str):  # supernet.pin: "auto" or a table
        return _coerce(key, value, dict if isinstance(value, dict) else str)
    if tp is dict:  # a table; its owner checks the entries
        if not isinstance(value, dict):
            raise TmpqError(f"{key}: must be a table, got {value!r}")
        return dict(value)
    raise TmpqError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise TmpqError(f"{prefix or 'config'}: must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise TmpqError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _check(key, _coerce(key, data[name], tp))
    return cls(**kwargs)


def _check(key: str, value):
    if key in CHOICES and value not in CHOICES[key]:
        raise TmpqError(f"{key}: must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in MINIMUM and value < MINIMUM[key]:
        raise TmpqError(f"{key}: must be >= {MINIMUM[key]}, got {value}")
    if key == "search.bitops_budget":
        v = value.strip().lower()
        ok = v in ("", "none") or UNIFORM_OPTION.fullmatch(v) or _is_number(value) or FP_FRACTION.fullmatch(v)
        if not ok:
            raise TmpqError(f"{key}: must be 'none', a uniform option like 'w6a6', a share of the FP model like "
                            f"'1% fp100' (1 % of its BitOPs at 100 steps), or a number, got {value!r}")
    if key == "search.step_choices":
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise TmpqError(f"{key}: must be distinct step counts >= 1, got {list(value)}")
    if key == "executor.device":
        check_device_name(value, key)
    if key in ("executor.gpus_per_worker", "executor.min_task_s") and not 0 <= value:
        raise TmpqError(f"{key}: must be >= 0, got {value}")
    if key == "search.solvers":
        try:
            pairs = [parse_solver(v) for v in value]
        except TmpqError as exc:
            raise TmpqError(f"{key}: {exc}") from None
        if len(set(pairs)) != len(pairs):
            raise TmpqError(f"{key}: repeated solver in {list(value)}")
    if key == "search.mutation_prob" and not 0 <= value <= 1:
        raise TmpqError(f"{key}: must be in [0, 1] (0 = the engine's default), got {value}")
    if key == "search.fixed_bits" and not UNIFORM_OPTION.fullmatch(value.strip().lower()):
        raise TmpqError(f"{key}: must be a uniform option like 'w8a8', got {value!r}")
    if key == "search.storage" and value and not re.match(r"[A-Za-z][A-Za-z0-9]*(\+[A-Za-z0-9_]+)?://", value):
        raise TmpqError(f"{key}: must be empty (SQLite optuna.db in the run directory) or a database URL such as "
                        f"sqlite:///optuna.db or postgresql+psycopg2://user@host:5432/db, got {value!r}")
    return value




def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain dict (as TOML gives) into a ``RunConfig``."""
    cfg = _build(RunConfig, data, "")
    s = cfg.search
    if s.step_choices and s.steps not in s.step_choices:
        raise TmpqError(f"search.steps: {s.steps} must be one of search.step_choices {list(s.step_choices)}")
    if s.engine == "random" and s.mutation_prob:
        raise TmpqError(f"search.mutation_prob: engine random does not mutate; leave it at 0 (got {s.mutation_prob})")
    if s.step_choices and s.per_group_bits:
        raise TmpqError("search.per_group_bits: bits per time group need a fixed step count (drop search.step_choices)")
    if s.grouping in ("sensitivity", "error", "dp") and cfg.model.dtype != "fp32":
        raise TmpqError(f"search.grouping: {s.grouping} groups are profiled in fp32 only, not with model.dtype = "
                        f"{cfg.model.dtype} (use quad or uniform)")
    return cfg


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a TOML config (``None``: all defaults).

    Example:
        >>> load_config(None).search.population
        50
    """
    if path is None:
        return RunConfig()
    p = Path(path)
    if not p.is_file():
        raise TmpqError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TmpqError(f"malformed config {p}: {exc}") from None
    return config_from_dict(data)
