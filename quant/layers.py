"""Quantized Conv2d / Linear with K weight and K' activation quantizer options sharing one FP weight.

A ``QuantLayer`` wraps an existing ``nn.Conv2d`` / ``nn.Linear`` (no copy of its weight). ``set_bits(w, a)`` picks
the option indices (``None``: full precision) in O(1); nothing is recalibrated. ``split`` gives Q-Diffusion's split
quantization of a UNet skip concatenation: input channels ``[:split]`` and ``[split:]`` get separate activation
quantizers (their ranges differ by an order of magnitude).

Bias correction: every weight option carries a ``bias_shift`` buffer (one value per output channel, zero until
:func:`correct_bias` runs) that is added to the layer's bias whenever that option is active. Rounding
errors of a weight tensor are not noise-like: their sum over an output channel's inputs shifts the mean output, and
a diffusion sampler integrates that shift over every step (measured: the one-scale 8-bit ``conv_out`` of the
embedded model alone moved its samples 20x more than random weight noise of twice the size). The shift is
``-E[op(x, W_q - W)]`` over calibration inputs x, the classic bias correction of data-free quantization (Nagel et
al., 2019) measured on data, as PTQD does for diffusion models.

Dtypes: a layer computes in its wrapped module's dtype (``model.dtype``). Every quantizer of a bf16 / fp16 layer
quantizes in fp32 and rounds its result once to that dtype (:func:`tmpq.quant.quantizer.fake_quant_in_fp32`); the
active bias (bias + shift) is summed in fp32 and rounded once; the bias shifts are measured in fp32 on the
layer-dtype quantized weight. An fp32 layer runs exactly as before (every cast a no-op).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.core.choices import ROUNDINGS, TWO_BIT
from tmpq.quant.adaround import AdaRoundQuantizer
from tmpq.quant.binarize import MultiBasisBinarizer
from tmpq.quant.functional import fake_quant_split_inference
from tmpq.quant.quantizer import (
    LOW_PRECISION,
    AffineQuantizer,
    QuantError,
    fake_quant_in_fp32,
)
from tmpq.quant.winograd import (
    WinogradConv2d,
    conv_padding,
    group_stages,
    transformed_input,
    transformed_weight,
    why_not_winograd,
    winograd_conv2d,
)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """A bf16 / fp16 tensor upcast (exactly) to fp32; any other unchanged."""
    return t.float() if t.dtype in LOW_PRECISION else t


class QuantLayer(nn.Module):
    """Base of the quantized wrappers; subclasses implement ``_op(x, w, bias)`` and name their output's channel
    dimension (``channel_dim``)."""

    channel_dim = 1

    def __init__(self, module: nn.Module, w_bits: Sequence[int], a_bits: Sequence[int], *,
                 w_symmetric: bool = True, w_granularity: str = "channel", group_size: int | None = None,
                 w_observer: str = "mse", a_symmetric: bool = False, a_observer: str = "mse",
                 split: int | None = None, w_rounding: str = "nearest", w_two_bit: str = "multibasis",
                 time_groups: int = 1):
        super().__init__()
        self.module = module
        weight = module.weight
        in_features = weight[0].numel()
        self.w_bits, self.a_bits = tuple(int(b) for b in w_bits), tuple(int(b) for b in a_bits)
        if not self.w_bits or not self.a_bits:
            raise QuantError("a quantized layer needs at least one weight and one activation bit option")
        if w_rounding not in ROUNDINGS:
            raise QuantError(f"w_rounding: unknown {w_rounding!r}; choose nearest or adaround")
        if w_two_bit not in TWO_BIT:
            raise QuantError(f"w_two_bit: unknown {w_two_bit!r}; choose multibasis or affine")
        if w_rounding == "adaround" and w_granularity != "channel":
            raise QuantError("w_rounding adaround supports channel granularity only")

        def weight_quantizer(b: int) -> nn.Module:
            if b == 1 or (b == 2 and w_two_bit == "multibasis"):  # BinaryDM-style sign bases, one per bit

                return MultiBasisBinarizer(b, weight.shape[0])
            if w_rounding == "adaround":
                return AdaRoundQuantizer(b, tuple(weight.shape), w_symmetric, w_observer)
            return AffineQuantizer(b, w_symmetric, w_granularity, channels=weight.shape[0], group_size=group_size,
                                   in_features=in_features, observer=w_observer)

        self.w_quant = nn.ModuleList(weight_quantizer(b) for b in self.w_bits)
        for q in self.w_quant:  # per-option output-mean correction, explicit state from __init__ on
            q.register_buffer("bias_shift", torch.zeros(weight.shape[0]))
        self.a_quant = nn.ModuleList(AffineQuantizer(b, a_symmetric, "tensor", observer=a_observer)
                                     for b in self.a_bits)
        self.split = split
        if split is not None:
            in_ch = weight.shape[1]
            if not 0 < split < in_ch:
                raise QuantError(f"split: {split} is not inside the {in_ch} input channels")
            self.a_quant_split = nn.ModuleList(AffineQuantizer(b, a_symmetric, "tensor", observer=a_observer)
                                               for b in self.a_bits)
        self.time_groups = int(time_groups)
        if self.time_groups < 1:
            raise QuantError(f"time_groups: must be >= 1, got {time_groups}")
        if self.time_groups > 1:  # one bank row per timestep group, explicit state from __init__ on
            for q in self.activation_quantizers():
                q.register_buffer("tg_scale", torch.ones(self.time_groups, *q.scale.shape))
                q.register_buffer("tg_zero_point", torch.zeros(self.time_groups, *q.zero_point.shape))
            for q in self.w_quant:
                q.register_buffer("tg_bias_shift", torch.zeros(self.time_groups, weight.shape[0]))
        self.live_group = 0  # the timestep group whose bank row is live (time_groups > 1)
        self.w_index: int | None = None
        self.a_index: int | None = None
        self.observing = False
        self.bias_observing = False
        self._shift_sum: list[torch.Tensor] | None = None
        self._shift_n = 0
        # one quantized weight at most (the active option's), and only when this layer may keep one
        # (``keep_weight``, set by the supernet's weight budget): a copy per visited option made a supernet grow
        # toward (K + 1) times its model
        self.keep_weight = True
        self._w_kept: tuple[int, torch.Tensor] | None = None

    # -- option switching ---------------------------------------------------------------------------------------
    def set_bits(self, w_index: int | None, a_index: int | None) -> None:
        """Select weight / activation options by index (``None`` = full precision)."""
        if w_index is not None and not 0 <= w_index < len(self.w_quant):
            raise QuantError(f"weight option index {w_index} out of range for {len(self.w_quant)} options")
        if a_index is not None and not 0 <= a_index < len(self.a_quant):
            raise QuantError(f"activation option index {a_index} out of range for {len(self.a_quant)} options")
        self.w_index, self.a_index = w_index, a_index

    def activation_quantizers(self) -> list[AffineQuantizer]:
        """Every activation quantizer of this layer (each option, both halves of a split input)."""
        return list(self.a_quant) + (list(self.a_quant_split) if self.split is not None else [])

    # -- timestep groups ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def store_time_group(self, g: int) -> None:
        """Copy the live activation ranges and bias corrections of every option into bank row ``g``."""
        for q in self.activation_quantizers():
            q.tg_scale[g].copy_(q.scale.detach())
            q.tg_zero_point[g].copy_(q.zero_point)
        for q in self.w_quant:
            q.tg_bias_shift[g].copy_(q.bias_shift)
        self.live_group = g

    @torch.no_grad()
    def load_time_group(self, g: int) -> None:
        """Make bank row ``g`` live: a few small copies per option, no recalibration."""
        for q in self.activation_quantizers():
            q.scale.data.copy_(q.tg_scale[g])
            q.zero_point.copy_(q.tg_zero_point[g])
        for q in self.w_quant:
            q.bias_shift.copy_(q.tg_bias_shift[g])
        self.live_group = g

    # -- calibration --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_weights(self) -> None:
        """Observe the FP weight once and freeze every weight option."""
        for q in self.w_quant:
            q.observe(self.module.weight)
            q.freeze()
            if hasattr(q, "init_rounding"):
                q.init_rounding(self.module.weight)
        self._w_kept = None

    def freeze_activations(self, index: int | None = None) -> None:
        """Freeze the activation option(s) observed so far (all if ``index`` is None)."""
        idx = range(len(self.a_quant)) if index is None else [index]
        for i in idx:
            self.a_quant[i].freeze()
            if self.split is not None:
                self.a_quant_split[i].freeze()

    # -- forward ------------------------------------------------------------------------------------------------
    def _quantize_weight(self, q: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``q(weight)`` in the weight's dtype: a bf16 / fp16 weight quantized in fp32 and rounded once."""
        return fake_quant_in_fp32(q, weight)

    def quantized_weight(self) -> torch.Tensor:
        if self.w_index is None:
            return self.module.weight
        q = self.w_quant[self.w_index]
        if torch.is_grad_enabled() and (self.module.weight.requires_grad or any(p.requires_grad for p in q.parameters())):
            return self._quantize_weight(q, self.module.weight)
        weight = self.module.weight
        kept = self._w_kept
        if kept is not None and kept[0] == self.w_index and kept[1].stride() == weight.stride():
            return kept[1]
        # built in the weight's memory format: a channels-last model must not convert its weights in every conv
        # call (empty_like keeps the weight's strides)
        w = torch.empty_like(weight).copy_(self._quantize_weight(q, weight).detach())
        self._w_kept = (self.w_index, w) if self.keep_weight else None
        return w

    def invalidate_cache(self) -> None:
        """Forget the kept quantized weight (call after changing weights or weight-quantizer state)."""
        self._w_kept = None

    def kept_weight_bytes(self) -> int:
        """Bytes of the quantized weight this layer keeps now (0 or one weight's size)."""
        return 0 if self._w_kept is None else self._w_kept[1].numel() * self._w_kept[1].element_size()

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the active activation option quantizes it (fake quantization; unchanged at full precision)."""
        return self._act(x)

    def linear_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The wrapped conv / Linear applied with weight ``w`` and ``bias`` (stride, padding etc. its own)."""
        return self._op(x, w, bias)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_index is None:
            return x
        if self.split is None:
            if self.observing:
                self.a_quant[self.a_index].observe(x)
                return x
            return self.a_quant[self.a_index](x)
        a, b = x[:, : self.split], x[:, self.split:]
        qa, qb = self.a_quant[self.a_index], self.a_quant_split[self.a_index]
        if self.observing:
            qa.observe(a)
            qb.observe(b)
            return x
        grads = torch.is_grad_enabled() and (x.requires_grad or qa.scale.requires_grad or qb.scale.requires_grad)
        if not grads and qa.granularity == qb.granularity == "tensor" and bool(qa.frozen) and bool(qb.frozen):
            # (the kernel casts the parameters to the input's dtype: a bf16 / fp16 input goes through it in fp32)
            return fake_quant_in_fp32(lambda v: fake_quant_split_inference(v, self.split, qa.inference_params(),
                                                                           qb.inference_params()), x)
        return torch.cat([qa(a), qb(b)], dim=1)

    # -- bias correction ------------------------------------------------------------------------------------------
    def begin_bias_correction(self) -> None:
        """Start accumulating, on the (FP) inputs of the following forwards, each weight option's output shift."""
        self.bias_observing = True
        self._shift_sum, self._shift_n = None, 0

    @torch.no_grad()
    def _observe_shift(self, x: torch.Tensor) -> None:
        # in fp32 (no-ops for an fp32 layer): the shift of the weight the layer will use, on its exact inputs
        w = self.module.weight
        sums = []
        for q in self.w_quant:
            d = self._op(_fp32(x), _fp32(self._quantize_weight(q, w).detach()) - _fp32(w), None)
            c = self.channel_dim % d.ndim
            sums.append(d.double().sum(dim=[i for i in range(d.ndim) if i != c]))
        n = d.numel() // d.shape[c]
        self._shift_sum = sums if self._shift_sum is None else [a + b for a, b in zip(self._shift_sum, sums)]
        self._shift_n += n

    @torch.no_grad()
    def end_bias_correction(self) -> None:
        """Store ``-mean shift`` of every weight option in its ``bias_shift`` buffer."""
        self.bias_observing = False
        if self._shift_sum is None:
            raise QuantError("bias correction saw no inputs")
        for q, s in zip(self.w_quant, self._shift_sum):
            q.bias_shift.copy_((-s / self._shift_n).to(q.bias_shift.dtype))
        self._shift_sum, self._shift_n = None, 0

    def active_bias(self) -> torch.Tensor | None:
        """The wrapped module's bias plus the active weight option's ``bias_shift`` (``None`` only when both are)."""
        b = self.module.bias
        if self.w_index is None:
            return b
        shift = self.w_quant[self.w_index].bias_shift  # fp32: summed in fp32, rounded once to the layer's dtype
        return (shift if b is None else b + shift).to(self.module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_observing:
            self._observe_shift(x)
            return self._op(x, self.module.weight, self.module.bias)
        return self._op(self._act(x), self.quantized_weight(), self.active_bias())

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def load_state_dict(self, *args, **kwargs):
        self._w_kept = None
        return super().load_state_dict(*args, **kwargs)


class WinogradTile(nn.Module):
    """The Winograd F(m, 3) option of one conv at one tile size m: ``U``'s quantizer per weight option (symmetric, one
    grid per tile position x output channel, the layer's weight observer) and ``V``'s ranges per activation option
    and tile position (``v_lo`` / ``v_hi`` [activation options, alpha^2]; +-inf until observed)."""

    def __init__(self, conv: nn.Conv2d, m: int, w_bits: Sequence[int], a_options: int, w_observer: str):
        super().__init__()
        self.m = int(m)
        p = (self.m + 2) ** 2
        self.u_quant = nn.ModuleList(AffineQuantizer(b, True, "channel", channels=p * conv.out_channels,
                                                     observer=w_observer) for b in w_bits)
        self.register_buffer("v_lo", torch.full((a_options, p), float("inf")))
        self.register_buffer("v_hi", torch.full((a_options, p), float("-inf")))

    @torch.no_grad()
    def calibrate_weights(self, weight: torch.Tensor) -> None:
        """Observe the transformed weight once and freeze every weight option's ``U`` grid; forget ``V``'s ranges
        (a calibration starts afresh)."""
        u = transformed_weight(weight, self.m)
        for q in self.u_quant:
            q.reset()
            q.observe(u)
            q.freeze()
        self.v_lo.fill_(float("inf"))
        self.v_hi.fill_(float("-inf"))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, a_index: int, padding: tuple[int, int]) -> None:
        """Widen activation option ``a_index``'s ``V`` ranges to cover the tiles of ``x`` (in float32)."""
        v = transformed_input(x.float() if x.dtype in LOW_PRECISION else x, self.m, padding).float()
        self.v_lo[a_index] = torch.minimum(self.v_lo[a_index], v.amin((1, 2)))
        self.v_hi[a_index] = torch.maximum(self.v_hi[a_index], v.amax((1, 2)))


