"""The quantization plan of an export: per-layer options by FQN, the sampler, reuse and guidance, as one frozen value.

An export stores everything a deployment needs in ``tmpq_export.json``; :meth:`QuantPlan.from_export` reads the plan
out of that manifest (old exports included: nothing new is written), and :meth:`QuantPlan.from_model` reads it from a
live quantized model (a supernet set to one allocation). Every consumer reads the plan instead of the quantizers'
attributes: :func:`tmpq.deploy.bundle.apply_export` (sampler, reuse, null label; the loaded quantizers are checked
against its bits), both int8 backends (which layers are W8A8: :meth:`LayerOption.why_not_w8a8`) and torchao's
per-layer config map (:meth:`QuantPlan.to_torchao`). ``to_json`` / ``from_json`` give it a file form of its own.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn

from tmpq.core.errors import TmpqError
from tmpq.core.solvers import SOLVERS
from tmpq.core.timeaxis import TimeAxis
from tmpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear

PLAN_FORMAT = "tmpq.plan"
PLAN_VERSION = 1
FP_BITS = 32  # a full-precision operand
# A converted layer agrees with fake quantization when its largest error is at most this fraction of the exact
# sum of |products| behind each output (float32 accumulation: ~1e-7 of it; a saturated 16-bit pair: ~1e-3); shared by
# the direct int8 kernels (tmpq.deploy.int8) and the Winograd ones (tmpq.deploy.winograd_int8)
CHECK_TOL = 1e-5


def capture_inputs(unet: nn.Module, layers: Mapping[str, nn.Module], probe: Callable[[nn.Module], object],
                   per_bucket: int, bucket: Callable[[nn.Module], object] = lambda _mod: 0) -> dict[str, dict]:
    """The inputs a real-kernel conversion checks each layer on: ``probe(unet)`` runs once (no grad) with a pre-hook
    on every layer of ``layers``, which keeps the first ``per_bucket`` inputs of each ``bucket(layer)`` (e.g. its live
    time group; by default one bucket, 0). Returns fqn -> {bucket: [inputs]}."""
    seen: dict[str, dict] = {n: {} for n in layers}

    def grab(name):
        def hook(mod, args):
            kept = seen[name].setdefault(bucket(mod), [])
            if len(kept) < per_bucket:
                kept.append(args[0].detach().clone())
        return hook

    handles = [lay.register_forward_pre_hook(grab(n)) for n, lay in layers.items()]
    try:
        with torch.no_grad():
            probe(unet)
    finally:
        for h in handles:
            h.remove()
    return seen


@dataclass(frozen=True)
class LayerOption:
    """The exported option of one layer: bits and quantizer settings of its weights and its activations."""

    w_bits: int
    a_bits: int
    granularity: str = "channel"  # weight scales: tensor / channel / group / multibasis
    w_symmetric: bool = True
    a_symmetric: bool = False
    a_granularity: str = "tensor"
    group_size: int | None = None
    split: int | None = None  # a conv over a skip concatenation: its first half's channels
    kind: str = ""  # Conv2d / Linear
    winograd: int = 0  # the tile m of a conv run by Winograd F(m, 3) (0: direct; left out of files at 0)

    @classmethod
    def of(cls, layer: QuantLayer) -> LayerOption:
        """The live option of a quantized layer (full precision: :data:`FP_BITS`)."""
        wq = layer.w_quant[layer.w_index] if layer.w_index is not None else None
        aq = layer.a_quant[layer.a_index] if layer.a_index is not None else None
        return cls(w_bits=int(wq.bits) if wq is not None else FP_BITS,
                   a_bits=int(aq.bits) if aq is not None else FP_BITS,
                   granularity=wq.granularity if wq is not None else "channel",
                   w_symmetric=bool(wq.symmetric) if wq is not None else True,
                   a_symmetric=bool(aq.symmetric) if aq is not None else False,
                   a_granularity=aq.granularity if aq is not None else "tensor",
                   group_size=getattr(wq, "group_size", None) if wq is not None and wq.granularity == "group" else None,
                   split=layer.split, kind=type(layer.module).__name__,
                   winograd=int(getattr(layer, "algo", 0)) if wq is not None and aq is not None else 0)

    def why_not_w8a8(self) -> str | None:
        """Why this option is not an int8 weight grid times per-channel scales on 8-bit per-tensor activations
        (None: it is), whatever the layer's geometry and the kernels."""
        if self.winograd:
            return f"Winograd F({self.winograd}, 3) (its int8 path is tmpq.deploy.winograd_int8's)"
        if self.w_bits >= FP_BITS:
            return "full-precision weights"
        if self.granularity == "multibasis":
            return f"{self.w_bits}-bit multi-basis binarized weights (sums of scaled signs, not one integer grid)"
        if self.w_bits > 8:
            return f"{self.w_bits}-bit weights (int8 kernels hold <= 8)"
        if not self.w_symmetric:
            return "asymmetric weights (the int8 kernels take zero-point 0)"
        if self.granularity == "group":
            return "group-wise weight scales"
        if self.a_bits >= FP_BITS:
            return "full-precision activations"
        if self.a_bits > 8:
            return f"{self.a_bits}-bit activations (the kernels take 8-bit inputs)"
        if self.a_granularity != "tensor":
            return f"{self.a_granularity}-wise activation scales (the kernels take one per tensor)"
        return None


