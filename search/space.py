"""The search space: time groups x per-gene bit options, its integer genome codec, the analytic cost model, and
operators (sampling, mutation, uniform crossover) that always produce valid candidates. Pure Python / NumPy.

Genome layout (ints): ``[time offsets (n)] + [w option index (G x B)] + [a option index (G x B)]`` where n is the
number of steps (one gene per time group), G the number of bit genes and B = 1 (bits shared by all steps, the
default) or n (bits per time group).

With a step-count gene (``step_groups``: one grouping per allowed step count) the time part is
``[step-count choice] + [time position (n_max)]``: a position v in [0, R) selects offset ``v * size // R`` of its
group (R = the largest group size of any choice), so every gene keeps one domain whatever the step count; the positions
past the chosen count are unused. Bits are shared by all steps in this mode.

With more than one solver (``solvers``: (name, order) pairs, see :mod:`tmpq.core.solvers`) one last gene picks the
candidate's solver; with one, every candidate has it; with none, DDIM (the genome of every space before solvers).

With reuse (``reuse_branch`` > 0, ``deep_layers`` the layers a reuse call skips, see :mod:`tmpq.core.reuse`), the
genome ends with one 0/1 gene per denoiser call after the first, up to the most calls any step choice and solver
makes: gene k-1 = 1 makes call k reuse the deep features of the last full call; the genes past a candidate's own
calls are unused. A reuse call costs the BitOPs of the shallow layers only.

With Winograd tiles (``wino_tiles``: the supernet's ``winograd``, tile sizes m of F(m, 3)), the genome ends with one
algorithm gene per eligible layer (a layer whose ``wino`` is set: a 3x3, stride-1 conv), in layer order, over
``0..len(wino_tiles)``: 0 = direct convolution, k = Winograd with tile ``wino_tiles[k - 1]``; shared by all steps.
Such a layer costs its Winograd-domain multiplications and transform operations
(:func:`tmpq.core.cost.winograd_bitops`); its stored weight is unchanged. Without tiles the genome is what it was.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tmpq.core.candidate import DEFAULT_SOLVER, Candidate, Solver
from tmpq.core.cost import WINOGRAD_TILES, LayerCost, call_bitops, call_latency, weight_bits
from tmpq.core.errors import TmpqError
from tmpq.search.groups import TimeGroups

SPACE_FORMAT = "tmpq.search-space"
SPACE_VERSION = 1
# search.axes: what a search may change (SearchSpace.restrict)
AXES = ("joint", "time", "bits")
# search.cost: the second objective, BitOPs (analytic) or latency (measured on the deployment backend)
COSTS = ("bitops", "latency")


@dataclass(frozen=True)
class SearchSpace:
    groups: TimeGroups
    layers: tuple[LayerCost, ...]
    num_genes: int
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    per_group_bits: bool = False
    other_params: int = 0  # parameters outside the quantized layers (kept at 32 bits)
    bitops_budget: float | None = None
    size_budget_mb: float | None = None
    extra: dict = field(default_factory=dict)
    fixed: tuple[tuple[int, int], ...] = ()  # (gene index, value) held constant: single-axis searches
    # one grouping per allowed step count (ascending; ``groups`` is one of them, the reference): the step count is a
    # gene. Empty: the step count is fixed at ``groups.n``.
    step_groups: tuple[TimeGroups, ...] = ()
    # (solver, order) choices; more than one: a solver gene (the genome's last); none: DDIM
    solvers: tuple[tuple[str, int], ...] = ()
    # reuse of deep features as a gene (0: none): the depth of the shallow part, and the layers a reuse call skips
    reuse_branch: int = 0
    deep_layers: tuple[str, ...] = ()
    # the measured latency table (search.cost = "latency"; tmpq.core.cost.latency_entries): not part of to_dict,
    # the run keeps it in its own file
    latency_table: dict | None = field(default=None, compare=False)
    # Winograd F(m, 3) tile sizes an eligible layer may use besides direct convolution (empty: no algorithm genes)
    wino_tiles: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "wino_tiles", tuple(int(m) for m in self.wino_tiles))
        if self.wino_tiles:
            tiles = list(self.wino_tiles)
            if any(m not in WINOGRAD_TILES for m in tiles) or tiles != sorted(set(tiles)):
                raise TmpqError(f"supernet.winograd: tile sizes must be distinct, ascending, each one of "
                                f"{list(WINOGRAD_TILES)}, got {tiles}")
            if not self.wino_layers:
                raise TmpqError("supernet.winograd: no quantized layer is a Winograd-eligible 3x3 convolution "
                                "(stride 1, dilation 1, groups 1, zeros padding, not pinned)")
            if self.per_group_bits:
                raise TmpqError("supernet.winograd: algorithm genes do not combine with bits per time group "
                                "(search.per_group_bits)")
            if self.latency_table is not None:
                raise TmpqError("search.cost: \"latency\" does not combine with supernet.winograd (the latency table "
                                "has no Winograd entries)")
        if self.latency_table is not None:
            t = self.latency_table
            missing = [lay.fqn for lay in self.layers if lay.fqn not in t.get("layers", {})]
            if missing:
                raise TmpqError(f"latency table: no entry for layer {missing[0]} ({len(missing)} missing): measured "
                                f"for another model or supernet")
            if self.reuse_branch and "remainder_reuse" not in t:
                raise TmpqError("latency table: no reuse remainder, but the space has reuse genes")
        if self.reuse_branch and self.per_group_bits:
            raise TmpqError("search.reuse: reuse genes do not combine with bits per time group")
        if self.reuse_branch and any(s == "heun" for s, _o in self.solver_choices):
            raise TmpqError("search.reuse_branch: reuse does not combine with the heun solver (two calls per step)")
        if self.reuse_branch and not self.deep_layers:
            raise TmpqError("search.reuse: no quantized layer lies in the deep part, so reuse would save nothing")
        if len(set(self.solvers)) != len(self.solvers):
            raise TmpqError(f"search.solvers: repeated solver in {[Solver(*s).label for s in self.solvers]}")
        if len(self.solvers) > 1 and self.per_group_bits:
            raise TmpqError("search.solvers: a solver gene does not combine with bits per time group")
        if self.step_groups:
            if self.per_group_bits:
                raise TmpqError("search.per_group_bits: bits per time group need a fixed step count "
                                "(drop search.step_choices)")
            if len({g.n for g in self.step_groups}) != len(self.step_groups):
                raise TmpqError(f"search.step_choices: repeated step count in {[g.n for g in self.step_groups]}")
            if self.groups not in self.step_groups:
                raise TmpqError(f"search.steps: {self.groups.n} must be one of the step choices "
                                f"{[g.n for g in self.step_groups]}")

    # -- shape of the genome --------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return self.groups.n

    @property
    def step_choices(self) -> tuple[int, ...]:
        """The step counts a candidate may have."""
        return tuple(g.n for g in self.step_groups) if self.step_groups else (self.groups.n,)

    @property
    def bits_start(self) -> int:
        """Index of the first bit gene (= number of time genes)."""
        if self.step_groups:
            return 1 + max(self.step_choices)
        return self.n_steps

    @property
    def _resolution(self) -> int:
        return max(max(g.sizes) for g in self.step_groups)

    @property
    def bit_blocks(self) -> int:
        return self.n_steps if self.per_group_bits else 1

    @property
    def max_calls(self) -> int:
        """The most denoiser calls any candidate of the space makes."""
        return max(s.calls(max(self.step_choices)) for s in self.solver_choices)

    @property
    def reuse_genes(self) -> int:
        return self.max_calls - 1 if self.reuse_branch else 0

    @property
    def wino_layers(self) -> tuple[int, ...]:
        """Indices (into ``layers``) of the Winograd-eligible layers, in order: one algorithm gene each."""
        return tuple(i for i, lay in enumerate(self.layers) if lay.wino is not None)

    @property
    def algo_genes(self) -> int:
        return len(self.wino_layers) if self.wino_tiles else 0

    @property
    def reuse_start(self) -> int:
        """Index of the first reuse gene (= where the algorithm genes start when there are none)."""
        return self.bits_start + 2 * self.num_genes * self.bit_blocks + (1 if len(self.solvers) > 1 else 0)

    @property
    def algo_start(self) -> int:
        """Index of the first algorithm gene (the genome's last ones)."""
        return self.reuse_start + self.reuse_genes

    @property
    def genome_length(self) -> int:
        return self.algo_start + self.algo_genes

    @property
    def solver_choices(self) -> tuple[Solver, ...]:
        return tuple(Solver(*s) for s in self.solvers) or (DEFAULT_SOLVER,)

    def upper_bounds(self) -> np.ndarray:
        """Exclusive upper bound of every gene (lower bounds are 0)."""
        nb = self.num_genes * self.bit_blocks
        if self.step_groups:
            time = [len(self.step_groups)] + [self._resolution] * max(self.step_choices)
        else:
            time = list(self.groups.sizes)
        solver = [len(self.solvers)] if len(self.solvers) > 1 else []
        return np.array(time + [len(self.w_bits)] * nb + [len(self.a_bits)] * nb + solver + [2] * self.reuse_genes
                        + [len(self.wino_tiles) + 1] * self.algo_genes, dtype=np.int64)

    def _time_decode(self, g: np.ndarray) -> tuple[int, ...]:
        if not self.step_groups:
            return self.groups.schedule(g[:self.n_steps].tolist())
        grp, r = self.step_groups[int(g[0])], self._resolution
        return grp.schedule([int(v) * size // r for v, size in zip(g[1:1 + grp.n], grp.sizes)])

    def _time_encode(self, timesteps: Sequence[int]) -> list[int]:
        if not self.step_groups:
            return list(self.groups.offsets(timesteps))
        if len(timesteps) not in self.step_choices:
            raise TmpqError(f"schedule of {len(timesteps)} steps: the space allows {list(self.step_choices)} steps")
        k = self.step_choices.index(len(timesteps))
        grp, r = self.step_groups[k], self._resolution
        # the smallest position that decodes to each offset: ceil(offset * R / size)
        pos = [-(-o * r // size) for o, size in zip(grp.offsets(timesteps), grp.sizes)]
        return [k] + pos + [0] * (max(self.step_choices) - grp.n)

    # -- codec ----------------------------------------------------------------------------------------------------
    def decode(self, genome: Sequence[int]) -> Candidate:
        g = np.asarray(genome, dtype=np.int64)
        if g.shape != (self.genome_length,):
            raise TmpqError(f"genome: expected {self.genome_length} genes, got {g.size}")
        if np.any(g < 0) or np.any(g >= self.upper_bounds()):
            bad = int(np.argmax((g < 0) | (g >= self.upper_bounds())))
            raise TmpqError(f"genome: gene {bad} = {int(g[bad])} outside [0, {int(self.upper_bounds()[bad])})")
        n, nb = self.bits_start, self.num_genes * self.bit_blocks
        ts = self._time_decode(g)
        w = [self.w_bits[i] for i in g[n:n + nb]]
        a = [self.a_bits[i] for i in g[n + nb:n + 2 * nb]]
        pairs = tuple(zip(w, a))
        if self.per_group_bits:
            bits = tuple(tuple(pairs[b * self.num_genes:(b + 1) * self.num_genes]) for b in range(self.n_steps))
        else:
            bits = tuple(pairs)
        r0 = self.reuse_start
        solver = self.solver_choices[int(g[r0 - 1]) if len(self.solvers) > 1 else 0]
        reuse = ()
        if self.reuse_genes:
            calls = solver.calls(len(ts))
            reuse = tuple(k for k in range(1, calls) if g[r0 + k - 1])
        tiles = (0,) + self.wino_tiles
        algos = tuple(tiles[int(v)] for v in g[self.algo_start:])
        return Candidate(ts, bits, solver, reuse, per_group=self.per_group_bits, algos=algos)

    def encode(self, cand: Candidate) -> np.ndarray:
        offs = self._time_encode(cand.timesteps)
        if cand.per_group != self.per_group_bits:
            want = "bits per time group" if self.per_group_bits else "one allocation for every step"
            raise TmpqError(f"candidate bits: the space has {want}")
        blocks = cand.bits if self.per_group_bits else (cand.bits,)
        if len(blocks) != self.bit_blocks or any(len(b) != self.num_genes for b in blocks):
            raise TmpqError(f"candidate bits: expected {self.bit_blocks} x {self.num_genes} (w, a) pairs")
        w_idx, a_idx = [], []
        for block in blocks:
            for w, a in block:
                if w not in self.w_bits or a not in self.a_bits:
                    raise TmpqError(f"candidate bits: ({w}, {a}) not in options W{list(self.w_bits)} A{list(self.a_bits)}")
                w_idx.append(self.w_bits.index(w))
                a_idx.append(self.a_bits.index(a))
        if cand.solver not in self.solver_choices:
            raise TmpqError(f"candidate solver: {cand.solver.label} is not a solver of the space "
                            f"{[s.label for s in self.solver_choices]}")
        solver = [self.solver_choices.index(cand.solver)] if len(self.solvers) > 1 else []
        reuse = []
        if cand.reuse:
            calls = cand.calls
            if not self.reuse_branch:
                raise TmpqError("candidate reuse: the space has no reuse genes (search.reuse)")
            if list(cand.reuse) != sorted(set(cand.reuse)) or cand.reuse[0] < 1 or cand.reuse[-1] >= calls:
                raise TmpqError(f"candidate reuse: calls must be distinct, ascending, within 1..{calls - 1}, got "
                                f"{list(cand.reuse)}")
        if self.reuse_genes:
            reuse = [1 if k in cand.reuse else 0 for k in range(1, self.reuse_genes + 1)]
        return np.array(list(offs) + w_idx + a_idx + solver + reuse + self._algo_encode(cand), dtype=np.int64)

    def _algo_encode(self, cand: Candidate) -> list[int]:
        if not cand.algos:
            return [0] * self.algo_genes
        if not self.algo_genes:
            raise TmpqError("candidate algos: the space has no algorithm genes (supernet.winograd)")
        if len(cand.algos) != self.algo_genes or any(m and m not in self.wino_tiles for m in cand.algos):
            raise TmpqError(f"candidate algos: expected {self.algo_genes} entries, each 0 (direct) or one of "
                            f"{list(self.wino_tiles)}, got {list(cand.algos)}")
        return [self.wino_tiles.index(m) + 1 if m else 0 for m in cand.algos]

    def algo_map(self, cand: Candidate) -> dict[str, int]:
        """fqn -> Winograd tile m of the candidate's Winograd layers (empty when all direct)."""
        return {self.layers[i].fqn: m for i, m in zip(self.wino_layers, cand.algos) if m}

    # -- analytic cost ----------------------------------------------------------------------------------------------
    def _step_bits(self, cand: Candidate) -> list[tuple]:
        """Per denoiser call (in schedule order), the per-gene (w, a) allocation used (Heun: two calls per step
        but the last)."""
        if not self.per_group_bits:
            return [cand.bits] * cand.calls
        # bits[g] belongs to time group g; the schedule runs from the last group to the first
        return list(reversed(cand.bits))

    def bitops(self, cand: Candidate) -> float:
        """BitOPs of the whole schedule per sample: sum over denoiser calls and layers of MACs * b_w * b_a (a call
        that reuses deep features: the shallow layers only; a Winograd layer: its Winograd-domain multiplications
        and transform operations)."""
        deep = frozenset(self.deep_layers)
        reuse = set(cand.reuse)
        algos = self.algo_map(cand) if cand.algos else None
        return float(sum(call_bitops(self.layers, alloc, deep if k in reuse else frozenset(), algos)
                         for k, alloc in enumerate(self._step_bits(cand))))

    def latency(self, cand: Candidate) -> float:
        """Predicted seconds per image of the whole sampling from the measured table: per denoiser call the remainder
        plus each layer's int8 or fp entry by its option (a reuse call: the shallow layers and the reuse remainder)."""
        t = self.latency_table
        if t is None:
            raise TmpqError("search.cost: this search space has no latency table (set search.cost = \"latency\")")
        deep = frozenset(self.deep_layers)
        int8 = frozenset((int(w), int(a)) for w, a in t["int8_options"])
        reuse = set(cand.reuse)
        return float(sum(call_latency(self.layers, alloc, t, int8, deep if k in reuse else frozenset(), k in reuse)
                         for k, alloc in enumerate(self._step_bits(cand))))

    def size_mb(self, cand: Candidate) -> float:
        """Weights at their bits (each distinct precision a layer needs is stored) + other parameters at 32 bits."""
        return (32 * self.other_params + weight_bits(self.layers, self._step_bits(cand))) / 8 / 1e6

    def feasible(self, cand: Candidate) -> bool:
        if self.fixed and not self.respects_fixed(self.encode(cand)):
            return False
        if self.bitops_budget is not None and self.bitops(cand) > self.bitops_budget:
            return False
        if self.size_budget_mb is not None and self.size_mb(cand) > self.size_budget_mb:
            return False
        return True

    def uniform_candidate(self, w: int, a: int, offsets: Sequence[int] | None = None,
                          steps: int | None = None, solver: tuple[str, int] | None = None) -> Candidate:
        """Every gene at (w, a) on the seed schedule (first timestep of every group) of the reference grouping, or of
        the ``steps`` choice of a space with a step-count gene; with the space's first solver unless ``solver``."""
        grp = self.groups
        if steps is not None and steps != grp.n:
            if steps not in self.step_choices:
                raise TmpqError(f"steps: {steps} is not a step choice of the space {list(self.step_choices)}")
            grp = self.step_groups[self.step_choices.index(steps)]
        offs = list(offsets) if offsets is not None else list(grp.seed_offsets())
        block = tuple((w, a) for _ in range(self.num_genes))
        bits = tuple(block for _ in range(self.n_steps)) if self.per_group_bits else block
        return Candidate(grp.schedule(offs), bits, Solver(*(solver or self.solver_choices[0])),
                         per_group=self.per_group_bits)

    def uniform_seeds(self, limit: int) -> list[np.ndarray]:
        """Genomes of the uniform options (every (w, a) pair) at every step choice on its groups' seed schedule, the
        feasible ones that respect the held genes, at most ``limit``: the first generation's seeds, so that a search
        starts from every uniform baseline it is compared with. Uniform W6A6 at the reference step count comes first
        (the paper's seed); past ``limit`` the rest are thinned evenly over BitOPs."""
        first, rest, seen = [], [], set()
        for k, steps in enumerate(sorted(self.step_choices, key=lambda s: s != self.groups.n)):
            for j, (w, a) in enumerate((w, a) for w in self.w_bits for a in self.a_bits):
                # with a solver gene, the seeds take the solvers in turn
                solver = self.solver_choices[(k + j) % len(self.solver_choices)]
                c = self.uniform_candidate(w, a, steps=steps, solver=solver)
                if c.key in seen or not self.feasible(c):
                    continue
                seen.add(c.key)
                (first if (steps, w, a) == (self.groups.n, 6, 6) else rest).append(c)
        rest.sort(key=self.bitops)
        room = max(0, limit - len(first))
        if len(rest) > room:
            rest = [rest[i] for i in np.unique(np.linspace(0, len(rest) - 1, room).round().astype(int))] if room else []
        return [self.encode(c) for c in first + rest]

    # -- single-axis restriction -----------------------------------------------------------------------------------
    def restrict(self, axes: str, fixed_bits: tuple[int, int] | None = None) -> "SearchSpace":
        """``joint`` (everything free), ``time`` (every bit gene held at the uniform option ``fixed_bits``, every
        algorithm gene at direct) or ``bits`` (every time gene held at its group's seed offset: for quad groups,
        quadratic DDIM; the algorithm genes stay free)."""
        from dataclasses import replace

        n = self.bits_start
        if axes == "joint":
            return replace(self, fixed=())
        if axes == "bits":  # the reference step count on its groups' seed schedule
            time = self._time_encode(self.groups.schedule(self.groups.seed_offsets()))
            r0 = self.reuse_start  # reuse belongs to the time axis: held at "never"
            return replace(self, fixed=tuple((i, int(o)) for i, o in enumerate(time))
                           + tuple((r0 + j, 0) for j in range(self.reuse_genes)))
        if axes == "time":
            if fixed_bits is None or fixed_bits[0] not in self.w_bits or fixed_bits[1] not in self.a_bits:
                raise TmpqError(f"search.fixed_bits: W{fixed_bits[0] if fixed_bits else '?'}A"
                                f"{fixed_bits[1] if fixed_bits else '?'} is not a uniform option of the supernet "
                                f"(W{list(self.w_bits)} A{list(self.a_bits)})")
            nb = self.num_genes * self.bit_blocks
            wi, ai = self.w_bits.index(fixed_bits[0]), self.a_bits.index(fixed_bits[1])
            return replace(self, fixed=tuple((n + j, wi) for j in range(nb))
                           + tuple((n + nb + j, ai) for j in range(nb))
                           + tuple((self.algo_start + j, 0) for j in range(self.algo_genes)))
        raise TmpqError(f"search.axes: unknown {axes!r}; choose {', '.join(AXES[:-1])} or {AXES[-1]}")

    def _hold(self, g: np.ndarray) -> np.ndarray:
        for i, v in self.fixed:
            g[i] = v
        return g

    def respects_fixed(self, genome: Sequence[int]) -> bool:
        return all(int(genome[i]) == v for i, v in self.fixed)

    # -- operators (explicit generators) ----------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> np.ndarray:
        return self._hold(rng.integers(0, self.upper_bounds()))

    def mutate(self, genome: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
        """Each free gene is redrawn with probability p (uniform over its domain)."""
        out = np.array(genome, dtype=np.int64)
        hit = rng.random(out.size) < p
        out[hit] = rng.integers(0, self.upper_bounds()[hit])
        return self._hold(out)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Uniform crossover: each gene from either parent with probability 1/2."""
        return self._hold(np.where(rng.random(len(a)) < 0.5, a, b).astype(np.int64))

    def sample_feasible(self, rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
        for _ in range(tries):
            g = self.sample(rng)
            if self.feasible(self.decode(g)):
                return g
        raise TmpqError(f"search space: no feasible candidate in {tries} random draws; the budget is too tight")

    # -- persistence ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": SPACE_FORMAT, "version": SPACE_VERSION, "groups": self.groups.to_dict(),
                "layers": [_layer_dict(lay) for lay in self.layers],
                "num_genes": self.num_genes, "w_bits": list(self.w_bits), "a_bits": list(self.a_bits),
                "per_group_bits": self.per_group_bits, "other_params": self.other_params,
                "bitops_budget": self.bitops_budget, "size_budget_mb": self.size_budget_mb, "extra": self.extra,
                "fixed": [list(f) for f in self.fixed], "step_groups": [g.to_dict() for g in self.step_groups],
                **({"solvers": [list(s) for s in self.solvers]} if self.solvers else {}),
                **({"reuse_branch": self.reuse_branch, "deep_layers": list(self.deep_layers)}
                   if self.reuse_branch else {}),
                **({"wino_tiles": list(self.wino_tiles)} if self.wino_tiles else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        if d.get("format") != SPACE_FORMAT:
            raise TmpqError(f"not a tmpq search space (format {d.get('format')!r})")
        layers = tuple(LayerCost(lay["fqn"], int(lay["macs"]), int(lay["params"]), lay["gene"],
                                 tuple(lay["pinned"]) if lay["pinned"] else None,
                                 tuple(int(v) for v in lay["wino"]) if lay.get("wino") else None)
                       for lay in d["layers"])
        return cls(TimeGroups.from_dict(d["groups"]), layers, int(d["num_genes"]), tuple(d["w_bits"]),
                   tuple(d["a_bits"]), bool(d["per_group_bits"]), int(d["other_params"]), d["bitops_budget"],
                   d["size_budget_mb"], dict(d.get("extra", {})),
                   tuple((int(i), int(v)) for i, v in d.get("fixed", [])),
                   tuple(TimeGroups.from_dict(g) for g in d.get("step_groups", [])),
                   tuple(Solver(str(s), int(o)) for s, o in d.get("solvers", [])), int(d.get("reuse_branch", 0)),
                   tuple(str(f) for f in d.get("deep_layers", [])),
                   wino_tiles=tuple(int(m) for m in d.get("wino_tiles", [])))

    @classmethod
    def from_supernet(cls, net, groups: TimeGroups, per_group_bits: bool = False,
                      step_groups: Sequence[TimeGroups] = (), solvers: Sequence[tuple[str, int]] = (),
                      reuse_branch: int = 0, reused: Sequence[str] = (), **budgets) -> "SearchSpace":
        """Build the space from a ``QuantSupernet``'s layer table (the only torch-touching constructor); with
        ``reuse_branch``, ``reused`` names the modules a reuse call skips (:func:`tmpq.core.reuse.reused_layers`);
        the Winograd tiles are the supernet's ``winograd`` and the eligible layers those its table gives a ``wino``."""
        layers = tuple(LayerCost(i.fqn, i.macs, i.params, i.gene, i.pinned, getattr(i, "wino", None))
                       for i in net.infos)
        other = sum(p.numel() for p in net.unet.parameters()) - sum(i.params for i in net.infos)
        names = set(reused)
        deep = tuple(i.fqn for i in net.infos if i.fqn in names) if reuse_branch else ()
        return cls(groups, layers, net.num_genes, net.config.w_bits, net.config.a_bits, per_group_bits, other,
                   step_groups=tuple(sorted(step_groups, key=lambda g: g.n)),
                   solvers=tuple(Solver(*s) for s in solvers),
                   reuse_branch=reuse_branch, deep_layers=deep,
                   wino_tiles=tuple(getattr(net.config, "winograd", ()) or ()), **budgets)


def _layer_dict(lay: LayerCost) -> dict:
    """A layer's entry of search_space.json: its fields, ``wino`` only for an eligible layer (older files unchanged)."""
    d = {k: v for k, v in lay.__dict__.items() if k != "wino"} | {"pinned": list(lay.pinned) if lay.pinned else None}
    return d | ({"wino": list(lay.wino)} if lay.wino is not None else {})
