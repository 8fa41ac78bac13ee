"""Real int8 kernels on CPU for Winograd-domain quantized 3x3 convolution (:class:`tmpq.quant.winograd.WinogradConv2d`).

A calibrated ``WinogradConv2d`` at W8A8 (or fewer bits) fake-quantizes the transformed weight ``U`` (symmetric, one
grid per tensor or per tile position x output channel) and the transformed input tiles ``V`` (one grid per tensor or
per tile position, asymmetric unless ``a_symmetric``), then multiplies them in float: ``alpha^2`` GEMMs of
``[tiles, Cin] x [Cin, Cout]``. Both operands are integer codes times scales, so :class:`WinogradInt8Conv2d` runs the
same products in integers: ``U``'s int8 codes are stored once (``[alpha^2, Cin, Cout]``, the ``[K, N]`` operand of
``torch._int_mm``), each call transforms the input exactly as the twin does (the same float ops, so the same codes),
quantizes ``V`` to int8 codes per tile position, runs one ``torch._int_mm`` (int8 x int8 -> int32) per tile position
and rescales the int32 accumulators by ``s_V[p] * s_U[p, o]``; then the output transform (one GEMM by
``kron(A^T, A^T)``) and the bias.

Asymmetric ``V`` codes ``q`` in ``[0, 255]`` are stored as ``q - 128`` (int8) and the zero-point term is folded
exactly in int32: ``sum_c (q - zp) u = sum_c (q - 128) u + (128 - zp) colsum(u)``.

Measured on this CPU (torch 2.14, one thread): ``torch._int_mm`` takes any shape here (m of 1, odd k and n) given
canonical strides (:func:`_dense`), is 2.5x faster than the float32 GEMM at ``[4096, 64] x [64, 64]`` and faster
than oneDNN's ``qlinear_pointwise`` per position (0.047 vs 0.110 ms writing into a preallocated int32 buffer);
PyTorch has no batched int8 GEMM on CPU, so the positions loop.

Exactness: both sides compute the same integer products; the twin sums their float32 values, this module sums them
exactly in int32 and rounds once. They differ by float rounding, which scales with the exact sum of ``|products|``
behind each output (its "mass"), not with the output, which can cancel (F(6, 3)'s transforms have entries up to
~10 and large cancellations). :func:`check` reports the largest difference as a fraction of that mass (``err``,
tolerance :data:`CHECK_TOL`, float32's ~6e-8 times a few hundred accumulated terms at worst) and of the largest
output (``rel_max``). One flipped activation code would cost ~1e-3 of the mass: the check tells the two apart.

Falls back (:func:`convert`, one row with a one-line reason, as :func:`tmpq.deploy.int8.convert_checked`'s rows):
weights or ``V`` above 8 bits or in full precision, a quantized Hadamard output ``M`` (``m_bits``: requantized
between the GEMM and the output transform, where the exact int32 and the float32 sums can round to different codes),
no ``torch._int_mm`` in this build, a kernel error or a check beyond tolerance on the given inputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.deploy.plan import CHECK_TOL, capture_inputs
from tmpq.quant.functional import affine_params, fake_quant, qrange
from tmpq.quant.layers import replace_module
from tmpq.quant.quantizer import LOW_PRECISION, QuantError
from tmpq.quant.winograd import WinogradConv2d, transforms, winograd_conv2d

__all__ = ["CHECK_TOL", "WinogradInt8Conv2d", "check", "convert", "deploy", "int_mm_available", "why_not_int8"]


def int_mm_available() -> bool:
    """Whether this PyTorch build runs ``torch._int_mm`` on CPU (probed on a small exact product)."""
    try:
        a = torch.tensor([[-128, 127], [3, -5]], dtype=torch.int8)
        return torch.equal(torch._int_mm(a, a), (a.long() @ a.long()).int())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def why_not_int8(layer: WinogradConv2d) -> str | None:
    """Why ``layer`` cannot run on int8 GEMMs exactly (None: it can). Raises :class:`QuantError` for an uncalibrated
    layer (its fake-quant twin cannot run either)."""
    if not isinstance(layer, WinogradConv2d):
        raise QuantError(f"WinogradInt8Conv2d converts a WinogradConv2d, got {type(layer).__name__}")
    if layer.w_bits is None or layer.a_bits is None:
        return f"full-precision {'U' if layer.w_bits is None else 'V'}: no integer codes to multiply"
    if layer.w_bits > 8 or layer.a_bits > 8:
        return f"w_bits {layer.w_bits} / a_bits {layer.a_bits}: int8 GEMMs need codes of at most 8 bits"
    if layer.m_bits is not None:
        return (f"m_bits {layer.m_bits}: M is requantized between the GEMM and the output transform, where exact "
                f"int32 and float32 sums can round to different codes")
    if not bool(layer.frozen):
        raise QuantError("WinogradInt8Conv2d: the WinogradConv2d is not calibrated (calibrate, or observe + freeze)")
    if not int_mm_available():
        return "no CPU torch._int_mm in this PyTorch build"
    return None


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a fresh row-major buffer with canonical strides. ``torch._int_mm`` on a strided operand (V is a
    permuted view of the transform) is ~1000x slower, and ``.contiguous()`` may keep a size-1 dimension's stride at 1
    (Cin = 1: a [1, Cout] slice with strides (1, 1)), which this CPU kernel misreads (wrong sums, measured)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


class WinogradInt8Conv2d(nn.Module):
    """A calibrated W8A8 ``WinogradConv2d`` on int8 GEMMs (module docstring). Holds the twin's transforms at its
    tuned scales, ``U``'s int8 codes ``[alpha^2, Cin, Cout]`` and scales, ``V``'s per-position grids and the bias;
    not the twin itself."""

    def __init__(self, layer: WinogradConv2d):
        super().__init__()
        why = why_not_int8(layer)
        if why is not None:
            raise QuantError(f"WinogradInt8Conv2d: {why}")
        conv = layer.module
        self.m, self.alpha, self.padding = layer.m, layer.alpha, layer.padding
        self.cin, self.cout = conv.in_channels, conv.out_channels
        p = self.alpha ** 2
        s_B, s_G = layer.s_B.detach().float(), layer.s_G.detach().float()
        # the twin's float32 transforms at its scales, built by the same ops (winograd_conv2d), so V is bit-identical
        at, _, bt = (t.float() for t in transforms(self.m))
        self.register_buffer("bt", s_B[:, None] * bt)
        self.register_buffer("at2", torch.kron(*(2 * (at / s_B[None, :] / s_G[None, :],))))  # [m^2, alpha^2]
        # U as the twin's forward quantizes it (captured from winograd_conv2d), then as integer codes
        seen: dict[str, torch.Tensor] = {}

        def u_stage(t: torch.Tensor) -> torch.Tensor:
            seen["U"] = layer.u_quant(t.reshape(-1, t.shape[-1])).reshape(t.shape)
            return seen["U"]

        with torch.no_grad():
            w = conv.weight.detach().float()
            winograd_conv2d(torch.zeros(1, self.cin, 3, 3), w, None, self.m, self.padding, s_B=s_B, s_G=s_G,
                            stages={"U": u_stage})
            uq = seen["U"]  # [P, Cout, Cin]
            su = layer.u_quant.scale.detach().float().reshape(-1)
            su = (su.expand(p * self.cout) if su.numel() == 1 else su).reshape(p, self.cout, 1)
            codes = torch.round(uq / su)
            if codes.abs().max() > 128 or not torch.equal(codes * su, uq):
                raise AssertionError("U's fake-quantized values are not its int8 codes times its scales")
        self.register_buffer("u_codes", _dense(codes.to(torch.int8).transpose(1, 2)))  # [P, Cin, Cout]
        self.register_buffer("u_scale", su.reshape(p, 1, self.cout).clone())
        # V's grids (the twin's ranges at its scales), per position or one
        wv = torch.outer(layer.s_B, layer.s_B).reshape(-1)
        lo, hi = layer.v_lo * wv, layer.v_hi * wv
        if layer.granularity == "tensor":
            lo, hi = lo.min(), hi.max()
        else:
            lo, hi = lo[:, None, None], hi[:, None, None]
        sym = layer.a_symmetric
        sv, zp = affine_params(lo, hi, layer.a_bits, sym)
        sv, zp = sv.float(), zp.float()
        self.qmin, self.qmax = qrange(layer.a_bits, sym)
        self.shift = 0 if sym else 128  # int8 code = q - shift
        self.register_buffer("v_scale", sv)
        self.register_buffer("v_inv", 1.0 / sv)  # the reciprocal fake_quant multiplies by
        self.register_buffer("v_zp", zp)
        svp = sv.reshape(-1).expand(p) if sv.numel() == 1 else sv.reshape(p)
        zpp = zp.reshape(-1).expand(p) if zp.numel() == 1 else zp.reshape(p)
        # M = s_V s_U (acc + (shift - zp) colsum(U)): the zero-point term exact in int32
        self.register_buffer("m_scale", svp[:, None, None] * su.reshape(p, 1, self.cout))
        colsum = self.u_codes.to(torch.int32).sum(1, keepdim=True)  # [P, 1, Cout]
        self.register_buffer("zp_term", ((self.shift - zpp).to(torch.int32)[:, None, None] * colsum))
        self.x_grid = None
        if layer.x_bits is not None:  # the conv input, fake-quantized per tensor before the transform, as the twin
            xs, xz = affine_params(layer.x_lo, layer.x_hi, layer.x_bits, sym)
            self.x_grid = (xs.float(), xz.float(), *qrange(layer.x_bits, sym))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    def _tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The transformed input ``V`` [P, tiles, Cin] (float32), as the twin computes it, and the output geometry."""
        n, _, h, wd = x.shape
        m, a = self.m, self.alpha
        ph, pw = self.padding
        ho, wo = h + 2 * ph - 2, wd + 2 * pw - 2
        if ho < 1 or wo < 1:
            raise QuantError(f"WinogradInt8Conv2d: input {h}x{wd} with padding {self.padding} leaves no output")
        th, tw = -(-ho // m), -(-wo // m)
        xp = F.pad(x, (pw, tw * m + 2 - wd - pw, ph, th * m + 2 - h - ph))
        if self.x_grid is not None:
            s, z, lo, hi = self.x_grid
            xp = fake_quant(xp, s, z, lo, hi)
        d = xp.unfold(2, a, m).unfold(3, a, m)
        v = (self.bt @ d @ self.bt.T).permute(4, 5, 0, 2, 3, 1).reshape(a * a, n * th * tw, self.cin)
        return v, (n, th, tw, ho, wo)

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """``V``'s int8 codes ``clamp(round(v / s) + zp, qmin, qmax) - shift`` (fake_quant's rounding)."""
        q = torch.round(v * self.v_inv).add_(self.v_zp - self.shift)
        return _dense(q.clamp_(self.qmin - self.shift, self.qmax - self.shift).to(torch.int8))

    def v_hat(self, v: torch.Tensor) -> torch.Tensor:
        """The dequantized ``V`` the twin multiplies (for :func:`check`)."""
        return (self.codes(v).float() + (self.shift - self.v_zp)) * self.v_scale

    def u_hat(self) -> torch.Tensor:
        """The dequantized ``U`` [P, Cin, Cout] (for :func:`check`)."""
        return self.u_codes.float() * self.u_scale


    def _output(self, mm: torch.Tensor, geo: tuple[int, ...], at2: torch.Tensor) -> torch.Tensor:
        """The output transform as one GEMM, ``kron(A^T, A^T)`` [m^2, alpha^2] x M [alpha^2, tiles * Cout] (the
        twin's per-tile ``A^T M A`` in another summation order: float rounding only; 2-4x faster here)."""
        n, th, tw, ho, wo = geo
        m = self.m
        y = (at2 @ mm.reshape(at2.shape[1], -1)).reshape(m, m, n, th, tw, self.cout)
        return y.permute(2, 5, 3, 0, 4, 1).reshape(n, self.cout, th * m, tw * m)[..., :ho, :wo]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        v, geo = self._tiles(x.float() if dtype in LOW_PRECISION else x)
        q = self.codes(v)
        acc = torch.empty(q.shape[0], q.shape[1], self.cout, dtype=torch.int32)
        for p in range(q.shape[0]):
            torch._int_mm(q[p], self.u_codes[p], out=acc[p])
        if self.shift:
            acc.add_(self.zp_term)
        y = self._output(torch.mul(acc, self.m_scale), geo, self.at2)
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y.to(dtype)

    @torch.no_grad()
    def mass(self, x: torch.Tensor) -> torch.Tensor:
        """The exact magnitude behind each output, ``|A^T| (|V_hat| |U_hat|) |A| + |bias|``: what float rounding
        scales with."""
        v, geo = self._tiles(x.float())
        mm = torch.bmm(self.v_hat(v).abs(), self.u_hat().abs())
        y = self._output(mm, geo, self.at2.abs())  # kron(|A^T|, |A^T|)
        return y if self.bias is None else y + self.bias.abs()[None, :, None, None]

    def extra_repr(self) -> str:
        return f"F({self.m}, 3), int8 codes U {tuple(self.u_codes.shape)}, zero-point folded: {bool(self.shift)}"


@torch.no_grad()
def check(layer: WinogradConv2d, module: WinogradInt8Conv2d, xs: list[torch.Tensor]) -> dict:
    """How far ``module`` is from its fake-quant twin ``layer`` on inputs ``xs``: ``err`` (the largest difference as a
    fraction of the exact magnitude behind that output, :meth:`WinogradInt8Conv2d.mass`; tolerance
    :data:`CHECK_TOL`), ``rel_max`` (the largest difference over the largest twin output) and ``rel_mse``."""
    err = rel_max = num = den = 0.0
    for x in xs:
        want, got = layer(x).float(), module(x).float()
        d = (got - want).abs()
        mass = module.mass(x)
        err = max(err, float((d / mass.clamp_min(torch.finfo(mass.dtype).tiny)).max()))
        rel_max = max(rel_max, float(d.max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)))
        num += float(d.double().pow(2).sum())
        den += float(want.double().pow(2).sum())
    return {"err": err, "rel_max": rel_max, "rel_mse": num / den if den else float(num > 0)}


