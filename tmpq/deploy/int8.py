"""Real low-bit kernels on CPU for an exported model (``apply_export(..., kernels="int8")``, ``tmpq speed``).

PyTorch's oneDNN int8 kernels (``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``, the ones PyTorch's
own x86 int8 lowering uses) take uint8 activations with a static per-tensor scale and zero-point, int8 weights with
per-output-channel scales, accumulate in int32 and return float32. Every exported option of <= 8 bits is an integer
grid times its scales, so both operands are stored *exactly*: the activations are quantized with the exported,
calibrated A-bit quantizer (same rounding, same clamp to its 2^A levels, shifted into uint8) and the weights are the
exported grid. An int8 layer therefore computes what fake quantization computes, up to float rounding (tested).

Not ``torch.ao.nn.quantized.dynamic.Conv2d``: that kernel requantizes its *output* to 8 bits with the input's scale
and zero-point before dequantizing, so every output outside the input's range is clipped (measured: 65 % relative
error on one resnet conv of the embedded UNet, FID 34 instead of 0.6 for a whole export).

The kernels are not exact on every CPU: without VNNI (``avx512_vnni`` / ``avx_vnni`` / AMX), oneDNN multiplies u8 x s8
with ``vpmaddubsw``, which sums each pair of products in 16 bits and saturates (measured here with
``ONEDNN_MAX_CPU_ISA=AVX2``: 8-bit activations x 8-bit weights, 1.2 % relative MSE on random operands). A probe tells
whether this process's kernels saturate; where they do, a layer whose pair sums can exceed 32767 runs its weights as
two halves that cannot (``w = a + b``, ``|a|, |b| <= 32767 // (2 x top activation level)``, one kernel call on
twice the output channels, summed: exact). Whatever the CPU, every converted layer is then checked against its
fake-quant twin on real inputs (the ``probe`` run); a layer that disagrees beyond float rounding falls back, named,
with the measured error and what the CPU lacks.

A layer falls back to fake quantization (and is named as such) when the kernels cannot run it exactly: weight bits
above 8, asymmetric, group-wise or multi-basis binarized weights, activations above 8 bits (the default pins the
first and last layers' inputs at 16) or not per tensor, full-precision activations, a non-zeros or string padding,
a grouped conv; all of them when this PyTorch build has no oneDNN int8 kernels.
"""
from __future__ import annotations

import copy
import functools
import os
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from tmpq.core.adapters import adapter_for, denoise, denoiser_of, sample_shape
from tmpq.core.devices import cpu_allocator
from tmpq.core.model import load_model
from tmpq.core.rowlog import cpu_info
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
# bundle deploys this module's kernels (apply_export(kernels="int8")) and measure_speed loads exports through
# bundle: each imports the other as a module, whose names are read at call time, so either may load first
from tmpq.deploy import bundle
from tmpq.deploy import winograd_int8
from tmpq.deploy.plan import CHECK_TOL, FP_BITS, LayerOption, QuantPlan, capture_inputs
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import embedded_reference, score_features
from tmpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear, replace_module


def onednn_available() -> bool:
    return all(hasattr(torch.ops.onednn, op) for op in ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack",
                                                        "qlinear_pointwise"))


_INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def kernels_saturate() -> bool:
    """Whether this process's oneDNN u8 x s8 kernels sum product pairs in 16 bits and saturate (no VNNI), probed
    once: 4 x 255 x 127 = 129,540 exactly, or less when a pair is clamped at 32,767."""
    if not onednn_available():
        return False
    u = torch.full((1, 4), 255, dtype=torch.uint8)
    w = torch.full((1, 4), 127, dtype=torch.int8)
    one = torch.ones(1)
    y = _qlinear(u, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None), one, torch.zeros(1, dtype=torch.int64), None)
    return float(y.reshape(-1)[0]) != 4 * 255 * 127


def cpu_int8_features() -> dict:
    """The CPU and what its int8 kernels do: ``{"cpu", "int8_isa", "onednn_max_cpu_isa", "saturating_pairs"}``."""
    model, flags = cpu_info()
    return {"cpu": model, "int8_isa": [f for f in _INT8_FLAGS if f in flags],
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "saturating_pairs": kernels_saturate()}


