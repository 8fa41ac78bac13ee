"""Real int8 kernels for an exported model through torchao (``apply_export(..., backend="torchao")``, ``tmpq speed
--device cuda``; the same code runs on CPU).

What runs int8: every quantized layer whose exported option is W8A8-representable (``int8.why_not_w8a8``: <= 8-bit
symmetric per-channel weights, <= 8-bit per-tensor activations, an ungrouped zero-padded conv or a Linear). For each
such layer a per-layer torchao config (:func:`ExportedW8A8Config`, a config class registered with torchao's
``register_quantize_module_handler``) is built from the export, and one ``torchao.quantization.quantize_`` call with
an ``FqnToConfig`` map converts exactly those layers' matmuls; every other layer is left out of the map and stays
fake-quant, named with why.

The decision, and what is exact:

- **Static, not dynamic, activations.** torchao's ``Int8DynamicActivationInt8WeightConfig`` picks a new activation
  scale per token at run time, which is a different quantizer from the exported, calibrated one: its outputs would
  differ from fake quantization by more than float rounding, and the search scored the calibrated one. So the
  activation of a converted layer is quantized by torchao's static per-tensor path (``Int8Tensor`` with
  ``act_quant_scale`` / ``act_quant_zero_point``) with the exported scale and zero-point, shifted into the int8 range
  (``q - qmin - 128``: the same rounding ``round(x * (1 / s)) + zp`` and the same clamp; below 8 bits the input is
  clamped in float at the top level first, which is exact by monotonicity of the rounding).
- **The exported weight grid, not torchao's.** torchao's own configs re-derive the weight scales
  (``max |w| / 127.5``), which re-rounds the exported grid (and would turn a 4-bit grid into some other 8-bit one).
  The handler instead stores the exported integer codes and per-channel scales in an ``Int8Tensor`` (codes checked to
  reproduce the exported weights exactly, ``int8._int8_weight``). Weight-only int8 (``Int8WeightOnlyConfig``) would
  be exact for the weights but keeps a float matmul; it is not used.
- **Convolutions.** torchao's ``Int8Tensor`` implements ``linear`` only. A conv therefore runs as im2col
  (``F.unfold``, or a reshape for 1x1 stride-1 convs) followed by the torchao int8 linear on the ``[out, in x kh x kw]``
  weight: the same products and sums as the conv. Zero padding pads the float input with 0, which quantizes to the
  zero-point, i.e. to 0, as fake quantization pads. This costs the unfolded input's memory (kh x kw times the input)
  and is measured, not assumed, to be fast or slow.
- **The matmul.** torchao's ``int_scaled_matmul`` multiplies int8 x int8 into int32 (``torch._int_mm``: cuBLAS on
  CUDA, where it needs K and N multiples of 8, so other layers are not converted on CUDA rather than silently run
  on the CPU; PyTorch's CPU kernel here) and scales the int32 sums in float32: exact integer sums, float rounding in
  the scaling (and in the zero-point correction of asymmetric activations).

So a converted layer computes what fake quantization computes up to float rounding. Whatever the device, each
converted layer is checked at conversion (``int8.check_layer``): its output against its fake-quant twin's on the
inputs it saw in a probe run of the fake-quant model (a few images along the exported schedule); a layer whose
largest error exceeds ``tol`` of the exact magnitude behind that output (``sum |x_q| |w_q| + |bias|``) falls back,
named with the measured error. On CUDA the check (and the probe) run with TF32 off, or the fake-quant reference
itself would be 1e-3 off; the timings use the default settings.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.core.devices import resolve_device
from tmpq.core.model import load_model
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import make_timesteps
# bundle deploys this module's kernels (apply_export(backend="torchao")) and measure_speed_torchao loads exports
# through bundle: each imports the other as a module, whose names are read at call time, so either may load first
from tmpq.deploy import bundle
from tmpq.deploy.int8 import (
    CHECK_TOL,
    SplitInt8Conv2d,
    TimeGroupedInt8,
    _int8_weight,
    compiled_timings,
    convert_checked,
    int8_summary,
    schedule_probe,
    time_sampling,
    why_not_geometry,
    why_not_w8a8,
)
from tmpq.deploy.plan import QuantPlan, W8A8Operands, exported_w8a8_config, torchao_api
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import embedded_reference, score_features
from tmpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear, replace_module
from tmpq.quant.winograd import WinogradConv2d


def ExportedW8A8Config(codes: torch.Tensor, scale: torch.Tensor, act_scale: float, act_zero_point: int):
    """The torchao config of one converted matmul: the exported int8 weight codes ``[N, K]``, their per-channel
    scales, and the exported activation scale and zero-point in the int8 range."""
    return exported_w8a8_config(codes, scale, act_scale, act_zero_point)


def torchao_version() -> str:
    return torchao_api()["version"]


def _run_mm(module: TorchaoLinear, x: torch.Tensor) -> torch.Tensor:
    """The converted matmul of a wrapper (a test swaps in a wrong one to see the check catch it)."""
    return module.mm(x)


class TorchaoLinear(nn.Module):
    """A Linear over the last dimension whose ``mm`` child (``nn.Linear`` ``[N, K]``) torchao converts; the input is
    clamped at the top level of a below-8-bit activation quantizer (``hi``) before torchao quantizes it."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, hi: float | None, name: str):
        super().__init__()
        self.mm = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.mm.weight.copy_(w)
            if bias is not None:
                self.mm.bias.copy_(bias)
        self.hi, self.name = hi, name

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.hi is not None:
            x = x.clamp(max=self.hi)
        return _run_mm(self, x).reshape(*lead, self.mm.out_features)


