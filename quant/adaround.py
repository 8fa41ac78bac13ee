"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round up or down.

``AdaRoundQuantizer`` is an ``AffineQuantizer`` (weights, fixed scale from its observer) plus a learnable rounding
variable ``alpha`` of the weight's shape, created in ``__init__``. ``soft`` mode uses the rectified sigmoid
h(alpha) in [0, 1]; ``hard`` mode uses alpha >= 0. Before any learning, ``init_rounding(w)`` sets alpha so that the
soft weight equals the FP weight and the hard weight equals round-to-nearest.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tmpq.quant.functional import channel_view
from tmpq.quant.quantizer import AffineQuantizer, QuantError

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(AffineQuantizer):
    def __init__(self, bits: int, weight_shape: tuple[int, ...], symmetric: bool = True, observer: str = "mse"):
        super().__init__(bits, symmetric, "channel", channels=weight_shape[0], observer=observer)
        self.alpha = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.register_buffer("hard", torch.tensor(True))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    @torch.no_grad()
    def init_rounding(self, w: torch.Tensor) -> None:
        """Set alpha so that soft rounding reproduces ``w`` and hard rounding is round-to-nearest."""
        if not bool(self.frozen):
            raise QuantError("init_rounding() needs a frozen scale (observe + freeze first)")
        s = channel_view(self.scale, w.ndim)
        rest = (w / s - torch.floor(w / s)).clamp(1e-4, 1 - 1e-4)
        self.alpha.copy_(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen):
            raise QuantError("quantizer used before calibration (observe + freeze, or load a state_dict)")
        s = channel_view(self.scale, w.ndim)
        zp = channel_view(self.zero_point, w.ndim)
        r = (self.alpha >= 0).to(w.dtype) if bool(self.hard) else self.h()
        q = torch.clamp(torch.floor(w / s).detach() + r + zp, self.qmin, self.qmax)
        return (q - zp) * s

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes h(alpha) to 0 or 1: sum(1 - |2 h - 1| ** beta)."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()