def describe_cpu_int8(feat: dict | None = None) -> str:
    """One line: the CPU, its int8 instruction sets and whether the kernels saturate."""
    f = feat or cpu_int8_features()
    cap = f" (oneDNN capped at {f['onednn_max_cpu_isa']})" if f["onednn_max_cpu_isa"] else ""
    how = ("u8 x s8 pairs summed in 16 bits, saturating: layers that could overflow run split weights"
           if f["saturating_pairs"] else "u8 x s8 summed in 32 bits (exact)")
    return f"{f['cpu']}; int8 ISA: {', '.join(f['int8_isa']) or 'none'}{cap}; kernels: {how}"


def _lacks() -> str:
    """What this CPU lacks for exact int8, for a fallback's reason."""
    _, flags = cpu_info()
    missing = [f for f in _VNNI_FLAGS if f not in flags]
    if kernels_saturate():
        return f"; this CPU's kernels lack VNNI ({' / '.join(missing) or 'capped by ONEDNN_MAX_CPU_ISA'}): " \
               f"u8 x s8 pairs saturate at 16 bits"
    return ""


def why_not_w8a8(layer: QuantLayer) -> str | None:
    """Why the layer's live option is not an int8 weight grid times per-channel scales on 8-bit per-tensor
    activations, or its geometry not one the kernels take (None: it runs W8A8), whatever the kernels (also used by
    :mod:`tmpq.deploy.torchao_int8`)."""
    return LayerOption.of(layer).why_not_w8a8() or why_not_geometry(layer)


def why_not_geometry(layer: QuantLayer) -> str | None:
    """What of a layer's module (not of its option) the int8 kernels do not take (None: nothing)."""
    if isinstance(layer, QuantConv2d):
        m = layer.module
        if m.padding_mode != "zeros":
            return f"padding_mode {m.padding_mode}"
        if isinstance(m.padding, str):
            return f"padding {m.padding!r}"
        if m.groups != 1:
            return f"grouped conv (groups = {m.groups})"
    return None


def _int8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exported weight grid as int8 integers (checked exact)."""
    s = scale.double().reshape(-1, *([1] * (w.dim() - 1)))
    wi = torch.round(w.double() / s)
    if wi.min() < -128 or wi.max() > 127 or not torch.equal((wi * s).float(), w):
        raise AssertionError("an int8 weight does not hold the exported grid")
    return wi.to(torch.int8)


@functools.cache
def _fused_quantize_available() -> bool:
    """Probed once per process. quint8 tensor creation is deprecated upstream (its kernel still runs) and PyTorch
    warns about it once per process: the probe takes that warning, so the per-layer calls need no filter."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8).int_repr()
        return True
    except (AttributeError, RuntimeError):
        return False


class _StaticInput:
    """The exported activation quantizer as uint8: q = clamp(round(x / s) + zp, qmin, qmax) shifted by -qmin.

    One fused pass where PyTorch still has it (``torch.quantize_per_tensor`` to quint8 with the zero-point shifted by
    -qmin: the same x * (1 / s), round-half-even and clamp as fake quantization) and its bytes (viewed, not copied by
    ``int_repr``); options below 8 bits
    clamp the bytes to their 2^A levels afterwards. Otherwise four in-place float passes and a cast (measured on the
    embedded UNet: the input quantization took ~40 % of an int8 forward that way, about a quarter fused).
    """

    def __init__(self, aq):
        self.scale = float(aq.scale.detach().reshape(-1)[0])
        self.inv = 1.0 / aq.scale.detach().reshape(-1)[0]  # the float32 reciprocal fake quantization multiplies by
        self.zp, self.qmin, self.qmax = float(aq.zero_point.detach().reshape(-1)[0]), aq.qmin, aq.qmax
        self.zp_u8 = int(self.zp) - self.qmin
        self.top = self.qmax - self.qmin  # the largest byte value of this option
        self.fused = _fused_quantize_available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q = torch.quantize_per_tensor(x, self.scale, self.zp_u8, torch.quint8)
            # its bytes as a uint8 view of the same storage: int_repr() would copy them (~7 % of an int8 call)
            u = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
            return u.clamp_(0, self.top) if self.top < 255 else u
        # round(x / s) + zp - qmin: the integer shift after rounding keeps the ties of fake quantization
        return torch.round(x * self.inv).add_(self.zp_u8).clamp_(0, self.top).to(torch.uint8)


