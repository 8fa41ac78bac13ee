"""The run reader's frames for people: readable results (one column per objective, units in the names, no repeats),
per-layer bits keyed by module name (checked against the supernet's own layer map), the validated points, the
exports, and ``Run.export`` writing where ``tmpq status`` and the report find it. Reading changes no file."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError


def _digests(path):
    """Every run file's hash (but the writer lock file, which jobs that write create)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".tmpq.lock"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("frames")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    return run_search(tiny_cfg(root / "tiny-ddpm", generations=1), root / "run", progress=False).path


def test_results_name_every_objective_with_its_unit_and_drop_the_repeats(tiny):
    from tmpq.jobs.run import load_run

    before = _digests(tiny)
    run = load_run(tiny)
    ev, res = run.evaluations, run.results()
    assert {"proxy", "fid_small", "bits", "bitops"} <= set(ev.columns)  # the log frame keeps every field
    assert not {"proxy", "fid_small", "bits", "bitops", "eval_s", "proxy_version"} & set(res.columns)
    assert list(res.columns[:6]) == ["key", "status", "generation", "origin", "steps", "timesteps"]
    assert res.attrs["proxy"] == "fid" and res.attrs["objectives"] == ["fid_proxy", "gbitops"]
    assert res["key"].tolist() == ev["key"].tolist()
    np.testing.assert_allclose(res["gbitops"], ev["bitops"] / 1e9)
    assert res["fid_proxy"].tolist() == ev["fid_proxy"].tolist() and "kid_proxy" in res and "size_mb" in res
    assert res["fid_final"].isna().all() and (res["export"] == "").all()  # nothing validated or exported yet
    front = run.results(front=True)
    assert front["key"].tolist() == run.pareto()["key"].tolist()
    assert _digests(tiny) == before


def test_bits_table_names_each_layer_as_the_supernet_does(tiny):
    from tests.conftest import tiny_unet
    from tmpq.jobs.run import load_run
    from tmpq.supernet import QuantSupernet

    run = load_run(tiny)
    keys = run.pareto()["key"].tolist()
    table = run.bits_table(keys)
    layers = [lay["fqn"] for lay in json.loads((tiny / "search_space.json").read_text())["layers"]]
    assert list(table.columns) == ["key", "layer", "w_bits", "a_bits", "pinned"]
    assert len(table) == len(keys) * len(layers) and table["key"].unique().tolist() == keys
    net = QuantSupernet.from_file(tiny_unet(), tiny / "supernet.safetensors")
    ev = run.evaluations.drop_duplicates("key").set_index("key")
    for k in keys:
        want = net.layer_bits([tuple(p) for p in ev.loc[k, "bits"]])  # fqn -> (w, a), pins included
        got = {r.layer: (r.w_bits, r.a_bits) for r in table[table["key"] == k].itertuples()}
        assert got == want
    pinned = set(table.loc[table["pinned"], "layer"])
    assert pinned and pinned == {i.fqn for i in net.infos if i.pinned}
    wide = table.pivot(index="layer", columns="key", values="w_bits")  # named columns, one per point
    assert wide.shape == (len(layers), len(keys))
    assert len(run.bits_table()) == ev.shape[0] * len(layers)  # default: every key of the log
    with pytest.raises(TmpqError, match="no evaluation with key nope"):
        run.bits_table(["nope"])


@pytest.mark.slow
def test_validated_and_exports_frames_and_export_writes_where_status_finds_it(tiny):
    import tmpq.jobs.validate as fin
    from tmpq.jobs.run import load_run
    from tmpq.jobs.runinfo import EXPORT_MANIFEST, run_status
    from tmpq.deploy.bundle import EXPORT_JSON

    assert EXPORT_MANIFEST == EXPORT_JSON
    run = load_run(tiny)
    assert run.validated.empty and list(run.validated.columns)[:3] == ["key", "fid_mean", "fid_std"]
    assert run.exports.empty
    key = run.pareto().sort_values("fid_proxy")["key"].iloc[0]
    fin.validate_run(tiny, fin.ValidateConfig(keys=(key,), n=2, seeds=(1,), calib_per_step=1, batch_size=2),
                     progress=False)
    val = run.validated
    assert val["key"].tolist() == [key] and val["n"].tolist() == [2] and np.isfinite(val["fid_mean"]).all()
    assert "bitops" not in val and val["gbitops"].iloc[0] == pytest.approx(run.pareto().set_index("key")
                                                                          .loc[key, "bitops"] / 1e9)
    st = run_status(tiny)
    assert st["validation"]["points"] == 1 and st["validation"]["best"]["key"] == key and not st["exports"]

    before = _digests(tiny)
    out = run.export(key)
    assert out == tiny / "exports" / key[:8] and (out / EXPORT_MANIFEST).is_file()
    assert json.loads((out / EXPORT_MANIFEST).read_text())["provenance"]["candidate"] == key
    assert {k: v for k, v in _digests(tiny).items() if not k.startswith("exports/")} == before
    assert run.exports[["key", "path"]].values.tolist() == [[key, str(out)]]
    assert run.exports["quantizers"].iloc[0].startswith("validated")  # the re-calibrated point's quantizers
    res = run.results()
    assert set(res.loc[res["export"] != "", "key"]) == {key}
    assert res.loc[res["key"] == key, "fid_final"].iloc[0] == pytest.approx(val["fid_mean"].iloc[0])
    assert run_status(tiny)["exports"] == [{"key": key, "path": str(out), "quantizers": run.exports["quantizers"][0]}]
    with pytest.raises(TmpqError, match="exists and is not empty"):
        run.export(key)  # never over an existing export


def test_a_logged_candidate_comes_back_whole_and_scores_as_logged(tiny):
    """``Run.candidate(key)``: the row's candidate as one value (its key is the row's), which the search's own
    evaluator scores to the logged proxy; the face names the same classes."""
    import tmpq
    from tmpq.core.candidate import Candidate, Solver
    from tmpq.core.errors import TmpqError
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import WorkerSpec

    before = _digests(tiny)
    run = load_run(tiny)
    row = run.pareto().iloc[0]
    cand = run.candidate(row["key"])
    assert isinstance(cand, Candidate) and cand.key == row["key"] and cand.solver == Solver("ddim", 1)
    assert cand.to_dict() == {**Candidate.from_dict(row).fields(), "key": row["key"]}
    cfg = run.config
    spec = WorkerSpec(cfg["model"], str(tiny / "supernet.safetensors"), cfg["proxy"],
                      cfg["executor"]["threads_per_worker"], companions=False)
    prev = spec.torch_threads()
    try:
        assert spec().evaluate(cand)["fid_proxy"] == pytest.approx(float(row["fid_proxy"]), rel=1e-6)
    finally:
        spec.torch_threads(prev)  # the rest of this process keeps its thread count
    with pytest.raises(TmpqError, match="no evaluation with key 'nope'"):
        run.candidate("nope")
    assert tmpq.Candidate is Candidate and tmpq.Solver is Solver
    assert _digests(tiny) == before  # reading a run never modifies it