@dataclass(frozen=True)
class SamplerPlan:
    """The exported sampler: solver and order, the searched timesteps, eta and denoiser calls per sample."""

    timesteps: tuple[int, ...] = ()
    solver: str = "ddim"
    order: int = 1
    eta: float = 0.0
    denoiser_calls: int | None = None
    time_axis: TimeAxis = TimeAxis()  # the model's (exports of DDPM models name none)


@dataclass(frozen=True)
class ReusePlan:
    """Deep-feature reuse: the branch cut and the denoiser calls (by index) that reuse the cached features."""

    branch: int
    calls: tuple[int, ...]


@dataclass(frozen=True)
class QuantPlan:
    """What an export runs, by module FQN, with its sampler, reuse and guidance (see the module docstring)."""

    layers: Mapping[str, LayerOption] = field(default_factory=dict)
    sampler: SamplerPlan = SamplerPlan()
    reuse: ReusePlan | None = None
    guidance_scale: float = 1.0
    null_label: int | None = None  # a class model's unconditional label (guidance)
    version: int = PLAN_VERSION

    # -- reading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_export(cls, manifest: dict) -> QuantPlan:
        """The plan of an export manifest (``tmpq_export.json``, as :func:`tmpq.deploy.bundle.read_export` returns
        it, any export written so far). A field of the wrong type raises ``TypeError`` / ``KeyError`` naming it."""
        s = manifest["sampler"]
        solver = s.get("solver", "ddim")
        order = s.get("order") or SOLVERS[solver][0]
        layers = {}
        for fqn, v in manifest["layers"].items():
            if not isinstance(v, dict):
                raise TypeError(f"layers.{fqn}: expected an object")
            layers[fqn] = LayerOption(
                w_bits=_int(v["w_bits"], f"layers.{fqn}.w_bits"), a_bits=_int(v["a_bits"], f"layers.{fqn}.a_bits"),
                granularity=str(v.get("granularity", "channel")), w_symmetric=bool(v.get("w_symmetric", True)),
                a_symmetric=bool(v.get("a_symmetric", False)),
                group_size=v.get("group_size") if v.get("granularity") == "group" else None,
                split=v.get("split"), kind=str(v.get("kind", "")),
                winograd=_int(v.get("winograd", 0), f"layers.{fqn}.winograd"))
        reuse = s.get("reuse")
        null = manifest.get("conditioning", {}).get("null_label")
        return cls(layers=layers,
                   sampler=SamplerPlan(timesteps=tuple(int(t) for t in s["timesteps"]), solver=solver, order=int(order),
                                       eta=float(s.get("eta", 0.0)), denoiser_calls=s.get("denoiser_calls"),
                                       time_axis=_axis(s.get("time_axis"))),
                   reuse=ReusePlan(int(reuse["branch"]), tuple(int(k) for k in reuse["calls"])) if reuse else None,
                   guidance_scale=float(s.get("guidance_scale", 1.0)),
                   null_label=None if null is None else int(null))

    @classmethod
    def from_model(cls, unet: nn.Module, **others) -> QuantPlan:
        """The plan of a live quantized model: every quantized layer's live option (``others``: the remaining
        fields, e.g. ``sampler``)."""
        return cls(layers={n: LayerOption.of(m) for n, m in unet.named_modules()
                           if isinstance(m, (QuantConv2d, QuantLinear))}, **others)

    def why_not_w8a8(self, fqn: str) -> str | None:
        """Why layer ``fqn`` does not run on an int8 W8A8 kernel by its option (None: it can)."""
        opt = self.layers.get(fqn)
        return "not in the quantization plan" if opt is None else opt.why_not_w8a8()

    # -- file form ------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The plan as JSON (keys sorted: the same plan always gives the same text)."""
        d = {"format": PLAN_FORMAT, "version": self.version,
             "layers": {k: _layer_dict(v) for k, v in sorted(self.layers.items())}, "sampler": self._sampler_dict(),
             "reuse": asdict(self.reuse) if self.reuse else None, "guidance_scale": self.guidance_scale,
             "null_label": self.null_label}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def _sampler_dict(self) -> dict:
        d = asdict(self.sampler)
        if not self.sampler.time_axis.flow:  # plans of DDPM models read as they did before flow models
            del d["time_axis"]
        return d

    @classmethod
    def from_json(cls, text: str, what: str = "quantization plan") -> QuantPlan:
        """A plan written by :meth:`to_json`; anything else is one ``TmpqError`` naming ``what`` and the field."""
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise TmpqError(f"{what}: not JSON ({exc})") from None
        fmt = d.get("format") if isinstance(d, dict) else None
        if fmt != PLAN_FORMAT:
            raise TmpqError(f"{what}: not a tmpq quantization plan (format {fmt!r})")
        if d.get("version") != PLAN_VERSION:
            raise TmpqError(f"{what}: plan version {d.get('version')} is not supported (this tmpq reads "
                            f"{PLAN_VERSION})")
        try:
            layers = {str(k): _build(LayerOption, v, f"layers.{k}") for k, v in d["layers"].items()}
            sampler = _build(SamplerPlan, d["sampler"], "sampler")
            sampler = SamplerPlan(**{**asdict(sampler), "timesteps": tuple(sampler.timesteps),
                                     "time_axis": _axis(d["sampler"].get("time_axis"))})
            reuse = d.get("reuse")
            reuse = None if reuse is None else _build(ReusePlan, reuse, "reuse")
            if reuse is not None:
                reuse = ReusePlan(reuse.branch, tuple(reuse.calls))
            guidance = float(d["guidance_scale"])
            null = d.get("null_label")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TmpqError(f"{what}: malformed ({type(exc).__name__}: {exc})") from None
        if not math.isfinite(guidance):
            raise TmpqError(f"{what}: guidance_scale must be finite, got {guidance}")
        return cls(layers=layers, sampler=sampler, reuse=reuse, guidance_scale=guidance,
                   null_label=None if null is None else int(null))

    # -- torchao --------------------------------------------------------------------------------------------------
    def torchao_entries(self, operands: Mapping[str, Mapping[str, W8A8Operands]]) -> dict[str, W8A8Operands]:
        """The flat ``{fqn of the matmul: operands}`` map of the layers the plan runs W8A8: ``operands[layer][rel]``
        are a converted layer's matmuls by FQN relative to its wrapper (``mm``, ``lin.mm``, ``a.lin.mm``,
        ``per_group.1.mm``, ...). A layer the plan does not run W8A8 is refused (a caller's bug)."""
        out = {}
        for fqn, parts in operands.items():
            why = self.why_not_w8a8(fqn)
            if why is not None:
                raise TmpqError(f"to_torchao: layer {fqn} is not W8A8 in the plan ({why})")
            out.update({f"{fqn}.{rel}": ops for rel, ops in parts.items()})
        return out

    def to_torchao(self, operands: Mapping[str, Mapping[str, W8A8Operands]]):
        """torchao's ``FqnToConfig`` converting exactly the matmuls of :meth:`torchao_entries` (each an
        :func:`exported_w8a8_config`): one ``torchao.quantization.quantize_`` call applies it."""
        ao = torchao_api()
        return ao["FqnToConfig"]({k: exported_w8a8_config(*v) for k, v in self.torchao_entries(operands).items()})


