"""The Winograd algorithm gene on the pure side: the candidate's ``algos`` (normalised, keyed and logged only when
not all direct), the space's algorithm genes (codec, operators, restriction, persistence, refusals) and the cost
model's Winograd BitOPs, with the transform operation counts checked against the real F(m, 3) matrices."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tmpq.core.candidate import Candidate, Solver
from tmpq.core.cost import LayerCost, call_bitops, winograd_bitops, winograd_transform_ops, winograd_transforms
from tmpq.core.errors import TmpqError
from tmpq.quant.winograd import transforms
from tmpq.search.groups import quadratic_groups
from tmpq.search.space import SearchSpace

# the hand-worked layer: 3x3 conv, 8 -> 8 channels, 16 x 16 output per sample
CONV = LayerCost("conv", 16 * 16 * 8 * 8 * 9, 8 * 8 * 9, 0, wino=(8, 8, 16, 16))


def make_space(tiles=(2, 4), wino=True, n=4, **kw):
    """conv_in (pinned), three gene layers of which l0 and l2 are eligible 3x3 convs, conv_out (pinned)."""
    layers = [LayerCost("conv_in", 100, 10, None, (8, 8)),
              LayerCost("l0", 16 * 16 * 8 * 8 * 9, 576, 0, wino=(8, 8, 16, 16) if wino else None),
              LayerCost("l1", 2000, 100, 1),
              LayerCost("l2", 8 * 8 * 16 * 16 * 9, 2304, 1, wino=(16, 16, 8, 8) if wino else None),
              LayerCost("conv_out", 100, 10, None, (8, 8))]
    return SearchSpace(quadratic_groups(n), tuple(layers), 2, (8, 6, 4), (8, 6), other_params=7,
                       wino_tiles=tiles, **kw)


def test_candidate_algos_are_normalised_and_keep_old_keys_and_rows():
    # keys computed before the algorithm gene existed: all-direct candidates keep them byte for byte
    old = Candidate((800, 50, 0), ((8, 8), (6, 6)))
    assert old.key == "8b823aeaf3bcf77d"
    assert Candidate((800, 50, 0), ((8, 8), (6, 6)), Solver("dpm", 2), (1,), algos=(0, 0, 0)).key == "92587710e305e3ca"
    direct = Candidate((800, 50, 0), ((8, 8), (6, 6)), algos=[0, 0])
    assert direct.algos == () and direct == old and direct.to_dict() == old.to_dict()
    assert "algos" not in direct.fields()
    wino = Candidate((800, 50, 0), ((8, 8), (6, 6)), algos=(0, 4))
    assert wino.key != old.key and wino.fields()["algos"] == [0, 4]
    assert Candidate.from_dict(json.loads(json.dumps(wino.to_dict()))) == wino
    # Parquet-style rows: an array cell, and the NaN cell of a direct row in a frame whose other rows use Winograd
    frame = pd.DataFrame([wino.to_dict(), old.to_dict()])
    assert Candidate.from_dict(frame.iloc[0]) == wino and Candidate.from_dict(frame.iloc[1]) == old
    assert Candidate.from_dict({**old.to_dict(), "algos": np.array([0, 6])}).algos == (0, 6)
    with pytest.raises(TmpqError, match="algos"):
        Candidate((800, 50, 0), ((8, 8),), algos=(2, -1))


def _ops(mat: torch.Tensor) -> int:
    """Independent count of one 1-D pass: (nnz - 1) additions per row, one multiplication per non-unit entry."""
    nz = mat != 0
    return int((nz.sum(1) - 1).clamp(min=0).sum() + (nz & (mat.abs() != 1)).sum())


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transform_ops_come_from_the_real_matrices(m):
    at, _g, bt = transforms(m)
    mine_at, mine_bt = winograd_transforms(m)
    assert torch.equal(torch.tensor([[float(v) for v in r] for r in mine_at], dtype=torch.float64), at)
    assert torch.equal(torch.tensor([[float(v) for v in r] for r in mine_bt], dtype=torch.float64), bt)
    alpha = m + 2
    assert winograd_transform_ops(m) == (2 * alpha * _ops(bt), (alpha + m) * _ops(at))


def test_transform_ops_known_values():
    # F(2x2, 3x3): the textbook 32 input and 24 output additions (Lavin & Gray), no multiplications
    assert winograd_transform_ops(2) == (32, 24)
    # F(4, 3) by hand: B^T rows (x^4-5x^2+4, x^4+x^3-4x^2-4x, x^4-x^3-4x^2+4x, x^4+2x^3-x^2-2x, x^4-2x^3-x^2+2x,
    # x^5-5x^3+4x) cost 4+5+5+5+5+4 = 28 per pass, 2 passes x 6 vectors: 336; A^T rows (1,1,1,1,1,0), (0,1,-1,2,-2,0),
    # (0,1,1,4,4,0), (0,1,-1,8,-8,1) cost 4+5+5+6 = 20, over 6 columns then 4 rows: 200
    assert winograd_transform_ops(4) == (336, 200)
    with pytest.raises(TmpqError, match="F\\(3, 3\\)"):
        winograd_transform_ops(3)


def test_winograd_bitops_by_hand():
    # W6A8, m = 4: alpha = 6, tiles = ceil(16/4)^2 = 16
    # products: 16 tiles x 36 x 8 cin x 8 cout x 6 x 8 bits                 = 1,769,472
    # input transform: 16 tiles x 336 ops x 8 cin x 32 bits                  = 1,376,256
    # output transform: 16 tiles x 200 ops x 8 cout x 32 bits                =   819,200
    # total                                                                  = 3,964,928
    # (direct: 16 x 16 x 8 x 8 x 9 MACs x 6 x 8 bits                         = 7,077,888)
    b = winograd_bitops(CONV, 4, 6, 8)
    assert (b["mults"], b["input"], b["output"], b["total"]) == (1_769_472, 1_376_256, 819_200, 3_964_928)
    assert call_bitops([CONV], [(6, 8)]) == 7_077_888
    assert call_bitops([CONV], [(6, 8)], algos={"conv": 4}) == 3_964_928
    assert call_bitops([CONV], [(6, 8)], algos={"conv": 0}) == call_bitops([CONV], [(6, 8)], algos={}) == 7_077_888
    assert call_bitops([CONV], [(6, 8)], skip={"conv"}, algos={"conv": 4}) == 0
    with pytest.raises(TmpqError, match="l1"):
        winograd_bitops(LayerCost("l1", 10, 10, 0), 2, 8, 8)


def test_genome_unchanged_without_tiles_and_algo_genes_last():
    for kw in ({}, {"solvers": (("ddim", 1), ("dpm", 2)), "reuse_branch": 1, "deep_layers": ("l1",)}):
        plain, marked = make_space((), wino=False, **kw), make_space((), **kw)
        assert plain.genome_length == marked.genome_length and plain.algo_genes == 0
        assert np.array_equal(plain.upper_bounds(), marked.upper_bounds())
        assert json.dumps(plain.to_dict()) == json.dumps(make_space((), **kw).to_dict()).replace(
            ', "wino": [8, 8, 16, 16]', "").replace(', "wino": [16, 16, 8, 8]', "")
        assert set(plain.to_dict()["layers"][1]) == {"fqn", "macs", "params", "gene", "pinned"}
        assert "wino_tiles" not in marked.to_dict()
        sp = make_space((2, 6), **kw)
        assert sp.genome_length == plain.genome_length + 2 and sp.wino_layers == (1, 3)
        assert list(sp.upper_bounds()[-2:]) == [3, 3]
        assert np.array_equal(sp.upper_bounds()[:-2], plain.upper_bounds())


@pytest.mark.parametrize("kw", [{}, {"solvers": (("ddim", 1), ("dpm", 2)), "reuse_branch": 1, "deep_layers": ("l1",)}])
def test_codec_operators_and_persistence_with_tiles(kw):
    sp = make_space((2, 6), **kw)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        a, b = sp.sample(rng), sp.sample(rng)
        for g in (a, sp.mutate(a, rng, 0.5), sp.crossover(a, b, rng)):
            c = sp.decode(g)
            assert np.array_equal(sp.encode(c), g)
            assert Candidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c
            assert all(m in (0, 2, 6) for m in c.algos) and len(c.algos) in (0, 2)
            seen.add(c.algos)
    assert {(), (2, 6), (6, 0), (0, 2)} <= seen
    back = SearchSpace.from_dict(json.loads(json.dumps(sp.to_dict())))
    assert back == sp and back.to_dict() == sp.to_dict() and sp.to_dict()["wino_tiles"] == [2, 6]
    # the other genes decode as they do without tiles
    plain = make_space((), **kw)
    g = sp.sample(rng)
    c, c0 = sp.decode(g), plain.decode(g[:plain.genome_length])
    assert (c.timesteps, c.bits, c.solver, c.reuse) == (c0.timesteps, c0.bits, c0.solver, c0.reuse)


def test_cost_of_the_space_counts_winograd_layers_only():
    sp = make_space((2, 4))
    direct = sp.uniform_candidate(6, 8)
    wino = Candidate(direct.timesteps, direct.bits, algos=(4, 0))
    steps = len(direct.timesteps)
    assert sp.bitops(wino) == sp.bitops(direct) - steps * (7_077_888 - 3_964_928)
    assert sp.size_mb(wino) == sp.size_mb(direct)
    assert sp.algo_map(wino) == {"l0": 4} and sp.algo_map(direct) == {}
    tight = make_space((2, 4), bitops_budget=sp.bitops(wino))
    assert tight.feasible(wino) and not tight.feasible(direct)


def test_restrict_and_uniform_seeds():
    sp = make_space((2, 4))
    assert all(sp.decode(g).algos == () for g in sp.uniform_seeds(20))
    rng = np.random.default_rng(1)
    time = sp.restrict("time", (8, 8))
    for _ in range(30):
        g = time.mutate(time.sample(rng), rng, 0.9)
        assert time.decode(g).algos == () and time.feasible(time.decode(g))
    bits = sp.restrict("bits")
    assert any(bits.decode(bits.sample(rng)).algos for _ in range(30))
    assert all(i < sp.algo_start for i, _v in bits.fixed)


def test_refusals():
    with pytest.raises(TmpqError, match="per_group_bits"):
        make_space((2,), per_group_bits=True)
    with pytest.raises(TmpqError, match="latency"):
        make_space((2,), latency_table={"layers": {f: {} for f in ("conv_in", "l0", "l1", "l2", "conv_out")}})
    for bad in ((3,), (4, 2), (2, 2)):
        with pytest.raises(TmpqError, match="supernet.winograd: tile sizes"):
            make_space(bad)
    with pytest.raises(TmpqError, match="no quantized layer is a Winograd-eligible"):
        make_space((2,), wino=False)
    sp, plain = make_space((2,)), make_space(())
    c = sp.uniform_candidate(8, 8)
    for algos in ((2,), (4, 0), (2, 2, 2)):
        with pytest.raises(TmpqError, match="candidate algos"):
            sp.encode(Candidate(c.timesteps, c.bits, algos=algos))
    with pytest.raises(TmpqError, match="no algorithm genes"):
        plain.encode(Candidate(c.timesteps, c.bits, algos=(2, 0)))


def test_from_supernet_reads_wino_and_tiles_from_the_net():
    # a stand-in for QuantSupernet: what from_supernet reads of it (layer table, genes, config, parameter counts)
    infos = list(make_space(()).layers)
    params = SimpleNamespace(numel=lambda: sum(i.params for i in infos) + 7)
    net = SimpleNamespace(infos=infos, num_genes=2, unet=SimpleNamespace(parameters=lambda: [params]),
                          config=SimpleNamespace(w_bits=(8, 6, 4), a_bits=(8, 6), winograd=[2, 4]))
    sp = SearchSpace.from_supernet(net, quadratic_groups(4))
    assert sp == make_space((2, 4))
    net.config = SimpleNamespace(w_bits=(8, 6, 4), a_bits=(8, 6))  # a supernet from before the gene
    assert SearchSpace.from_supernet(net, quadratic_groups(4)).algo_genes == 0
