"""The layer cost model that the supernet and the search space share: BitOPs (MACs x weight bits x activation bits
per denoiser call and sample), weight storage (parameters x weight bits) and, from a measured table, latency (seconds
per denoiser call and sample, :mod:`tmpq.deploy.latency`). Pure Python."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """What the cost model needs of one quantized layer (``supernet.LayerInfo`` carries the same fields and more)."""

    fqn: str
    macs: int
    params: int
    gene: int | None
    pinned: tuple[int, int] | None = None


def output_macs(out, weight) -> int:
    """MACs per sample of one Conv2d / Linear call from its output and weight: each output element costs
    (in / groups) * kh * kw (conv) or in_features (linear) MACs, one weight row."""
    return int(out.numel() // out.shape[0]) * weight[0].numel()


def layer_bits(layer, allocation: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(w, a) bits of ``layer`` under a per-gene ``allocation`` (a pinned layer keeps its own)."""
    w, a = layer.pinned if layer.pinned else allocation[layer.gene]
    return int(w), int(a)


def call_bitops(layers: Iterable, allocation: Sequence[tuple[int, int]], skip: frozenset | set = frozenset()) -> int:
    """BitOPs of one denoiser call for one sample: sum over layers of MACs x b_w x b_a; the layers named in ``skip``
    (the deep part on a step that reuses deep features, :mod:`tmpq.core.reuse`) do not run and cost nothing."""
    total = 0
    for lay in layers:
        if lay.fqn in skip:
            continue
        w, a = layer_bits(lay, allocation)
        total += lay.macs * w * a
    return total


# where a run keeps its measured latency table (tmpq.deploy.latency), beside search_space.json
LATENCY_FILE = "latency.json"


def latency_entries(table: dict) -> dict:
    """What the search space needs of a measured latency table: per-layer entries, the remainders, the int8 options
    (the table's fingerprint and diagnostics stay in its file)."""
    return {k: table[k] for k in ("layers", "remainder", "remainder_reuse", "int8_options") if k in table}


def call_latency(layers: Iterable, allocation: Sequence[tuple[int, int]], table: dict, int8: frozenset | set,
                 skip: frozenset | set = frozenset(), reuse: bool = False) -> float:
    """Seconds of one denoiser call for one sample from a measured latency ``table`` (``layers``: fqn -> {"int8",
    "fp"}; ``remainder`` / ``remainder_reuse``: the rest of a full / reuse call): each layer costs its ``int8`` entry
    when its (w, a) is one of the ``int8`` options (the deployment's int8 kernel, the same whatever the width), else
    its ``fp`` entry; the layers in ``skip`` do not run (a reuse call's deep part), and a reuse call's remainder is
    the reuse one."""
    total = float(table["remainder_reuse" if reuse else "remainder"])
    entries = table["layers"]
    for lay in layers:
        if lay.fqn in skip:
            continue
        total += entries[lay.fqn]["int8" if layer_bits(lay, allocation) in int8 else "fp"]
    return total


def weight_bits(layers: Iterable, allocations: Sequence[Sequence[tuple[int, int]]]) -> int:
    """Bits of the quantized weights: each layer stores every distinct weight precision the ``allocations`` (one per
    time group, or just one) give it."""
    return sum(lay.params * sum({layer_bits(lay, alloc)[0] for alloc in allocations}) for lay in layers)