def convert(layer: WinogradConv2d, xs: list[torch.Tensor], tol: float = CHECK_TOL,
            name: str = "") -> tuple[nn.Module, dict]:
    """``layer`` on int8 GEMMs where that is exact on ``xs``, else ``layer`` itself: returns the module to use and one
    row ``{"fqn", "kind", "m", "granularity", "w_bits", "a_bits", "int8", "why", "check_err", "check_rel_max",
    "check_rel_mse"}`` (``why``: the one-line reason of a fallback)."""
    row = {"fqn": name, "kind": "WinogradConv2d", "m": layer.m, "granularity": layer.granularity,
           "w_bits": layer.w_bits, "a_bits": layer.a_bits, "int8": False, "why": why_not_int8(layer) or "",
           "check_err": None, "check_rel_max": None, "check_rel_mse": None}
    if row["why"]:
        return layer, row
    if not xs:
        row["why"] = "no inputs to check the int8 GEMMs on"
        return layer, row
    try:
        module = WinogradInt8Conv2d(layer)
        c = check(layer, module, xs)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run this layer is a named fallback
        row["why"] = f"its int8 GEMMs failed on it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return layer, row
    row.update(check_err=c["err"], check_rel_max=c["rel_max"], check_rel_mse=c["rel_mse"])
    if c["err"] <= tol:
        row["int8"] = True
        return module, row
    row["why"] = (f"its int8 GEMMs disagree with fake quantization (error {c['err']:.1e} of the exact magnitude, "
                  f"tolerance {tol:.0e}; relative MSE {c['rel_mse']:.1e})")
    return layer, row


def deploy(unet: nn.Module, probe, tol: float = CHECK_TOL, per_layer: int = 2) -> list[dict]:
    """Every calibrated :class:`WinogradConv2d` of ``unet`` (an export's Winograd layers) on int8 GEMMs where that is
    exact, in place: ``probe(unet)`` runs the model once on real inputs, each layer's first ``per_layer`` inputs
    there check its conversion (:func:`convert`); a layer that falls back stays fake-quant. Returns :func:`convert`'s
    rows (``parts``: 1 converted, 0 not, as :func:`tmpq.deploy.int8.convert_checked`'s rows count them)."""
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, WinogradConv2d)}
    if not layers:
        return []
    seen = capture_inputs(unet, layers, probe, per_layer)
    rows = []
    for name, layer in layers.items():
        module, row = convert(layer, seen[name].get(0, []), tol, name)
        if module is not layer:
            replace_module(unet, name, module)
        rows.append({**row, "parts": int(row["int8"])})
    return rows
