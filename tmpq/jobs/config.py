"""The run configuration: one validated tree of frozen dataclasses, TOML in, resolved JSON out.

Every error names the key at fault, e.g. ``search.population: must be >= 2, got 0``. Unknown keys are errors
(a typo must not silently fall back to a default). Everything is checked here, before a job writes or computes
anything: types (no bool for a number), finite floats, every number within ``BOUNDS`` (seeds in [0, 2**32), sizes under
generous upper bounds), strings without control characters (printable ASCII outside ``FREE_TEXT``), the Optuna storage
URL parsed without connecting, and the budgets against the supernet's own bit options.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
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
from tmpq.search.executors import EXECUTORS
from tmpq.search.groups import GROUPINGS
from tmpq.search.space import AXES, COSTS
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
    # the second objective: "bitops" (analytic) or "latency" (predicted seconds per image on the deployment backend,
    # from a per-layer table measured at the run's start and kept as latency.json: tmpq.deploy.latency); the BitOPs
    # budget constrains either way
    cost: str = "bitops"


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

    @classmethod
    def preset(cls, name: str) -> "RunConfig":
        """A packaged preset by name (``demo``, ``tiny``, ``default``, ...; :func:`preset_names`), validated.

        Example:
            >>> RunConfig.preset("tiny").search.population
            6
        """
        return load_preset(name)

    def with_(self, **overrides) -> "RunConfig":
        """This config with dotted keys replaced and the whole validated again (errors name the key), e.g.
        ``cfg.with_(**{"search.population": 8, "model.guidance_scale": 2.0})``. Values are as TOML gives them
        (lists for tuples). ``dataclasses.replace`` works too, but skips the validation."""
        return config_with(self, overrides)


# The run config's version: 1 is the key set of the first runs; every key added since is in ``LATER_KEYS`` with the
# version that added it and the value the runs before it behaved as (frozen: a later change of the default must not
# change which runs resume). Such a key counts in a run's fingerprint only when set to another value
# (tmpq.jobs.search.run_fingerprint), so the runs made before it keep their fingerprint and resume. New runs write
# ``config_version`` into their resolved config (not into the fingerprint); a config of a newer version is refused.
# Adding a key: append it here with CONFIG_VERSION + 1 and raise CONFIG_VERSION (tests/test_config_version.py
# fails on a key that is neither of version 1 nor listed).
CONFIG_VERSION = 5
LATER_KEYS: dict[str, tuple[int, object]] = {
    # 2: keys added to the run's own sections one by one
    "search.step_choices": (2, []), "proxy.reference": (2, ""), "search.mutation_prob": (2, 0.0),
    "proxy.extractor": (2, "auto"), "proxy.inception_weights": (2, ""), "supernet.time_groups": (2, 1),
    "search.uniform_seeds": (2, True), "search.size_objective": (2, False), "search.solvers": (2, []),
    "search.reuse_branch": (2, 0),
    # 3: keys that came with the components' own config classes (ModelConfig, SupernetConfig, ProxyConfig), at the
    # defaults those classes had then
    "model.dtype": (3, "fp32"), "model.guidance_scale": (3, 1.0), "model.null_label": (3, -1), "model.prompts": (3, []),
    "supernet.a_symmetric": (3, False),
    "supernet.block_types": (3, ["ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "TimestepEmbedding"]),
    "supernet.exclude": (3, []), "supernet.guidance_ranges": (3, "shared"), "supernet.include": (3, ["*"]),
    "supernet.pin": (3, "auto"), "supernet.split_skip": (3, True), "supernet.tie": (3, []),
    "supernet.w_symmetric": (3, True),
    "proxy.batch_size": (3, 128),
    # 4: keys added one by one again (the joint-attention ranges; the second objective)
    "supernet.stream_ranges": (4, "separate"), "search.cost": (4, "bitops"),
    # 5: the convolution algorithm as a gene
    "supernet.winograd": (5, []),
}

# choices of the run's own sections (the supernet, calibration and proxy classes check theirs as well)
CHOICES = {
    "search.engine": ENGINES,
    "search.grouping": GROUPINGS,
    "search.axes": AXES,
    "search.cost": COSTS,
    "executor.kind": EXECUTORS,
}
# noise-bank and engine seeds: NumPy's and pymoo's seeding takes 0 <= seed < 2**32
SEED_LIMIT = 2**32
# every number of every section within [low, high]: the lows are the meaningful minimums, the highs generous bounds on
# absurd sizes (a typo of a few extra digits is refused in one line instead of running for days or running out of
# memory); the components' own classes check their lows (and choices) again where they are built without a run config
# (low None: only that class checks it, in its own words)
BOUNDS: dict[str, tuple[float | None, float]] = {
    "model.guidance_scale": (None, 100), "model.null_label": (None, 1_000_000),
    "supernet.group_size": (None, 1 << 20), "supernet.time_groups": (None, 1000),
    "calibration.steps": (1, 10_000), "calibration.per_step": (1, 1 << 20), "calibration.sampler_steps": (1, 10_000),
    "calibration.batch_size": (1, 1 << 16), "calibration.recon_iters": (0, 10_000_000),
    "calibration.seed": (0, SEED_LIMIT - 1),
    "search.steps": (1, 10_000), "search.step_choices": (1, 10_000), "search.population": (2, 100_000),
    "search.generations": (1, 100_000), "search.seed": (0, SEED_LIMIT - 1), "search.size_budget_mb": (0, 1e9),
    "search.reuse_branch": (0, 1000),
    "proxy.n_images": (2, 1_000_000), "proxy.seed": (0, SEED_LIMIT - 1), "proxy.teacher_steps": (1, 10_000),
    "proxy.batch_size": (1, 1 << 16),
    "executor.gpus_per_worker": (0, 1024), "executor.min_task_s": (0, 86_400), "executor.workers": (1, 4096),
    "executor.threads_per_worker": (1, 1024), "executor.timeout_s": (1, 7 * 86_400), "executor.retries": (0, 100),
}
# strings: at most this many characters, no control characters but tab and line breaks (a NUL in a path is a crash
# deep in the OS layer)
MAX_TEXT = 4096
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# strings that are free text (paths, patterns, prompts, a database URL); every other string must be printable ASCII
FREE_TEXT = {"model.path", "model.prompts", "supernet.include", "supernet.exclude", "supernet.tie", "supernet.pin",
             "supernet.block_types", "calibration.supernet_file", "proxy.reference", "proxy.inception_weights",
             "search.storage"}


# lists that may be empty (an empty list means "none")
EMPTY_OK = {"model.prompts", "search.solvers", "search.step_choices", "supernet.exclude", "supernet.tie",
            "supernet.block_types", "supernet.winograd"}


def _show(value) -> str:
    """``repr`` of a refused value, cut to one short line (a megabyte of garbage must not become the message)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (not value and key not in EMPTY_OK):
            raise TmpqError(f"{key}: must be a {'' if key in EMPTY_OK else 'non-empty '}list, got {_show(value)}")
        if len(value) > 1000:
            raise TmpqError(f"{key}: at most 1000 entries, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise TmpqError(f"{key}: must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TmpqError(f"{key}: must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TmpqError(f"{key}: must be a number, got {_show(value)}")
        if isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
            raise TmpqError(f"{key}: must be a finite number, got {_show(value)}")
        if not math.isfinite(value):
            raise TmpqError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TmpqError(f"{key}: must be a string, got {_show(value)}")
        if len(value) > MAX_TEXT:
            raise TmpqError(f"{key}: at most {MAX_TEXT} characters, got {len(value)}")
        if _CONTROL.search(value) or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise TmpqError(f"{key}: control characters or unpaired surrogates are not allowed, got {_show(value)}")
        return value
    if tp == (dict | str):  # supernet.pin: "auto" or a table
        return _coerce(key, value, dict if isinstance(value, dict) else str)
    if tp is dict:  # a table; its owner checks the entries
        if not isinstance(value, dict):
            raise TmpqError(f"{key}: must be a table, got {_show(value)}")
        for k, v in value.items():
            _coerce(f"{key}.{k}", k, str)
            if isinstance(v, (list, tuple)) and any(isinstance(b, bool) or not isinstance(b, int) for b in v):
                raise TmpqError(f"{key}.{k}: must be a list of integers, got {_show(v)}")
        return dict(value)
    raise TmpqError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise TmpqError(f"{prefix or 'config'}: must be a table, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise TmpqError(f"{where}{_clean(unknown[0])}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in sorted(names & set(data)):
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _check(key, _coerce(key, data[name], tp))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a component's own check that is not a TmpqError (never expected)
        raise TmpqError(f"{prefix or 'config'}: {exc}") from None


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _clean(name) -> str:
    """An unknown key as it may be printed: cut, with control characters escaped."""
    text = str(name)
    return _show(text)[1:-1] if not text.isprintable() or len(text) > 80 else text


def _check(key: str, value):
    if key in CHOICES and value not in CHOICES[key]:
        raise TmpqError(f"{key}: must be one of {', '.join(CHOICES[key])}, got {_show(value)}")
    texts = value if isinstance(value, tuple) else (value,)
    if key not in FREE_TEXT and any(isinstance(t, str) and not (t.isascii() and t.isprintable()) for t in texts):
        # names, options and specs are ASCII: a look-alike letter or a non-ASCII digit (an Arabic-Indic one in
        # "cuda:N", which Python's int and float read) is refused here rather than failing far from the config
        raise TmpqError(f"{key}: must be printable ASCII, got {_show(value)}")
    if key in BOUNDS:
        low, high = BOUNDS[key]
        for v in value if isinstance(value, tuple) else (value,):
            if (low is not None and v < low) or v > high:
                bound = f"<= {_num(high)} (the bound on this key)" if v > high else f">= {_num(low)}"
                raise TmpqError(f"{key}: must be {bound}, got {_num(v)}")
    if key == "search.bitops_budget":
        check_budget_spec(value, key)
    if key == "search.step_choices":
        if len(set(value)) != len(value):
            raise TmpqError(f"{key}: must be distinct step counts >= 1, got {list(value)}")
    if key == "executor.device":
        check_device_name(value, key)
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
        raise TmpqError(f"{key}: must be a uniform option like 'w8a8', got {_show(value)}")
    if key == "search.storage":
        check_storage_url(value, key)
    if key == "executor.address" and value and not RAY_ADDRESS.fullmatch(value):
        raise TmpqError(f"{key}: must be empty (a local Ray), auto, local, HOST:PORT or ray://HOST:PORT, got "
                        f"{_show(value)}")
    return value


# a Ray address: auto, local, HOST:PORT or ray://HOST:PORT (HOST a name, IPv4 or [IPv6])
RAY_ADDRESS = re.compile(r"auto|local|(ray://)?([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")


def check_budget_spec(value: str, key: str) -> str:
    """A BitOPs budget's form (``none``, ``w6a6``, ``1% fp100`` or a finite number >= 0), not yet its supernet."""
    v = value.strip().lower()
    number = _is_number(v) and math.isfinite(float(v)) and float(v) >= 0
    if not (v in ("", "none") or UNIFORM_OPTION.fullmatch(v) or number or FP_FRACTION.fullmatch(v)):
        raise TmpqError(f"{key}: must be 'none', a uniform option like 'w6a6', a share of the FP model like "
                        f"'1% fp100' (1 % of its BitOPs at 100 steps), or a number >= 0, got {_show(value)}")
    return value


def check_budget_options(value: str, supernet: SupernetConfig, key: str) -> None:
    """A uniform-option budget (``w6a6``) names bit-widths the supernet has (checked before any run directory, as the
    search's space would only after calibration)."""
    m = UNIFORM_OPTION.fullmatch(value.strip().lower())
    if m and (int(m.group(1)) not in supernet.w_bits or int(m.group(2)) not in supernet.a_bits):
        raise TmpqError(f"{key}: {value.strip()} is not a uniform option of the supernet (supernet.w_bits "
                        f"{list(supernet.w_bits)}, supernet.a_bits {list(supernet.a_bits)})")


def check_storage_url(value: str, key: str = "search.storage") -> str:
    """An Optuna storage URL parsed (SQLAlchemy's own parser and dialect registry) without connecting; "" = SQLite in
    the run directory."""
    if not value:
        return value
    from sqlalchemy.engine import make_url  # optuna's dependency; third-party, imported where used

    try:
        make_url(value).get_dialect()
    except Exception as exc:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, ValueError (a bad port) ...
        why = " ".join(str(exc).split()) or type(exc).__name__
        shown = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", value)  # never a password in a message
        raise TmpqError(f"{key}: must be empty (SQLite optuna.db in the run directory) or a database URL SQLAlchemy "
                        f"can use, such as sqlite:///optuna.db or postgresql+psycopg2://user@host:5432/db; got "
                        f"{_show(shown)} ({why})") from None
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain dict (as TOML gives) into a ``RunConfig``. A ``config_version`` (a resolved config's, see
    ``CONFIG_VERSION``) is checked and dropped."""
    if isinstance(data, dict) and "config_version" in data:
        version = data["config_version"]
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
            raise TmpqError(f"config_version: this tmpq reads run configs of versions 1 to {CONFIG_VERSION}, got "
                            f"{_show(version)} (a run of a newer tmpq?)")
        data = {k: v for k, v in data.items() if k != "config_version"}
    cfg = _build(RunConfig, data, "")
    s = cfg.search
    if s.step_choices and s.steps not in s.step_choices:
        given = isinstance(data.get("search"), dict) and "steps" in data["search"]
        if not given:  # the step count is the default: the choices are what the user set
            raise TmpqError(f"search.step_choices: {list(s.step_choices)} must include search.steps ({s.steps}, its "
                            f"default; set search.steps to one of them)")
        raise TmpqError(f"search.steps: {s.steps} must be one of search.step_choices {list(s.step_choices)}")
    if s.engine == "random" and s.mutation_prob:
        raise TmpqError(f"search.mutation_prob: engine random does not mutate; leave it at 0 (got {s.mutation_prob})")
    if s.step_choices and s.per_group_bits:
        raise TmpqError("search.per_group_bits: bits per time group need a fixed step count (drop search.step_choices)")
    if cfg.supernet.winograd and s.cost == "latency":
        raise TmpqError("search.cost: \"latency\" does not combine with supernet.winograd (the latency table has no "
                        "Winograd entries); use search.cost = \"bitops\" or drop the Winograd tiles")
    if cfg.supernet.winograd and s.per_group_bits:
        raise TmpqError("search.per_group_bits: bits per time group do not combine with supernet.winograd (the "
                        "algorithm genes are shared by all steps)")
    if s.grouping in ("sensitivity", "error", "dp") and cfg.model.dtype != "fp32":
        raise TmpqError(f"search.grouping: {s.grouping} groups are profiled in fp32 only, not with model.dtype = "
                        f"{cfg.model.dtype} (use quad or uniform)")
    # what the search would find only once the run directory exists and the supernet is calibrated
    # a key left at its default is not the culprit: name the supernet's options the user did set instead
    for key, value in (("bitops_budget", s.bitops_budget), ("fixed_bits", s.fixed_bits if s.axes == "time" else "")):
        given = key in (data.get("search") or {})
        try:
            check_budget_options(value, cfg.supernet, f"search.{key}")
        except TmpqError as exc:
            if given:
                raise
            m = UNIFORM_OPTION.fullmatch(value.strip().lower())
            side = "w_bits" if int(m.group(1)) not in cfg.supernet.w_bits else "a_bits"  # the one lacking a width
            raise TmpqError(f"supernet.{side}: {list(getattr(cfg.supernet, side))} lacks the "
                            f"{'weight' if side == 'w_bits' else 'activation'} width of the default search.{key} "
                            f"{value.strip()!r}; add it or set search.{key}") from None
    c = cfg.calibration
    if not c.supernet_file and c.steps > c.sampler_steps:
        raise TmpqError(f"calibration.steps: {c.steps} must be <= calibration.sampler_steps ({c.sampler_steps}): the "
                        "calibration timesteps are taken from that trajectory")
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
    if p.is_dir():
        raise TmpqError(f"config {p}: is a directory, not a TOML file")
    if not p.is_file():
        raise TmpqError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TmpqError(f"malformed config {p}: {exc}") from None
    return config_from_dict(data)


def presets_dir() -> Path:
    """Where the presets live: ``tmpq/presets`` in an installed wheel (pyproject packages ``configs/`` there), or
    ``configs/`` itself in a checkout and an editable install (one copy: the wheel's is built from it)."""
    packaged = Path(str(importlib.resources.files("tmpq").joinpath("presets")))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def preset_names() -> list[str]:
    """The names :meth:`RunConfig.preset` and ``tmpq run --config NAME`` accept."""
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_preset(name: str) -> RunConfig:
    """The preset ``name`` (see :func:`preset_names`), validated."""
    if name not in preset_names():
        raise TmpqError(f"config: no preset {name!r} (presets: {', '.join(preset_names())})")
    return load_config(presets_dir() / f"{name}.toml")


def resolve_config(spec: str | Path | RunConfig | dict | None) -> RunConfig:
    """A run config from a TOML path, a preset name, a plain dict (as TOML gives), a ``RunConfig`` or ``None``
    (the defaults). A path that names a file wins over a preset of the same name."""
    if spec is None or isinstance(spec, RunConfig):
        return spec or RunConfig()
    if isinstance(spec, dict):
        return config_from_dict(spec)
    p = Path(spec)
    if not p.is_file() and not p.is_dir() and p.suffix != ".toml" and str(spec) in preset_names():
        return load_preset(str(spec))
    if not p.exists() and p.suffix != ".toml" and len(p.parts) == 1:
        raise TmpqError(f"config file not found: {p} (nor a preset: {', '.join(preset_names())})")
    return load_config(p)


def config_with(cfg: RunConfig, overrides: dict) -> RunConfig:
    """``cfg`` with each dotted key (``search.population``) set to its value, validated as a whole."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = data
        for i, part in enumerate(sections):
            if not isinstance(node.get(part), dict):
                where = ".".join(sections[:i + 1])
                raise TmpqError(f"{where}: unknown section (sections: {', '.join(sorted(data))})")
            node = node[part]
        if name not in node:
            raise TmpqError(f"{key}: unknown key (known: {', '.join(sorted(node))})")
        node[name] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(data)


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (``tmpq search --set``) as (key, value): the value read as a TOML value (``8``, ``2.5``,
    ``true``, ``[8, 6]``, ``"w6a6"``); a value that is no TOML (``optuna``, ``w6a6``, a path) is the string itself."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise TmpqError(f"--set: expected KEY=VALUE (e.g. search.population=8), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value
    # a string key takes the text as written (search.bitops_budget=1e9 is the string "1e9", not a float)
    return key, value if _key_type(key) is str and not isinstance(parsed, str) else parsed


def _key_type(key: str):
    """The annotated type of a dotted run-config key, or None for an unknown one."""
    tp = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp
