"""Winograd-domain quantized 3x3 convolution: F(m, 3) transforms, the tiled convolution, fake quantization of its
transformed operands, and data-free tuning of the transforms' diagonal scales.

Transforms (Toom-Cook / Winograd minimal filtering, Lavin & Gray 2015). ``F(m, r)`` computes ``m`` outputs of an
``r``-tap correlation from ``alpha = m + r - 1`` inputs with ``alpha`` multiplications: ``y = A^T [(G g) * (B^T d)]``.
It is the transpose of Toom-Cook polynomial multiplication evaluated at ``alpha - 1`` finite points ``a_j`` and the
point at infinity (the leading coefficient):

- ``A^T`` (m x alpha): ``A^T[i, j] = a_j^i``; the column of infinity is ``e_{m-1}``;
- ``G`` (alpha x r): ``G[j, k] = a_j^k / f_j`` with ``f_j = prod_{l != j} (a_j - a_l)``; the row of infinity is
  ``e_{r-1}``;
- ``B^T`` (alpha x alpha): row ``j`` holds the coefficients (ascending powers) of ``prod_{l != j} (x - a_l)``; the
  row of infinity those of ``prod_l (x - a_l)``.

The construction runs in exact rational arithmetic (:class:`fractions.Fraction`) and is checked exactly before it is
turned into float64 tensors. Points (:data:`POINTS`): F(2, 3) ``0, 1, -1``; F(4, 3) ``0, 1, -1, 2, -2``; F(6, 3)
``0, 1, -1, 2, -2, 1/2, -1/2``; each plus infinity. 2-D: ``Y = A^T [(G g G^T) * (B^T d B)] A`` per tile.

Quantization (:class:`WinogradConv2d`): the transformed weight ``U`` [alpha^2, Cout, Cin] and the transformed input
tiles ``V`` [alpha^2, tiles, Cin] are fake-quantized, one scale each (``tensor``) or one per tile position for ``V``
and per tile position x output channel for ``U`` (``group``: the channel-wise groups of the alpha^2 GEMMs). Optional
stages of the fully quantized pipeline: the conv input before the input transform (``x_bits``, per tensor) and the
Hadamard-product output ``M`` [alpha^2, tiles, Cout] before the output transform (``m_bits``: one scale, or one per
output channel across all tile positions, the grouping a GEMM over positions admits).

Scales (the learnable-scales method of data-free group-wise fully quantized Winograd): ``B^T -> diag(s_B) B^T``,
``G -> diag(s_G) G`` and ``A^T -> A^T diag(1 / (s_B s_G))`` leave the FP result unchanged and rescale position
``(i, j)`` of ``V`` by ``s_B[i] s_B[j]``, of ``U`` by ``s_G[i] s_G[j]`` and of ``M`` by their product. A per-position
scale of ``V`` / ``U`` absorbs such a rescaling exactly, so with ``group`` quantization and FP ``M`` the tuned scales
change nothing (tested); they matter where one scale spans several positions: ``tensor`` granularity, and ``M``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.quant.functional import affine_params, fake_quant, qrange
from tmpq.quant.quantizer import LOW_PRECISION, SUPPORTED_BITS, AffineQuantizer, QuantError

# interpolation points of F(m, 3) (the point at infinity is always added)
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2)),
    6: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2)),
}
TILES = tuple(POINTS)
WINOGRAD_GRANULARITIES = ("tensor", "group")
Matrix = list[list[Fraction]]


def _poly_from_roots(roots: Iterable[Fraction]) -> list[Fraction]:
    """Coefficients (ascending powers) of ``prod (x - r)``."""
    c = [Fraction(1)]
    for r in roots:
        c = [Fraction(0)] + c  # x * p
        for i in range(len(c) - 1):
            c[i] -= r * c[i + 1]
    return c


def cook_toom(m: int, r: int = 3, points: Iterable[Fraction] | None = None) -> tuple[Matrix, Matrix, Matrix]:
    """Exact ``(A^T, G, B^T)`` of ``F(m, r)`` from ``m + r - 2`` distinct finite points plus infinity (see the
    module docstring for the construction)."""
    pts = [Fraction(p) for p in (POINTS[m] if points is None else points)]
    n = m + r - 1
    if len(pts) != n - 1 or len(set(pts)) != len(pts):
        raise QuantError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {pts}")
    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            f *= p - q
        g.append([p ** k / f for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt = []
    for j in range(n - 1):
        c = _poly_from_roots(pts[:j] + pts[j + 1:])
        bt.append(c + [Fraction(0)] * (n - len(c)))
    bt.append(_poly_from_roots(pts))
    return at, g, bt


def exact_correlation_check(at: Matrix, g: Matrix, bt: Matrix) -> bool:
    """``A^T [(G g) * (B^T d)] == correlate(d, g)`` exactly for every unit ``g`` and ``d``: the maps are bilinear,
    so the unit vectors decide it."""
    m, n, r = len(at), len(bt), len(g[0])
    for k in range(r):
        gg = [Fraction(int(i == k)) for i in range(r)]
        for e in range(n):
            d = [Fraction(int(i == e)) for i in range(n)]
            u = [sum(g[j][i] * gg[i] for i in range(r)) for j in range(n)]
            v = [sum(bt[j][i] * d[i] for i in range(n)) for j in range(n)]
            y = [sum(at[i][j] * u[j] * v[j] for j in range(n)) for i in range(m)]
            if y != [sum(gg[t] * d[i + t] for t in range(r)) for i in range(m)]:
                return False
    return True


_TRANSFORMS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def transforms(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(A^T, G, B^T)`` of ``F(m, 3)``, built once per process and checked exactly."""
    if m not in POINTS:
        raise QuantError(f"m: F({m}, 3) is not available; choose one of {', '.join(map(str, TILES))}")
    if m not in _TRANSFORMS:
        at, g, bt = cook_toom(m)
        if not exact_correlation_check(at, g, bt):  # pragma: no cover - a construction bug
            raise AssertionError(f"F({m}, 3) transforms fail the exact check")
        _TRANSFORMS[m] = tuple(torch.tensor([[float(v) for v in row] for row in mat], dtype=torch.float64)
                               for mat in (at, g, bt))
    return _TRANSFORMS[m]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


