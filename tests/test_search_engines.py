"""Engines on a synthetic objective (no torch): validity, feasibility, determinism, and that they optimise."""
import numpy as np
import pytest
from test_search_space import make_space

from tmpq.search.engines import make_engine, repair
from tmpq.search.pareto import hypervolume_2d


def synthetic(space, genome):
    """A proxy that wants high bits and each timestep at the start of its group; cost = BitOPs (conflicting)."""
    c = space.decode(genome)
    bits = np.array(c.bits, dtype=float)
    offs = np.array(space.groups.offsets(c.timesteps), dtype=float) / np.array(space.groups.sizes)
    proxy = float(np.sum(1.0 / bits[:, 0]) + np.sum(1.0 / bits[:, 1]) + 3.0 * np.sum(offs ** 2))
    return np.array([proxy, space.bitops(c) / 1e6])


def run(engine, space, gens):
    seen = []
    for _ in range(gens):
        genomes = engine.ask()
        F = np.array([synthetic(space, g) for g in genomes])
        for g in genomes:
            assert space.feasible(space.decode(g))
        seen += list(zip(genomes, F))
        engine.tell(genomes, F)
    return seen


@pytest.mark.parametrize("name", ["pymoo", "paper-ea", "random"])
def test_engines_ask_valid_feasible_genomes_and_are_deterministic(name):
    sp0 = make_space(genes=6)
    budget = sp0.bitops(sp0.uniform_candidate(6, 6))
    sp = make_space(genes=6, bitops_budget=budget)
    a = run(make_engine(name, sp, seed=3, population=20), sp, 3)
    b = run(make_engine(name, sp, seed=3, population=20), sp, 3)
    assert len(a) == len(b) and all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))


def test_nsga2_beats_random_on_hypervolume():
    sp = make_space(genes=8)
    fronts = {(name, seed): np.array([f for _, f in run(make_engine(name, sp, seed=seed, population=20), sp, 8)])
              for name in ("pymoo", "random") for seed in range(3)}
    ref = 1.05 * np.max(np.vstack(list(fronts.values())), axis=0)
    hv = {name: np.mean([hypervolume_2d(fronts[(name, s)], ref) for s in range(3)]) for name in ("pymoo", "random")}
    assert hv["pymoo"] > 1.05 * hv["random"]


def test_paper_ea_keeps_improving_single_objective():
    sp = make_space(genes=8)
    eng = make_engine("paper-ea", sp, seed=0)
    best = []
    for _ in range(5):
        genomes = eng.ask()
        F = np.array([synthetic(sp, g) for g in genomes])
        eng.tell(genomes, F)
        best.append(eng.elite[0][0])
    assert best == sorted(best, reverse=True) and best[-1] < best[0]


def test_paper_ea_defaults_are_the_papers():
    eng = make_engine("paper-ea", make_space())  # search.population 50, search.mutation_prob 0 (= engine default)
    assert (eng.population, eng.keep, eng.mutants, eng.crossovers, eng.randoms, eng.p) == (50, 10, 25, 10, 15, 0.25)


@pytest.mark.parametrize("population,p_mutation", [(50, None), (12, 0.6), (2, 1.0)])
def test_paper_ea_honours_population_and_mutation_prob(population, p_mutation, monkeypatch):
    """Every generation asks ``search.population`` candidates, half of them mutants at ``search.mutation_prob``."""
    from tmpq.search.space import SearchSpace

    rates, mutate = [], SearchSpace.mutate
    monkeypatch.setattr(SearchSpace, "mutate", lambda self, g, rng, p: rates.append(p) or mutate(self, g, rng, p))
    sp = make_space(genes=8)
    eng = make_engine("paper-ea", sp, seed=0, population=population, p_mutation=p_mutation,
                      seeds=sp.uniform_seeds(population // 2))
    for gen in range(3):
        genomes = eng.ask()
        assert len(genomes) == population
        eng.tell(genomes, np.array([synthetic(sp, g) for g in genomes]))
        assert len(rates) == gen * (population // 2)  # the first generation is seeds + random draws
    assert set(rates) == {0.25 if p_mutation is None else p_mutation}
    assert len(eng.elite) == max(2, population // 5)


def test_engines_refuse_or_honour_mutation_prob():
    from tmpq.core.errors import TmpqError

    sp = make_space()
    with pytest.raises(TmpqError, match="search.mutation_prob: engine random does not mutate"):
        make_engine("random", sp, p_mutation=0.3)
    eng = make_engine("optuna", sp, population=4, p_mutation=0.3)
    assert eng.study.sampler._child_generation_strategy._mutation_prob == 0.3


def test_failed_evaluations_are_never_elite():
    sp = make_space()
    eng = make_engine("paper-ea", sp, seed=0)
    genomes = eng.ask()
    F = np.array([synthetic(sp, g) for g in genomes])
    F[:45, 0] = np.inf
    eng.tell(genomes, F)
    assert len(eng.elite) == 5 and all(np.isfinite(f) for f, _ in eng.elite)


def test_repair_lowers_bits_into_budget():
    sp0 = make_space()
    sp = make_space(bitops_budget=sp0.bitops(sp0.uniform_candidate(6, 6)))
    g = sp.encode(sp.uniform_candidate(8, 8))
    fixed = repair(sp, g, np.random.default_rng(0))
    assert sp.feasible(sp.decode(fixed))
    assert np.array_equal(fixed[: sp.n_steps], g[: sp.n_steps])  # the schedule is kept


def test_unknown_engine():
    from tmpq.core.errors import TmpqError

    with pytest.raises(TmpqError, match="search.engine"):
        make_engine("cma", make_space())
