"""A supernet's memory does not grow while a search visits its options: every layer keeps at most one quantized
weight (the active option's), and only the layers the weight budget names; what it keeps never changes a result."""
from __future__ import annotations

import gc
import itertools

import pytest
import torch
import torch.nn as nn

from tests.conftest import calib_batches, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.quant.layers import QuantConv2d
from tmpq.supernet import QuantSupernet, SupernetConfig

W_BITS, A_BITS = (4, 6, 8), (6, 8, 16)


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once): what a cache would hold on to."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
        except (RuntimeError, ReferenceError):  # tensors without storage (meta, sparse)
            continue
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@pytest.fixture(scope="module")
def net():
    net = QuantSupernet(tiny_unet(), SupernetConfig(w_bits=W_BITS, a_bits=A_BITS, pin={}, w_observer="minmax",
                                                    a_observer="minmax"))
    net.calibrate(calib_batches(2), progress=False)
    return net


def _visit(net: QuantSupernet, alloc, x, t) -> torch.Tensor:
    """One allocation at two timesteps (two time groups: the layers' banks switch too)."""
    net.set_bits(alloc)
    with torch.no_grad():
        return torch.cat([net.unet(x, torch.full((len(x),), int(s))).sample for s in t])


def _allocations(net: QuantSupernet, k: int = 3) -> list:
    """Every uniform option, then per-gene mixes that give different layers different options."""
    uniform = [[(w, a)] * net.num_genes for w, a in itertools.product(W_BITS, A_BITS)]
    g = torch.Generator().manual_seed(0)
    mixed = [[(W_BITS[int(i)], A_BITS[int(j)]) for i, j in torch.randint(0, 3, (net.num_genes, 2), generator=g)]
             for _ in range(k)]
    return uniform + mixed


def test_memory_stays_flat_while_a_search_visits_every_option(net):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    weights = sum(layer.module.weight.numel() * 4 for layer in net.layers.values())
    for budget in (0.0, 0.25, 1.0):
        net.keep_weights(budget)
        allocs = _allocations(net)
        _visit(net, allocs[0], x, t)
        first_kept, first_live = net.kept_weight_bytes(), _live_tensor_bytes()
        for alloc in allocs[1:]:
            _visit(net, alloc, x, t)
            assert net.kept_weight_bytes() <= budget * weights  # the budget bounds what is kept, at every step
        # after all 9 uniform options and 3 mixes: nothing more held than after the first (one weight per layer at
        # most; the old cache held one per visited option, 3x the quantized layers' weights here)
        assert net.kept_weight_bytes() == first_kept
        assert _live_tensor_bytes() <= first_live + 4096
    net.keep_weights(1.0)
    _visit(net, _allocations(net)[0], x, t)
    assert net.kept_weight_bytes() == weights  # budget 1: every layer keeps its active weight, and only that one


def test_what_is_kept_never_changes_a_result(net):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    outs = {}
    for budget in (0.0, 0.25, 1.0):
        net.keep_weights(budget)
        outs[budget] = [_visit(net, a, x, t) for a in _allocations(net, 2)]
    for budget in (0.25, 1.0):
        for a, b in zip(outs[0.0], outs[budget]):
            assert torch.equal(a, b)


def test_budget_goes_to_the_layers_that_do_least_work_per_weight(net):
    kept = set(net.keep_weights(0.25))
    assert kept and len(kept) < len(net.layers)
    ratio = {i.fqn: i.macs / i.params for i in net.infos}
    # a layer left out either does more work per weight element than every kept one, or did not fit what was left
    weights = {i.fqn: i.params for i in net.infos}
    room = 0.25 * sum(weights.values()) - sum(weights[n] for n in kept)
    for name in set(net.layers) - kept:
        assert ratio[name] >= min(ratio[k] for k in kept) or weights[name] > room
    with pytest.raises(TmpqError, match="weight budget"):
        net.keep_weights(1.5)


def test_a_layer_keeps_one_weight_and_rebuilds_it_when_the_option_changes():
    torch.manual_seed(0)
    layer = QuantConv2d(nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False), w_bits=W_BITS, a_bits=(8,))
    layer.calibrate_weights()
    expected = {}
    for k in range(3):
        layer.set_bits(k, None)
        expected[k] = layer.quantized_weight().clone()
        assert layer.kept_weight_bytes() == layer.module.weight.numel() * 4
    for k in (2, 0, 1):
        layer.set_bits(k, None)
        assert torch.equal(layer.quantized_weight(), expected[k])
        assert layer.kept_weight_bytes() == layer.module.weight.numel() * 4
    layer.keep_weight = False
    layer.set_bits(0, None)
    assert torch.equal(layer.quantized_weight(), expected[0]) and layer.kept_weight_bytes() == 0