def _qconv(u, scale, zp, packed, w_scale, w_zp, bias, args):
    return torch.ops.onednn.qconv2d_pointwise(u, scale, zp, packed, w_scale, w_zp, bias, *args, 1.0, 0,
                                              torch.float32, "none", [], None)


def _qlinear(u, scale, zp, packed, w_scale, w_zp, bias):
    return torch.ops.onednn.qlinear_pointwise(u, scale, zp, packed, w_scale, w_zp, bias, 1.0, 0, torch.float32,
                                              "none", [], "")


# The kernels every int8 module calls, looked up at call time (a test swaps in a wrong one to see the check catch it)
_KERNELS: dict[str, Callable] = {"conv": _qconv, "linear": _qlinear}


def _weight_parts(wi: torch.Tensor, top: int) -> tuple[torch.Tensor, int]:
    """The int8 weight, with the output channels of its two halves stacked where 16-bit pair sums could saturate.

    Without VNNI a pair ``u1 w1 + u2 w2`` (``u <= top``) is clamped to 16 bits; it cannot be when
    ``2 top max|w| <= 32767``. Otherwise ``w = a + b`` with ``a = clamp(w, -lim, lim)``, ``lim = 32767 // (2 top)``
    (64 for 8-bit activations, so ``|b| <= 64`` too): both halves are exact and their outputs sum to the layer's.
    Returns the (possibly stacked) weight and the number of parts."""
    lim = 32767 // (2 * max(top, 1))
    if not kernels_saturate() or int(wi.abs().max()) <= lim:
        return wi, 1
    a = wi.to(torch.int16).clamp(-lim, lim)
    b = wi.to(torch.int16) - a
    if int(b.abs().max()) > lim:  # pragma: no cover - |w| <= 128 and lim >= 64 make this impossible
        raise AssertionError("an int8 weight does not split into two non-saturating halves")
    return torch.cat([a, b]).to(torch.int8), 2