Stage = Callable[[torch.Tensor], torch.Tensor]


def winograd_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, m: int = 4,
                    padding: int | tuple[int, int] = 1, *, s_B: torch.Tensor | None = None,
                    s_G: torch.Tensor | None = None, stages: Mapping[str, Stage] | None = None) -> torch.Tensor:
    """3x3, stride-1 convolution of an NCHW ``x`` by ``F(m, 3)`` Winograd tiles (any H, W: the output is padded up to
    whole tiles and cropped). In full precision it equals ``F.conv2d(x, w, bias, padding=padding)`` to rounding.

    ``s_B`` / ``s_G`` (alpha): positive diagonal scales of ``B^T`` / ``G`` (``A^T`` compensates). ``stages`` maps
    ``"input"`` (the zero-padded input), ``"V"`` [alpha^2, tiles, Cin], ``"U"`` [alpha^2, Cout, Cin] and ``"M"``
    [alpha^2, tiles, Cout] to functions applied at that point (fake quantizers, observers); the elementwise stage is
    one batched matmul, alpha^2 GEMMs of [tiles, Cin] x [Cin, Cout].
    """
    if w.shape[-2:] != (3, 3):
        raise QuantError(f"winograd_conv2d: a 3x3 kernel is needed, got {tuple(w.shape[-2:])}")
    stages = stages or {}
    at, g, bt = (t.to(device=x.device, dtype=x.dtype) for t in transforms(m))
    alpha = m + 2
    if s_B is not None:
        bt = s_B.to(x.dtype)[:, None] * bt
        at = at / s_B.to(x.dtype)[None, :]
    if s_G is not None:
        g = s_G.to(x.dtype)[:, None] * g
        at = at / s_G.to(x.dtype)[None, :]
    cin, cout = x.shape[1], w.shape[0]
    v, (n, th, tw, ho, wo) = _input_tiles(x, bt, m, padding, stages.get("input"))
    u = (g @ w.to(x.dtype) @ g.T).permute(2, 3, 0, 1).reshape(alpha * alpha, cout, cin)
    if "V" in stages:
        v = stages["V"](v)
    if "U" in stages:
        u = stages["U"](u)
    mm = torch.bmm(v, u.transpose(1, 2))  # [alpha^2, tiles, Cout]
    if "M" in stages:
        mm = stages["M"](mm)
    y = at @ mm.reshape(alpha, alpha, n * th * tw, cout).permute(2, 3, 0, 1) @ at.T  # [tiles, Cout, m, m]
    y = y.reshape(n, th, tw, cout, m, m).permute(0, 3, 1, 4, 2, 5).reshape(n, cout, th * m, tw * m)[..., :ho, :wo]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y


