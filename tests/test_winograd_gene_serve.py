"""Serving the Winograd algorithm gene: a supernet with ``supernet.winograd`` gives every eligible 3x3 conv a
calibrated Winograd F(m, 3) option per tile that serves each of its (w, a) options (``set_algos``); all-direct is the
supernet without the option bit for bit; the file round-trips; a searched point with Winograd layers validates,
exports (``"winograd": m`` per layer, the U grids and V ranges in the quantizer file), and the stock pipeline after
``apply_export`` in a fresh process draws what tmpq samples from the export; refusals are one line."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from tests.conftest import calib_batches, run_stock, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.quant.winograd import WinogradConv2d
from tmpq.supernet import QuantSupernet, SupernetConfig

CFG = dict(w_bits=(8, 4), a_bits=(8, 6), time_groups=2)


def _calibrated(**over) -> QuantSupernet:
    net = QuantSupernet(tiny_unet(), SupernetConfig(**{**CFG, **over}))
    net.calibrate(calib_batches(), progress=False)
    return net


def _call(net, alloc=(8, 6)):
    x, _ = calib_batches(1, seed=5)[0]
    net.set_uniform(*alloc)
    with torch.no_grad():
        return net(x, torch.full((x.shape[0],), 100)).sample


def test_winograd_options_serve_every_bit_option_and_all_direct_is_the_plain_supernet(tmp_path):
    net = _calibrated(winograd=(2, 4))
    plain = _calibrated()
    n = len(net.wino_layers)
    assert n > 0 and plain.wino_layers == [] and not any(".wino." in k for k in plain.quantizer_state())
    eligible = {i.fqn: i.wino for i in net.infos if i.wino is not None}
    assert list(eligible) == net.wino_layers and all(len(w) == 4 for w in eligible.values())
    assert all(not i.pinned for i in net.infos if i.wino)  # conv_in / conv_out are pinned: no gene
    table = net.layer_table()
    assert all(("wino" in row) == (row["fqn"] in eligible) for row in table)
    assert all("wino" not in row for row in plain.layer_table())  # old tables unchanged

    direct = _call(plain)
    net.set_algos(())
    assert torch.equal(_call(net), direct)  # all-direct: the supernet without the option, bit for bit
    net.set_algos([0] * n)
    assert torch.equal(_call(net), direct)
    outs = {}
    for m in (2, 4):
        net.set_algos([m] * n)
        outs[m] = _call(net)
        assert not torch.equal(outs[m], direct) and bool(torch.isfinite(outs[m]).all())
    assert not torch.equal(outs[2], outs[4])
    net.set_fp()  # FP ignores algos: the direct FP model
    plain.set_fp()
    with torch.no_grad():
        x, _ = calib_batches(1, seed=5)[0]
        t = torch.full((x.shape[0],), 100)
        assert torch.equal(net(x, t).sample, plain(x, t).sample)

    # one layer's option equals a standalone WinogradConv2d (its own U grid) at the V ranges calibrated here
    name = net.wino_layers[2]
    layer = net.layers[name]
    seen = {}
    h = layer.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0].detach().clone()))
    net.set_algos([4 if f == name else 0 for f in net.wino_layers])
    for w, a in ((8, 8), (4, 6)):
        seen.clear()
        _call(net, (w, a))
        ai = net.config.a_bits.index(a)
        tile = layer.wino[layer.wino_tiles.index(4)]
        ref = WinogradConv2d(layer.module, 4, w, a, "group", w_observer=net.config.w_observer,
                             a_symmetric=net.config.a_symmetric)
        ref.v_lo.copy_(tile.v_lo[ai])
        ref.v_hi.copy_(tile.v_hi[ai])
        ref.observed.fill_(True)
        ref.freeze()
        with torch.no_grad():
            assert torch.equal(layer(seen["x"]), ref(seen["x"]))
            assert torch.equal(layer.winograd_module()(seen["x"]), ref(seen["x"]))
    h.remove()

    # the file round-trips with the Winograd state; a file without the key stays as it was
    net.save(tmp_path / "w.safetensors")
    back = QuantSupernet.from_file(tiny_unet(), tmp_path / "w.safetensors")
    assert back.config.winograd == (2, 4) and back.wino_layers == net.wino_layers
    for m in (2, 4):
        net.set_algos([m] * n)
        back.set_algos([m] * n)
        assert torch.equal(_call(back), _call(net))
    plain.save(tmp_path / "p.safetensors")
    assert "winograd" not in json.loads(plain.config.to_json())
    assert set(QuantSupernet.from_file(tiny_unet(), tmp_path / "p.safetensors").quantizer_state()) == \
        set(plain.quantizer_state())

    # a pinned Winograd layer: what validation and an export build
    pinned = QuantSupernet(tiny_unet(), net.pinned_config([(8, 6)] * net.num_genes, [4] + [0] * (n - 1)))
    assert pinned.wino_layers == [] and pinned.layer_algos() == {net.wino_layers[0]: 4}
    assert pinned.config.pin[net.wino_layers[0]] == [8, 6, 4]

    with pytest.raises(TmpqError, match=r"^algos: expected \d+ entries") as e:
        net.set_algos([3] * n)
    assert "\n" not in str(e.value)
    with pytest.raises(TmpqError, match=r"^algos: expected"):
        net.set_algos([2])


@pytest.mark.parametrize("over, msg", [
    ({"winograd": (3,)}, r"^supernet\.winograd: tile sizes must be distinct, ascending"),
    ({"winograd": (4, 2)}, r"^supernet\.winograd: tile sizes must be distinct, ascending"),
    ({"winograd": (2, 2)}, r"^supernet\.winograd: tile sizes must be distinct, ascending"),
    ({"winograd": (2,), "w_bits": (8, 1)}, r"^supernet\.winograd: 1-bit weight options"),
    ({"pin": {"conv_in": [8, 8, 4]}, "winograd": (2,)}, r"^supernet\.pin\.conv_in: the Winograd tile 4 must be one"),
])
def test_winograd_config_refusals_are_one_line(over, msg):
    with pytest.raises(TmpqError, match=msg) as e:
        SupernetConfig(**{**CFG, **over})
    assert "\n" not in str(e.value)


def test_a_pin_on_an_ineligible_layer_and_latency_cost_are_refused_in_one_line(tiny_model_dir):
    from tmpq.jobs.config import config_from_dict

    cfg = SupernetConfig(**CFG, winograd=(2,), pin={"down_blocks.0.downsamplers.0.conv": [8, 8, 2]})
    with pytest.raises(TmpqError, match=r"^supernet\.pin\.down_blocks\.0\.downsamplers\.0\.conv: layer .* cannot run "
                                        r"Winograd F\(2, 3\) \(only 3x3, stride-1.*stride \(2, 2\)\)$"):
        QuantSupernet(tiny_unet(), cfg)
    base = {"model": {"path": str(tiny_model_dir)}, "supernet": {"winograd": [2]}}
    with pytest.raises(TmpqError, match=r'^search\.cost: "latency" does not combine with supernet\.winograd'):
        config_from_dict({**base, "search": {"cost": "latency"}})
    with pytest.raises(TmpqError, match=r"^search\.per_group_bits: bits per time group do not combine"):
        config_from_dict({**base, "search": {"per_group_bits": True}})


STOCK = """
import json, sys, torch, tmpq
from diffusers import DDPMPipeline
from tmpq.core.sampler import noise_generators
from tmpq.quant.winograd import WinogradConv2d
args = json.loads(sys.argv[1])
pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(args["exp"]), args["exp"])
pipe.set_progress_bar_config(disable=True)
wino = sorted(n for n, m in pipe.unet.named_modules() if isinstance(m, WinogradConv2d))
img = pipe(batch_size=2, generator=noise_generators(2, 0), output_type="np").images
torch.save({"img": torch.from_numpy(img), "wino": torch.tensor([len(wino)]),
            "m": torch.tensor([pipe.unet.get_submodule(n).m for n in wino])}, args["out"])