class _Int8Op(nn.Module):
    """What a oneDNN int8 layer holds: the input quantizer, the packed weight (``pack(int8 weight, scales, input)``),
    weight scales and zero-points (all 0: symmetric), the float bias, and the number of weight parts whose outputs
    are summed (1, or 2 where 16-bit pair sums could saturate)."""

    def __init__(self, w: torch.Tensor, w_scale: torch.Tensor, bias, aq, pack: Callable):
        super().__init__()
        self.inp = _StaticInput(aq)
        wi, self.parts = _weight_parts(_int8_weight(w, w_scale), self.inp.top)
        self.out_ch = w.shape[0]
        self.w_scale = w_scale.float().repeat(self.parts).contiguous()
        self.w_zp = torch.zeros_like(self.w_scale, dtype=torch.int64)
        if bias is not None and self.parts > 1:
            bias = torch.cat([bias, torch.zeros((self.parts - 1) * self.out_ch, dtype=bias.dtype)])
        self.bias = bias
        self.packed = pack(wi, self.w_scale, self.inp)

    def _sum_parts(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from the kernel's: the parts' output channels (dim 1) summed."""
        if self.parts == 1:
            return y
        a, b = y.split(self.out_ch, dim=1)
        return a + b


class Int8Conv2d(_Int8Op):
    """A conv on oneDNN's static int8 kernel with float32 output (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, w: torch.Tensor, w_scale: torch.Tensor, bias, aq):
        args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        super().__init__(w, w_scale, bias, aq, lambda wi, scale, inp: torch.ops.onednn.qconv_prepack(
            wi.contiguous(memory_format=torch.channels_last), scale, inp.scale, inp.zp_u8, *args, None))
        self.args = args

    def forward(self, x):
        u = self.inp(x).contiguous(memory_format=torch.channels_last)
        y = _KERNELS["conv"](u, self.inp.scale, self.inp.zp_u8, self.packed, self.w_scale, self.w_zp, self.bias,
                             self.args)
        return self._sum_parts(y)


class Int8Linear(_Int8Op):
    """A Linear on oneDNN's static int8 kernel with float32 output; any leading dimensions."""

    def __init__(self, w: torch.Tensor, w_scale: torch.Tensor, bias, aq):
        super().__init__(w, w_scale, bias, aq, lambda wi, scale, inp: torch.ops.onednn.qlinear_prepack(wi, None))

    def forward(self, x):
        lead = x.shape[:-1]
        u = self.inp(x.reshape(-1, x.shape[-1])).contiguous()
        y = _KERNELS["linear"](u, self.inp.scale, self.inp.zp_u8, self.packed, self.w_scale, self.w_zp, self.bias)
        return self._sum_parts(y).reshape(*lead, self.out_ch)


class SplitInt8Conv2d(nn.Module):
    """A conv over a skip concatenation as two int8 convs over its halves (exact: conv is linear in its input),
    each with its half's own activation quantizer, as split quantization has it."""

    def __init__(self, a: nn.Module, b: nn.Module, split: int):
        super().__init__()
        self.a, self.b, self.split = a, b, split

    def forward(self, x):
        return self.a(x[:, : self.split]) + self.b(x[:, self.split:])


class TimeGroupedInt8(nn.Module):
    """One int8 module per timestep group (``supernet.time_groups``: each group its own input ranges and bias
    corrections, the same weight grid); runs the one of the group the supernet's timestep routing made live."""

    def __init__(self, per_group: list[nn.Module], layer: QuantLayer):
        super().__init__()
        self.per_group = nn.ModuleList(per_group)
        object.__setattr__(self, "source", layer)  # the replaced layer: its live_group follows the routing

    def forward(self, x):
        return self.per_group[self.source.live_group](x)


def _int8_module(layer: QuantLayer) -> nn.Module:
    if layer.time_groups > 1:
        live = layer.live_group
        try:
            per_group = []
            for g in range(layer.time_groups):
                layer.load_time_group(g)
                per_group.append(_int8_single(layer))
        finally:
            layer.load_time_group(live)
        return TimeGroupedInt8(per_group, layer)
    return _int8_single(layer)


def _int8_single(layer: QuantLayer) -> nn.Module:
    q = layer.w_quant[layer.w_index]
    w = layer.quantized_weight().detach().float().contiguous()
    scale = q.scale.detach().reshape(-1).float()
    if scale.numel() == 1:
        scale = scale.expand(w.shape[0]).contiguous()
    m = layer.module
    bias = layer.active_bias()  # the layer's bias plus the active option's bias correction
    bias = None if bias is None else bias.detach().float().contiguous()
    aq = layer.a_quant[layer.a_index]
    if isinstance(layer, QuantConv2d):
        if layer.split is not None:
            s = layer.split
            return SplitInt8Conv2d(Int8Conv2d(m, w[:, :s].contiguous(), scale, bias, aq),
                                   Int8Conv2d(m, w[:, s:].contiguous(), scale, None,
                                              layer.a_quant_split[layer.a_index]), s)
        return Int8Conv2d(m, w, scale, bias, aq)
    return Int8Linear(w, scale, bias, aq)


@torch.no_grad()
def check_layer(layer: QuantLayer, module: nn.Module, xs: list[torch.Tensor]) -> dict:
    """How far an int8 module is from its fake-quant twin on inputs ``xs`` (the twin's live time group).

    ``err``: the largest ``|int8 - fake quant|`` as a fraction of the exact magnitude behind that output,
    ``sum |x_q| |w_q| + |bias|`` (what float rounding scales with); ``rel_mse``: ``||int8 - fq||^2 / ||fq||^2``."""
    w = layer.quantized_weight().detach()
    bias = layer.active_bias()
    err, num, den = 0.0, 0.0, 0.0
    for x in xs:
        want, got = layer(x), module(x)
        mass = layer.linear_op(layer.quantized_input(x).abs(), w.abs(), None if bias is None else bias.abs())
        d = (got - want).abs()
        err = max(err, float((d / mass.clamp_min(torch.finfo(mass.dtype).tiny)).max()))
        num += float(d.double().pow(2).sum())
        den += float(want.double().pow(2).sum())
    return {"err": err, "rel_mse": num / den if den else float(num > 0)}


def _check_module(layer: QuantLayer, module: nn.Module, inputs: dict[int, list[torch.Tensor]]) -> dict:
    """``check_layer`` over every time group of the layer (each on its own group's inputs, or any where the probe
    never reached the group): the worst of them."""
    if not isinstance(module, TimeGroupedInt8):
        return check_layer(layer, module, [x for xs in inputs.values() for x in xs])
    live, worst = layer.live_group, {"err": 0.0, "rel_mse": 0.0}
    try:
        for g, m in enumerate(module.per_group):
            layer.load_time_group(g)
            c = check_layer(layer, m, inputs.get(g) or [x for xs in inputs.values() for x in xs])
            worst = {k: max(worst[k], c[k]) for k in worst}
    finally:
        layer.load_time_group(live)
    return worst


def convert_checked(unet: nn.Module, plan: QuantPlan, make_kernel: Callable[[str, QuantLayer], nn.Module],
                    probe: Callable[[nn.Module], object], *,
                    why_not: Callable[[str, QuantLayer], str | None] | None = None,
                    convert: Callable[[nn.Module, dict], None] | None = None, tol: float = CHECK_TOL,
                    per_group: int = 2, what: str = "int8 kernel", lacks: Callable[[], str] | None = None,
                    backend: str | None = None) -> tuple[nn.Module, list[dict]]:
    """The one convert -> check -> fall back loop of every real-kernel backend (in place).

    A quantized layer converts when ``plan`` runs it W8A8 (:meth:`QuantPlan.why_not_w8a8`) and the backend's
    ``why_not(fqn, layer)`` has no objection: ``make_kernel(fqn, layer)`` builds its module, which replaces the
    layer; ``convert(unet, {fqn: module})``, if given, then runs once over all of them (torchao's ``quantize_``).
    ``probe(unet)`` has run the fake-quant model on real inputs first; each converted module is checked on the inputs
    its layer saw there (:func:`check_layer`, every time group) and stays only when its error is within ``tol``
    (float rounding); otherwise, or when the kernel fails on those inputs, the fake-quant layer goes back, named with
    the measured error (and ``lacks()``: what the machine lacks). Returns the model and one row per quantized layer:
    ``{"fqn", "kind", "w_bits", "a_bits", "int8", "why", "parts", "check_err", "check_rel_mse"[, "backend"]}``.
    """
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    why = {n: plan.why_not_w8a8(n) or (why_not(n, m) if why_not is not None else None) for n, m in layers.items()}
    inputs = capture_inputs(unet, {n: m for n, m in layers.items() if why[n] is None}, probe, per_group,
                            bucket=lambda mod: mod.live_group)
    rows, made = [], {}
    for name, layer in layers.items():
        opt = plan.layers.get(name)
        row = {"fqn": name, "kind": type(layer.module).__name__, "w_bits": opt.w_bits if opt else FP_BITS,
               "a_bits": opt.a_bits if opt else FP_BITS, "int8": False, "why": why[name] or "", "parts": 0,
               "check_err": None, "check_rel_mse": None, **({"backend": backend} if backend else {})}
        rows.append(row)
        if why[name] is not None:
            continue
        if not inputs[name]:
            row["why"] = f"the probe run never called it, so its {what} could not be checked"
            continue
        made[name] = make_kernel(name, layer)
        replace_module(unet, name, made[name])
    if made and convert is not None:
        convert(unet, made)
    for row in rows:
        name = row["fqn"]
        if name not in made:
            continue
        module, layer = made[name], layers[name]
        try:
            c = _check_module(layer, module, inputs[name])
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run this layer is a named fallback
            row["why"] = f"its {what} failed on it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        else:
            row.update(check_err=c["err"], check_rel_mse=c["rel_mse"],
                       parts=max(getattr(m, "parts", 1) for m in module.modules()))
            if c["err"] <= tol:
                row["int8"] = True
                continue
            row["why"] = (f"its {what} disagrees with fake quantization (error {c['err']:.1e} of the exact "
                          f"magnitude, tolerance {tol:.0e}; relative MSE {c['rel_mse']:.1e})"
                          f"{lacks() if lacks is not None else ''}")
        replace_module(unet, name, layer)  # back to fake quantization
    return unet, rows


def to_int8(unet: nn.Module, probe: Callable[[nn.Module], object], tol: float = CHECK_TOL,
            per_group: int = 2, plan: QuantPlan | None = None) -> tuple[nn.Module, list[dict]]:
    """Replace every quantized layer the oneDNN int8 kernels run exactly by its int8 module (in place), through
    :func:`convert_checked`: ``plan`` (default: the model's live options, :meth:`QuantPlan.from_model`) says which
    layers are W8A8; ``probe(unet)`` runs the (fake-quant) model on real inputs, e.g. a few images along the
    exported schedule; a layer whose int8 module disagrees stays fake-quant, named with the measured error and what
    the CPU lacks."""
    plan = plan if plan is not None else QuantPlan.from_model(unet)
    return convert_checked(unet, plan, lambda _name, layer: _int8_module(layer), probe,
                           why_not=lambda _name, layer: (None if onednn_available() else
                                                         "no oneDNN int8 kernels in this PyTorch build")
                           or why_not_geometry(layer),
                           tol=tol, per_group=per_group, what="int8 kernel", lacks=_lacks)


def schedule_probe(scheduler, timesteps, n: int = 4, seed: int = 2) -> Callable[[nn.Module], object]:
    """The conversion check's real inputs: ``n`` images along ``timesteps`` on the noise bank's seed ``seed``, noise
    that neither the user's samples (``tmpq sample``'s seed 0) nor ``tmpq speed``'s timed runs use."""
    return lambda u: sample_images(u, scheduler, list(timesteps), n, seed=seed, batch_size=n, progress=False)


def deploy_int8(unet: nn.Module, scheduler, timesteps, plan: QuantPlan) -> dict:
    """Run an exported model on oneDNN int8 where the kernels run it exactly (in place; ``apply_export(...,
    kernels="int8")``): :func:`to_int8` checked on :func:`schedule_probe`'s samples, every other layer fake-quant and
    named; the export's Winograd layers (:class:`tmpq.quant.winograd.WinogradConv2d`) through
    :func:`tmpq.deploy.winograd_int8.deploy`, checked and named alike. Keeps ``unet.tmpq_int8`` = ``int8_summary`` + ``"cpu"`` (:func:`describe_cpu_int8`) + ``"layers"`` (one row
    per quantized layer: ``int8`` and, where False, ``why``) and returns it. A PyTorch without oneDNN int8 kernels
    leaves every layer fake-quant, each with that reason, and says so in one warning line."""
    probe = schedule_probe(scheduler, timesteps)
    _, rows = to_int8(unet, probe, plan=plan)
    rows += winograd_int8.deploy(unet, probe)  # the export's Winograd layers (apply_export built them)
    info = {**int8_summary(rows), "cpu": describe_cpu_int8(), "layers": rows}
    unet.tmpq_int8 = info
    if not onednn_available():
        warnings.warn(f"kernels='int8': this PyTorch build has no oneDNN int8 kernels, so all {len(rows)} quantized "
                      f"layers stay fake-quant (tmpq_int8['layers'] names each)", RuntimeWarning, stacklevel=3)
    return info


def int8_summary(rows: list[dict]) -> dict:
    """The check over a ``to_int8`` result: layers run int8, fallbacks, the worst checked error."""
    checked = [r["check_err"] for r in rows if r["check_err"] is not None]
    return {"int8_layers": sum(r["int8"] for r in rows), "fallback_layers": sum(not r["int8"] for r in rows),
            "split_weight_layers": sum(r["int8"] and r["parts"] > 1 for r in rows),
            "check_worst_err": max(checked, default=0.0),
            "check_worst_err_int8": max((r["check_err"] for r in rows if r["int8"]), default=0.0)}


def compiled(unet: nn.Module) -> nn.Module:
    """A view of ``unet`` whose forward is ``torch.compile``'d (same class, modules and parameters; ``unet`` itself
    stays eager)."""
    view = copy.copy(unet)
    view.forward = torch.compile(unet.forward)
    return view


def compiled_timings(models: dict[str, tuple], n: int, batch: int, repeats: int = 3) -> dict:
    """``time_sampling`` of each ``name: (unet, scheduler, timesteps[, autocast dtype])`` with a compiled forward
    (the warm-up batch compiles): ``{"NAME_compiled_s": ..., "compile_errors": {NAME: one line}}``; a model that
    does not compile is named with its error rather than failing the others."""
    out: dict = {"compile_errors": {}}
    import torch._dynamo

    # the blocks of a UNet share their forward code at other shapes, and time groups switch modules: more than
    # dynamo's default 8 versions per frame, past which it silently runs the frame eagerly
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)
    try:
        for name, (unet, sched, ts, *dtype) in models.items():
            dev = next(unet.parameters()).device.type
            try:
                with torch.autocast(dev, dtype=dtype[0] if dtype else None, enabled=bool(dtype)):
                    out[f"{name}_compiled_s"] = time_sampling(compiled(unet), sched, ts, n, batch, repeats)
            except Exception as e:  # noqa: BLE001 - a compile failure is a measurement, reported per model
                first = (str(e).strip().splitlines() or [""])[0][:300]
                out["compile_errors"][name] = f"{type(e).__name__}: {first}"
    finally:
        torch._dynamo.config.recompile_limit = limit
    return out


