"""Search engines behind one ask / tell interface (the caller owns evaluation, as pymoo's ask-and-tell):

- ``pymoo``: NSGA-II (pymoo) with tmpq's own sampling / mutation / crossover and a budget repair, so every asked
  genome is valid and feasible.
- ``optuna``: Optuna's ``NSGAIISampler`` on a persistent RDB study (SQLite in the run directory by default, or any
  SQLAlchemy URL such as PostgreSQL); infeasible proposals are rejected analytically before evaluation.
- ``paper-ea``: TMPQ-DM's single-objective EA (at its defaults, population 50 and p = 0.25: keep the top 10,
  25 mutants, 10 uniform crossovers, 15 random; another population is split in the same proportions).
- ``random``: uniform random feasible genomes.

Every engine's first generation starts from the service's seeds (``SearchSpace.uniform_seeds``: the uniform options
at every step choice, as far as the budget allows; the paper's seed, uniform W6A6 at the reference step count, first).

Objectives are minimised; a failed evaluation is told as ``inf`` (never kept, never a reported fitness).
All randomness comes from the engine's ``numpy.random.Generator`` (seeded).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tmpq.core.cost import layer_bitops, layer_bits
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write_bytes
from tmpq.search.space import SearchSpace

ENGINES = ("pymoo", "optuna", "paper-ea", "random")


def repair(space: SearchSpace, genome: np.ndarray, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """Make a genome feasible one random move at a time (time genes are kept): a bit gene one option lower (or a
    solver / reuse gene one index on), or an algorithm gene to the algorithm that is cheapest for its conv at the
    conv's current bits, offered only when that is strictly cheaper than its current one. A larger Winograd tile is
    not always cheaper (on a conv with few channels the FP32 transforms outweigh the products saved), so algorithm
    genes are never stepped blindly; a space without them walks exactly as before."""
    g = np.array(genome, dtype=np.int64)
    if space.feasible(space.decode(g)):
        return g
    n = space.bits_start
    ub = space.upper_bounds()
    for _ in range(tries):
        held = {i for i, _ in space.fixed}
        raisable = [i for i in range(n, space.algo_start) if g[i] < ub[i] - 1 and i not in held]  # high -> low bits
        cheaper = _cheaper_algos(space, g, held) if space.algo_genes else {}
        moves = raisable + list(cheaper)
        if not moves:
            break
        i = int(rng.choice(moves))
        g[i] = cheaper[i] if i in cheaper else g[i] + 1
        if space.feasible(space.decode(g)):
            return g
    return space.sample_feasible(rng)


def _cheaper_algos(space: SearchSpace, g: np.ndarray, held: set[int]) -> dict[int, int]:
    """Free algorithm genes whose conv has a strictly cheaper algorithm at its current bits: gene index -> that
    algorithm's value (0 = direct, k = tile ``wino_tiles[k - 1]``). Per call, as the cost model counts it; the
    ranking holds over the whole schedule, since a conv runs at the same bits on every call it runs."""
    alloc = space.decode(g).bits
    out = {}
    for j, li in enumerate(space.wino_layers):
        i = space.algo_start + j
        if i in held:
            continue
        lay = space.layers[li]
        w, a = layer_bits(lay, alloc)
        costs = [layer_bitops(lay, w, a, m) for m in (0, *space.wino_tiles)]
        best = int(np.argmin(costs))
        if costs[best] < costs[int(g[i])]:
            out[i] = best
    return out


class Engine:
    """Base: ``ask()`` returns genomes to evaluate; ``tell(genomes, F)`` gives their objective rows."""

    name = "base"
    n_obj = 2

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.generation = 0

    def ask(self) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def tell(self, genomes: Sequence[np.ndarray], F: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RandomSearch(Engine):
    name = "random"

    def __init__(self, space: SearchSpace, seed: int = 0, batch: int = 50, seeds: Sequence[np.ndarray] = ()):
        super().__init__(space, seed)
        self.batch = batch
        self.seeds = [np.asarray(s) for s in seeds]

    def ask(self) -> list[np.ndarray]:
        out = self.seeds if self.generation == 0 else []
        out = out + [self.space.sample_feasible(self.rng) for _ in range(self.batch - len(out))]
        return out

    def tell(self, genomes, F) -> None:
        self.generation += 1


class PaperEA(Engine):
    """TMPQ-DM's EA on one scalar fitness (objective column ``fitness_col``, default the quality proxy).

    Every generation asks ``population`` new candidates: ``mutants`` (default half) of the elite, each free gene
    redrawn with probability ``p_mutation``; ``crossovers`` (a fifth) uniform crossovers of two elite members; the
    rest random. The elite is the best ``keep`` (a fifth, at least 2) of all candidates so far. At population 50 and
    p = 0.25 these are the paper's 25 / 10 / 15 and top 10.
    """

    name = "paper-ea"
    n_obj = 1

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 50, keep: int | None = None,
                 mutants: int | None = None, p_mutation: float = 0.25, crossovers: int | None = None,
                 randoms: int | None = None, seeds: Sequence[np.ndarray] = (), fitness_col: int = 0):
        super().__init__(space, seed)
        keep = max(2, population // 5) if keep is None else keep
        mutants = population // 2 if mutants is None else mutants
        crossovers = population // 5 if crossovers is None else crossovers
        randoms = population - mutants - crossovers if randoms is None else randoms
        if not 0 < p_mutation <= 1:
            raise TmpqError(f"search.mutation_prob: paper-ea needs a per-gene mutation probability in (0, 1], got "
                            f"{p_mutation}")
        if mutants + crossovers + randoms != population:
            raise TmpqError(f"paper-ea: mutants + crossovers + randoms must equal the population {population} "
                            f"(new candidates per generation; the top {keep} are kept besides)")
        self.population, self.keep, self.mutants = population, keep, mutants
        self.p, self.crossovers, self.randoms = p_mutation, crossovers, randoms
        self.seeds = [np.asarray(s) for s in seeds]
        self.col = fitness_col
        self.elite: list[tuple[float, np.ndarray]] = []

    def ask(self) -> list[np.ndarray]:
        if not self.elite:
            out = list(self.seeds[: self.population])
            return out + [self.space.sample_feasible(self.rng) for _ in range(self.population - len(out))]
        parents = [g for _, g in self.elite]
        out = []
        for _ in range(self.mutants):
            out.append(repair(self.space, self.space.mutate(parents[self.rng.integers(len(parents))], self.rng, self.p),
                              self.rng))
        for _ in range(self.crossovers):
            i, j = self.rng.choice(len(parents), 2, replace=len(parents) < 2)
            out.append(repair(self.space, self.space.crossover(parents[i], parents[j], self.rng), self.rng))
        out += [self.space.sample_feasible(self.rng) for _ in range(self.randoms)]
        return out

    def tell(self, genomes, F) -> None:
        F = np.asarray(F, dtype=np.float64).reshape(len(genomes), -1)
        pool = self.elite + [(float(f[self.col]), np.asarray(g)) for g, f in zip(genomes, F)]
        pool = [(f, g) for f, g in pool if np.isfinite(f)]
        pool.sort(key=lambda fg: fg[0])
        seen, elite = set(), []
        for f, g in pool:
            k = g.tobytes()
            if k not in seen:
                seen.add(k)
                elite.append((f, g))
            if len(elite) == self.keep:
                break
        self.elite = elite
        self.generation += 1


class PymooNSGA2(Engine):
    """pymoo's NSGA-II driven by ask / tell, with tmpq's valid-by-construction operators."""

    name = "pymoo"

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 50, p_mutation: float | None = None,
                 seeds: Sequence[np.ndarray] = (), n_obj: int = 2):
        super().__init__(space, seed)
        # per-gene mutation probability; None = 1 / free genes (pymoo's and Optuna's default). At the paper EA's 0.25
        # a 129-gene child has ~32 genes redrawn at random and the search is little better than random search.
        free = space.genome_length - len(space.fixed)
        p_mutation = p_mutation if p_mutation is not None else min(0.5, 1.0 / max(1, free))
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.crossover import Crossover
        from pymoo.core.duplicate import DuplicateElimination
        from pymoo.core.mutation import Mutation
        from pymoo.core.population import Population
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair
        from pymoo.core.sampling import Sampling
        from pymoo.termination.max_gen import MaximumGenerationTermination

        sp = self.space
        self.n_obj = n_obj
        seeds = [np.asarray(s) for s in seeds]

        class _Sampling(Sampling):
            def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
                rows = seeds[:n_samples] + [sp.sample_feasible(random_state) for _ in range(n_samples - len(seeds))]
                return np.array(rows[:n_samples], dtype=np.int64)

        class _Mutation(Mutation):
            def _do(self, problem, X, *args, random_state=None, **kwargs):
                return np.array([sp.mutate(x, random_state, p_mutation) for x in X], dtype=np.int64)

        class _Crossover(Crossover):
            def __init__(self):
                super().__init__(2, 1, prob=0.9)

            def _do(self, problem, X, *args, random_state=None, **kwargs):
                return np.array([[sp.crossover(a, b, random_state) for a, b in zip(X[0], X[1])]], dtype=np.int64)

        class _Repair(Repair):
            def _do(self, problem, X, *args, random_state=None, **kwargs):
                rs = random_state if random_state is not None else np.random.default_rng(0)
                return np.array([repair(sp, x.astype(np.int64), rs) for x in X], dtype=np.int64)

        history: set[str] = set()  # keys of every candidate asked so far
        self._history = history

        class _Duplicates(DuplicateElimination):
            """Duplicates by decoded candidate (genomes differing only in unused time positions are one candidate),
            and against every candidate asked before, so each offspring is a new evaluation."""

            def _do(self, pop, other, is_duplicate):
                seen = set(history) if other is None else {sp.decode(o.X).key for o in other}
                for i, ind in enumerate(pop):
                    k = sp.decode(ind.X).key
                    if k in seen:
                        is_duplicate[i] = True
                    seen.add(k)
                return is_duplicate

        problem = Problem(n_var=sp.genome_length, n_obj=n_obj, xl=np.zeros(sp.genome_length),
                          xu=sp.upper_bounds() - 1, vtype=int)
        self._Population = Population
        self.algorithm = NSGA2(pop_size=population, sampling=_Sampling(), crossover=_Crossover(),
                               mutation=_Mutation(), repair=_Repair(), eliminate_duplicates=_Duplicates())
        self.algorithm.setup(problem, termination=MaximumGenerationTermination(10**9), seed=seed, verbose=False)
        self._pop = None

    def ask(self) -> list[np.ndarray]:
        self._pop = self.algorithm.ask()
        out = [np.asarray(x, dtype=np.int64) for x in self._pop.get("X")]
        self._history.update(self.space.decode(g).key for g in out)
        return out

    def tell(self, genomes, F) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        F = np.asarray(F, dtype=np.float64).reshape(len(genomes), -1)
        F = np.where(np.isfinite(F), F, 1e300)  # failed evaluations: dominated by everything
        Evaluator().eval(StaticProblem(self.algorithm.problem, F=F), self._pop)
        self.algorithm.tell(infills=self._pop)
        self.generation += 1


FAILED_VALUE = 1e300  # objective an engine is told for a failed evaluation: finite, dominated by every real one


def optuna_study_for_run(run_path: Path, storage: str = "") -> tuple[str, str]:
    """The storage URL and study name of a run's Optuna study.

    ``storage`` empty: SQLite ``<run>/optuna.db`` (resolved when the run starts, so a relative run directory works);
    otherwise any SQLAlchemy URL, e.g. ``postgresql+psycopg2://tmpq@db.example:5432/tmpq`` (keep passwords out of
    the URL, which is part of the resolved config: libpq reads ``PGPASSWORD`` and ``~/.pgpass``). The study name is
    made once per run (``tmpq-<run directory name>-<8 hex>``) and kept in ``<run>/optuna.json``, so a resume finds
    its own study, also in a database that many runs share.
    """

    run_path = Path(run_path)
    url = storage or f"sqlite:///{(run_path / 'optuna.db').resolve()}"
    meta = run_path / "optuna.json"
    if meta.is_file():
        name = str(json.loads(meta.read_text())["study_name"])
    else:
        name = f"tmpq-{run_path.resolve().name}-{uuid.uuid4().hex[:8]}"
        atomic_write_bytes(meta, (json.dumps({"study_name": name}, indent=2) + "\n").encode())
    return url, name


def _redact(url: str) -> str:
    """A database URL with its password (if any) replaced by ``***``, for messages."""
    import re

    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _open_rdb(url: str):
    """Optuna's RDB storage for ``url``; on SQLite in WAL mode with ``synchronous=NORMAL`` (the evaluation log is the
    record of truth; a commit per parameter with a full fsync each made SQLite about 7x slower)."""
    import optuna

    try:
        rdb = optuna.storages.RDBStorage(url)
    except Exception as exc:  # bad URL, missing driver, server down: one line naming the key
        msg = (str(exc).strip().splitlines() or [""])[0]
        raise TmpqError(f"search.storage: cannot open {_redact(url)}: {type(exc).__name__}: {msg}") from None
    if rdb.engine.dialect.name == "sqlite":
        from sqlalchemy import event

        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        event.listen(rdb.engine, "connect", _pragmas)
        rdb.engine.dispose()  # connections opened while creating the tables predate the pragmas
    return rdb


class OptunaNSGA2(Engine):
    """Optuna's NSGA-II (``NSGAIISampler``) driven through Optuna's ask / tell API, on an RDB study.

    Gene ``i`` is the integer parameter ``g<i>`` in ``[0, upper_bound_i)``; ``p_mutation`` is NSGA-II's per-parameter
    mutation probability (``None``: Optuna's 1 / number of parameters). ``ask()`` returns exactly ``population``
    feasible genomes. Each Optuna proposal is checked analytically against the budgets before it is returned: an
    infeasible one is told at once with state FAIL (user attr ``tmpq_infeasible``, its relative budget overshoot
    recorded as constraints) and never handed out for evaluation. After ``max_rejects`` (default 10 x population)
    rejections in one ask, the remaining places are filled by repairing the last rejected proposal (bits lowered,
    schedule kept, as the pymoo engine's repair) and enqueuing it with ``enqueue_trial``, so Optuna records it and
    breeds from it like any trial.
    The ``seeds`` are enqueued when the study is created. Every handed-out trial carries its budget slack as Optuna
    constraints (``bitops`` / ``size_mb``: cost / budget - 1, feasible when <= 0) and user attrs ``tmpq_generation``
    and ``tmpq_key`` (the candidate key of ``evaluations.jsonl``).

    Failure handling. Optuna's NSGA-II puts a new trial in the newest generation until that generation has
    ``population`` COMPLETE trials, and then starts the next one. So:

    - rejected proposals are told FAIL, not COMPLETE with large values and a positive violation: as COMPLETE they
      would count towards the generation, and a budget that rejects a population's worth of proposals in one ask
      would start the next generation early from an incomplete parent pool. Nothing is lost: constrained domination
      would rank them after every feasible trial, and each generation has ``population`` feasible ones;
    - a failed evaluation (a non-finite objective) is told COMPLETE with ``FAILED_VALUE`` (1e300) in place of each
      non-finite objective: dominated by every real evaluation, never preferred as a parent, and the generation stays
      full. Told FAIL it would leave the generation short, and Optuna would fold the next batch into it.

    Persistence and resume. ``storage`` is an SQLAlchemy URL (``None``: in memory); the study (``study_name``) is
    opened with ``load_if_exists``. The number of generations told is the study user attr ``tmpq_generations``, read
    back as ``self.generation``, and the search service starts its loop there: a resumed run *continues* the study
    rather than replaying it (replaying would double its trials). The candidates of an interrupted generation
    (trials tagged with that generation and still RUNNING, or already told before the interruption) are handed out
    again by the first ``ask()`` (the service serves the logged ones from its log), topped up with new proposals;
    other stale RUNNING trials are marked FAIL. The sampler's random stream restarts on resume (reseeded from the
    seed and the number of stored trials), so unlike the pymoo engine's replay, an interrupted-and-resumed run is
    not bit-identical to an uninterrupted one; it is deterministic given the stored study and the seed.
    """

    name = "optuna"

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 50, seeds: Sequence[np.ndarray] = (),
                 storage: str | None = None, study_name: str | None = None, max_rejects: int | None = None,
                 n_obj: int = 2, p_mutation: float | None = None):
        super().__init__(space, seed)
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
        self.population, self.n_obj = population, n_obj
        self.max_rejects = 10 * population if max_rejects is None else max_rejects
        self._ub = [int(u) for u in space.upper_bounds()]
        self._states = TrialState
        rdb = _open_rdb(storage) if storage else None
        # NSGA-II is set below, once we know whether the study is new (its seed depends on that)
        self.study = optuna.create_study(storage=rdb, study_name=study_name or "tmpq",
                                         sampler=optuna.samplers.RandomSampler(seed=seed),
                                         directions=["minimize"] * n_obj, load_if_exists=True)
        attrs = self.study.user_attrs
        trials = self.study.get_trials(deepcopy=False)
        if "tmpq_population" in attrs:
            for key, want in (("tmpq_population", population), ("tmpq_genome_length", space.genome_length),
                              ("tmpq_n_obj", n_obj)):
                if attrs.get(key) != want:
                    raise TmpqError(f"optuna study {self.study.study_name!r}: stored {key[5:]} {attrs.get(key)} "
                                    f"differs from this search's {want}; use a new study")
        sampler_seed = seed if not trials else int(np.random.SeedSequence([seed, len(trials)]).generate_state(1)[0])
        self.rng = np.random.default_rng(sampler_seed)
        # p_mutation None: Optuna's own default, 1 / number of parameters
        self.study.sampler = optuna.samplers.NSGAIISampler(population_size=population, mutation_prob=p_mutation,
                                                           seed=sampler_seed)
        if "tmpq_population" not in attrs:
            for g in seeds:
                self.study.enqueue_trial(self._params(g), user_attrs={"tmpq_origin": "seed"})
            self.study.set_user_attr("tmpq_population", population)
            self.study.set_user_attr("tmpq_genome_length", space.genome_length)
            self.study.set_user_attr("tmpq_n_obj", n_obj)
        self.generation = int(attrs.get("tmpq_generations", 0))
        self._pending: list[tuple[int, np.ndarray]] = []
        for t in trials:
            if t.state not in (TrialState.RUNNING, TrialState.COMPLETE):
                continue
            g = self._genome(t)
            if (t.user_attrs.get("tmpq_generation") == self.generation and g is not None
                    and space.feasible(space.decode(g)) and len(self._pending) < population):
                self._pending.append((t.number, g))
            elif t.state == TrialState.RUNNING:
                self.study.tell(t.number, state=TrialState.FAIL)
        self._asked: list[tuple[int, np.ndarray]] = []

    def _params(self, genome: np.ndarray) -> dict:
        return {f"g{i}": int(v) for i, v in enumerate(np.asarray(genome))}

    def _genome(self, trial) -> np.ndarray | None:
        try:
            g = np.array([trial.params[f"g{i}"] for i in range(len(self._ub))], dtype=np.int64)
        except KeyError:
            return None
        return g if "tmpq_key" in trial.user_attrs else None

    def _constraints(self, cand) -> dict[str, float]:
        sp, out = self.space, {}
        if sp.bitops_budget is not None:
            out["bitops"] = sp.bitops(cand) / sp.bitops_budget - 1.0
        if sp.size_budget_mb is not None:
            out["size_mb"] = sp.size_mb(cand) / sp.size_budget_mb - 1.0
        return out

    def ask(self) -> list[np.ndarray]:
        if self._asked:
            raise TmpqError("optuna engine: ask() called again before tell() of the previous generation")
        out, self._pending = list(self._pending), []
        rejects, last_bad = 0, None
        while len(out) < self.population:
            if rejects >= self.max_rejects:
                fix = (repair(self.space, last_bad, self.rng) if last_bad is not None
                       else self.space.sample_feasible(self.rng))
                self.study.enqueue_trial(self._params(fix), user_attrs={"tmpq_origin": "repair"})
            trial = self.study.ask()
            # Pin the trial's NSGA-II generation: Optuna assigns it when relative sampling first runs, which never
            # happens for an enqueued trial (all its params fixed), and such a trial would belong to no population.
            trial.relative_params  # noqa: B018
            held = dict(self.space.fixed)
            g = np.array([trial.suggest_int(f"g{i}", held.get(i, 0), held.get(i, ub - 1))
                          for i, ub in enumerate(self._ub)], dtype=np.int64)
            cand = self.space.decode(g)
            for k, v in self._constraints(cand).items():  # Optuna 5's replacement of constraints_func
                trial.set_constraint(k, v)
            trial.set_user_attr("tmpq_generation", self.generation)
            if not self.space.feasible(cand):
                trial.set_user_attr("tmpq_infeasible", True)
                self.study.tell(trial, state=self._states.FAIL)
                rejects, last_bad = rejects + 1, g
                continue
            trial.set_user_attr("tmpq_key", cand.key)
            out.append((trial.number, g))
        self._asked = out
        return [g.copy() for _, g in out]

    def tell(self, genomes, F) -> None:
        F = np.asarray(F, dtype=np.float64).reshape(len(genomes), -1)[:, : self.n_obj]
        if len(genomes) != len(self._asked) or not all(
                np.array_equal(np.asarray(g), a) for g, (_, a) in zip(genomes, self._asked)):
            raise TmpqError("optuna engine: tell() needs exactly the genomes of the last ask(), in order")
        for (number, _), f in zip(self._asked, F):
            values = np.where(np.isfinite(f), f, FAILED_VALUE)
            self.study.tell(number, [float(v) for v in values], skip_if_finished=True)
        self._asked = []
        self.generation += 1
        self.study.set_user_attr("tmpq_generations", self.generation)


def make_engine(name: str, space: SearchSpace, seed: int = 0, population: int = 50,
                seeds: Sequence[np.ndarray] = (), storage: str | None = None,
                study_name: str | None = None, p_mutation: float | None = None, n_obj: int = 2) -> Engine:
    """Build a named engine (``pymoo``, ``optuna``, ``paper-ea`` or ``random``).

    ``storage`` / ``study_name``: the Optuna study (an SQLAlchemy URL, ``None`` in memory); other engines ignore them.
    ``population``: candidates asked per generation (every engine). ``p_mutation``: the per-gene mutation
    probability; ``None`` = the engine's default (pymoo: 1 / free genes; optuna: 1 / parameters; paper-ea: 0.25);
    random search has no mutation and refuses one. ``n_obj``: objectives of the multi-objective engines (pymoo,
    optuna: 2 or 3); the paper EA uses the first, random search none.
    """
    if name == "pymoo":
        return PymooNSGA2(space, seed, population=population, seeds=seeds, p_mutation=p_mutation, n_obj=n_obj)
    if name == "optuna":
        return OptunaNSGA2(space, seed, population=population, seeds=seeds, storage=storage, study_name=study_name,
                           n_obj=n_obj, p_mutation=p_mutation)
    if name == "paper-ea":
        return PaperEA(space, seed, population=population, p_mutation=0.25 if p_mutation is None else p_mutation,
                       seeds=seeds)
    if name == "random":
        if p_mutation is not None:
            raise TmpqError(f"search.mutation_prob: engine random does not mutate; leave it at 0 (got {p_mutation})")
        return RandomSearch(space, seed, batch=population, seeds=seeds)
    raise TmpqError(f"search.engine: unknown {name!r}; choose one of {', '.join(ENGINES)}")