class QuantConv2d(QuantLayer):
    """``nn.Conv2d`` with switchable quantizer options (shares the wrapped module's weight and bias).

    With :meth:`add_winograd` (a 3x3, stride-1 conv of a supernet with ``winograd`` tiles) it also holds, per tile
    size m, a Winograd F(m, 3) option (:class:`WinogradTile`) that serves every (w, a) option: ``algo`` = m runs
    :func:`tmpq.quant.winograd.winograd_conv2d` with ``U`` on the active weight option's grid and ``V`` on the active
    activation option's per-position ranges, no input / ``M`` quantization, and the conv's own bias (no bias
    correction: what :class:`tmpq.quant.winograd.WinogradConv2d` and its int8 path run). ``V``'s ranges are observed
    while the layer observes its activation ranges, one set for every timestep group and guidance pass (they are not
    banked: the time-group routing switches the direct option's ranges only). ``U`` is recomputed at every call
    (never kept: a kept ``U`` would be alpha^2 / 9 times the weight). Full precision (no option active) is always the
    direct conv."""

    wino_tiles: tuple[int, ...] = ()
    algo = 0

    def add_winograd(self, tiles: Sequence[int], w_observer: str = "mse") -> None:
        """Give this conv a Winograd option per tile size in ``tiles``, ``U`` observed by ``w_observer`` (refused,
        one line, for an ineligible conv or a 1-bit weight option)."""
        why = why_not_winograd(self.module)
        if why is not None:
            raise QuantError(f"Winograd: {why}")
        self.wino_tiles = tuple(int(m) for m in tiles)
        self.wino = nn.ModuleList(WinogradTile(self.module, m, self.w_bits, len(self.a_bits), w_observer)
                                  for m in self.wino_tiles).to(self.module.weight.device)
        self.algo = 0

    def set_algo(self, m: int) -> None:
        """Direct convolution (0) or the Winograd option of tile size ``m``."""
        if m and m not in self.wino_tiles:
            raise QuantError(f"Winograd tile {m} is not an option of this layer (tiles {list(self.wino_tiles)})")
        self.algo = int(m)

    def calibrate_weights(self) -> None:
        super().calibrate_weights()
        for tile in getattr(self, "wino", ()):
            tile.calibrate_weights(self.module.weight)

    def winograd_stages(self) -> dict:
        """The active Winograd option's ``U`` / ``V`` fake quantizers (:func:`tmpq.quant.winograd.group_stages`)."""
        tile = self.wino[self.wino_tiles.index(self.algo)]
        aq = self.a_quant[self.a_index]
        return group_stages(tile.u_quant[self.w_index], tile.v_lo[self.a_index], tile.v_hi[self.a_index], aq.bits,
                            aq.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wino_tiles and not self.bias_observing and self.a_index is not None:
            if self.observing:
                for tile in self.wino:
                    tile.observe(x, self.a_index, conv_padding(self.module))
            elif self.algo and self.w_index is not None:
                dtype = x.dtype
                y = winograd_conv2d(x.float() if dtype in LOW_PRECISION else x, self.module.weight, self.module.bias,
                                    self.algo, conv_padding(self.module), stages=self.winograd_stages())
                return y.to(dtype)
        return super().forward(x)

    def winograd_module(self) -> WinogradConv2d:
        """The live Winograd option as a calibrated standalone :class:`tmpq.quant.winograd.WinogradConv2d` over the
        same conv (its ``U`` grid and ``V`` ranges copied; the same outputs)."""
        if not self.algo or self.w_index is None or self.a_index is None:
            raise QuantError("winograd_module: no Winograd option is active (set_algo and set_bits first)")
        tile = self.wino[self.wino_tiles.index(self.algo)]
        uq, aq = tile.u_quant[self.w_index], self.a_quant[self.a_index]
        wc = WinogradConv2d(self.module, self.algo, uq.bits, aq.bits, "group", w_observer=uq.observer,
                            a_symmetric=aq.symmetric).to(self.module.weight.device)
        with torch.no_grad():
            wc.u_quant.load_state_dict(uq.state_dict())
            wc.v_lo.copy_(tile.v_lo[self.a_index])
            wc.v_hi.copy_(tile.v_hi[self.a_index])
            wc.observed.fill_(True)
            wc.frozen.fill_(True)
        return wc

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = self.module
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            return F.conv2d(x, w, bias, m.stride, 0, m.dilation, m.groups)
        return F.conv2d(x, w, bias, m.stride, m.padding, m.dilation, m.groups)


class QuantLinear(QuantLayer):
    """``nn.Linear`` with switchable quantizer options (shares the wrapped module's weight and bias)."""

    channel_dim = -1

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, bias)


