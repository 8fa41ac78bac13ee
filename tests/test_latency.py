"""``search.cost = "latency"``: the measured per-layer table (tmpq.deploy.latency) has every quantized layer, the
space sums it over a candidate's calls (a reuse call runs the shallow part only, a W16 layer costs its FP time), the
config refuses an unknown cost in one line, a latency search logs the column end to end, and a resume reads the
stored table back (refusing one of another machine or setting). Real measurements on the tiny UNet, batch 8."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from conftest import tiny_unet
from tests.test_search_service import tiny_cfg
from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
from tmpq.jobs.config import config_from_dict
from tmpq.jobs.run import load_run
from tmpq.jobs.runinfo import run_status
from tmpq.jobs.search import prepare_run, run_search
from tmpq.search.rundir import run_objectives
from tmpq.search.space import SearchSpace


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """One tiny latency search (W16 / W8 / W4 weights, reuse genes, batch 8), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("latency")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), tmp / "tiny-ddpm")
    cfg = tiny_cfg(tmp / "tiny-ddpm", cost="latency", reuse_branch=1, generations=1, population=4).with_(
        **{"proxy.batch_size": 8, "supernet.w_bits": [16, 8, 4]})
    return cfg, run_search(cfg, tmp / "run", progress=False).path


def test_the_table_covers_every_layer_and_the_space_sums_it_over_calls(latency_run):
    cfg, path = latency_run
    stored = (path / "latency.json").read_bytes()
    run, space, _sn = prepare_run(cfg, path, resume=True, progress=False)  # the stored table, read back
    run.lock.release()
    assert (path / "latency.json").read_bytes() == stored
    table = json.loads(stored)
    assert space.latency_table == {k: table[k] for k in ("layers", "remainder", "remainder_reuse", "int8_options")}
    assert table["format"] == "tmpq.latency-table"
    assert set(table["layers"]) == {lay.fqn for lay in space.layers}  # every quantized layer, pinned ones too
    assert all(e["int8"] > 0 and e["fp"] > 0 for e in table["layers"].values())
    fp = table["fingerprint"]
    assert fp["batch"] == 8 and fp["backend"] == "cpu-onednn-int8" and fp["threads"] >= 1 and fp["cpu"]
    opts = {tuple(o) for o in table["int8_options"]}
    assert (8, 8) in opts and (4, 6) in opts and not any(w == 16 for w, _a in opts)
    assert table["measured"]["int8_layers"] > 0

    # the prediction is the sum over calls: remainder + each layer's int8 entry (W8A8) or fp entry (W16, pins)
    def call(bits, reuse=False):
        t = table["remainder_reuse" if reuse else "remainder"]
        for lay in space.layers:
            if reuse and lay.fqn in space.deep_layers:
                continue
            w, a = lay.pinned or bits
            t += table["layers"][lay.fqn]["int8" if (w, a) in opts else "fp"]
        return t

    w8 = space.uniform_candidate(8, 8)
    w16 = space.uniform_candidate(16, 8)
    assert space.latency(w8) == pytest.approx(3 * call((8, 8)))
    assert space.latency(w16) == pytest.approx(3 * call((16, 8)))
    # a W16 layer costs its FP time, a W8 one its int8 time
    layer = next(lay for lay in space.layers if not lay.pinned)
    one16 = tuple((16, 8) if i == layer.gene else (8, 8) for i in range(space.num_genes))
    e = table["layers"][layer.fqn]
    assert space.latency(Candidate(w8.timesteps, one16)) - space.latency(w8) == pytest.approx(
        3 * (e["fp"] - e["int8"]) * sum(lay.gene == layer.gene for lay in space.layers))
    # a reuse call runs the shallow layers only, on the reuse remainder: cheaper than a full call
    reused = Candidate(w8.timesteps, w8.bits, reuse=(1,))
    assert space.latency(reused) == pytest.approx(2 * call((8, 8)) + call((8, 8), reuse=True))
    assert len(space.deep_layers) > 0 and space.latency(reused) < space.latency(w8)
    # the space's JSON does not carry the table (the run keeps it in latency.json); without it there is no latency
    assert "latency_table" not in json.loads((path / "search_space.json").read_text())
    with pytest.raises(TmpqError, match="no latency table"):
        SearchSpace.from_dict(space.to_dict()).latency(w8)
    assert run_objectives({"search": {}}) == ("fid_proxy", "bitops")  # a run without the key: as before


@pytest.mark.parametrize("bad", ["latncy", "", 3])
def test_the_config_refuses_an_unknown_cost_in_one_line(tiny_model_dir, bad):
    with pytest.raises(TmpqError, match=r"^search\.cost: must be ") as e:
        config_from_dict({"model": {"path": str(tiny_model_dir)}, "search": {"cost": bad}})
    assert "\n" not in str(e.value)


def test_a_latency_search_logs_the_column_and_resumes_on_its_stored_table(latency_run, tmp_path):
    cfg, path = latency_run
    ev = pd.read_parquet(path / "evaluations.parquet")
    ok = ev[ev["status"] == "ok"]
    assert len(ok) >= 4 and (ok["latency_s"] > 0).all() and "bitops" in ok  # bitops still logged beside it
    assert run_objectives(json.loads((path / "config.resolved.json").read_text())) == ("fid_proxy", "latency_s")
    run = load_run(path)
    for _, row in ok.iterrows():  # each row's latency is the space's prediction of its candidate
        assert row["latency_s"] == pytest.approx(run.space.latency(Candidate.from_dict(row)))
    front = run.pareto()
    assert "latency_s" in front and len(front) >= 1
    status = run_status(path)
    assert status["best"] and "latency_s" in status["best"][0]

    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    stored = (copy / "latency.json").read_bytes()
    again = run_search(cfg, copy, resume=True, progress=False)  # served from the log and the stored table
    assert (again.path / "latency.json").read_bytes() == stored
    assert pd.read_parquet(again.path / "evaluations.parquet")["latency_s"].tolist() == ev["latency_s"].tolist()

    # a table measured elsewhere (here: another thread count) is refused in one line, changing nothing
    table = json.loads(stored)
    table["fingerprint"]["threads"] += 7
    (copy / "latency.json").write_text(json.dumps(table))
    log = (copy / "evaluations.jsonl").read_bytes()
    with pytest.raises(TmpqError, match=r"^refusing to resume with .*latency\.json: .*threads") as e:
        run_search(cfg, copy, resume=True, progress=False)
    assert "\n" not in str(e.value) and (copy / "evaluations.jsonl").read_bytes() == log