def time_sampling(unet, scheduler, timesteps, n: int, batch: int, repeats: int = 3, seed: int = 0) -> float:
    """Median wall-clock seconds to sample ``n`` images (after one warm-up batch)."""

    sample_images(unet, scheduler, timesteps, min(batch, 16), seed=seed, batch_size=min(batch, 16), progress=False)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_images(unet, scheduler, timesteps, n, seed=seed, batch_size=batch, progress=False)
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2]


_MATMUL_OPS = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::thnn_conv2d",
               "aten::slow_conv2d_forward", "aten::addmm", "aten::mm", "onednn::qconv2d_pointwise",
               "onednn::qlinear_pointwise")


@torch.no_grad()
def op_shares(unet, batch: int, t: int = 500) -> dict:
    """Where one denoiser call's CPU time goes (``torch.profiler``, self time, one call after a warm-up):
    ``{"total_ms", "conv_linear_ms", "conv_linear_share"}``. The conv / Linear share bounds what faster
    conv / Linear kernels can give per step (Amdahl): at most 1 / (1 - share)."""

    g = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(batch, *sample_shape(unet), generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    tt = torch.full((batch,), t)
    adapter = adapter_for(unet)
    cond = adapter.example(denoiser_of(unet), batch, x.device)
    denoise(unet, x, tt, cond)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        denoise(unet, x, tt, cond)
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows) / 1e3
    mm = sum(r.self_cpu_time_total for r in rows if r.key in _MATMUL_OPS) / 1e3
    return {"total_ms": total, "conv_linear_ms": mm, "conv_linear_share": mm / total if total else 0.0}