@torch.no_grad()
def correct_bias(layers: Iterable[QuantLayer], run: Callable[[], object]) -> None:
    """Bias correction of every weight option of ``layers``: while ``run()`` drives the model, each layer passes its
    FP output through and accumulates, on its FP inputs, every option's mean output shift; the shifts are then
    stored (``end_bias_correction``). The layers' option indices are left as they were."""
    layers = list(layers)
    for layer in layers:
        layer.begin_bias_correction()
    try:
        run()
    finally:
        for layer in layers:
            layer.bias_observing = False
    for layer in layers:
        layer.end_bias_correction()


WRAPPERS: dict[type, type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def wrap(module: nn.Module, **kwargs) -> QuantLayer:
    """Wrap a module through the type -> wrapper registry.

    Example:
        >>> q = wrap(nn.Linear(4, 3), w_bits=(8, 4), a_bits=(8,))
        >>> type(q).__name__
        'QuantLinear'
    """
    for cls in type(module).__mro__:
        if cls in WRAPPERS:
            return WRAPPERS[cls](module, **kwargs)
    raise QuantError(f"no quantized wrapper registered for {type(module).__name__}")


def replace_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``fqn`` of ``root`` (the one module-replacement path of the supernet's
    wrapping and the int8 deployment)."""
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
