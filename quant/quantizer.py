"""``AffineQuantizer``: explicit quantizer state (shaped buffers created in ``__init__``), explicit phases.

Life cycle: build (shapes fixed) -> ``observe(x)`` one or more times -> ``freeze()`` computes scale / zero-point ->
``forward`` fake-quantizes. Weight quantizers usually do ``observe(w); freeze()`` once. A quantizer that was never
frozen refuses to run instead of silently creating state inside ``forward``. ``state_dict`` round-trips without any
warm-up forward because every tensor exists from ``__init__`` on.

Dtypes: a quantizer's state (scale, zero-point) is fp32 whatever the model's dtype, and a bf16 / fp16 input is
fake-quantized exactly as its fp32 upcast would be, the result rounded once to the input's dtype
(:func:`fake_quant_in_fp32`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tmpq.core.choices import GRANULARITIES, OBSERVERS
from tmpq.quant.functional import (
    affine_params,
    channel_view,
    fake_quant,
    fake_quant_channel_inference,
    fake_quant_inference,
    from_groups,
    qrange,
    to_groups,
)

SUPPORTED_BITS = tuple(range(2, 17))


# input dtypes that are fake-quantized in fp32 and rounded once back (see fake_quant_in_fp32)
LOW_PRECISION = (torch.bfloat16, torch.float16)


class QuantError(ValueError):
    """Invalid quantizer configuration or use."""


def fake_quant_in_fp32(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an fp32 (or fp64) ``x``; for a bf16 / fp16 ``x``, ``fn(x.float())`` rounded once to ``x``'s dtype.

    What "exact in the dtype it computes in" means here: the integer code of every element is the one fp32 fake
    quantization gives (codes from fp32 scaling, rounding and clamping of the exactly upcast input, never from a
    scale or a product rounded to 8 mantissa bits, which would move values across rounding boundaries), and the
    dequantized value is the fp32 grid value ``(q - zero_point) * scale`` rounded once, to nearest, to the compute
    dtype: no second rounding in between. A grid value itself is generally not representable in bf16 (8 significant
    bits against an 8-bit code times a 24-bit scale); the bf16 value is its nearest neighbour, and for codes
    ``|q - zero_point| <= 128`` (every symmetric grid of up to 8 bits) it still decodes to its code:
    ``round(value / scale) == q - zero_point`` (fp16, 11 significant bits: up to 1024). Tested in
    ``tests/test_dtype.py``. Gradients pass through both casts."""
    if x.dtype in LOW_PRECISION:
        return fn(x.float()).to(x.dtype)
    return fn(x)