def measure_speed(export_dir, n: int = 256, batch_size: int = 256, fid_n: int = 0, compile: bool = False,
                  fp_reference: tuple | None = None) -> dict:
    """Wall-clock of an export (``tmpq speed``): FP at 100 uniform DDIM steps, FP and fake quantization at the
    exported schedule, real int8 kernels at the exported schedule; the pixel MSE between int8 and fake-quant images
    on the same noise and, with ``fid_n``, both FIDs (embedded 1-channel models only). Times are medians of 3.
    ``compile``: also each of the four with a ``torch.compile``'d forward (``compiled_timings``).
    ``fp_reference``: ``(label, solver, order, timesteps)`` of an FP sampler to time in the same run (the fastest FP
    configuration of the quality the export reaches, which the caller knows from an FP grid): ``fp_reference_s`` and
    ``speedup_int8_vs_fp_reference``. The int8 time is checked against a small-batch timing of the same model
    (``int8_small_batch_s_per_image``): a large-batch time per image more than twice the small-batch one marks the
    run ``int8_timing_suspect`` (shared cores), as does int8 slower than fake quantization."""

    fp = load_model(export_dir)  # the export holds the FP weights: the FP reference is the same model
    unet, sched, ts, manifest = bundle.load_export(export_dir)
    T = fp.num_train_timesteps
    rows = {"fp_100_uniform_s": time_sampling(fp.unet, make_scheduler(fp.scheduler_config),
                                              make_timesteps("uniform", 100, T), n, batch_size),
            "fp_export_schedule_s": time_sampling(fp.unet, sched, ts, n, batch_size),
            "fakequant_export_s": time_sampling(unet, sched, ts, n, batch_size)}
    fq_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    # the int8 model as apply_export(kernels="int8") deploys it (its probe, then its reuse)
    unet = bundle.load_export(export_dir, kernels="int8")[0]
    layers = unet.tmpq_int8["layers"]
    rows["int8_export_s"] = time_sampling(unet, sched, ts, n, batch_size)
    small = min(16, n)
    rows["int8_small_batch_s_per_image"] = time_sampling(unet, sched, ts, small, small) / small
    per_image = rows["int8_export_s"] / n
    rows["int8_timing_suspect"] = bool(per_image > 2 * rows["int8_small_batch_s_per_image"]
                                       or rows["int8_export_s"] > rows["fakequant_export_s"])
    if fp_reference is not None:
        label, solver, order, ref_ts = fp_reference
        rows["fp_reference"] = {"label": label, "solver": solver, "order": order, "timesteps": list(ref_ts)}
        rows["fp_reference_s"] = time_sampling(fp.unet, make_scheduler(fp.scheduler_config, solver, order),
                                               list(ref_ts), n, batch_size)
        rows["speedup_int8_vs_fp_reference"] = rows["fp_reference_s"] / rows["int8_export_s"]
    i8_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    rows["int8_vs_fakequant_pixel_mse"] = float((i8_imgs - fq_imgs).pow(2).mean())
    if fid_n and fp.sample_shape[0] == 1:
        ext = make_extractor("domain")
        ref = embedded_reference(ext)
        for name, u in (("fakequant", bundle.load_export(export_dir)[0]), ("int8", unet)):
            imgs = sample_images(u, sched, ts, fid_n, seed=1, batch_size=batch_size, progress=False)
            rows[f"{name}_fid_n{fid_n}"] = score_features(ext(imgs), ref)["fid"]
    reuse = getattr(unet, "tmpq_reuse", None)  # an export that reuses deep features: its timings above reused
    if reuse is not None:
        rows["reuse"] = {"branch": reuse.branch, "calls": [k for k, r in enumerate(reuse.plan) if r],
                         "reuse_calls_run": reuse.reuse_calls, "full_calls_run": reuse.full_calls}
        reuse.__exit__(None, None, None)  # op_shares profiles single full calls
    shares = {"fp": op_shares(fp.unet, batch_size), "int8": op_shares(unet, batch_size)}
    rows.update({"images": n, "batch_size": batch_size, "steps": len(ts), **int8_summary(layers),
                 "cpu_int8": cpu_int8_features(), "cpu_allocator": cpu_allocator(), "layers": layers,
                 "op_shares": shares,
                 # Amdahl: infinitely fast convs / Linears on the exported schedule, vs FP 100 steps
                 "speedup_bound_vs_fp100": rows["fp_100_uniform_s"] / rows["fp_export_schedule_s"]
                 / (1 - shares["fp"]["conv_linear_share"]),
                 "speedup_int8_vs_fp100": rows["fp_100_uniform_s"] / rows["int8_export_s"],
                 "speedup_fakequant_vs_fp100": rows["fp_100_uniform_s"] / rows["fakequant_export_s"],
                 "speedup_int8_vs_fakequant": rows["fakequant_export_s"] / rows["int8_export_s"]})
    if compile:
        fp100 = (make_scheduler(fp.scheduler_config), make_timesteps("uniform", 100, T))
        rows.update(compiled_timings({"fp_100_uniform": (fp.unet, *fp100), "fp_export_schedule": (fp.unet, sched, ts),
                                      "fakequant_export": (bundle.load_export(export_dir)[0], sched, ts),
                                      "int8_export": (unet, sched, ts)}, n, batch_size))
    return rows
