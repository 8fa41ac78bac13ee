"""The weight-sharing quantized supernet: every selected Conv2d / Linear of a diffusers denoiser is wrapped (in place,
through the type -> wrapper registry of ``quant.layers``) with one quantizer per candidate bit-width; a bit allocation
is served by switching option indices, never by recalibrating."""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import types
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from tmpq.core.adapters import adapter_for, denoise, forward, index_time, sample_shape
from tmpq.core.cost import call_bitops, output_macs, weight_bits
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import model_dtype
from tmpq.quant.layers import WRAPPERS, QuantConv2d, QuantLayer, correct_bias, replace_module, wrap
from tmpq.quant.winograd import why_not_winograd
from tmpq.supernet import calibration
from tmpq.supernet.config import TIE_QKV, LayerInfo, SupernetConfig
from tmpq.supernet.store import load_supernet, save_supernet, supernet_config_of


# the kept quantized weights' share of the model's quantized-layer weights (see QuantSupernet.keep_weights)
WEIGHT_BUDGET = 0.25


def model_fingerprint(unet: nn.Module) -> str:
    """SHA-256 over the FP parameter names, shapes and values (identifies 'the same model')."""
    h = hashlib.sha256()
    for name, p in sorted(unet.state_dict().items()):
        if ".w_quant." in name or ".a_quant" in name or ".wino." in name:
            continue
        h.update(name.replace(".module.", ".").encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _skip_splits(unet: nn.Module) -> dict[str, int]:
    """FQN -> split channel for the convolutions that read a UNet skip concatenation ``cat([h, skip])``.

    In diffusers' up blocks each resnet reads ``cat([h, skip])`` where ``h`` has the channels of the previously
    executed resnet (the mid block's last resnet for the first up block)."""
    splits: dict[str, int] = {}
    mid = getattr(unet, "mid_block", None)
    if mid is None or not hasattr(unet, "up_blocks"):
        return splits
    prev = mid.resnets[-1].out_channels
    for i, block in enumerate(unet.up_blocks):
        for j, res in enumerate(block.resnets):
            if res.in_channels > prev:
                for part in ("conv1", "conv_shortcut"):
                    if getattr(res, part, None) is not None:
                        splits[f"up_blocks.{i}.resnets.{j}.{part}"] = prev
            prev = res.out_channels
    return splits


class QuantSupernet(nn.Module):
    """Wrap ``unet`` in place; ``set_bits`` selects any per-gene allocation instantly.

    Example:
        >>> from tmpq.core.model import load_model
        >>> net = QuantSupernet(load_model().unet, SupernetConfig())
        >>> net.set_uniform(8, 8)   # after calibrate(); doctest: +SKIP
    """

    def __init__(self, unet: nn.Module, config: SupernetConfig | None = None):
        super().__init__()
        config = config or SupernetConfig()
        if config.pin == "auto":  # the denoiser's own first / last layers (its adapter knows them)
            config = dataclasses.replace(config, pin=adapter_for(unet).default_pins(unet))
        self.config = config
        # bank rows per layer: time group g of pass p (0: conditional / unguided, 1: guidance's null pass) is row
        # p * time_groups + g
        self.passes = 2 if config.guidance_ranges == "separate" else 1
        self.fingerprint = model_fingerprint(unet)
        self.unet = unet
        splits = _skip_splits(unet) if config.split_skip else {}
        candidates = [(n, m) for n, m in unet.named_modules() if type(m) in WRAPPERS]
        selected = [(n, m) for n, m in candidates
                    if any(fnmatch.fnmatchcase(n, p) for p in config.include)
                    and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
        if not selected:
            raise TmpqError("supernet.include: the patterns match no Conv2d / Linear layer")
        for pat in config.pin:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in selected):
                raise TmpqError(f"supernet.pin: pattern {pat!r} matches no quantized layer")
        tie_res = [re.compile(t) for t in config.tie]
        for t, rx in zip(config.tie, tie_res):
            if rx.groups != 1:
                raise TmpqError(f"supernet.tie: regex {t!r} needs exactly one capture group")
            if not any(rx.search(n) for n, _ in selected):
                raise TmpqError(f"supernet.tie: regex {t!r} matches no quantized layer")
        if config.tie_qkv:  # a model without attention has nothing to tie
            tie_res.append(re.compile(TIE_QKV))

        self.layers: dict[str, QuantLayer] = {}
        self.genes: list[tuple[str, ...]] = []
        gene_of_key: dict[str, int] = {}
        self._pinned: dict[str, tuple[int, int]] = {}
        # Winograd: the searchable eligible convs (an algorithm gene each, in layer order) and the pinned ones
        self.wino_layers: list[str] = []
        for name, mod in selected:
            pat, pin = next(((p, tuple(wa)) for p, wa in config.pin.items() if fnmatch.fnmatchcase(name, p)),
                            (None, None))
            w_opts, a_opts = ((pin[0],), (pin[1],)) if pin else (config.w_bits, config.a_bits)
            layer = wrap(mod, w_bits=w_opts, a_bits=a_opts, w_symmetric=config.w_symmetric,
                         w_granularity=config.w_granularity, group_size=config.group_size,
                         w_observer=config.w_observer, a_symmetric=config.a_symmetric,
                         a_observer=config.a_observer, split=splits.get(name), w_rounding=config.w_rounding,
                         w_two_bit=config.w_two_bit, time_groups=config.time_groups * self.passes)
            self._replace(name, layer)
            self.layers[name] = layer
            if pin and len(pin) == 3:  # fixed at Winograd F(m, 3)
                why = why_not_winograd(mod) if isinstance(layer, QuantConv2d) else "not a Conv2d"
                if why is not None:
                    raise TmpqError(f"supernet.pin.{pat}: layer {name} cannot run Winograd F({pin[2]}, 3) ({why})")
                layer.add_winograd((pin[2],), config.w_observer)
                layer.set_algo(pin[2])
            elif config.winograd and not pin and isinstance(layer, QuantConv2d) and why_not_winograd(mod) is None:
                layer.add_winograd(config.winograd, config.w_observer)
                self.wino_layers.append(name)
            if pin:
                self._pinned[name] = pin[:2]
                continue
            key = name
            for rx in tie_res:
                mt = rx.search(name)
                if mt:
                    key = "tie:" + mt.group(1)
                    break
            if key not in gene_of_key:
                gene_of_key[key] = len(self.genes)
                self.genes.append(())
            g = gene_of_key[key]
            self.genes[g] = self.genes[g] + (name,)
        self._gene_of = {n: g for g, names in enumerate(self.genes) for n in names}
        device = next(unet.parameters()).device
        if device.type != "cpu":  # the new quantizers join the denoiser on its device
            self.to(device)
        self.infos = self._profile()
        self.wino_layers = [i.fqn for i in self.infos if i.wino is not None]  # (a layer the profile never ran: none)
        self.keep_weights(WEIGHT_BUDGET)
        self._calibrated = False
        # timestep groups: group g holds the calibration timesteps t with time_starts[g-1] <= t < time_starts[g];
        # set by calibrate() / load(); until then no routing
        self.time_starts: list[int] = []
        self._live_group: int | None = None
        if self.passes > 1:  # routing by timestep and pass, one call per pass (see _forward_by_pass)
            object.__setattr__(unet, "_tmpq_pass_router", self)  # not a submodule: no module cycle
            object.__setattr__(unet, "forward", types.MethodType(_forward_by_pass, unet))
        elif config.time_groups > 1:
            unet.register_forward_pre_hook(self._route_by_timestep, with_kwargs=True)

    def _replace(self, fqn: str, new: nn.Module) -> None:
        replace_module(self.unet, fqn, new)

    def keep_weights(self, budget: float = WEIGHT_BUDGET) -> list[str]:
        """Let the layers whose quantized weight costs most to rebuild, relative to their own work, keep it while
        their option is active; the rest quantize their weight at every call. ``budget``: the kept weights' size as a
        fraction of the quantized layers' FP weights (0: none kept, 1: all), so the supernet stays within
        ``1 + budget`` times the model's weight memory whatever options a search visits.

        The order: fewest MACs per weight element first (a weight quantized per call costs a few passes over its
        elements; a layer that does little work per element, a deep UNet conv at low resolution or a Linear over
        few tokens, feels that most). Results are identical either way. Returns the FQNs that keep theirs."""
        if not 0.0 <= budget <= 1.0:
            raise TmpqError(f"weight budget: expected a fraction in [0, 1], got {budget}")
        total = sum(info.params for info in self.infos)
        room, kept = budget * total, []
        for info in sorted(self.infos, key=lambda i: (i.macs / max(i.params, 1), i.fqn)):
            layer = self.layers[info.fqn]
            layer.keep_weight = info.params <= room
            if layer.keep_weight:
                room -= info.params
                kept.append(info.fqn)
            else:
                layer.invalidate_cache()
        return kept

    def kept_weight_bytes(self) -> int:
        """Bytes of quantized weights the layers keep now (bounded by :meth:`keep_weights`' budget)."""
        return sum(layer.kept_weight_bytes() for layer in self.layers.values())

    # -- cost model ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _profile(self) -> list[LayerInfo]:
        """Per-layer MACs per sample per denoiser call, from one forward with hooks (profiled once)."""
        macs: dict[str, int] = {}
        hw: dict[str, tuple[int, int]] = {}
        hooks = []
        for name, layer in self.layers.items():
            def hook(mod, inp, out, name=name):
                macs[name] = output_macs(out, mod.module.weight)
                hw[name] = (int(out.shape[-2]), int(out.shape[-1]))
            hooks.append(layer.register_forward_hook(hook))
        saved = {n: (lay.w_index, lay.a_index) for n, lay in self.layers.items()}
        for lay in self.layers.values():
            lay.set_bits(None, None)
        try:
            adapter, device = adapter_for(self.unet), self._device()
            x = torch.zeros(1, *sample_shape(self.unet), device=device, dtype=model_dtype(self.unet))
            denoise(self.unet, x, torch.tensor([500], device=device), adapter.example(self.unet, 1, device))
        finally:
            for h in hooks:
                h.remove()
            for n, (w, a) in saved.items():
                self.layers[n].set_bits(w, a)
        infos = []
        wino = set(self.wino_layers)
        for name, layer in self.layers.items():
            conv = layer.module
            shape = (conv.in_channels, conv.out_channels, *hw[name]) if name in wino and name in hw else None
            infos.append(LayerInfo(fqn=name, kind=type(conv).__name__, macs=macs.get(name, 0),
                                   params=conv.weight.numel(), gene=self._gene_of.get(name),
                                   pinned=self._pinned.get(name), wino=shape, split=layer.split))
        return infos

    @property
    def denoiser(self) -> nn.Module:
        """The wrapped denoiser (what :mod:`tmpq.core.adapters` calls through)."""
        return self.unet

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_genes(self) -> int:
        return len(self.genes)

    def layer_table(self) -> list[dict]:
        return [info.table_row() for info in self.infos]

    def bitops(self, allocation: Sequence[tuple[int, int]]) -> int:
        """BitOPs of one denoiser call for one sample: sum over layers of MACs * b_w * b_a (pinned at their bits)."""
        return call_bitops(self.infos, self._check_allocation(allocation))

    def size_mb(self, allocation: Sequence[tuple[int, int]]) -> float:
        """Storage of the quantized weights at their bits plus every other parameter at 32 bits, in MB (1e6 B)."""
        bits = weight_bits(self.infos, [self._check_allocation(allocation)])
        other = sum(p.numel() for p in self.unet.parameters()) - sum(info.params for info in self.infos)
        return (bits + 32 * other) / 8 / 1e6

    def layer_bits(self, allocation: Sequence[tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """(w_bits, a_bits) of every quantized layer under ``allocation`` (pinned layers at their pins)."""
        alloc = self._check_allocation(allocation)
        return {i.fqn: tuple(i.pinned) if i.pinned else tuple(alloc[i.gene]) for i in self.infos}

    def layer_algos(self, algos: Sequence[int] = ()) -> dict[str, int]:
        """FQN -> Winograd tile m of the layers ``algos`` runs by Winograd (direct layers left out), pinned
        Winograd layers included."""
        out = {n: m for n, m in zip(self.wino_layers, self._check_algos(algos)) if m}
        out.update({n: lay.algo for n, lay in self.layers.items() if n in self._pinned and getattr(lay, "algo", 0)})
        return out

    def pinned_config(self, allocation: Sequence[tuple[int, int]], algos: Sequence[int] = ()) -> SupernetConfig:
        """This config with every quantized layer pinned to its bits under ``allocation`` (and, with ``algos``, the
        Winograd layers to ``[w, a, m]``): the supernet of exactly that allocation (one option per layer, no genes),
        to calibrate it alone or to export it."""
        d = json.loads(self.config.to_json())
        wino = self.layer_algos(algos)
        d["pin"] = {fqn: [w, a, wino[fqn]] if fqn in wino else [w, a]
                    for fqn, (w, a) in sorted(self.layer_bits(allocation).items())}
        d["tie"], d["tie_qkv"] = [], False
        return SupernetConfig.from_json(json.dumps(d))

    # -- option switching ---------------------------------------------------------------------------------------
    def _check_allocation(self, allocation) -> list[tuple[int, int]]:
        alloc = [tuple(int(b) for b in wa) for wa in allocation]
        if len(alloc) != self.num_genes:
            raise TmpqError(f"allocation: expected {self.num_genes} (w_bits, a_bits) genes, got {len(alloc)}")
        for g, wa in enumerate(alloc):
            if len(wa) != 2:
                raise TmpqError(f"allocation: gene {g} must be (w_bits, a_bits), got {wa!r}")
            if wa[0] not in self.config.w_bits:
                raise TmpqError(f"allocation: gene {g} ({self.genes[g][0]}): weight bits {wa[0]} not in options "
                                f"{list(self.config.w_bits)}")
            if wa[1] not in self.config.a_bits:
                raise TmpqError(f"allocation: gene {g} ({self.genes[g][0]}): activation bits {wa[1]} not in options "
                                f"{list(self.config.a_bits)}")
        return alloc

    def set_bits(self, allocation: Sequence[tuple[int, int]]) -> None:
        """Serve a per-gene (w_bits, a_bits) allocation: O(layers) index switches, no recalibration."""
        alloc = self._check_allocation(allocation)
        w_idx = {b: i for i, b in enumerate(self.config.w_bits)}
        a_idx = {b: i for i, b in enumerate(self.config.a_bits)}
        for name, layer in self.layers.items():
            g = self._gene_of.get(name)
            if g is None:
                layer.set_bits(0, 0)
            else:
                layer.set_bits(w_idx[alloc[g][0]], a_idx[alloc[g][1]])

    def _check_algos(self, algos: Sequence[int]) -> list[int]:
        algos = [int(m) for m in algos]
        if not algos:
            return [0] * len(self.wino_layers)
        tiles = self.config.winograd
        if len(algos) != len(self.wino_layers) or any(m and m not in tiles for m in algos):
            raise TmpqError(f"algos: expected {len(self.wino_layers)} entries (one per Winograd-eligible conv), each "
                            f"0 (direct) or one of supernet.winograd {list(tiles)}, got {algos}")
        return algos

    def set_algos(self, algos: Sequence[int]) -> None:
        """Run each Winograd-eligible conv (:attr:`wino_layers`, in order) directly (0) or by its calibrated Winograd
        F(m, 3) option at its live (w, a) option; ``()``: all direct. Shared by every timestep group (the
        Winograd ``V`` ranges are one set for all of them); full precision (:meth:`set_fp`) is always direct."""
        for name, m in zip(self.wino_layers, self._check_algos(algos)):
            self.layers[name].set_algo(m)

    def set_uniform(self, w_bits: int, a_bits: int) -> None:
        self.set_bits([(w_bits, a_bits)] * self.num_genes)

    def set_fp(self) -> None:
        """Full-precision passthrough (every layer, pinned ones included)."""
        for layer in self.layers.values():
            layer.set_bits(None, None)

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    # -- timestep groups ----------------------------------------------------------------------------------------
    def time_group_of(self, t) -> int:
        """Group index of the denoiser call at model time(s) ``t`` (what the denoiser is called with: tmpq's integer
        timesteps on the DDPM axis, sigma * N on a flow axis, mapped back to the integer grid the groups' starts
        live on); every timestep of one call must fall in the same group."""
        ts = index_time(self.unet, torch.as_tensor(t).reshape(-1).contiguous())  # a pipeline may pass a stride-0 one
        if ts.numel() == 0:
            raise TmpqError("time_groups: a denoiser call without a timestep")
        starts = torch.as_tensor(self.time_starts, dtype=ts.dtype, device=ts.device)
        groups = torch.bucketize(ts, starts, right=True)
        g = int(groups[0])
        if ts.numel() > 1 and not bool((groups == g).all()):
            raise TmpqError(f"time_groups: one denoiser call mixes timesteps of groups {sorted(set(groups.tolist()))} "
                            f"(group starts {self.time_starts}); call the denoiser with one timestep group per batch")
        return g

    def bank_row(self, t, null: bool = False) -> int:
        """The bank row of a call at timestep(s) ``t`` in the conditional (or, ``null``, the null) pass."""
        g = self.time_group_of(t) if self.time_starts else 0
        return (self.config.time_groups if null and self.passes > 1 else 0) + g

    def select_time_group(self, g: int) -> None:
        """Make bank row ``g``'s activation ranges and bias corrections live in every layer (skipped if already)."""
        if g != self._live_group:
            for layer in self.layers.values():
                layer.load_time_group(g)
            self._live_group = g

    def _route_by_timestep(self, module, args, kwargs):
        if not self.time_starts:  # not calibrated / loaded yet: calibration drives the groups itself
            return None
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is None:
            raise TmpqError("time_groups: the denoiser was called without a timestep")
        self.select_time_group(self.time_group_of(t))
        return None

    @torch.no_grad()
    def correct_bias(self, data: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Bias correction of every weight option of every layer: one FP pass over ``data`` measures each option's
        mean output shift on the layer's FP inputs (``quant.layers.correct_bias``)."""
        correct_bias(self.layers.values(), lambda: [forward(self.unet, b) for b in data])

    def observe(self, batches) -> None:
        """Run ``batches`` with every layer's observers on (one calibration pass at the live options)."""
        for layer in self.layers.values():
            layer.observing = True
        try:
            for batch in batches:
                forward(self.unet, batch)
        finally:
            for layer in self.layers.values():
                layer.observing = False

    def calibrate(self, data, mode: str = "per-option", seed: int = 0, progress: bool = True,
                  checkpoint: Path | str | None = None) -> None:
        """Calibrate every option of every layer once (:func:`tmpq.supernet.calibration.calibrate`)."""
        calibration.calibrate(self, data, mode=mode, seed=seed, progress=progress, checkpoint=checkpoint)

    def reconstruct(self, data, iters: int = 200, lr: float = 1e-3, progress: bool = True) -> list[dict]:
        """BRECQ / AdaRound per weight option (:func:`tmpq.supernet.calibration.reconstruct`)."""
        return calibration.reconstruct(self, data, iters=iters, lr=lr, progress=progress)

    # -- persistence (tmpq.supernet.store) ----------------------------------------------------------------------
    def quantizer_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()
                if ".w_quant." in k or ".a_quant" in k or ".wino." in k}

    def save(self, path: Path | str, progress: dict | None = None) -> Path:
        """Save the quantizer state and its metadata (:func:`tmpq.supernet.store.save_supernet`)."""
        return save_supernet(self, path, progress)

    def load(self, path: Path | str, allow_partial: bool = False) -> dict:
        """Load a saved state (:func:`tmpq.supernet.store.load_supernet`); returns the calibration progress."""
        return load_supernet(self, path, allow_partial)

    @classmethod
    def from_file(cls, unet: nn.Module, path: Path | str) -> "QuantSupernet":
        """Build the supernet described in a saved file's metadata over ``unet`` and load its calibrated state."""
        config = supernet_config_of(path)
        try:
            net = cls(unet, config)
        except TmpqError as exc:  # the file's config does not fit this model
            raise TmpqError(f"supernet file {path}: {exc}") from None
        net.load(path)
        return net


# -- separate guidance-pass ranges ---------------------------------------------------------------------------------
def _forward_by_pass(unet: nn.Module, *args, **kwargs):
    """The denoiser's forward under ``guidance_ranges = "separate"`` (bound to the denoiser in place of its class's
    forward): makes the bank row of the call's timestep group and pass live, and runs a call that batches both
    passes (rows at the null conditioning and rows not, as stock pipelines batch guidance) as one call per pass,
    its outputs put back in the caller's row order. Before calibration it is the class's forward."""
    net = unet._tmpq_pass_router
    run = type(unet).forward
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))  # SD3's pipeline passes it by keyword
    if not net._calibrated or not isinstance(x, torch.Tensor):
        return run(unet, *args, **kwargs)
    n = x.shape[0]
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise TmpqError("supernet: the denoiser was called without a timestep")
    null = adapter_for(unet).null_rows(unet, kwargs, n).to(x.device)
    if bool(null.all()) or not bool(null.any()):
        net.select_time_group(net.bank_row(t, bool(null[0])))
        return run(unet, *args, **kwargs)
    outs = []
    for is_null, mask in ((False, ~null), (True, null)):
        net.select_time_group(net.bank_row(t, is_null))
        outs.append(run(unet, *_rows_of(args, mask, n), **_rows_of(kwargs, mask, n)))
    return _merge_rows(outs[0], outs[1], null)


def _rows_of(obj, mask: torch.Tensor, n: int):
    """``obj`` (arguments: tensors, tuples, lists, dicts of them) with every tensor of ``n`` rows cut to ``mask``."""
    if isinstance(obj, torch.Tensor):
        return obj[mask] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows_of(v, mask, n) for v in obj)
    if isinstance(obj, dict):
        return {k: _rows_of(v, mask, n) for k, v in obj.items()}
    return obj


def _merge_rows(a, b, null: torch.Tensor):
    """Outputs of the two passes back in one batch: rows ``~null`` from ``a``, rows ``null`` from ``b``."""
    if isinstance(a, torch.Tensor):
        out = a.new_empty((null.numel(), *a.shape[1:]))
        out[~null], out[null] = a, b
        return out
    if isinstance(a, tuple):
        return tuple(_merge_rows(x, y, null) for x, y in zip(a, b))
    if isinstance(a, dict):  # a diffusers output (an OrderedDict with attribute access)
        return type(a)(**{k: _merge_rows(a[k], b[k], null) for k in a})
    raise TmpqError(f"supernet.guidance_ranges: cannot merge denoiser outputs of type {type(a).__name__}")
