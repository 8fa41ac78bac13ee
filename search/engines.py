"""Search engines behind one ask / tell interface (the caller owns evaluation, as pymoo's ask-and-tell):

- ``pymoo``: NSGA-II (pymoo) with tmpq's own sampling / mutation / crossover and a budget repair, so every asked
  genome is valid and feasible.
- ``paper-ea``: TMPQ-DM's single-objective EA (population 50: keep the top 10, 25 mutants at p = 0.25,
  10 uniform crossovers, 15 random), seeded with the quadratic-DDIM schedule at uniform W6A6.
- ``random``: uniform random feasible genomes.

Objectives are minimised; a failed evaluation is told as ``inf`` (never kept, never a reported fitness).
All randomness comes from the engine's ``numpy.random.Generator`` (seeded).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.space import SearchSpace
from tmpq.errors import TmpqError

ENGINES = ("pymoo", "paper-ea", "random")


def repair(space: SearchSpace, genome: np.ndarray, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """Make a genome feasible by lowering random bit genes one option at a time (time genes are kept)."""
    g = np.array(genome, dtype=np.int64)
    if space.feasible(space.decode(g)):
        return g
    n = space.n_steps
    ub = space.upper_bounds()
    for _ in range(tries):
        raisable = [i for i in range(n, len(g)) if g[i] < ub[i] - 1]  # options are ordered high -> low bits
        if not raisable:
            break
        i = int(rng.choice(raisable))
        g[i] += 1
        if space.feasible(space.decode(g)):
            return g
    return space.sample_feasible(rng)


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
    """TMPQ-DM's EA on one scalar fitness (objective column ``fitness_col``, default the quality proxy)."""

    name = "paper-ea"
    n_obj = 1

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 50, keep: int = 10, mutants: int = 25,
                 p_mutation: float = 0.25, crossovers: int = 10, randoms: int = 15,
                 seeds: Sequence[np.ndarray] = (), fitness_col: int = 0):
        super().__init__(space, seed)
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
            out = list(self.seeds)
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

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 50, p_mutation: float = 0.25,
                 seeds: Sequence[np.ndarray] = (), n_obj: int = 2):
        super().__init__(space, seed)
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.crossover import Crossover
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

        problem = Problem(n_var=sp.genome_length, n_obj=n_obj, xl=np.zeros(sp.genome_length),
                          xu=sp.upper_bounds() - 1, vtype=int)
        self._Population = Population
        self.algorithm = NSGA2(pop_size=population, sampling=_Sampling(), crossover=_Crossover(),
                               mutation=_Mutation(), repair=_Repair(), eliminate_duplicates=True)
        self.algorithm.setup(problem, termination=MaximumGenerationTermination(10**9), seed=seed, verbose=False)
        self._pop = None

    def ask(self) -> list[np.ndarray]:
        self._pop = self.algorithm.ask()
        return [np.asarray(x, dtype=np.int64) for x in self._pop.get("X")]

    def tell(self, genomes, F) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        F = np.asarray(F, dtype=np.float64).reshape(len(genomes), -1)
        F = np.where(np.isfinite(F), F, 1e300)  # failed evaluations: dominated by everything
        Evaluator().eval(StaticProblem(self.algorithm.problem, F=F), self._pop)
        self.algorithm.tell(infills=self._pop)
        self.generation += 1


def make_engine(name: str, space: SearchSpace, seed: int = 0, population: int = 50,
                seeds: Sequence[np.ndarray] = ()) -> Engine:
    """Build a named engine (``pymoo``, ``paper-ea`` or ``random``)."""
    if name == "pymoo":
        return PymooNSGA2(space, seed, population=population, seeds=seeds)
    if name == "paper-ea":
        return PaperEA(space, seed, seeds=seeds)
    if name == "random":
        return RandomSearch(space, seed, batch=population, seeds=seeds)
    raise TmpqError(f"search.engine: unknown {name!r}; choose one of {', '.join(ENGINES)}")
