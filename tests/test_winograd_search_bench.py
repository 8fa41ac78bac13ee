"""The Winograd-gene search benchmark (benchmarks/winograd_search.py): the arms differ only by the gene, the
reference point and hypervolumes, the front's Winograd conv counts by bits and tile on hand-made fronts, the verdict
rule, the README section kept apart from the rest of the file, and the row of a real tiny search."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.winograd_search import (
    REF_PROXY,
    SECTION,
    SECTION_END,
    arm_config,
    front_points,
    hv_above,
    hypervolumes,
    reference_point,
    search_row,
    verdict,
    wino_counts,
    write_section,
)
from tests.test_search_service import tiny_cfg
from tmpq.core.candidate import Candidate
from tmpq.core.cost import LayerCost
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.search import run_search
from tmpq.search.groups import quadratic_groups
from tmpq.search.space import SearchSpace


def _space():
    """conv_in (pinned), l0 (gene 0, eligible), l1 (gene 1, not eligible), l2 (gene 1, eligible), l3 (gene 0,
    eligible), conv_out (pinned)."""
    w = (8, 8, 16, 16)
    layers = (LayerCost("conv_in", 100, 10, None, (8, 8)), LayerCost("l0", 147456, 576, 0, wino=w),
              LayerCost("l1", 2000, 100, 1), LayerCost("l2", 147456, 576, 1, wino=w),
              LayerCost("l3", 147456, 576, 0, wino=w), LayerCost("conv_out", 100, 10, None, (8, 8)))
    return SearchSpace(quadratic_groups(4), layers, 2, (8, 6, 4), (8, 6), other_params=7, wino_tiles=(2, 4))


def _row(space, c: Candidate, proxy: float) -> dict:
    return {**c.to_dict(), "key": c.key, "fid_proxy": proxy, "bitops": space.bitops(c)}


def test_arms_differ_only_by_the_gene():
    d = config_from_dict(arm_config("direct", 2, "sn.safetensors")).to_dict()
    g = config_from_dict(arm_config("gene", 2, "sn.safetensors")).to_dict()
    assert g["supernet"].pop("winograd") == [2, 4] and d["supernet"].pop("winograd", []) == []
    assert d == g
    assert d["search"]["seed"] == 2 and d["search"]["step_choices"] == [] and d["executor"]["threads_per_worker"] == 1
    assert d["calibration"]["supernet_file"] == "sn.safetensors" and d["search"]["bitops_budget"] == "w6a6"


def test_counts_reference_point_and_hypervolume_on_a_hand_made_front():
    sp = _space()
    base = sp.uniform_candidate(6, 8)
    ts = base.timesteps
    direct = Candidate(ts, ((8, 8), (6, 6)))
    mixed = Candidate(ts, ((8, 8), (4, 6)), algos=(4, 2, 0))  # l0 W8A8 F4, l2 W4A6 F2, l3 direct
    allw = Candidate(ts, ((8, 6), (8, 6)), algos=(4, 4, 4))
    assert wino_counts(sp, direct) == {}
    assert wino_counts(sp, mixed) == {"W4A6 F2": 1, "W8A8 F4": 1}
    assert wino_counts(sp, allw) == {"W8A6 F4": 3}
    front = pd.DataFrame([_row(sp, c, p) for c, p in ((direct, 3.0), (mixed, 3.5), (allw, 4.0))])
    pts = front_points(sp, front, {direct.key: 0, mixed.key: 2})
    assert [p["key"] for p in pts] == front.sort_values("bitops")["key"].tolist()
    by = {p["key"]: p for p in pts}
    assert by[mixed.key]["n_wino"] == 2 and by[mixed.key]["seed_distance"] == 2
    assert by[allw.key]["seed_distance"] is None and by[direct.key]["wino"] == {}
    assert by[direct.key]["bits"] == ["W6A6", "W8A8"]

    ref = reference_point(sp)
    assert ref[0] == REF_PROXY and ref[1] == pytest.approx(sp.bitops(sp.uniform_candidate(8, 8)) / 1e9)
    # against (4, 10), (5, 1) lies beyond the proxy bound; (1, 5) and (2, 3): 3 x 5 + (4 - 2) x (5 - 3) = 19
    hv = hypervolumes(np.array([[1.0, 5.0], [2.0, 3.0], [5.0, 1.0]]), np.array([4.0, 10.0]))
    assert hv["hv"] == pytest.approx(19.0)
    assert hv["hv_log10"] == pytest.approx(5 * np.log10(4) + 2 * (np.log10(4) - np.log10(2)))
    assert hypervolumes(np.zeros((0, 2)), np.array([4.0, 10.0])) == {"hv": 0.0, "hv_log10": 0.0}
    # above a BitOPs floor of 4: (2, 3) counts as (2, 4): 3 x 5 + (4 - 2) x (5 - 4) = 17
    assert hv_above(np.array([[1.0, 5.0], [2.0, 3.0]]), np.array([4.0, 10.0]), 4.0) == pytest.approx(17.0)


def test_verdict_needs_every_seed():
    rows = [{"kind": "search", "arm": a, "seed": s, "hv": h} for s, a, h in
            ((1, "direct", 1.0), (1, "gene", 2.0), (2, "direct", 1.0), (2, "gene", 1.5))]
    v = verdict(rows)
    assert v == {"seeds": [1, 2], "wins": 2, "complete": False, "helps": False}
    three = rows + [{"kind": "search", "arm": "direct", "seed": 3, "hv": 1.0},
                    {"kind": "search", "arm": "gene", "seed": 3, "hv": 1.1}]
    assert verdict(three)["helps"] is True
    three[-1]["hv"] = 1.0  # a tie is not higher
    assert verdict(three) == {"seeds": [1, 2, 3], "wins": 2, "complete": True, "helps": False}


def test_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\ntext\n")
    write_section(readme, [SECTION, "", "first", "", SECTION_END, ""])
    readme.write_text(readme.read_text() + "\n## Another helper's section\n\nkept\n")
    write_section(readme, [SECTION, "", "second", "", SECTION_END, ""])
    text = readme.read_text()
    assert text.startswith("# Title\n\ntext\n\n" + SECTION) and "first" not in text and text.count(SECTION) == 1
    assert text.index("second") < text.index("## Another helper's section") and text.endswith("kept\n")


@pytest.mark.slow
def test_row_of_a_real_tiny_gene_search(tiny_model_dir, tmp_path):
    base = tiny_cfg(tiny_model_dir).to_dict()
    base["supernet"].update(w_observer="minmax", time_groups=1)  # calibration in milliseconds, not MSE grid searches
    cfg = arm_config("gene", 1, None, proxy_n=2, population=3, generations=1, base=base)
    cfg["search"].update(steps=2, bitops_budget="none")
    run = run_search(config_from_dict(cfg), tmp_path / "run", progress=False)
    row = search_row(run.path, "gene", 1, 1.0)
    assert {"kind", "name", "arm", "seed", "tiles", "evaluations", "ok", "wall_s", "eval_s_mean", "ref", "hv",
            "hv_log10", "eligible_convs", "front"} <= set(row)
    assert row["name"] == "gene-s1" and row["tiles"] == [2, 4] and row["ok"] == row["evaluations"] >= 3
    assert row["eligible_convs"] > 0 and row["ref"][0] == REF_PROXY and row["hv"] >= 0
    assert row["front"] and all(p["n_wino"] == sum(p["wino"].values()) <= row["eligible_convs"] for p in row["front"])
    assert all(isinstance(p["seed_distance"], int) for p in row["front"])
    assert [p["gbitops"] for p in row["front"]] == sorted(p["gbitops"] for p in row["front"])