class TorchaoConv2d(nn.Module):
    """A conv as im2col + :class:`TorchaoLinear` over ``[out, in x kh x kw]`` (1x1 stride-1 convs: a reshape)."""

    def __init__(self, conv: nn.Conv2d, lin: TorchaoLinear):
        super().__init__()
        self.lin = lin
        self.k, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.pointwise = self.k == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x):
        n, c, h, w = x.shape
        if self.pointwise:
            ho, wo = h, w
            cols = x.permute(0, 2, 3, 1).reshape(-1, c)
        else:
            ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.k[0] - 1) - 1) // self.stride[0] + 1
            wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.k[1] - 1) - 1) // self.stride[1] + 1
            cols = F.unfold(x, self.k, self.dilation, self.padding, self.stride).transpose(1, 2)
            cols = cols.reshape(-1, cols.shape[-1])
        y = self.lin(cols)
        return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)


def _act_params(aq) -> tuple[float, int, float | None]:
    """The exported activation quantizer in torchao's int8 range: scale, zero-point shifted by ``-qmin - 128``, and
    the float top clamp where its levels end below 127 after the shift (None: torchao's clamp is the same)."""
    scale = aq.scale.detach().reshape(-1)[0].float()
    zp = int(float(aq.zero_point.detach().reshape(-1)[0]))
    shift = -128 - aq.qmin
    hi = None
    if aq.qmax + shift < 127:
        hi = float((aq.qmax - zp) * scale)
    return float(scale), zp + shift, hi


def _single(layer: QuantLayer, name: str, configs: dict) -> nn.Module:
    """The float wrapper of the layer's live option; ``configs`` gets ``{wrapper-relative fqn: W8A8Operands}``."""
    q = layer.w_quant[layer.w_index]
    w = layer.quantized_weight().detach().float().contiguous()
    scale = q.scale.detach().reshape(-1).float()
    if scale.numel() == 1:
        scale = scale.expand(w.shape[0]).contiguous()
    bias = layer.active_bias()
    bias = None if bias is None else bias.detach().float().contiguous()

    def lin(wpart, b, aq, part):
        w2 = wpart.reshape(wpart.shape[0], -1).contiguous()
        s, zp, hi = _act_params(aq)
        configs[part] = W8A8Operands(_int8_weight(w2.cpu(), scale.cpu()), scale.cpu(), s, zp)
        half = {"a.lin.mm": " (first half of the skip concatenation)",
                "b.lin.mm": " (second half of the skip concatenation)"}.get(part, "")
        return TorchaoLinear(w2, b, hi, name + half)

    aq = layer.a_quant[layer.a_index]
    if isinstance(layer, QuantConv2d):
        m = layer.module
        if layer.split is not None:
            s = layer.split
            return SplitInt8Conv2d(TorchaoConv2d(m, lin(w[:, :s], bias, aq, "a.lin.mm")),
                                   TorchaoConv2d(m, lin(w[:, s:], None, layer.a_quant_split[layer.a_index],
                                                        "b.lin.mm")), s)
        return TorchaoConv2d(m, lin(w, bias, aq, "lin.mm"))
    return lin(w, bias, aq, "mm")


def _wrapper(layer: QuantLayer, name: str) -> tuple[nn.Module, dict]:
    """The float wrapper of a layer (one per time group where it has several) and its matmuls' operands by fqn
    relative to the wrapper."""
    if layer.time_groups <= 1:
        configs: dict = {}
        return _single(layer, name, configs), configs
    live, per_group, configs = layer.live_group, [], {}
    try:
        for g in range(layer.time_groups):
            layer.load_time_group(g)
            sub: dict = {}
            per_group.append(_single(layer, f"{name}[group {g}]", sub))
            configs.update({f"per_group.{g}.{k}": v for k, v in sub.items()})
    finally:
        layer.load_time_group(live)
    return TimeGroupedInt8(per_group, layer), configs


