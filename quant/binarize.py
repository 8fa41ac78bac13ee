"""BinaryDM-style multi-basis binarizer for 1- and 2-bit weight options.

``MultiBasisBinarizer`` represents each output channel of a weight as a sum of ``bases`` scaled sign tensors,

    w ~ a_1 * sign(r_1) + a_2 * sign(r_2) + ...,   r_1 = w,  r_{i+1} = r_i - a_i * sign(r_i),

one basis per bit (1 bit: XNOR-Net's a * sign(w); 2 bits: the two-basis binarizer of BinaryDM's learnable multi-basis
binarizer). The per-channel scales ``alpha`` (shape ``[bases, channels]``, created in ``__init__``) start at the
L2-optimal greedy values a_i = mean |r_i| and are ``nn.Parameter`` s, so brief re-training (``quant.distill``) tunes
them by gradient; the signs pass straight-through gradients to the weight when the weight itself is trained.

Same life cycle as ``AffineQuantizer``: ``observe(w)`` -> ``freeze()`` -> ``forward(w)``; a quantizer that was never
frozen refuses to run.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tmpq.quant.functional import channel_view
from tmpq.quant.quantizer import QuantError

BINARY_BITS = (1, 2)


def _ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 and a straight-through (clipped identity) gradient."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if not x.requires_grad:
        return s
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (s - clipped).detach()


class MultiBasisBinarizer(nn.Module):
    """Per-output-channel multi-basis binarization of a weight (``bits`` bases).

    Example:
        >>> q = MultiBasisBinarizer(2, channels=3)
        >>> w = torch.randn(3, 8)
        >>> q.observe(w); q.freeze()
        >>> len(torch.unique(q(w)[0]))  # two bases: at most four levels per channel
        4
    """

    granularity = "multibasis"
    symmetric = True

    def __init__(self, bits: int, channels: int):
        super().__init__()
        if bits not in BINARY_BITS:
            raise QuantError(f"bits: the multi-basis binarizer takes 1 or 2 bits, got {bits}")
        self.bits, self.bases, self.channels = int(bits), int(bits), int(channels)
        self.alpha = nn.Parameter(torch.ones(self.bases, self.channels), requires_grad=False)
        self.register_buffer("frozen", torch.tensor(False))
        self._w: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, w: torch.Tensor) -> None:
        if w.shape[0] != self.channels:
            raise QuantError(f"binarizer for {self.channels} channels got weight {tuple(w.shape)}")
        self._w = w.detach().float().clone()

    @torch.no_grad()
    def freeze(self) -> None:
        """Greedy residual fit: a_i = mean |r_i| per channel (the L2-optimal scale of each sign basis)."""
        if self._w is None:
            raise QuantError("freeze() before any observe(): the binarizer has seen no weight")
        r = self._w.reshape(self.channels, -1)
        for i in range(self.bases):
            a = r.abs().mean(-1).clamp(min=1e-8)
            self.alpha.data[i].copy_(a)
            r = r - a[:, None] * torch.where(r >= 0, 1.0, -1.0)
        self.frozen.fill_(True)
        self._w = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen):
            raise QuantError("binarizer used before calibration (observe + freeze, or load a state_dict)")
        out = torch.zeros_like(w)
        r = w
        for i in range(self.bases):
            a = channel_view(self.alpha[i], w.ndim)
            s = _ste_sign(r)
            out = out + a * s
            r = r - a.detach() * s  # the scales get gradient from their own basis only
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bases={self.bases}, channels={self.channels}"
