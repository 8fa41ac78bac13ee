"""Genome codec, cost model and operators, property-tested on a synthetic layer table (no torch)."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmpq.core.errors import TmpqError
from tmpq.search.groups import quadratic_groups
from tmpq.search.space import Candidate, LayerCost, SearchSpace


def make_space(n=10, genes=5, per_group=False, **kw):
    layers = [LayerCost("conv_in", 100, 10, None, (8, 8))]
    layers += [LayerCost(f"l{g}", 1000 * (g + 1), 50 * (g + 1), g) for g in range(genes)]
    layers += [LayerCost("conv_out", 100, 10, None, (8, 8))]
    return SearchSpace(quadratic_groups(n), tuple(layers), genes, (8, 6, 4), (8, 6), per_group, other_params=7, **kw)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), per_group=st.booleans(), n=st.integers(1, 12))
def test_operators_always_produce_decodable_candidates(seed, per_group, n):
    sp = make_space(n=n, per_group=per_group)
    rng = np.random.default_rng(seed)
    a, b = sp.sample(rng), sp.sample(rng)
    for g in (a, b, sp.mutate(a, rng, 0.5), sp.crossover(a, b, rng)):
        c = sp.decode(g)
        assert len(c.timesteps) == n and all(x > y for x, y in zip(c.timesteps, c.timesteps[1:]))
        assert np.array_equal(sp.encode(c), g)
        assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_operators_use_only_the_given_generator():
    sp = make_space()
    g1 = sp.mutate(sp.sample(np.random.default_rng(3)), np.random.default_rng(4))
    g2 = sp.mutate(sp.sample(np.random.default_rng(3)), np.random.default_rng(4))
    assert np.array_equal(g1, g2)


def test_mutation_rate():
    sp = make_space(n=10, genes=40)
    rng = np.random.default_rng(0)
    g = sp.sample(rng)
    changed = np.mean([np.mean(sp.mutate(g, rng, 0.25) != g) for _ in range(200)])
    assert 0.1 < changed < 0.25  # redraws can land on the same value


def test_bitops_and_size_by_hand():
    sp = make_space(n=3, genes=2)
    c = sp.uniform_candidate(6, 8)
    per_call = 100 * 64 * 2 + 1000 * 48 + 2000 * 48
    assert sp.bitops(c) == 3 * per_call
    assert sp.size_mb(c) == pytest.approx((10 * 8 * 2 + 50 * 6 + 100 * 6 + 7 * 32) / 8e6)
    assert sp.bitops(sp.uniform_candidate(4, 6)) < sp.bitops(c)


def test_per_group_bits_cost_and_storage():
    sp = make_space(n=2, genes=1, per_group=True)
    c = Candidate(sp.groups.schedule([0, 0]), (((8, 8),), ((4, 6),)), per_group=True)
    assert sp.bitops(c) == 2 * 100 * 64 * 2 + 1000 * 64 + 1000 * 24
    assert sp.size_mb(c) == pytest.approx((10 * 8 * 2 + 50 * (8 + 4) + 7 * 32) / 8e6)


def test_budgets_filter_before_sampling():
    sp0 = make_space()
    budget = sp0.bitops(sp0.uniform_candidate(6, 6))
    sp = make_space(bitops_budget=budget)
    assert sp.feasible(sp.uniform_candidate(6, 6)) and not sp.feasible(sp.uniform_candidate(8, 8))
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert sp.feasible(sp.decode(sp.sample_feasible(rng)))
    with pytest.raises(TmpqError, match="budget is too tight"):
        make_space(bitops_budget=1.0).sample_feasible(rng, tries=50)


def test_codec_errors_and_round_trip():
    sp = make_space()
    with pytest.raises(TmpqError, match="expected"):
        sp.decode([0, 1])
    g = sp.sample(np.random.default_rng(0))
    g[0] = 999
    with pytest.raises(TmpqError, match="gene 0"):
        sp.decode(g)
    with pytest.raises(TmpqError, match="not in options"):
        sp.encode(Candidate(sp.uniform_candidate(8, 8).timesteps, tuple((5, 8) for _ in range(5))))
    assert SearchSpace.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp


def test_candidate_key_is_stable():
    c = Candidate((800, 50, 0), ((8, 8), (6, 6)))
    assert c.key == Candidate((800, 50, 0), ((8, 8), (6, 6))).key
    assert c.key != Candidate((800, 51, 0), ((8, 8), (6, 6))).key
    assert c.key == Candidate.from_dict(c.to_dict()).key == "8b823aeaf3bcf77d"  # pinned: keys name rows in run logs



@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), per_group=st.booleans())
def test_single_axis_restriction_holds_genes_through_every_operator(seed, per_group):
    from tmpq.search.engines import repair
    from tmpq.search.groups import quadratic_groups

    rng = np.random.default_rng(seed)
    full = make_space(n=6, per_group=per_group)
    time_only = full.restrict("time", (6, 8))
    bits_only = full.restrict("bits")
    for sp in (time_only, bits_only):
        a, b = sp.sample(rng), sp.sample(rng)
        for g in (a, b, sp.mutate(a, rng, 1.0), sp.crossover(a, b, rng), sp.sample_feasible(rng)):
            assert sp.respects_fixed(g)
            c = sp.decode(g)
            if sp is time_only:
                blocks = c.bits if per_group else (c.bits,)
                assert all(pair == (6, 8) for block in blocks for pair in block)
            else:
                assert c.timesteps == quadratic_groups(6).schedule(quadratic_groups(6).seed_offsets())
        assert SearchSpace.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp
    # a candidate off the held axis is infeasible, so engines and seeds can never bring one in
    assert not time_only.feasible(full.uniform_candidate(8, 8))
    assert time_only.feasible(full.uniform_candidate(6, 8))
    # repair under a budget lowers only free genes (time-only: none; falls back to a held, feasible sample)
    budget = full.bitops(full.uniform_candidate(6, 6))
    from dataclasses import replace

    tight = replace(bits_only, bitops_budget=budget)
    g = repair(tight, tight._hold(np.zeros(tight.genome_length, dtype=np.int64)), rng)
    assert tight.respects_fixed(g) and tight.feasible(tight.decode(g))
    with pytest.raises(TmpqError, match="fixed_bits"):
        full.restrict("time", (5, 8))
    with pytest.raises(TmpqError, match="axes"):
        full.restrict("diagonal")


def test_budget_specs_uniform_option_number_and_share_of_the_fp_model():
    from tmpq.jobs.config import config_from_dict
    from tmpq.search.budget import budget_bitops, fp_bitops

    sp = make_space(n=10)
    macs = 100 + sum(1000 * (g + 1) for g in range(5)) + 100
    assert fp_bitops(sp, 100) == macs * 32 * 32 * 100
    assert budget_bitops(sp, "1% fp100") == pytest.approx(0.01 * macs * 32 * 32 * 100)
    assert budget_bitops(sp, "0.5%fp50") == pytest.approx(0.005 * macs * 32 * 32 * 50)
    assert budget_bitops(sp, "w6a6") == sp.bitops(sp.uniform_candidate(6, 6))
    assert budget_bitops(sp, "none") is None and budget_bitops(sp, "12345") == 12345.0
    assert config_from_dict({"search": {"bitops_budget": "1% fp100"}}).search.bitops_budget == "1% fp100"
    with pytest.raises(TmpqError, match="search.bitops_budget"):
        config_from_dict({"search": {"bitops_budget": "1% of fp"}})


def make_step_space(choices=(3, 5, 8), ref=5, **kw):
    from dataclasses import replace

    base = make_space(n=ref)
    return replace(base, step_groups=tuple(quadratic_groups(n) for n in choices), **kw)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_step_gene_operators_produce_candidates_of_every_allowed_length(seed):
    sp = make_step_space()
    rng = np.random.default_rng(seed)
    a, b = sp.sample(rng), sp.sample(rng)
    for g in (a, b, sp.mutate(a, rng, 0.5), sp.crossover(a, b, rng)):
        c = sp.decode(g)
        n = len(c.timesteps)
        assert n == sp.step_choices[g[0]] and all(x > y for x, y in zip(c.timesteps, c.timesteps[1:]))
        quadratic_groups(n).offsets(c.timesteps)  # one timestep in each of that step count's groups
        assert sp.decode(sp.encode(c)) == c  # positions past the chosen count are unused: compare decoded


def test_step_gene_covers_every_offset_and_costs_scale_with_steps():
    sp = make_step_space(choices=(2, 4), ref=4)
    assert sp.genome_length == 1 + 4 + 2 * 5 and sp.bits_start == 5
    grp = quadratic_groups(2)
    # every timestep of every group is reachable (the position resolution is the largest group size)
    for g, size in enumerate(grp.sizes):
        for off in range(size):
            offs = [0, 0]
            offs[g] = off
            c = Candidate(grp.schedule(offs), sp.uniform_candidate(8, 8).bits)
            assert sp.decode(sp.encode(c)) == c
    two, four = sp.uniform_candidate(6, 6, steps=2), sp.uniform_candidate(6, 6)
    assert len(two.timesteps) == 2 and len(four.timesteps) == 4
    assert sp.bitops(four) == 2 * sp.bitops(two)
    assert SearchSpace.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp
    with pytest.raises(TmpqError, match="allows"):
        sp.encode(Candidate(quadratic_groups(3).schedule([0, 0, 0]), two.bits))
    with pytest.raises(TmpqError, match="not a step choice"):
        sp.uniform_candidate(6, 6, steps=3)


def test_step_gene_bits_only_holds_the_reference_schedule_and_bad_spaces_are_refused():
    sp = make_step_space().restrict("bits")
    rng = np.random.default_rng(0)
    ref = quadratic_groups(5).schedule(quadratic_groups(5).seed_offsets())
    for _ in range(20):
        assert sp.decode(sp.mutate(sp.sample(rng), rng, 1.0)).timesteps == ref
    with pytest.raises(TmpqError, match="must be one of the step choices"):
        make_step_space(choices=(3, 8), ref=5)
    with pytest.raises(TmpqError, match="per_group_bits"):
        make_step_space(per_group_bits=True)
    from tmpq.jobs.config import config_from_dict

    assert config_from_dict({"search": {"steps": 5, "step_choices": [3, 5]}}).search.step_choices == (3, 5)
    with pytest.raises(TmpqError, match=r"^search.step_choices: \[3, 5\] must include search.steps \(10, its default"):
        config_from_dict({"search": {"step_choices": [3, 5]}})  # the key the user set is named first
    with pytest.raises(TmpqError, match="^search.steps: 7 must be one of search.step_choices"):
        config_from_dict({"search": {"steps": 7, "step_choices": [3, 5]}})
    with pytest.raises(TmpqError, match="search.step_choices"):
        config_from_dict({"search": {"steps": 5, "step_choices": [5, 5]}})


def test_uniform_seeds_cover_every_option_at_every_step_count_within_budget_and_held_genes():
    from dataclasses import replace

    sp = make_step_space()
    seeds = [sp.decode(g) for g in sp.uniform_seeds(100)]
    got = {(len(c.timesteps), c.bits[0]) for c in seeds}
    assert got == {(n, (w, a)) for n in (3, 5, 8) for w in (8, 6, 4) for a in (8, 6)} and len(seeds) == 18
    assert seeds[0] == sp.uniform_candidate(6, 6)  # the paper's seed (reference steps, W6A6) first
    # thinned evenly over BitOPs past the limit, keeping the paper's seed and both ends
    few = [sp.decode(g) for g in sp.uniform_seeds(5)]
    costs = sorted(sp.bitops(c) for c in seeds[1:])
    assert len(few) == 5 and few[0] == seeds[0]
    assert sp.bitops(few[1]) == costs[0] and sp.bitops(few[-1]) == costs[-1]
    # a budget drops what does not fit; a time-only search seeds only its held bits; a bits-only one its schedule
    budget = sp.bitops(sp.uniform_candidate(6, 6))
    assert all(sp.bitops(sp.decode(g)) <= budget for g in replace(sp, bitops_budget=budget).uniform_seeds(100))
    held = [sp.decode(g) for g in sp.restrict("time", (4, 8)).uniform_seeds(100)]
    assert {c.bits[0] for c in held} == {(4, 8)} and len(held) == 3
    ref = sp.uniform_candidate(8, 8).timesteps
    fixed_t = [sp.decode(g) for g in sp.restrict("bits").uniform_seeds(100)]
    assert len(fixed_t) == 6 and all(c.timesteps == ref for c in fixed_t)