def why_not_torchao(layer: QuantLayer, device: str = "cpu") -> str | None:
    """Why a layer does not run on torchao's int8 matmul on ``device`` (None: it does)."""
    return why_not_w8a8(layer) or _why_not_device(layer, device)


def _why_not_device(layer: QuantLayer, device: str) -> str | None:
    """What of a W8A8 layer's module the int8 matmul on ``device`` does not take (None: nothing)."""
    why = why_not_geometry(layer)
    if why is not None or not str(device).startswith("cuda"):
        return why
    n = layer.module.weight.shape[0]
    ks = [layer.module.weight[0].numel()]
    if isinstance(layer, QuantConv2d) and layer.split is not None:
        per_in = layer.module.weight[0, 0].numel()
        ks = [layer.split * per_in, (layer.module.weight.shape[1] - layer.split) * per_in]
    if n % 8 or any(k % 8 for k in ks):
        return (f"matmul K = {'/'.join(map(str, ks))}, N = {n} not multiples of 8 (cuBLAS int8 needs them; torchao "
                f"would run it on the CPU)")
    return None


def plan(unet: nn.Module, device: str = "cpu") -> dict[str, str | None]:
    """The per-layer plan of an exported (fake-quant) model: ``{fqn: None (converted) or why not}``."""
    return {n: why_not_torchao(m, device) for n, m in unet.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


@contextlib.contextmanager
def exact_float():
    """float32 matmuls and convs without TF32 (CUDA) for the duration: the fake-quant reference of the check."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_torchao_int8(unet: nn.Module, probe: Callable[[nn.Module], object], device: str | None = None,
                    tol: float = CHECK_TOL, per_group: int = 2,
                    plan: QuantPlan | None = None) -> tuple[nn.Module, list[dict]]:
    """Convert (in place) every layer ``plan`` runs W8A8 (default: the model's live options) and the device takes
    (:func:`why_not_torchao`) to torchao's int8 matmul, through one ``quantize_`` call with the plan's
    ``FqnToConfig`` (:meth:`QuantPlan.to_torchao`), and check each against its fake-quant twin on the inputs it saw
    in ``probe(unet)``: :func:`tmpq.deploy.int8.convert_checked`, with float32 references (TF32 off). Returns the
    model and one row per quantized layer, as ``int8.to_int8`` does, with ``"backend": "torchao"``."""
    ao = torchao_api()
    device = str(device or next(unet.parameters()).device)
    plan = plan if plan is not None else QuantPlan.from_model(unet)
    operands: dict[str, dict] = {}

    def make(name: str, layer: QuantLayer) -> nn.Module:
        module, operands[name] = _wrapper(layer, name)
        return module

    def convert(model: nn.Module, _made: dict) -> None:
        ao["quantize_"](model, plan.to_torchao(operands), filter_fn=None)

    with exact_float(), torch.no_grad():
        return convert_checked(unet, plan, make, probe, why_not=lambda _n, layer: _why_not_device(layer, device),
                               convert=convert, tol=tol, per_group=per_group, what="torchao int8 matmul",
                               backend="torchao")


def deploy_torchao(unet: nn.Module, scheduler, timesteps, plan: QuantPlan) -> dict:
    """Run an exported model on torchao's int8 matmuls where they run it exactly, on the model's device (in place;
    ``apply_export(..., backend="torchao")``): :func:`to_torchao_int8` checked on
    :func:`tmpq.deploy.int8.schedule_probe`'s samples (32 images on CUDA, as ``tmpq speed --device cuda`` checks, so
    that every matmul takes cuBLAS's int8 kernel; 4 elsewhere), every other layer fake-quant and named. The export's
    Winograd layers stay fake-quant, named (this path runs direct matmuls only). Keeps ``unet.tmpq_int8`` =
    ``int8_summary`` + ``"device"`` (:func:`describe_device`) + ``"layers"`` and returns it."""
    device = str(next(unet.parameters()).device)
    probe = schedule_probe(scheduler, timesteps, n=32 if device.startswith("cuda") else 4)
    _, rows = to_torchao_int8(unet, probe, device=device, plan=plan)
    for name, m in unet.named_modules():
        if isinstance(m, WinogradConv2d):
            opt = plan.layers.get(name)
            rows.append({"fqn": name, "kind": "WinogradConv2d", "w_bits": opt.w_bits if opt else None,
                         "a_bits": opt.a_bits if opt else None, "int8": False,
                         "why": "a Winograd layer: the torchao path runs direct matmuls only (backend='int8' runs it "
                                "on int8 GEMMs on the CPU)", "parts": 0, "check_err": None, "check_rel_mse": None,
                         "backend": "torchao"})
    info = {**int8_summary(rows), "device": describe_device(device), "layers": rows}
    unet.tmpq_int8 = info
    return info


def torchao_layers(unet: nn.Module) -> int:
    """How many matmul weights in ``unet`` are torchao ``Int8Tensor``s."""
    cls = torchao_api()["Int8Tensor"]
    return sum(isinstance(m.weight, cls) for m in unet.modules() if isinstance(m, nn.Linear))


def describe_device(device: str) -> str:
    """One line: the device and the torchao / torch versions."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    return f"{device} ({name}); torch {torch.__version__}, torchao {torchao_version()}"


def measure_speed_torchao(export_dir, device: str = "cuda", n: int = 256, batch_size: int = 256, fid_n: int = 0,
                          compile: bool = False, repeats: int = 3) -> dict:
    """Wall-clock of an export on ``device`` with torchao's int8 matmuls (``tmpq speed --device cuda``): FP at 100
    uniform DDIM steps and at the exported schedule, each in float32 and under bf16 autocast, fake quantization
    and the torchao int8 model at the exported schedule (float32 activations); the pixel MSE between the int8 and
    fake-quant images on the same noise; with ``fid_n`` both FIDs (embedded 1-channel models); with ``compile``
    each again with a ``torch.compile``'d forward. Times are medians of ``repeats`` (the sampled images are copied
    to the CPU per batch, which synchronises the device)."""

    dev = resolve_device(device, "--device")
    torchao_api()
    fp = load_model(export_dir, device=dev)
    unet, sched, ts, manifest = bundle.load_export(export_dir, device=dev)
    T = fp.num_train_timesteps
    sched100, ts100 = make_scheduler(fp.scheduler_config), make_timesteps("uniform", 100, T)
    bf16 = lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)  # noqa: E731

    def timed(u, s, t):
        return time_sampling(u, s, t, n, batch_size, repeats=repeats)

    rows = {"fp_100_uniform_s": timed(fp.unet, sched100, ts100)}
    with bf16():
        rows["fp_100_uniform_bf16_s"] = timed(fp.unet, sched100, ts100)
    rows["fp_export_schedule_s"] = timed(fp.unet, sched, ts)
    with bf16():
        rows["fp_export_schedule_bf16_s"] = timed(fp.unet, sched, ts)
    rows["fakequant_export_s"] = timed(unet, sched, ts)
    fq_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    # the check's real inputs: a few images along the exported schedule, on noise the timed runs do not use; on CUDA
    # enough rows (> 16) that every matmul takes cuBLAS's int8 kernel there as in the timed runs
    k = 32 if dev.startswith("cuda") else 4
    unet, layers = to_torchao_int8(unet, lambda u: sample_images(u, sched, ts, k, seed=2, batch_size=k,
                                                                  progress=False), device=dev,
                                  plan=QuantPlan.from_export(manifest))
    rows["torchao_int8_export_s"] = timed(unet, sched, ts)
    i8_imgs = sample_images(unet, sched, ts, n, seed=0, batch_size=batch_size, progress=False)
    rows["torchao_int8_vs_fakequant_pixel_mse"] = float((i8_imgs - fq_imgs).pow(2).mean())
    if fid_n and fp.sample_shape[0] == 1:
        ext = make_extractor("domain")
        ref = embedded_reference(ext)
        for name, u in (("fakequant", bundle.load_export(export_dir, device=dev)[0]), ("torchao_int8", unet)):
            imgs = sample_images(u, sched, ts, fid_n, seed=1, batch_size=batch_size, progress=False)
            rows[f"{name}_fid_n{fid_n}"] = score_features(ext(imgs), ref)["fid"]
    if compile:
        rows.update(compiled_timings({
            "fp_100_uniform": (fp.unet, sched100, ts100), "fp_100_uniform_bf16": (fp.unet, sched100, ts100,
                                                                                   torch.bfloat16),
            "fp_export_schedule": (fp.unet, sched, ts), "fp_export_schedule_bf16": (fp.unet, sched, ts, torch.bfloat16),
            "fakequant_export": (bundle.load_export(export_dir, device=dev)[0], sched, ts),
            "torchao_int8_export": (unet, sched, ts)}, n, batch_size, repeats))
    rows.update({"device": describe_device(dev), "torchao": torchao_version(), "images": n,
                 "batch_size": batch_size, "steps": len(ts), **int8_summary(layers), "layers": layers,
                 "speedup_torchao_int8_vs_fp100": rows["fp_100_uniform_s"] / rows["torchao_int8_export_s"],
                 "speedup_torchao_int8_vs_fp100_bf16": rows["fp_100_uniform_bf16_s"] / rows["torchao_int8_export_s"],
                 "speedup_torchao_int8_vs_fakequant": rows["fakequant_export_s"] / rows["torchao_int8_export_s"]})
    return rows
