"""The layer cost model that the supernet and the search space share: BitOPs (MACs x weight bits x activation bits
per denoiser call and sample; a 3x3 conv run by Winograd F(m, 3): its Winograd-domain multiplications at those bits
plus its transforms' FP32 operations), weight storage (parameters x weight bits) and, from a measured table, latency
(seconds per denoiser call and sample, :mod:`tmpq.deploy.latency`). Pure Python."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from tmpq.core.errors import TmpqError


@dataclass(frozen=True)
class LayerCost:
    """What the cost model needs of one quantized layer (``supernet.LayerInfo`` carries the same fields and more)."""

    fqn: str
    macs: int
    params: int
    gene: int | None
    pinned: tuple[int, int] | None = None
    # (in_channels, out_channels, out_h, out_w) per sample of a Winograd-eligible 3x3 conv; None: not eligible
    wino: tuple[int, int, int, int] | None = None


def output_macs(out, weight) -> int:
    """MACs per sample of one Conv2d / Linear call from its output and weight: each output element costs
    (in / groups) * kh * kw (conv) or in_features (linear) MACs, one weight row."""
    return int(out.numel() // out.shape[0]) * weight[0].numel()


def layer_bits(layer, allocation: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(w, a) bits of ``layer`` under a per-gene ``allocation`` (a pinned layer keeps its own)."""
    w, a = layer.pinned if layer.pinned else allocation[layer.gene]
    return int(w), int(a)


def call_bitops(layers: Iterable, allocation: Sequence[tuple[int, int]], skip: frozenset | set = frozenset(),
                algos: Mapping[str, int] | None = None) -> int:
    """BitOPs of one denoiser call for one sample: sum over layers of MACs x b_w x b_a; the layers named in ``skip``
    (the deep part on a step that reuses deep features, :mod:`tmpq.core.reuse`) do not run and cost nothing. A layer
    that ``algos`` (fqn -> tile m, 0 = direct) runs by Winograd F(m, 3) costs :func:`winograd_bitops` instead."""
    total = 0
    for lay in layers:
        if lay.fqn in skip:
            continue
        w, a = layer_bits(lay, allocation)
        total += layer_bitops(lay, w, a, algos.get(lay.fqn, 0) if algos else 0)
    return total


def layer_bitops(lay, w: int, a: int, m: int = 0) -> int:
    """BitOPs of one call of layer ``lay`` for one sample at (w, a) bits: MACs x w x a directly (``m`` = 0), else
    :func:`winograd_bitops` of Winograd F(m, 3)."""
    return winograd_bitops(lay, m, w, a)["total"] if m else lay.macs * w * a


# an FP32 addition or multiplication of the Winograd transforms, in bit-operations
TRANSFORM_OP_BITS = 32
# interpolation points of F(m, 3) (plus infinity): the same as tmpq.quant.winograd.POINTS, which a test checks
_POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}
WINOGRAD_TILES = tuple(_POINTS)


def winograd_transforms(m: int) -> tuple[list[list[Fraction]], list[list[Fraction]]]:
    """Exact ``(A^T, B^T)`` of ``F(m, 3)`` by the Cook-Toom construction of :mod:`tmpq.quant.winograd` (``A^T[i, j] =
    a_j^i``, infinity column ``e_{m-1}``; ``B^T`` row j: the ascending coefficients of ``prod_{l != j} (x - a_l)``,
    infinity row those of ``prod_l (x - a_l)``), rebuilt here because the core may not import the torch side."""
    if m not in _POINTS:
        raise TmpqError(f"winograd: F({m}, 3) is not available; choose one of {', '.join(map(str, WINOGRAD_TILES))}")
    pts = [Fraction(p) for p in _POINTS[m]]
    alpha = m + 2

    def poly(roots):  # ascending coefficients of prod (x - r), padded to alpha
        c = [Fraction(1)]
        for r in roots:
            c = [Fraction(0)] + c
            for i in range(len(c) - 1):
                c[i] -= r * c[i + 1]
        return c + [Fraction(0)] * (alpha - len(c))

    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    bt = [poly(pts[:j] + pts[j + 1:]) for j in range(alpha - 1)] + [poly(pts)]
    return at, bt


def _pass_ops(mat) -> int:
    """FP operations of one 1-D pass of ``mat`` over one vector: per output element nnz(row) - 1 additions, plus one
    multiplication per entry not in {0, +1, -1}."""
    return sum(max(sum(v != 0 for v in row) - 1, 0) + sum(v not in (0, 1, -1) for v in row) for row in mat)


def winograd_transform_ops(m: int) -> tuple[int, int]:
    """(input, output) transform operations of ``F(m x m, 3 x 3)`` per tile and channel, evaluated row-column with
    the matrices' sparsity: ``B^T d B`` is two passes of ``B^T`` over alpha vectors each; ``A^T M A`` one pass of
    ``A^T`` over alpha columns and one over m rows. The weight transform is precomputed and costs nothing."""
    at, bt = winograd_transforms(m)
    alpha = m + 2
    return 2 * alpha * _pass_ops(bt), (alpha + m) * _pass_ops(at)


def winograd_bitops(lay, m: int, w: int, a: int) -> dict:
    """Per call and sample, the BitOPs of layer ``lay`` (its ``wino`` = (cin, cout, out_h, out_w)) run by Winograd
    F(m, 3) at (w, a) bits: ``mults`` = tiles x alpha^2 x cin x cout Winograd-domain products at w x a bits
    (alpha = m + 2, tiles = ceil(out_h / m) x ceil(out_w / m)), ``input`` / ``output`` = the transforms' FP32
    operations (per tile, per input / output channel) at 32 bits each, and their ``total``."""
    if lay.wino is None:
        raise TmpqError(f"winograd: layer {lay.fqn} is not a Winograd-eligible 3x3 convolution")
    cin, cout, oh, ow = lay.wino
    tiles = -(-oh // m) * -(-ow // m)
    t_in, t_out = winograd_transform_ops(m)
    d = {"mults": tiles * (m + 2) ** 2 * cin * cout * w * a, "input": tiles * t_in * cin * TRANSFORM_OP_BITS,
         "output": tiles * t_out * cout * TRANSFORM_OP_BITS}
    return d | {"total": d["mults"] + d["input"] + d["output"]}


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
