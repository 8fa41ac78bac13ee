"""Real low-bit kernels on CPU for an exported model (``tmpq speed``).

PyTorch's int8 CPU GEMM (``torch.ao.nn.quantized.dynamic.Linear`` on the x86 / fbgemm engine; convs through im2col,
see :class:`Int8Conv2d`) takes int8 weights with per-output-channel scales, quantizes activations on the fly (per
tensor, per call) and returns float32. Every
exported weight option of <= 8 bits is an integer grid times a per-channel scale, so it is stored *exactly* in
int8 with the exported scales: the weights the int8 kernels multiply are the exported ones. Activations are the
kernel's own dynamic 8-bit quantization (reduce_range: 7 bits on x86), not the exported static A-bits, so outputs
differ slightly from fake quantization; ``tmpq speed`` reports that difference beside the timings.

A layer falls back to fake quantization (and is named as such) when the kernels cannot run it exactly: weight bits
above 8, asymmetric, group-wise or multi-basis binarized weights, activations above 8 bits (the default pins the
first and last layers' inputs at 16), a non-zeros padding mode, a grouped conv.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn

from quant.layers import QuantConv2d, QuantLayer, QuantLinear


def _why_not_int8(layer: QuantLayer) -> str | None:
    if layer.w_index is None:
        return "full-precision weights"
    q = layer.w_quant[layer.w_index]
    if q.granularity == "multibasis":
        return f"{q.bits}-bit multi-basis binarized weights (sums of scaled signs, not one integer grid)"
    if q.bits > 8:
        return f"{q.bits}-bit weights (int8 kernels hold <= 8)"
    if not q.symmetric:
        return "asymmetric weights (the int8 kernels take zero-point 0)"
    if q.granularity == "group":
        return "group-wise weight scales"
    if isinstance(layer, QuantConv2d) and layer.module.padding_mode != "zeros":
        return f"padding_mode {layer.module.padding_mode}"
    if isinstance(layer, QuantConv2d) and isinstance(layer.module.padding, str):
        return f"padding {layer.module.padding!r}"
    if isinstance(layer, QuantConv2d) and layer.module.groups != 1:
        return f"grouped conv (groups = {layer.module.groups})"
    if layer.a_index is not None and layer.a_quant[layer.a_index].bits > 8:
        return f"{layer.a_quant[layer.a_index].bits}-bit activations (the kernels quantize inputs to 8 bits)"
    return None


def _qint8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    zp = torch.zeros(w.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, zp, 0, torch.qint8)
    # the int8 weights are the exported grid exactly (dequantized == fake-quantized weight)
    if not torch.equal(qw.dequantize(), w):
        raise AssertionError("an int8 weight does not hold the exported grid")
    return qw


def _dyn_linear(qw: torch.Tensor, bias) -> nn.Module:
    from torch.ao.nn.quantized import dynamic as qd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = qd.Linear(qw.shape[1], qw.shape[0], bias_=bias is not None)
        out.set_weight_bias(qw, bias)
    return out


class Int8Conv2d(nn.Module):
    """A conv as an int8 GEMM: im2col (``unfold``; a 1x1 stride-1 conv needs none) and PyTorch's dynamic int8 Linear
    kernel, which quantizes its input per tensor on the fly and returns float32.

    Not ``torch.ao.nn.quantized.dynamic.Conv2d``: that kernel requantizes its *output* to 8 bits with the input's
    scale and zero point before dequantizing, so every output outside the input's range is clipped (measured: 65 %
    relative error on one resnet conv of the embedded UNet, FID 34 instead of 0.6 for a whole export)."""

    def __init__(self, conv: nn.Conv2d, qw: torch.Tensor, bias):
        super().__init__()
        self.lin = _dyn_linear(qw.reshape(qw.shape[0], -1), bias)
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x):
        n, c, h, w = x.shape
        if self.pointwise:
            oh, ow = h, w
            cols = x.permute(0, 2, 3, 1).reshape(-1, c)
        else:
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            cols = nn.functional.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            cols = cols.transpose(1, 2).reshape(n * oh * ow, -1)
        y = self.lin(cols)
        return y.reshape(n, oh, ow, -1).permute(0, 3, 1, 2)  # a channels-last view, as the sampler keeps the model


class SplitInt8Conv2d(nn.Module):
    """A conv over a skip concatenation as two int8 convs over its halves (exact: conv is linear in its input),
    so each half gets its own dynamic activation range, as split quantization gives it its own static one."""

    def __init__(self, a: nn.Module, b: nn.Module, split: int):
        super().__init__()
        self.a, self.b, self.split = a, b, split

    def forward(self, x):
        return self.a(x[:, : self.split].contiguous()) + self.b(x[:, self.split:].contiguous())


def _int8_module(layer: QuantLayer) -> nn.Module:
    q = layer.w_quant[layer.w_index]
    w = layer.quantized_weight().detach().float().contiguous()
    scale = q.scale.detach().reshape(-1).double()
    if scale.numel() == 1:
        scale = scale.expand(w.shape[0]).contiguous()
    m = layer.module
    bias = layer.active_bias()  # the layer's bias plus the active option's bias correction
    bias = None if bias is None else bias.detach().float()
    if isinstance(layer, QuantConv2d):
        if layer.split is not None:
            s = layer.split
            return SplitInt8Conv2d(Int8Conv2d(m, _qint8(w[:, :s].contiguous(), scale), bias),
                                   Int8Conv2d(m, _qint8(w[:, s:].contiguous(), scale), None), s)
        return Int8Conv2d(m, _qint8(w, scale), bias)
    return _dyn_linear(_qint8(w, scale), bias)


def to_int8(unet: nn.Module) -> tuple[nn.Module, list[dict]]:
    """Replace every quantized layer the int8 kernels can run exactly by its int8 module (in place).

    Returns the model and one row per quantized layer: ``{"fqn", "kind", "w_bits", "a_bits", "int8", "why"}``.
    """
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.engine
    rows = []
    for name, layer in list(unet.named_modules()):
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            continue
        why = _why_not_int8(layer)
        wq = layer.w_quant[layer.w_index] if layer.w_index is not None else None
        aq = layer.a_quant[layer.a_index] if layer.a_index is not None else None
        rows.append({"fqn": name, "kind": type(layer.module).__name__, "w_bits": wq.bits if wq else 32,
                     "a_bits": aq.bits if aq else 32, "int8": why is None, "why": why or ""})
        if why is None:
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, _int8_module(layer))
    return unet, rows


def time_sampling(unet, scheduler, timesteps, n: int, batch: int, repeats: int = 3, seed: int = 0) -> float:
    """Median wall-clock seconds to sample ``n`` images (after one warm-up batch)."""
    from tmpq.sampler import sample_images

    sample_images(unet, scheduler, timesteps, min(batch, 16), seed=seed, batch_size=min(batch, 16), progress=False)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_images(unet, scheduler, timesteps, n, seed=seed, batch_size=batch, progress=False)
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2]


def measure_speed(export_dir, n: int = 256, batch_size: int = 256, fid_n: int = 0) -> dict:
    """Wall-clock of an export (``tmpq speed``): FP at 100 uniform DDIM steps, FP and fake quantization at the
    exported schedule, real int8 kernels at the exported schedule; the pixel MSE between int8 and fake-quant images
    on the same noise and, with ``fid_n``, both FIDs (embedded 1-channel models only). Times are medians of 3."""
    from evaluators.features import make_extractor
    from evaluators.quality import embedded_reference, score_features
    from tmpq.export import load_export
    from tmpq.model import load_model
    from tmpq.sampler import make_scheduler, sample_images
    from tmpq.schedules import make_timesteps

    fp = load_model(export_dir)  # the export holds the FP weights: the FP reference is the same model
    unet, sched, ts, _ = load_export(export_dir)
    T = fp.num_train_timesteps
    rows = {"fp_100_uniform_s": time_sampling(fp.unet, make_scheduler(fp.scheduler_config),
                                              make_timesteps("uniform", 100, T), n, batch_size),
            "fp_export_schedule_s": time_sampling(fp.unet, sched, ts, n, batch_size),
            "fakequant_export_s": time_sampling(unet, sched, ts, n, batch_size)}
    fq_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    unet, layers = to_int8(unet)
    rows["int8_export_s"] = time_sampling(unet, sched, ts, n, batch_size)
    i8_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    rows["int8_vs_fakequant_pixel_mse"] = float((i8_imgs - fq_imgs).pow(2).mean())
    if fid_n and fp.sample_shape[0] == 1:
        ext = make_extractor("domain")
        ref = embedded_reference(ext)
        for name, u in (("fakequant", load_export(export_dir)[0]), ("int8", unet)):
            imgs = sample_images(u, sched, ts, fid_n, seed=1, batch_size=batch_size, progress=False)
            rows[f"{name}_fid_n{fid_n}"] = score_features(ext(imgs), ref)["fid"]
    n8 = sum(r["int8"] for r in layers)
    rows.update({"images": n, "batch_size": batch_size, "steps": len(ts), "int8_layers": n8,
                 "fallback_layers": len(layers) - n8, "layers": layers,
                 "speedup_int8_vs_fp100": rows["fp_100_uniform_s"] / rows["int8_export_s"],
                 "speedup_fakequant_vs_fp100": rows["fp_100_uniform_s"] / rows["fakequant_export_s"],
                 "speedup_int8_vs_fakequant": rows["fakequant_export_s"] / rows["int8_export_s"]})
    return rows