"""


def test_a_searched_winograd_point_validates_exports_and_the_stock_pipeline_reproduces_it(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    import tmpq.jobs.validate as fin
    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export
    from tmpq.deploy.plan import QuantPlan
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.search import run_search

    cfg = config_from_dict({
        "model": {"path": str(tiny_model_dir)},
        "supernet": {"w_bits": [8, 4], "a_bits": [8, 6], "winograd": [2, 4]},
        "calibration": {"steps": 2, "per_step": 4, "sampler_steps": 4, "batch_size": 8},
        "search": {"engine": "pymoo", "steps": 3, "population": 6, "generations": 2, "seed": 1,
                   "bitops_budget": "none"},
        "proxy": {"n_images": 4, "teacher_steps": 6},
    })
    run = run_search(cfg, tmp_path / "run", progress=False)
    ev = pd.read_parquet(run.path / "evaluations.parquet")
    assert set(ev["status"]) == {"ok"} and "algos" in ev
    front = pd.read_parquet(run.path / "pareto.parquet")
    with_algos = [r for _, r in front.iterrows() if len(r["algos"])]
    assert with_algos, "no front point runs a Winograd layer"
    point = with_algos[0]
    key, algos = point["key"], [int(m) for m in point["algos"]]
    assert any(algos)

    # validation re-calibrates it with its Winograd layers pinned; the export reads that state
    final = fin.validate_run(run.path, fin.ValidateConfig(keys=(key,), n=4, seeds=(1,), calib_per_step=2,
                                                           batch_size=4), progress=False)
    assert [list(a) for a in final["algos"]] == [algos]
    man = export_candidate(run.path, key, tmp_path / "exp")
    assert man["provenance"]["quantizers"].startswith("validated")
    wino = {f: v["winograd"] for f, v in man["layers"].items() if "winograd" in v}
    space = json.loads((run.path / "search_space.json").read_text())
    eligible = [la["fqn"] for la in space["layers"] if la.get("wino")]
    assert wino == {f: m for f, m in zip(eligible, algos) if m}
    plan = QuantPlan.from_export(man)
    assert {f: o.winograd for f, o in plan.layers.items() if o.winograd} == wino
    assert QuantPlan.from_json(plan.to_json()) == plan
    with safe_open(str(tmp_path / "exp" / "quantizers.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".wino.")[0] for k in keys if ".wino." in k} == set(wino)

    # tmpq's sample of the export vs the stock pipeline + apply_export in a fresh process
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    assert sum(isinstance(m, WinogradConv2d) for m in unet.modules()) == len(wino)
    ref = sample_images(unet, sched, ts, 2, seed=0, progress=False)
    stock = run_stock(STOCK, {"exp": str(tmp_path / "exp"), "out": str(tmp_path / "stock.pt")})
    assert int(stock["wino"]) == len(wino) and sorted(stock["m"].tolist()) == sorted(wino.values())
    out = stock["img"].permute(0, 3, 1, 2) * 2 - 1
    assert float((out - ref).abs().max()) < 1e-5

    # int8: the Winograd layers convert through tmpq.deploy.winograd_int8 (checked) or fall back, named
    unet8, _, _, _ = load_export(tmp_path / "exp", kernels="int8")
    rows = {r["fqn"]: r for r in unet8.tmpq_int8["layers"] if r["kind"] == "WinogradConv2d"}
    assert set(rows) == set(wino)
    assert all(r["int8"] or r["why"] for r in rows.values())
