"""The Winograd algorithm gene for users: ``tmpq calibrate --winograd``, the ``algos`` column of the validated
points, ``tmpq pareto`` and the report's per-point Winograd line on a tiny run with the gene, and the budget repair
that steps algorithm genes by their real cost (a space without them repairs exactly as before)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli
from tests.test_search_service import tiny_cfg
from tmpq.core.cost import LayerCost, winograd_bitops
from tmpq.jobs.runinfo import winograd_summary
from tmpq.search.engines import repair
from tmpq.search.groups import quadratic_groups
from tmpq.search.space import SearchSpace

CALIB = ["--calib-steps", "2", "--calib-per-step", "4", "--sampler-steps", "4", "--time-groups", "1",
         "--w-bits", "8,4", "--a-bits", "8", "--threads", "1"]


def test_calibrate_winograd_flag_reaches_the_supernet_file(tiny_model_dir, tmp_path, capsys):
    from tmpq.cli import build_parser
    from tmpq.commands import supernet_config
    from tmpq.core.model import load_model
    from tmpq.supernet import QuantSupernet, SupernetConfig

    assert supernet_config(build_parser().parse_args(["calibrate"])).winograd == ()
    for argv in (["--winograd", "4", "2"], ["--winograd", "2,4"], ["--winograd", "2", "4", "4"]):
        assert supernet_config(build_parser().parse_args(["calibrate", *argv])) == SupernetConfig(winograd=(2, 4))

    out = tmp_path / "sn.safetensors"
    code, stdout, err = run_cli(["calibrate", "--model", tiny_model_dir, *CALIB, "--winograd", "2", "4",
                                 "--out", out], capsys)
    assert code == 0, err
    net = QuantSupernet.from_file(load_model(str(tiny_model_dir)).unet, out)
    assert net.config.winograd == (2, 4) and net.wino_layers
    assert f"Winograd F(2,3), F(4,3) on {len(net.wino_layers)} eligible convs" in stdout
    assert json.loads((tmp_path / "sn.safetensors.json").read_text())["config"]["winograd"] == [2, 4]


@pytest.mark.parametrize("argv, needle", [
    (["--winograd", "3"], "--winograd: no Winograd F(3, 3); tile sizes are 2, 4, 6"),
    (["--winograd", "2", "x"], "--winograd: expected comma-separated integers"),
    (["--winograd", "2", "--w-bits", "8,1"], "supernet.winograd: 1-bit weight options"),
])
def test_calibrate_winograd_refusals_are_one_line_and_write_nothing(argv, needle, tmp_path, capsys):
    out = tmp_path / "sn.safetensors"
    code, _, err = run_cli(["calibrate", *argv, "--out", out], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_winograd_summary_counts_convs_per_tile_largest_first():
    assert winograd_summary([4, 0, 2, 4, 4, 2]) == "F(4,3) x 3, F(2,3) x 2"
    assert winograd_summary(np.array([0, 6])) == "F(6,3) x 1"
    assert winograd_summary([]) == winograd_summary([0, 0]) == winograd_summary(float("nan")) == "all direct"


@pytest.fixture(scope="module")
def wino_run(tmp_path_factory):
    """A tiny search with the gene and one validated point that runs Winograd layers."""
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.config import config_with
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    root = tmp_path_factory.mktemp("wino-ux")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    cfg = config_with(tiny_cfg(root / "tiny-ddpm"), {"supernet.winograd": [2, 4]})
    run = run_search(cfg, root / "run", progress=False)
    front = pd.read_parquet(run.path / "pareto.parquet")
    key, algos = next((r["key"], [int(m) for m in r["algos"]]) for _, r in front.iterrows() if len(r["algos"]))
    validate_run(run.path, ValidateConfig(keys=(key,), n=4, seeds=(1,), calib_per_step=2, batch_size=4,
                                          fp_reference=False), progress=False)
    return run.path, key, algos


def test_validated_points_and_the_front_carry_the_algorithms(wino_run, capsys):
    from tmpq.jobs.run import load_run

    path, key, algos = wino_run
    run = load_run(path)
    val = run.validated
    assert "algos" in val and [int(m) for m in val.set_index("key").loc[key, "algos"]] == algos
    front = run.pareto()
    assert "algos" in front
    table = run.results()  # the people's table keeps the algorithms beside the schedule, not as an objective
    assert "algos" in table and table.columns.tolist().index("algos") < table.columns.tolist().index("fid_proxy")
    assert table.columns.tolist().count("algos") == 1
    code, out, err = run_cli(["pareto", path], capsys)
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:2] == ["key", "fid_proxy"] and header.index("algos") == header.index("timesteps") - 1
    for _, p in front.iterrows():
        line = next(ln for ln in out.splitlines() if ln.split()[0] == p["key"])
        assert winograd_summary(p["algos"]) in line


def test_report_names_each_points_winograd_convs(wino_run):
    from tmpq.jobs.report import write_report
    from tmpq.jobs.run import load_run

    path, key, algos = wino_run
    run = load_run(path)
    page = write_report(path, baselines=False, grids=False).read_text()
    n = len(run.space.wino_layers)
    assert f"Winograd convs<br><small>of {n} eligible</small>" in page
    for _, p in run.pareto().iterrows():
        row = page[page.index(f"<code>{p['key']}</code>"):]
        row = row[:row.index("</tr>")]
        assert f"<td>{winograd_summary(p['algos'])}</td>" in row
    table = page[page.index("Validated points: convolution algorithms"):]
    assert key in table and winograd_summary(algos) in table and winograd_summary(algos) != "all direct"


# -- repair -------------------------------------------------------------------------------------------------------

def _old_repair(space, genome, rng, tries=200):
    """The repair walk as it was before the algorithm gene: the reference a space without it must match."""
    g = np.array(genome, dtype=np.int64)
    if space.feasible(space.decode(g)):
        return g
    n = space.bits_start
    ub = space.upper_bounds()
    for _ in range(tries):
        held = {i for i, _ in space.fixed}
        raisable = [i for i in range(n, len(g)) if g[i] < ub[i] - 1 and i not in held]
        if not raisable:
            break
        i = int(rng.choice(raisable))
        g[i] += 1
        if space.feasible(space.decode(g)):
            return g
    return space.sample_feasible(rng)


# a conv with many channels (Winograd far cheaper than direct) and one with few (its FP32 transforms cost more than
# the products saved: never cheaper than direct at any bits here)
BIG = LayerCost("big", 16 * 16 * 64 * 64 * 9, 64 * 64 * 9, 0, wino=(64, 64, 16, 16))
SMALL = LayerCost("small", 16 * 16 * 1 * 2 * 9, 2 * 9, 1, wino=(1, 2, 16, 16))
OTHER = LayerCost("lin", 50_000, 1000, 2)


def _space(tiles=(2, 4), budget=None, **kw):
    return SearchSpace(quadratic_groups(3), (BIG, SMALL, OTHER), 3, (8, 6, 4), (8, 6), other_params=7,
                       bitops_budget=budget, wino_tiles=tiles, **kw)


def _top_and_bottom(space):
    """The uniform schedule's genome at the highest bits (every other gene 0) and at the lowest bits."""
    top = np.zeros(space.genome_length, dtype=np.int64)
    top[:space.bits_start] = space.encode(space.uniform_candidate(space.w_bits[0], space.a_bits[0]))[:space.bits_start]
    bottom = top.copy()
    nb = 2 * space.num_genes
    bottom[space.bits_start:space.bits_start + nb] = space.upper_bounds()[space.bits_start:space.bits_start + nb] - 1
    return top, bottom


