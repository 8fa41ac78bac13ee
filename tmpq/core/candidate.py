"""The values a search passes whole from its genome to its rows: :class:`Solver` (a sampler and its order) and
:class:`Candidate` (schedule, bits, solver, reuse, bits layout, convolution algorithms). Pure Python.

A candidate's key and its row fields are what they were before each gene existed: a DDIM candidate writes no solver,
a candidate without reuse no reuse, an all-direct candidate no algorithms, and the bits layout is the bits' own
nesting (one allocation, or one per time group), so keys and logs of older runs stay byte-identical (tests/test_run_compat.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NamedTuple

from tmpq.core.errors import TmpqError


class Solver(NamedTuple):
    """A sampler: its name (:data:`tmpq.core.solvers.SOLVERS`) and order. It is a (name, order) tuple, so it
    compares and hashes as the pairs of configs and older code do.

    Example:
        >>> Solver("dpm", 2).label, Solver().is_default, Solver.of({"solver": "unipc", "order": 3})
        ('dpm-2', True, Solver(name='unipc', order=3))
    """

    name: str = "ddim"
    order: int = 1

    @property
    def is_default(self) -> bool:
        """DDIM, the only sampler before solvers: rows, keys and exports of a default-solver candidate name none."""
        return self == DEFAULT_SOLVER

    @property
    def label(self) -> str:
        return f"{self.name}-{self.order}"

    def fields(self) -> dict:
        """The solver's fields of a row or export: none for the default."""
        return {} if self.is_default else {"solver": self.name, "order": self.order}

    def calls(self, steps: int) -> int:
        """Denoiser calls per sample of a ``steps``-step schedule: one per step, but Heun's 2nd-order method calls
        the denoiser twice per step except the last (2n - 1)."""
        return 2 * steps - 1 if self.name == "heun" else steps

    @classmethod
    def of(cls, row) -> "Solver":
        """The solver of an evaluation / front / validation row (a dict or a pandas row; DDIM for runs before
        solvers, whose rows name none, and for the DDIM rows of a frame that has a solver column filled with NaN)."""
        name = row.get("solver") if hasattr(row, "get") else None
        if not isinstance(name, str):
            return DEFAULT_SOLVER
        return cls(name, int(row.get("order")))


DEFAULT_SOLVER = Solver()


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a schedule (strictly descending), its bits, solver, reused denoiser calls, and
    whether the bits are per time group.

    ``bits``: one (w, a) pair per bit gene, shared by every step; with ``per_group``, one such allocation per time
    group in ascending time order (``bits[g]`` serves the schedule's step in group g: the schedule runs from the last
    group to the first). ``None``: the FP model, the reference point of a schedule (no key). ``reuse``: the denoiser
    calls (0-based, ascending, never 0) that reuse the deep features of the last full call (:mod:`tmpq.core.reuse`).
    ``algos``: one entry per Winograd-eligible 3x3 conv (the space's layers in order, eligible ones only), the tile
    size m of its Winograd F(m, 3) or 0 for direct convolution, shared by every step; all-direct is normalised to
    ``()``, so it is the same candidate (key, row) as one of a run without the algorithm gene.

    Example:
        >>> c = Candidate((800, 50, 0), ((8, 8), (6, 6)))
        >>> len(c.key), c.solver.is_default, c.calls
        (16, True, 3)
    """

    timesteps: tuple[int, ...]
    bits: tuple | None
    solver: Solver = DEFAULT_SOLVER
    reuse: tuple[int, ...] = ()
    per_group: bool = False
    algos: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if self.bits is not None:
            object.__setattr__(self, "bits", _tuplify(self.bits))
        object.__setattr__(self, "solver", Solver(str(self.solver[0]), int(self.solver[1])))
        object.__setattr__(self, "reuse", tuple(int(k) for k in self.reuse))
        algos = tuple(int(m) for m in self.algos)
        if any(m < 0 for m in algos):
            raise TmpqError(f"candidate algos: tile sizes must be >= 0 (0 = direct), got {list(algos)}")
        object.__setattr__(self, "algos", algos if any(algos) else ())
        if self.bits is not None and nested(self.bits) != self.per_group:
            raise TmpqError("candidate bits: " + ("one allocation per time group needs per_group=True" if
                                                  nested(self.bits) else "per_group=True needs one allocation per "
                                                  "time group"))
        if self.per_group and len(self.bits) != len(self.timesteps):
            raise TmpqError(f"per-group bits: {len(self.bits)} allocations for {len(self.timesteps)} steps")

    @classmethod
    def fp(cls, timesteps, solver: Solver = DEFAULT_SOLVER, reuse: tuple[int, ...] = ()) -> "Candidate":
        """The FP model on ``timesteps`` (every quantizer passed through)."""
        return cls(tuple(timesteps), None, solver, reuse)

    @property
    def calls(self) -> int:
        """Denoiser calls of one trajectory."""
        return self.solver.calls(len(self.timesteps))

    @property
    def key(self) -> str:
        d = {"t": list(self.timesteps), "b": _listify(self.bits)}
        if not self.solver.is_default:  # DDIM candidates keep the keys they had before solvers
            d["s"] = self.solver.label
        if self.reuse:  # and candidates without reuse the keys they had before it
            d["r"] = list(self.reuse)
        if self.algos:  # and all-direct candidates the keys they had before the algorithm gene
            d["w"] = list(self.algos)
        blob = json.dumps(d, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fields(self) -> dict:
        """The candidate's fields of a row (no key): timesteps and bits as lists, the solver, reuse and algorithms
        only when they are not the defaults."""
        return {"timesteps": list(self.timesteps), "bits": _listify(self.bits), **self.solver.fields(),
                **({"reuse": list(self.reuse)} if self.reuse else {}),
                **({"algos": list(self.algos)} if self.algos else {})}

    def to_dict(self) -> dict:
        return {**self.fields(), "key": self.key}

    @classmethod
    def from_dict(cls, d) -> "Candidate":
        """From a row (a dict or a pandas row) of any run: the layout of the bits is their nesting."""
        bits = _tuplify(_plain(d["bits"]))
        return cls(tuple(int(t) for t in _plain(d["timesteps"])), bits, Solver.of(d), reuse_of(d),
                   per_group=nested(bits), algos=algos_of(d))


def reuse_of(row) -> tuple[int, ...]:
    """The reused denoiser calls of an evaluation / front / validation row (a dict or a pandas row); () when none
    (rows of runs before the reuse gene, and NaN cells of a frame whose other rows reuse)."""
    v = row.get("reuse") if hasattr(row, "get") else None
    return tuple(int(k) for k in _plain(v)) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else ()


def algos_of(row) -> tuple[int, ...]:
    """The convolution algorithms of a row (a dict or a pandas row); () when all direct (rows of runs without the
    algorithm gene, and NaN cells of a frame whose other rows use Winograd)."""
    v = row.get("algos") if hasattr(row, "get") else None
    return tuple(int(m) for m in _plain(v)) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else ()


def nested(bits) -> bool:
    """Whether ``bits`` hold one allocation per time group (pairs nested one level deeper)."""
    return bits is not None and len(bits) > 0 and isinstance(bits[0][0], (tuple, list))


def _plain(x):
    """A list from a list, tuple or array-like (pandas cells of a Parquet frame hold NumPy arrays)."""
    return x.tolist() if hasattr(x, "tolist") else x


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tuplify(x):
    x = _plain(x)
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else int(x)
