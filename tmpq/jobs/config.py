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

from tmpq.core.errors import TmpqError
from tmpq.search.budget import FP_FRACTION, UNIFORM_OPTION


@dataclass(frozen=True)
class ModelSection:
    path: str = "embedded"


@dataclass(frozen=True)
class SupernetSection:
    w_bits: tuple[int, ...] = (8, 6, 4)
    a_bits: tuple[int, ...] = (8, 6)
    tie_qkv: bool = True
    w_rounding: str = "nearest"
    w_granularity: str = "channel"
    group_size: int = 0
    # 2-bit weight options: "multibasis" (BinaryDM-style two sign bases with learnable scales) or "affine" (a uniform
    # 2-bit grid); 1-bit weight options are always a one-basis binarizer
    w_two_bit: str = "multibasis"
    bias_correction: bool = True
    w_observer: str = "mse"
    a_observer: str = "minmax"
    # activation ranges and bias corrections calibrated per contiguous group of calibration timesteps and switched by
    # the denoiser call's timestep (SupernetConfig.time_groups); 1 = one set for all timesteps (needed by adaround)
    time_groups: int = 4


@dataclass(frozen=True)
class CalibrationSection:
    mode: str = "per-option"
    strategy: str = "uniform"
    steps: int = 20
    per_step: int = 32
    sampler_steps: int = 100
    batch_size: int = 64
    recon_iters: int = 0
    seed: int = 10_000
    # a supernet already calibrated (tmpq calibrate --out FILE) for this model and supernet config: copied into the
    # run instead of calibrating (the data settings above are then not used)
    supernet_file: str = ""


@dataclass(frozen=True)
class SearchSection:
    engine: str = "pymoo"
    steps: int = 10
    # more than one step count: the step count becomes a gene (each choice with its own groups of the grouping
    # kind); ``steps`` must be one of them (the reference for budgets like w6a6 and for the bits-only search)
    step_choices: tuple[int, ...] = ()
    # "uniform" by measurement (results/search: on the embedded model its joint front weakly dominates all 18 uniform
    # baselines, quadratic groups' front 15, the sensitivity groups' fewer); "quad" is TMPQ-DM's
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


@dataclass(frozen=True)
class ProxySection:
    name: str = "fid"
    n_images: int = 128
    seed: int = 0
    teacher_steps: int = 100
    teacher_schedule: str = "uniform"
    # proxy fid only: reference statistics (.npz, pytorch-fid format, of the model's training data, same extractor);
    # "" = the embedded MNIST digits (1-channel models only)
    reference: str = ""
    # features of both proxies and of validation: "auto" = the domain digit classifier for 1-channel models, else a
    # seeded random CNN on the model's channels; "inception" = pytorch-fid's InceptionV3 from inception_weights (a
    # local file: tmpq never downloads), the usual choice for RGB models such as a CIFAR-10 DDPM
    extractor: str = "auto"
    inception_weights: str = ""


@dataclass(frozen=True)
class ExecutorSection:
    kind: str = "local"
    address: str = ""
    workers: int = 2
    threads_per_worker: int = 1
    timeout_s: float = 600.0
    retries: int = 1


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    supernet: SupernetSection = field(default_factory=SupernetSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    search: SearchSection = field(default_factory=SearchSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


CHOICES = {
    "supernet.w_rounding": ("nearest", "adaround"),
    "supernet.w_observer": ("minmax", "percentile", "mse"),
    "supernet.a_observer": ("minmax", "percentile", "mse"),
    "supernet.w_granularity": ("channel", "group", "tensor"),
    "supernet.w_two_bit": ("multibasis", "affine"),
    "calibration.mode": ("per-option", "random-path"),
    "calibration.strategy": ("uniform", "ndtc", "eda"),
    "search.engine": ("pymoo", "optuna", "paper-ea", "random"),
    "search.grouping": ("quad", "uniform", "sensitivity", "error"),
    "search.axes": ("joint", "time", "bits"),
    "proxy.name": ("paired-feat", "fid"),
    "proxy.teacher_schedule": ("uniform", "quad"),
    "proxy.extractor": ("auto", "domain", "inception", "random"),
    "executor.kind": ("local", "ray"),
}
MINIMUM = {
    "calibration.steps": 1, "calibration.per_step": 1, "calibration.sampler_steps": 1, "calibration.batch_size": 1,
    "calibration.recon_iters": 0, "search.steps": 1, "search.population": 2, "search.generations": 1,
    "search.size_budget_mb": 0, "proxy.n_images": 2, "proxy.teacher_steps": 1, "executor.workers": 1,
    "executor.threads_per_worker": 1, "executor.timeout_s": 1, "executor.retries": 0, "supernet.group_size": 0,
    "supernet.time_groups": 1,
}


EMPTY_OK = {"search.step_choices"}  # list keys whose empty list means "off"


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (not value and key not in EMPTY_OK):
            raise TmpqError(f"{key}: must be a non-empty list, got {value!r}")
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
    if key in ("supernet.w_bits", "supernet.a_bits"):
        lo = 1 if key == "supernet.w_bits" else 2  # 1-bit weights: binarized; activations need >= 2 bits
        for b in value:
            if not lo <= b <= 16:
                raise TmpqError(f"{key}: {b} is not a supported bit-width ({lo}..16)")
        if len(set(value)) != len(value):
            raise TmpqError(f"{key}: repeated bit-width in {list(value)}")
    if key == "search.bitops_budget":
        v = value.strip().lower()
        ok = v in ("", "none") or UNIFORM_OPTION.fullmatch(v) or _is_number(value) or FP_FRACTION.fullmatch(v)
        if not ok:
            raise TmpqError(f"{key}: must be 'none', a uniform option like 'w6a6', a share of the FP model like "
                            f"'1% fp100' (1 % of its BitOPs at 100 steps), or a number, got {value!r}")
    if key == "search.step_choices":
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise TmpqError(f"{key}: must be distinct step counts >= 1, got {list(value)}")
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