def test_repair_without_algorithm_genes_walks_exactly_as_before():
    from tmpq.core.candidate import Solver

    for solvers in ((), (Solver("ddim", 1), Solver("dpm++", 2))):
        free = _space(tiles=(), solvers=solvers)
        space = _space(tiles=(), solvers=solvers, budget=1.05 * free.bitops(free.decode(_top_and_bottom(free)[1])))
        assert space.algo_genes == 0
        draw = np.random.default_rng(7)
        walked = 0
        for seed in range(40):
            g = space.sample(draw)
            walked += not space.feasible(space.decode(g))
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            assert np.array_equal(repair(space, g, a), _old_repair(space, g, b))
            assert a.integers(1 << 30) == b.integers(1 << 30)  # the same random draws, too
        assert walked >= 10  # most samples needed the walk


def test_repair_steps_algorithm_genes_by_their_real_cost():
    space = _space()
    # SMALL: never strictly cheaper by Winograd at any bits of the space; BIG: F(4, 3) cheapest at every bits
    for w in space.w_bits:
        for a in space.a_bits:
            assert all(winograd_bitops(SMALL, m, w, a)["total"] >= SMALL.macs * w * a for m in (2, 4))
            assert winograd_bitops(BIG, 4, w, a)["total"] < winograd_bitops(BIG, 2, w, a)["total"] < BIG.macs * w * a
    start, lowest = _top_and_bottom(space)
    budget = space.bitops(space.decode(lowest))  # reachable by bits alone: no fall back to a random sample
    space = _space(budget=budget * 1.02)
    assert not space.feasible(space.decode(start))
    big, small = space.algo_start, space.algo_start + 1
    new, old = [], []
    for seed in range(30):
        g = repair(space, start, np.random.default_rng(seed))
        assert space.feasible(space.decode(g))
        new.append(g)
        old.append(_old_repair(space, start, np.random.default_rng(seed)))
    assert all(g[small] == 0 for g in new)  # the conv with few channels is never made dearer
    assert any(g[big] == 2 for g in new)  # the wide conv moves straight to its cheapest tile, F(4, 3)
    assert all(g[big] in (0, 2) for g in new)
    # the blind walk of before did step the small conv up to Winograd, a dearer algorithm there
    assert any(g[small] != 0 for g in old)