def why_not_winograd(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run as Winograd ``F(m, 3)`` (None: it can): only 3x3, stride-1, dilation-1, groups-1,
    zero-padded ``nn.Conv2d`` layers."""
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    bad = [f"{k} {v}" for k, v, ok in (("kernel_size", conv.kernel_size, (3, 3)), ("stride", conv.stride, (1, 1)),
                                        ("dilation", conv.dilation, (1, 1)), ("groups", conv.groups, 1),
                                        ("padding_mode", conv.padding_mode, "zeros")) if v != ok]
    if bad:
        return f"only 3x3, stride-1, dilation-1, groups-1 zero-padded convs; got {', '.join(map(str, bad))}"
    return None


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """A 3x3 conv's padding as two integers (``"valid"``: 0, ``"same"``: 1)."""
    padding = conv.padding
    if isinstance(padding, str):
        return (0, 0) if padding == "valid" else (1, 1)
    return tuple(padding)


def transformed_weight(weight: torch.Tensor, m: int, s_G: torch.Tensor | None = None) -> torch.Tensor:
    """The transformed weight ``U`` as its quantizer observes it: ``(G g G^T)`` in float64 (``G`` scaled by ``s_G``),
    rows ``[alpha^2 * Cout]`` (tile position major) by ``Cin`` columns, rounded once to float32."""
    _, g, _ = transforms(m)
    w = weight.detach().double()
    gs = g if s_G is None else s_G.double()[:, None] * g
    return (gs @ w @ gs.T).permute(2, 3, 0, 1).reshape(-1, w.shape[1]).float()


def transformed_input(x: torch.Tensor, m: int, padding: int | tuple[int, int]) -> torch.Tensor:
    """The transformed input tiles ``V`` [alpha^2, tiles, Cin] of ``x`` as :func:`winograd_conv2d` computes them
    (unit scales, ``x``'s dtype): what a calibration observes the ranges of."""
    _, _, bt = transforms(m)
    return _input_tiles(x, bt.to(device=x.device, dtype=x.dtype), m, padding)[0]


def _input_tiles(x: torch.Tensor, bt: torch.Tensor, m: int, padding, input_stage: Stage | None = None):
    """``V`` [alpha^2, tiles, Cin] of ``x`` under ``B^T`` = ``bt`` (the zero-padded input through ``input_stage``
    first) and the output geometry ``(N, tiles high, tiles wide, out_h, out_w)``."""
    alpha = m + 2
    n, cin, h, wd = x.shape
    ph, pw = _pair(padding)
    ho, wo = h + 2 * ph - 2, wd + 2 * pw - 2
    if ho < 1 or wo < 1:
        raise QuantError(f"winograd_conv2d: input {h}x{wd} with padding {padding} leaves no output")
    th, tw = -(-ho // m), -(-wo // m)
    xp = F.pad(x, (pw, tw * m + 2 - wd - pw, ph, th * m + 2 - h - ph))  # whole tiles; crop below
    if input_stage is not None:
        xp = input_stage(xp)
    d = xp.unfold(2, alpha, m).unfold(3, alpha, m)  # [N, Cin, th, tw, alpha, alpha]
    v = (bt @ d @ bt.T).permute(4, 5, 0, 2, 3, 1).reshape(alpha * alpha, n * th * tw, cin)
    return v, (n, th, tw, ho, wo)


def group_stages(u_quant: nn.Module, v_lo: torch.Tensor, v_hi: torch.Tensor, a_bits: int,
                 a_symmetric: bool) -> dict[str, Stage]:
    """The ``U`` / ``V`` fake quantizers of group granularity at unit scales: ``U`` by ``u_quant`` (one grid per
    tile position x output channel), ``V`` on the grid covering ``[v_lo[p], v_hi[p]]`` per tile position ``p`` (what
    :class:`WinogradConv2d` with ``granularity="group"``, no input / ``M`` bits, and unit scales runs)."""
    lo, hi = v_lo[:, None, None], v_hi[:, None, None]
    return {"V": lambda t: _fq_range(t, lo, hi, a_bits, a_symmetric),
            "U": lambda t: u_quant(t.reshape(-1, t.shape[-1])).reshape(t.shape)}


def _fq_range(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize ``t`` on the grid covering ``[lo, hi]`` (broadcastable; gradients straight-through)."""
    scale, zp = affine_params(lo.detach(), hi.detach(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return fake_quant(t, scale.to(t.dtype), zp.to(t.dtype), qmin, qmax)


class WinogradConv2d(nn.Module):
    """A 3x3, stride-1 ``nn.Conv2d`` (wrapped, weight not copied) computed by quantized ``F(m, 3)`` Winograd.

    ``w_bits`` / ``a_bits`` (``None``: full precision) quantize ``U`` (symmetric, ``w_observer``: ``mse`` clipping
    search by default, as tmpq's weights) and ``V`` (min-max, asymmetric unless ``a_symmetric``, as tmpq's
    activations); ``x_bits`` / ``m_bits`` add the conv input and the Hadamard output ``M`` (min-max). ``granularity``:
    ``tensor`` or ``group`` (module docstring).

    Life cycle: ``observe(x)`` (FP forward, records the ranges of the input, ``V`` and ``M`` per tile position, in
    the unscaled basis, and the input's mean / std) -> ``freeze()`` -> ``forward``; ``calibrate(inputs)`` does all
    three. ``tune_scales()`` learns ``s_B`` / ``s_G`` data-free and may run before or after calibration: the recorded
    per-position ranges rescale exactly with the scales, so nothing is re-observed. Every state tensor is a buffer
    created in ``__init__``, so a state_dict round-trips.
    """

    def __init__(self, conv: nn.Conv2d, m: int = 4, w_bits: int | None = 8, a_bits: int | None = 8,
                 granularity: str = "group", *, x_bits: int | None = None, m_bits: int | None = None,
                 w_observer: str = "mse", a_symmetric: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise QuantError(f"WinogradConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        padding = conv_padding(conv)
        why = why_not_winograd(conv)
        if why is not None:
            raise QuantError(f"WinogradConv2d: {why}")
        if m not in POINTS:
            raise QuantError(f"m: F({m}, 3) is not available; choose one of {', '.join(map(str, TILES))}")
        if granularity not in WINOGRAD_GRANULARITIES:
            raise QuantError(f"granularity: unknown {granularity!r}; choose tensor or group")
        for name, b in (("w_bits", w_bits), ("a_bits", a_bits), ("x_bits", x_bits), ("m_bits", m_bits)):
            if b is not None and b not in SUPPORTED_BITS:
                raise QuantError(f"{name}: {b} is not a supported bit-width (2..16)")
        self.module, self.m, self.alpha, self.padding = conv, int(m), int(m) + 2, tuple(padding)
        self.w_bits, self.a_bits, self.x_bits, self.m_bits = w_bits, a_bits, x_bits, m_bits
        self.granularity, self.a_symmetric = granularity, bool(a_symmetric)
        p, cout, cin = self.alpha ** 2, conv.out_channels, conv.in_channels
        self.register_buffer("s_B", torch.ones(self.alpha))
        self.register_buffer("s_G", torch.ones(self.alpha))
        for name, shape in (("x_lo", ()), ("x_hi", ()), ("v_lo", (p,)), ("v_hi", (p,)), ("m_lo", (p, cout)),
                            ("m_hi", (p, cout)), ("x_mean", ()), ("x_std", ())):
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("observed", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))
        self.u_quant = None
        if w_bits is not None:
            self.u_quant = AffineQuantizer(w_bits, True, "tensor" if granularity == "tensor" else "channel",
                                           channels=p * cout, observer=w_observer)
        self._moments = [0.0, 0.0, 0]  # running sum, sum of squares, count of the observed inputs (not persisted)

    @property
    def quantizes_activations(self) -> bool:
        return any(b is not None for b in (self.a_bits, self.x_bits, self.m_bits))

    # -- the pipeline -------------------------------------------------------------------------------------------
    def _pos_weights(self, s_B: torch.Tensor, s_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How each tile position of V and of M is rescaled by (s_B, s_G): ``[alpha^2]`` each."""
        sm = s_B * s_G
        return torch.outer(s_B, s_B).reshape(-1), torch.outer(sm, sm).reshape(-1)

    def _run(self, x: torch.Tensor, stages: dict, s_B: torch.Tensor, s_G: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xc = x.float() if dtype in LOW_PRECISION else x
        m = self.module
        y = winograd_conv2d(xc, m.weight, m.bias, self.m, self.padding, s_B=s_B, s_G=s_G, stages=stages)
        return y.to(dtype)

    def _act_ranges(self, lo: torch.Tensor, hi: torch.Tensor, wpos: torch.Tensor, per: str):
        """Ranges of a stage from unscaled per-position stats: ``per`` ``V`` ([alpha^2] stats) or ``M``
        ([alpha^2, Cout])."""
        if per == "V":
            lo, hi = lo * wpos, hi * wpos
            if self.granularity == "tensor":
                return lo.min(), hi.max()
            return lo[:, None, None], hi[:, None, None]
        lo, hi = lo * wpos[:, None], hi * wpos[:, None]
        if self.granularity == "tensor":
            return lo.min(), hi.max()
        return lo.amin(0)[None, None, :], hi.amax(0)[None, None, :]

    def _quant_stages(self) -> dict:
        """Fake-quantizing stages at the current scales: activation grids from the calibrated (unscaled,
        per-position) ranges, rescaled by the scales; weights by the frozen quantizer of ``U``."""
        wv, wm = self._pos_weights(self.s_B, self.s_G)
        sym = self.a_symmetric
        stages: dict[str, Stage] = {}
        if self.x_bits is not None:
            stages["input"] = lambda t: _fq_range(t, self.x_lo, self.x_hi, self.x_bits, sym)
        if self.a_bits is not None:
            lo, hi = self._act_ranges(self.v_lo, self.v_hi, wv, "V")
            stages["V"] = lambda t: _fq_range(t, lo, hi, self.a_bits, sym)
        if self.m_bits is not None:
            mlo, mhi = self._act_ranges(self.m_lo, self.m_hi, wm, "M")
            stages["M"] = lambda t: _fq_range(t, mlo, mhi, self.m_bits, sym)
        if self.w_bits is not None:
            stages["U"] = lambda t: self.u_quant(t.reshape(-1, t.shape[-1])).reshape(t.shape)
        return stages

    # -- calibration --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record the input, ``V`` and ``M`` ranges (per tile position, unscaled) of ``x``; returns the FP output."""
        wv, wm = self._pos_weights(self.s_B, self.s_G)
        seen = {}

        def rec(name):
            def f(t):
                seen[name] = t
                return t
            return f

        y = self._run(x, {"input": rec("input"), "V": rec("V"), "M": rec("M")}, self.s_B, self.s_G)
        xf, v, mm = x.float(), seen["V"].float(), seen["M"].float()
        new = {"x_lo": xf.min(), "x_hi": xf.max(), "v_lo": v.amin((1, 2)) / wv, "v_hi": v.amax((1, 2)) / wv,
               "m_lo": mm.amin(1) / wm[:, None], "m_hi": mm.amax(1) / wm[:, None]}
        first = not bool(self.observed)
        for k, t in new.items():
            old = getattr(self, k)
            old.copy_(t if first else (torch.minimum(old, t) if k.endswith("lo") else torch.maximum(old, t)))
        s = self._moments
        s[0] += float(xf.double().sum())
        s[1] += float(xf.double().pow(2).sum())
        s[2] += xf.numel()
        mean = s[0] / s[2]
        self.x_mean.fill_(mean)
        self.x_std.fill_(max(s[1] / s[2] - mean * mean, 0.0) ** 0.5)
        self.observed.fill_(True)
        return y

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the weights for the current scales and switch to quantized forwards."""
        if self.quantizes_activations and not bool(self.observed):
            raise QuantError("freeze() before any observe(): the Winograd layer has seen no inputs")
        self.freeze_weights()
        self.frozen.fill_(True)

    @torch.no_grad()
    def freeze_weights(self) -> None:
        """(Re)observe the transformed weight ``U`` under the current ``s_G`` and freeze its quantizer."""
        if self.u_quant is None:
            return
        u = transformed_weight(self.module.weight, self.m, self.s_G)
        self.u_quant.reset()
        self.u_quant.observe(u)
        self.u_quant.freeze()

    def calibrate(self, inputs: Iterable[torch.Tensor]) -> None:
        """``observe`` every input, then ``freeze``."""
        self._moments = [0.0, 0.0, 0]
        self.observed.fill_(False)
        for x in inputs:
            self.observe(x)
        self.freeze()

    # -- data-free scale tuning ---------------------------------------------------------------------------------
    def _random_batches(self, n: int, batch: int, tiles: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Gaussian inputs with the observed input mean / std (N(0, 1) before any observation)."""
        side = tiles * self.m
        mean, std = (float(self.x_mean), float(self.x_std)) if bool(self.observed) else (0.0, 1.0)
        w = self.module.weight
        return [torch.randn(batch, w.shape[1], side, side, generator=gen).to(w) * max(std, 1e-6) + mean
                for _ in range(n)]

    def _dynamic_stages(self) -> dict:
        """Fake quantizers whose grids are the min-max ranges of the very tensor they quantize, at the current
        scales, with this layer's granularities (what tuning on random inputs optimises; ranges detached)."""
        sym, tensor = self.a_symmetric, self.granularity == "tensor"

        def act(bits, dims):
            def f(t):
                d = t.detach()
                lo, hi = (d.amin(), d.amax()) if tensor else (d.amin(dims, keepdim=True), d.amax(dims, keepdim=True))
                return _fq_range(t, lo, hi, bits, sym)
            return f

        def weight(t):
            a = t.detach().abs().amax() if tensor else t.detach().abs().amax(-1, keepdim=True)
            return _fq_range(t, -a, a, self.w_bits, True)

        stages: dict[str, Stage] = {}
        if self.x_bits is not None:
            stages["input"] = lambda t: _fq_range(t, t.detach().amin(), t.detach().amax(), self.x_bits, sym)
        if self.a_bits is not None:
            stages["V"] = act(self.a_bits, (1, 2))  # group: per tile position
        if self.m_bits is not None:
            stages["M"] = act(self.m_bits, (0, 1))  # group: per output channel
        if self.w_bits is not None:
            stages["U"] = weight
        return stages

    def _tuning_loss(self, x: torch.Tensor, s_B: torch.Tensor, s_G: torch.Tensor) -> torch.Tensor:
        """Relative squared error of the quantized Winograd output (dynamic ranges) against the direct FP conv."""
        with torch.no_grad():
            ref = F.conv2d(x, self.module.weight, None, 1, self.padding)
        out = winograd_conv2d(x, self.module.weight, None, self.m, self.padding, s_B=s_B, s_G=s_G,
                              stages=self._dynamic_stages())
        return (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)

    def tuning_objective(self, batches: Iterable[torch.Tensor], s_B: torch.Tensor | None = None,
                         s_G: torch.Tensor | None = None) -> float:
        """Mean tuning loss over ``batches`` at the given (default: current) scales."""
        s_B = self.s_B if s_B is None else s_B
        s_G = self.s_G if s_G is None else s_G
        with torch.no_grad():
            losses = [float(self._tuning_loss(x, s_B, s_G)) for x in batches]
        return sum(losses) / len(losses)

    @torch.no_grad()
    def balanced_scales(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A data-free starting point: ``s_G`` that equalises the per-position ranges of ``U`` and ``s_B`` those of
        ``M`` (when quantized) or else of ``V``, each by the best rank-one (``s_i s_j``) fit in log space of the
        positions' max-abs values (``V`` / ``M`` on ``batches``)."""
        w = self.module.weight.detach().double()
        _, g, _ = transforms(self.m)
        a = self.alpha

        def rank_one(r: torch.Tensor) -> torch.Tensor:  # s with s_i s_j r_ij ~ const (least squares of the logs)
            lr = r.clamp_min(1e-30).log().reshape(a, a)
            return (lr.mean() / 2 - (lr.mean(1) + lr.mean(0)) / 2).exp()

        s_G = rank_one((g @ w @ g.T).abs().amax((0, 1)))
        seen: dict[str, torch.Tensor] = {}

        def rec(name):
            def f(t):
                seen[name] = seen[name].maximum(t.abs().amax((1, 2))) if name in seen else t.abs().amax((1, 2))
                return t
            return f

        for x in batches:
            winograd_conv2d(x.double(), w, None, self.m, self.padding, s_G=s_G, stages={"V": rec("V"), "M": rec("M")})
        s_B = rank_one(seen["M"]) if self.m_bits is not None else rank_one(seen["V"])
        return s_B.float(), s_G.float()

    def tune_scales(self, steps: int = 200, lr: float = 0.05, batch: int = 4, tiles: int = 3, seed: int = 0,
                    val_batches: int = 4) -> dict:
        """Learn ``s_B`` / ``s_G`` with Adam (on their logs, each normalised to mean log 0: a common factor changes
        nothing) through the fake quantizers (straight-through rounding), on Gaussian inputs against the direct FP
        conv, fresh inputs every step, no data. Adam starts from the better of the current scales and
        :meth:`balanced_scales`; the best of the three on ``val_batches`` held-out random batches is kept and the
        weights re-frozen. Returns the held-out objective ``{"before", "balanced", "after"}``."""
        if self.w_bits is None and not self.quantizes_activations:
            return {"before": 0.0, "balanced": 0.0, "after": 0.0}
        gen = torch.Generator().manual_seed(seed)
        val = self._random_batches(val_batches, batch, tiles, gen)
        weight = self.module.weight
        req = weight.requires_grad
        weight.requires_grad_(False)
        try:
            cands = [(self.tuning_objective(val), self.s_B.clone(), self.s_G.clone())]
            before = cands[0][0]
            b0, g0 = self.balanced_scales(val)
            cands.append((self.tuning_objective(val, b0, g0), b0, g0))
            _, b0, g0 = min(cands, key=lambda c: c[0])
            log_b = b0.log().clone().requires_grad_(True)
            log_g = g0.log().clone().requires_grad_(True)
            opt = torch.optim.Adam([log_b, log_g], lr=lr)

            def norm(t: torch.Tensor) -> torch.Tensor:
                return (t - t.mean()).exp()

            for _ in range(steps):
                (x,) = self._random_batches(1, batch, tiles, gen)
                loss = self._tuning_loss(x, norm(log_b), norm(log_g))
                opt.zero_grad()
                loss.backward()
                opt.step()
            b1, g1 = norm(log_b.detach()), norm(log_g.detach())
            cands.append((self.tuning_objective(val, b1, g1), b1, g1))
        finally:
            weight.requires_grad_(req)
        after, s_b, s_g = min(cands, key=lambda c: c[0])
        self.s_B.copy_(s_b)
        self.s_G.copy_(s_g)
        if bool(self.frozen):
            self.freeze_weights()
        return {"before": before, "balanced": cands[1][0], "after": after}

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_bits is None and not self.quantizes_activations:
            return self._run(x, {}, self.s_B, self.s_G)
        if not bool(self.frozen):
            raise QuantError("WinogradConv2d used before calibration (calibrate, or observe + freeze, or load a "
                             "state_dict)")
        return self._run(x, self._quant_stages(), self.s_B, self.s_G)

    def extra_repr(self) -> str:
        return (f"F({self.m}, 3), w_bits={self.w_bits}, a_bits={self.a_bits}, x_bits={self.x_bits}, "
                f"m_bits={self.m_bits}, granularity={self.granularity}")