class AffineQuantizer(nn.Module):
    """Uniform affine fake quantizer.

    Args:
        bits: 2..16.
        symmetric: signed range with zero-point 0, else unsigned with a zero-point.
        granularity: ``tensor`` (one scale), ``channel`` (one per output channel, axis 0), ``group`` (one per
            ``group_size`` consecutive inputs of each output channel, the Winograd-PTQ granularity).
        channels / group_size / in_features: the shape information the granularity needs.
        observer: ``minmax``, ``percentile`` (clip at ``percentile``) or ``mse`` (grid search of the clipping range
            minimising the L2.4 reconstruction error, as Q-Diffusion / BRECQ).
        learnable_scale: LSQ-style; ``scale`` becomes an ``nn.Parameter`` trained by straight-through gradients.

    Example:
        >>> q = AffineQuantizer(4, symmetric=True, granularity="channel", channels=3)
        >>> w = torch.randn(3, 5)
        >>> q.observe(w); q.freeze()
        >>> q(w).shape
        torch.Size([3, 5])
    """

    def __init__(self, bits: int, symmetric: bool = True, granularity: str = "tensor", channels: int = 1,
                 group_size: int | None = None, in_features: int | None = None, observer: str = "minmax",
                 percentile: float = 99.99, learnable_scale: bool = False, max_samples: int = 1 << 18):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise QuantError(f"bits: {bits} is not a supported bit-width (2..16)")
        if granularity not in GRANULARITIES:
            raise QuantError(f"granularity: unknown {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if observer not in OBSERVERS:
            raise QuantError(f"observer: unknown {observer!r}; choose one of {', '.join(OBSERVERS)}")
        if not 50.0 < percentile <= 100.0:
            raise QuantError(f"percentile: must be in (50, 100], got {percentile}")
        self.bits, self.symmetric, self.granularity = int(bits), bool(symmetric), granularity
        self.observer, self.percentile, self.max_samples = observer, float(percentile), int(max_samples)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        if granularity == "tensor":
            shape: tuple[int, ...] = (1,)
        elif granularity == "channel":
            shape = (int(channels),)
        else:
            if not group_size or not in_features:
                raise QuantError("group granularity needs group_size and in_features")
            self.group_size = int(group_size)
            shape = (int(channels), -(-int(in_features) // self.group_size))
        self.channels = int(channels)
        scale = torch.ones(shape)
        if learnable_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("frozen", torch.tensor(False))
        self._lo: torch.Tensor | None = None  # observation state (not persisted: freeze() turns it into scale/zp)
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []

    # -- shapes -------------------------------------------------------------------------------------------------
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x arranged as [..., elements] so that min/max over the last dim gives the per-granularity statistics."""
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        if self.granularity == "channel":
            if x.shape[0] != self.channels:
                raise QuantError(f"per-channel quantizer for {self.channels} channels got shape {tuple(x.shape)}")
            return x.reshape(x.shape[0], -1)
        g, _ = to_groups(x, self.group_size)
        if tuple(g.shape[:2]) != tuple(self.scale.shape):
            raise QuantError(f"group quantizer of shape {tuple(self.scale.shape)} got weight {tuple(x.shape)}")
        return g

    # -- calibration phases -------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of ``x`` (running min/max; a bounded sample for percentile / MSE)."""
        r = self._reduce(x.detach().float())
        lo, hi = r.amin(-1), r.amax(-1)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.observer != "minmax":
            if self.granularity == "tensor":
                flat = r.reshape(-1)
                if flat.numel() > self.max_samples:
                    idx = torch.linspace(0, flat.numel() - 1, self.max_samples).long()
                    flat = flat[idx]
                self._samples.append(flat.clone())
            else:
                self._samples = [r.clone()]  # weights: observed once

    @torch.no_grad()
    def freeze(self) -> None:
        """Turn the observed statistics into scale / zero-point and switch to quantizing."""
        if self._lo is None:
            raise QuantError("freeze() before any observe(): the quantizer has seen no data")
        lo, hi = self._lo, self._hi
        if self.observer == "percentile":
            lo, hi = self._percentile_range()
        scale, zp = affine_params(lo, hi, self.bits, self.symmetric)
        if self.observer == "mse":
            scale, zp = self._mse_search(lo, hi)
        self.scale.data.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.reshape(self.zero_point.shape))
        self.frozen.fill_(True)
        self._lo = self._hi = None
        self._samples = []

    def reset(self) -> None:
        """Forget observations and unfreeze (the next ``freeze`` uses only what is observed from now on)."""
        self._lo = self._hi = None
        self._samples = []
        self.frozen.fill_(False)

    def _stacked_samples(self) -> torch.Tensor:
        if self.granularity == "tensor":
            return torch.cat(self._samples).reshape(1, -1)
        return self._samples[0]

    def _percentile_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._stacked_samples()
        q = self.percentile / 100.0
        if self.symmetric:
            hi = torch.quantile(s.abs(), q, dim=-1) if s.shape[-1] <= 1 << 24 else s.abs().amax(-1)
            return -hi, hi
        return torch.quantile(s, 1.0 - q, dim=-1), torch.quantile(s, q, dim=-1)

    def _mse_search(self, lo: torch.Tensor, hi: torch.Tensor, grid: int = 40, p: float = 2.4):
        s = self._stacked_samples()
        best_err = torch.full(lo.shape, float("inf"))
        best_scale, best_zp = affine_params(lo, hi, self.bits, self.symmetric)
        for i in range(grid):
            alpha = 1.0 - i * (0.8 / grid)  # shrink the range from 100 % down to 20 %
            sc, zp = affine_params(lo * alpha, hi * alpha, self.bits, self.symmetric)
            err = (fake_quant(s, sc.unsqueeze(-1), zp.unsqueeze(-1), self.qmin, self.qmax) - s).abs().pow(p).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, sc, best_scale)
            best_zp = torch.where(better, zp, best_zp)
        return best_scale, best_zp

    # -- quantization -------------------------------------------------------------------------------------------
    def inference_params(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` for the no-grad kernels of :mod:`quant.functional`."""
        return self.scale.detach(), self.zero_point.detach(), self.qmin, self.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x``; a bf16 / fp16 ``x`` in fp32, the result rounded once to its dtype
        (:func:`fake_quant_in_fp32`)."""
        if not bool(self.frozen):
            raise QuantError("quantizer used before calibration (observe + freeze, or load a state_dict)")
        return fake_quant_in_fp32(self._fake_quant, x)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            if not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)):
                # inference fast path: in-place ops, bit-exact with fake_quant and the torch reference op (tested)
                return fake_quant_inference(x, self.scale, self.zero_point, self.qmin, self.qmax)
            return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.granularity == "channel":
            scale, zp = channel_view(self.scale, x.ndim), channel_view(self.zero_point, x.ndim)
            if not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)):
                return fake_quant_channel_inference(x, scale, zp, self.qmin, self.qmax)
            return fake_quant(x, scale, zp, self.qmin, self.qmax)
        g, pad = to_groups(x, self.group_size)
        out = fake_quant(g, self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1), self.qmin, self.qmax)
        return from_groups(out, x.shape, pad)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}, "
                f"observer={self.observer}, shape={tuple(self.scale.shape)}")