class W8A8Operands(NamedTuple):
    """One converted matmul's exported operands: int8 weight codes ``[N, K]``, per-output-channel scales ``[N]``, the
    activation scale and zero-point in the int8 range."""

    codes: torch.Tensor
    scale: torch.Tensor
    act_scale: float
    act_zero_point: int


def _layer_dict(opt: LayerOption) -> dict:
    """A layer's entry of the plan file (``winograd`` only for a Winograd layer: plans before it read unchanged)."""
    d = asdict(opt)
    if not d["winograd"]:
        del d["winograd"]
    return d


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}")
    return v


def _build(kind, d, name: str):
    """A plan dataclass from its JSON object (unknown or missing keys raise naming ``name``)."""
    if not isinstance(d, dict):
        raise TypeError(f"{name}: expected an object")
    known = {f.name for f in fields(kind)}
    extra = set(d) - known
    if extra:
        raise KeyError(f"{name}.{sorted(extra)[0]} (unknown)")
    return kind(**d)


@functools.cache
def torchao_api() -> dict:
    """torchao's pieces, imported once, with tmpq's exported-W8A8 config handler registered; one line when absent."""
    try:
        import torchao
        from torchao.core.config import AOBaseConfig
        from torchao.quantization import FqnToConfig, quantize_
        from torchao.quantization.granularity import PerTensor
        from torchao.quantization.quant_api import register_quantize_module_handler
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
            Int8Tensor,
            QuantizeTensorToInt8Kwargs,
        )
    except ImportError as e:
        raise TmpqError(f"the torchao int8 path needs torchao (pip install 'tmpq[gpu]'): {e}") from None

    @dataclass
    class _Config(AOBaseConfig):
        codes: torch.Tensor  # [N, K] int8: the exported weight grid's integers
        scale: torch.Tensor  # [N] float32: its per-output-channel scales
        act_scale: float
        act_zero_point: int  # in the int8 range (shifted by -qmin - 128)

    def _handler(module: nn.Module, config: _Config, *, parameter_name: str = "weight") -> nn.Module:
        w = getattr(module, parameter_name)
        dev = w.device
        zp = int(config.act_zero_point)
        kwargs = QuantizeTensorToInt8Kwargs(granularity=PerTensor(),
                                            mapping_type=MappingType.ASYMMETRIC if zp else MappingType.SYMMETRIC)
        t = Int8Tensor(config.codes.to(dev), config.scale.reshape(-1, 1).float().to(dev),
                       [1, config.codes.shape[1]], w.dtype, act_quant_kwargs=kwargs,
                       act_quant_scale=torch.full((1, 1), float(config.act_scale), device=dev),
                       act_quant_zero_point=torch.full((1, 1), zp, dtype=torch.int8, device=dev) if zp else None)
        setattr(module, parameter_name, nn.Parameter(t, requires_grad=False))
        return module

    register_quantize_module_handler(_Config)(_handler)
    return {"version": torchao.__version__, "Config": _Config, "FqnToConfig": FqnToConfig, "quantize_": quantize_,
            "Int8Tensor": Int8Tensor}


def exported_w8a8_config(codes: torch.Tensor, scale: torch.Tensor, act_scale: float, act_zero_point: int):
    """The torchao config of one converted matmul (:class:`W8A8Operands`' fields)."""
    return torchao_api()["Config"](codes, scale, act_scale, act_zero_point)


def _axis(d) -> TimeAxis:
    """The time axis of an export's sampler entry (DDPM when it names none)."""
    if d is None:
        return TimeAxis()
    if not isinstance(d, dict) or d.get("kind") not in ("ddpm", "flow"):
        raise TypeError("sampler.time_axis: expected an object with kind ddpm or flow")
    return TimeAxis(str(d["kind"]), int(d["num_train_timesteps"]), float(d["shift"]))
