"""The quantization plan: its file form round-trips, it reads today's export manifests and live quantized models, and
it maps the W8A8 layers to torchao's per-FQN config (the mapping without torchao; the object with it)."""
import json

import pytest
import torch

from tmpq.core.errors import TmpqError
from tmpq.deploy.plan import FP_BITS, LayerOption, QuantPlan, ReusePlan, SamplerPlan, W8A8Operands


def _manifest(**sampler):
    """A manifest as ``tmpq export`` writes it (the fields the plan reads)."""
    return {"sampler": {"timesteps": [800, 400, 0], "eta": 0.0, "guidance_scale": 2.0, "denoiser_calls": 3,
                        "config": {}, **sampler},
            "conditioning": {"kind": "class", "null_label": 10, "classes": list(range(10))},
            "layers": {"conv_in": {"w_bits": 8, "a_bits": 16, "granularity": "channel", "w_symmetric": True,
                                   "a_symmetric": False, "group_size": None, "split": None, "kind": "Conv2d",
                                   "macs": 10},
                       "up.conv": {"w_bits": 4, "a_bits": 8, "granularity": "channel", "w_symmetric": True,
                                   "a_symmetric": False, "group_size": None, "split": 16, "kind": "Conv2d",
                                   "macs": 10},
                       "attn.to_q": {"w_bits": 2, "a_bits": 8, "granularity": "multibasis", "w_symmetric": True,
                                     "a_symmetric": True, "group_size": None, "split": None, "kind": "Linear",
                                     "macs": 10}}}


def test_a_plan_round_trips_through_json_and_reads_todays_manifest():
    plan = QuantPlan.from_export(_manifest(solver="dpm++", order=2, reuse={"branch": 1, "calls": [1, 2]}))
    assert plan.sampler == SamplerPlan(timesteps=(800, 400, 0), solver="dpm++", order=2, eta=0.0, denoiser_calls=3)
    assert plan.reuse == ReusePlan(1, (1, 2)) and plan.guidance_scale == 2.0 and plan.null_label == 10
    assert plan.layers["up.conv"] == LayerOption(4, 8, split=16, kind="Conv2d")
    text = plan.to_json()
    assert QuantPlan.from_json(text) == plan and QuantPlan.from_json(text).to_json() == text
    # an export from before solvers and reuse: DDIM, its order, no reuse
    old = QuantPlan.from_export(_manifest())
    assert (old.sampler.solver, old.sampler.order, old.reuse) == ("ddim", 1, None)
    assert QuantPlan.from_json(old.to_json()) == old
    with pytest.raises(AttributeError):
        plan.guidance_scale = 1.0  # frozen


def test_a_damaged_plan_is_one_line_naming_the_field():
    good = json.loads(QuantPlan.from_export(_manifest()).to_json())
    for bad, match in ((dict(good, format="x"), "not a tmpq quantization plan"),
                       (dict(good, version=9), "plan version 9"),
                       (dict(good, layers={"a": {"w_bits": 8, "a_bits": 8, "colour": 1}}), "layers.a.colour"),
                       (dict(good, sampler=[1]), "sampler: expected an object")):
        with pytest.raises(TmpqError, match=match) as err:
            QuantPlan.from_json(json.dumps(bad), "plan.json")
        assert "\n" not in str(err.value) and str(err.value).startswith("plan.json")
    with pytest.raises(TmpqError, match="not JSON"):
        QuantPlan.from_json("{", "plan.json")


def test_w8a8_reasons_come_from_the_plan():
    plan = QuantPlan.from_export(_manifest())
    assert plan.why_not_w8a8("up.conv") is None
    assert plan.why_not_w8a8("conv_in").startswith("16-bit activations")
    assert "multi-basis" in plan.why_not_w8a8("attn.to_q")
    assert plan.why_not_w8a8("nowhere") == "not in the quantization plan"
    assert LayerOption(8, 8, w_symmetric=False).why_not_w8a8().startswith("asymmetric weights")
    assert LayerOption(8, 8, granularity="group", group_size=4).why_not_w8a8() == "group-wise weight scales"
    assert LayerOption(FP_BITS, 8).why_not_w8a8() == "full-precision weights"
    assert LayerOption(8, 8, a_granularity="channel").why_not_w8a8().startswith("channel-wise activation")


def test_a_live_model_gives_the_plan_of_its_allocation():
    from tests.conftest import tiny_unet
    from tmpq.supernet import QuantSupernet, SupernetConfig

    net = QuantSupernet(tiny_unet(), SupernetConfig(w_bits=(8, 4), a_bits=(8, 6), time_groups=1))
    net.set_uniform(4, 6)
    plan = QuantPlan.from_model(net.unet)
    assert set(plan.layers) == set(net.layers)
    assert plan.layers["conv_in"].a_bits == 16 and plan.layers["conv_out"].w_bits == 16  # the pins
    inner = [o for n, o in plan.layers.items() if n not in ("conv_in", "conv_out")]
    assert {(o.w_bits, o.a_bits) for o in inner} == {(4, 6)}
    assert any(o.split for o in inner) and {o.kind for o in inner} == {"Conv2d", "Linear"}


def test_the_torchao_map_holds_exactly_the_w8a8_matmuls():
    plan = QuantPlan.from_export(_manifest())
    ops = W8A8Operands(torch.ones(2, 4, dtype=torch.int8), torch.ones(2), 0.5, 3)
    entries = plan.torchao_entries({"up.conv": {"a.lin.mm": ops, "b.lin.mm": ops}})
    assert list(entries) == ["up.conv.a.lin.mm", "up.conv.b.lin.mm"] and entries["up.conv.a.lin.mm"] is ops
    with pytest.raises(TmpqError, match="conv_in is not W8A8 in the plan \\(16-bit activations"):
        plan.torchao_entries({"conv_in": {"lin.mm": ops}})
    try:
        import torchao  # noqa: F401
    except ImportError:
        pytest.skip("torchao is not installed: the FqnToConfig object itself is not built")
    cfg = plan.to_torchao({"up.conv": {"lin.mm": ops}})
    assert type(cfg).__name__ == "FqnToConfig" and list(cfg.fqn_to_config) == ["up.conv.lin.mm"]
    assert cfg.fqn_to_config["up.conv.lin.mm"].act_zero_point == 3
