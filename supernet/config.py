"""Supernet configuration and the value types that cross process / disk boundaries (JSON round-trip)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from tmpq.core.choices import GUIDANCE_RANGES, ROUNDINGS, STREAM_RANGES, TWO_BIT
from tmpq.core.cost import LayerCost
from tmpq.core.errors import TmpqError
from tmpq.quant.binarize import BINARY_BITS
from tmpq.quant.quantizer import GRANULARITIES, OBSERVERS, SUPPORTED_BITS
from tmpq.quant.winograd import TILES

# ties the q, k, v projections of each diffusers ``Attention`` module into one gene (``tie_qkv``): the capture is the
# module's path, so a UNet's self- and cross-attention (``attn1`` / ``attn2``) and a DiT's blocks tie per module
TIE_QKV = r"(.*)\.to_[qkv]$"
# what supernet files before ``tie_qkv`` stored in ``tie`` for it (read back as tie_qkv = true)
_LEGACY_TIE_QKV = r"(.*attentions\.\d+)\.to_[qkv]$"


def _check_bits(key: str, b, weight: bool) -> None:
    """Weights take 1..16 bits (1 and 2 through the multi-basis binarizer), activations 2..16."""
    ok = not isinstance(b, bool) and (b in SUPPORTED_BITS or (weight and b in BINARY_BITS))
    if not ok:
        raise TmpqError(f"{key}: {b} is not a supported bit-width "
                        f"({'1..16 for weights' if weight else '2..16 for activations'})")


@dataclass(frozen=True)
class SupernetConfig:
    """Which layers are quantized, with which bit options, and how.

    - ``w_bits`` / ``a_bits``: candidate weight / activation bit-widths of every searchable layer.
    - ``include`` / ``exclude``: ``fnmatch`` patterns over module FQNs (Conv2d / Linear only).
    - ``pin``: FQN pattern -> ``[w_bits, a_bits]``; matching layers are fixed. ``"auto"`` (the default): the
      denoiser adapter's pins (``tmpq.core.adapters``), for a UNet ``conv_in`` at 8-bit weights and 16-bit inputs
      and ``conv_out`` at 16 / 16. Both carry one image channel, so their MACs are a sliver of the
      model's (over W8A8 pins, BitOPs of uniform W8A8 +0.5 %, of W4A6 +1.3 %, embedded model), and both were the
      largest single errors of uniform W8A8 (embedded model, 20 uniform DDIM steps, 64 images, paired pixel MSE to
      FP; ``benchmarks/supernet_diag.py``): the 8-bit grid on the sampler state x_t (``conv_in``'s input) gave
      0.0011 of the 0.0013 of all 8-bit activations, and ``conv_out``'s one-scale 8-bit weights (one output
      channel) 0.00024, more than all other weights together. W8A8: 0.0016 with both pinned W8A8, 0.00022 with
      16-bit inputs, 0.00017 with ``conv_out`` at W16A16 as well.
    - ``tie``: regexes with one capture group; layers whose match captures the same text share one gene.
    - ``tie_qkv``: one gene for the q, k, v projections of each attention module (``TIE_QKV``; a model without
      attention has none to tie).
    - ``split_skip``: Q-Diffusion split quantization of the UNet skip concatenation.
    - ``w_rounding``: ``nearest`` or ``adaround`` (learned rounding, BRECQ block reconstruction over the modules
      whose class is in ``block_types``; layers outside any block are reconstructed on their own).
    - ``w_two_bit``: 2-bit weight options as ``multibasis`` (BinaryDM-style two sign bases, ``quant.binarize``) or
      ``affine``; 1-bit weight options are always one sign basis.
    - ``w_observer`` / ``a_observer``: range observers. Activations default to ``minmax``: the clipping that the
      ``mse`` search picks (per layer, on its inputs) is a systematic error that the sampler accumulates. Uniform
      DDIM 100 steps, 64 images, paired pixel MSE to FP (``benchmarks/supernet_diag.py --steps 100 --a-observer``):
      W8A8 0.00081 (minmax) vs 0.00143 (percentile 99.99) vs 0.00258 (mse); W6A6 0.046 vs 0.056 (mse). At 10
      steps the two are even (W8A8 0.00013 vs 0.00017, W6A6 0.0035 vs 0.0036).
    - ``bias_correction``: subtract each weight option's mean output shift on the calibration inputs from the layer's
      bias (see ``quant.layers``).
    - ``group_size``: inputs per weight group for ``w_granularity = "group"`` (0 = unset).
    - ``time_groups``: G > 1 calibrates the activation ranges and bias corrections once per contiguous group of the
      calibration timesteps (G groups of equally many distinct timesteps) and switches them by each denoiser call's
      timestep (weights stay shared): activation ranges of a diffusion denoiser drift with t. Uniform W8A8, 100 DDIM
      steps, paired pixel MSE to FP on 256 images: 0.00109 (G = 1), 0.00089 (2), 0.00066 (4)
      (``benchmarks/supernet_diag.py --time-groups``). A denoiser call must not mix timesteps of two groups. The
      default 4 needs ``time_groups = 1`` beside ``w_rounding = "adaround"``.
    - ``guidance_ranges``: with classifier-free guidance, ``"shared"`` activation ranges (and bias corrections)
      serve the conditional and the null pass alike; ``"separate"`` calibrates a second bank for the null pass
      (each time group twice) and switches by each call's conditioning (a call that batches both passes, as stock
      pipelines do, runs as one call per pass). Needs calibration with guidance; weights stay shared.
    - ``stream_ranges``: a joint-attention transformer (MMDiT: Stable Diffusion 3) projects its image and text
      tokens with separate Linears, so by default (``"separate"``) each stream's attention projections have their own
      activation ranges; ``"shared"`` gives each pair of a block (``to_q`` / ``add_q_proj``, ``to_k`` / ``add_k_proj``,
      ``to_v`` / ``add_v_proj``, ``to_out.0`` / ``to_add_out``) one range covering both streams, per option and time
      group: what a kernel that runs the joint sequence through one fused projection sees. The adapter names the
      pairs (``DenoiserAdapter.stream_pairs``); a model without them is unaffected.
    - ``winograd``: tile sizes m (2, 4, 6; ascending) of Winograd F(m, 3) options: every searchable 3x3, stride-1,
      dilation-1, groups-1, zero-padded Conv2d gets, per m, a calibrated Winograd option serving each of its
      (w, a) options (``U`` at the w bits per tile position x output channel with ``w_observer``, ``V`` at the a
      bits per tile position, no input / ``M`` quantization, the conv's own bias: ``quant.layers``), and the
      search an algorithm gene per such layer. Empty (the default): no Winograd state at all. A pin
      ``[w_bits, a_bits, m]`` (m one of these tiles) fixes a layer at Winograd F(m, 3): what an exported Winograd
      point pins (the cost model counts pinned layers as direct).

    This dataclass is the one source of these defaults: a run config's ``[supernet]`` section is this class, and
    ``tmpq calibrate`` fills only the options given on its command line.
    """

    w_bits: tuple[int, ...] = (8, 6, 4)
    a_bits: tuple[int, ...] = (8, 6)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    pin: dict | str = "auto"
    tie: tuple[str, ...] = ()
    tie_qkv: bool = True
    w_granularity: str = "channel"
    group_size: int = 0
    w_symmetric: bool = True
    a_symmetric: bool = False
    w_observer: str = "mse"
    a_observer: str = "minmax"
    split_skip: bool = True
    w_rounding: str = "nearest"
    w_two_bit: str = "multibasis"
    bias_correction: bool = True
    block_types: tuple[str, ...] = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "TimestepEmbedding")
    time_groups: int = 4
    guidance_ranges: str = "shared"
    stream_ranges: str = "separate"
    winograd: tuple[int, ...] = ()

    def __post_init__(self):
        if self.group_size is None:  # files and callers before group_size = 0 meant "unset"
            object.__setattr__(self, "group_size", 0)
        if _LEGACY_TIE_QKV in self.tie:
            object.__setattr__(self, "tie", tuple(t for t in self.tie if t != _LEGACY_TIE_QKV))
            object.__setattr__(self, "tie_qkv", True)
        if self.pin != "auto" and not isinstance(self.pin, dict):
            raise TmpqError(f"supernet.pin: must be \"auto\" or a table of pattern = [w_bits, a_bits], got "
                            f"{self.pin!r}")
        # pins as lists (as JSON reads them back), so configs compare equal across a round trip
        if isinstance(self.pin, dict):
            object.__setattr__(self, "pin", {k: list(v) if isinstance(v, tuple) else v for k, v in self.pin.items()})
        object.__setattr__(self, "w_bits", tuple(int(b) for b in self.w_bits))
        object.__setattr__(self, "a_bits", tuple(int(b) for b in self.a_bits))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "tie", tuple(self.tie))
        object.__setattr__(self, "block_types", tuple(self.block_types))
        if isinstance(self.winograd, (list, tuple)):
            object.__setattr__(self, "winograd", tuple(self.winograd))
        self.validate()

    def validate(self) -> None:
        for key in ("w_bits", "a_bits"):
            bits = getattr(self, key)
            if not bits:
                raise TmpqError(f"supernet.{key}: needs at least one bit-width")
            if len(set(bits)) != len(bits):
                raise TmpqError(f"supernet.{key}: repeated bit-width in {list(bits)}")
            for b in bits:
                _check_bits(f"supernet.{key}", b, weight=key == "w_bits")
        w = self.winograd
        if not isinstance(w, tuple) or not all(isinstance(m, int) and not isinstance(m, bool) for m in w):
            raise TmpqError(f"supernet.winograd: must be a list of tile sizes, got {w!r}")
        if any(m not in TILES for m in w) or list(w) != sorted(set(w)):
            raise TmpqError(f"supernet.winograd: tile sizes must be distinct, ascending, each one of "
                            f"{', '.join(map(str, TILES))}; got {list(w)}")
        if w and 1 in self.w_bits:
            raise TmpqError("supernet.winograd: 1-bit weight options (a sign basis) have no affine grid for the "
                            "transformed weight; drop 1 from supernet.w_bits or the Winograd tiles")
        for pat, wa in (self.pin.items() if isinstance(self.pin, dict) else ()):
            if not isinstance(wa, (list, tuple)) or len(wa) not in (2, 3):
                raise TmpqError(f"supernet.pin.{pat}: must be [w_bits, a_bits] (or [w_bits, a_bits, m]), got {wa!r}")
            _check_bits(f"supernet.pin.{pat}", wa[0], weight=True)
            _check_bits(f"supernet.pin.{pat}", wa[1], weight=False)
            if len(wa) == 3 and (isinstance(wa[2], bool) or wa[2] not in w or wa[0] == 1):
                raise TmpqError(f"supernet.pin.{pat}: the Winograd tile {wa[2]!r} must be one of supernet.winograd "
                                f"{list(w)} (with weights of >= 2 bits)")
        for t in self.tie:
            try:
                groups = re.compile(t).groups
            except (re.error, TypeError) as exc:
                raise TmpqError(f"supernet.tie: {t!r} is not a regular expression ({exc})") from None
            if groups != 1:
                raise TmpqError(f"supernet.tie: regex {t!r} needs exactly one capture group")
        for key, choices in (("w_two_bit", TWO_BIT), ("w_granularity", GRANULARITIES),
                             ("w_rounding", ROUNDINGS), ("w_observer", OBSERVERS),
                             ("a_observer", OBSERVERS)):
            if getattr(self, key) not in choices:
                raise TmpqError(f"supernet.{key}: must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise TmpqError(f"supernet.group_size: must be an integer >= 0 (0 = unset), got {self.group_size!r}")
        if self.w_granularity == "group" and not (self.group_size and self.group_size > 0):
            raise TmpqError("supernet.group_size: must be a positive integer for group granularity")
        if self.w_rounding == "adaround" and self.w_granularity != "channel":
            raise TmpqError("supernet.w_rounding: adaround needs w_granularity = channel")
        if isinstance(self.time_groups, bool) or not isinstance(self.time_groups, int) or self.time_groups < 1:
            raise TmpqError(f"supernet.time_groups: must be a positive integer, got {self.time_groups!r}")
        if self.time_groups > 1 and self.w_rounding == "adaround":
            raise TmpqError("supernet.time_groups: > 1 does not combine with w_rounding = adaround (block "
                            "reconstruction runs on mixed-timestep batches); set supernet.time_groups = 1")
        if self.guidance_ranges not in GUIDANCE_RANGES:
            raise TmpqError(f"supernet.guidance_ranges: must be one of {', '.join(GUIDANCE_RANGES)}, got "
                            f"{self.guidance_ranges!r}")
        if self.stream_ranges not in STREAM_RANGES:
            raise TmpqError(f"supernet.stream_ranges: must be one of {', '.join(STREAM_RANGES)}, got "
                            f"{self.stream_ranges!r}")
        if self.guidance_ranges == "separate" and self.w_rounding == "adaround":
            raise TmpqError("supernet.guidance_ranges: separate does not combine with w_rounding = adaround (block "
                            "reconstruction runs on batches of both passes)")

    def to_json(self) -> str:
        d = asdict(self)
        if d["stream_ranges"] == "separate":  # the files written before the key existed, byte for byte
            del d["stream_ranges"]
        if not d["winograd"]:  # likewise
            del d["winograd"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SupernetConfig":
        """Read back :meth:`to_json`, also of files written before a key existed (they meant its old value)."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError(f"expected an object, got {type(d).__name__}")
        d.setdefault("time_groups", 1)  # before supernet format v2
        d.setdefault("tie_qkv", False)  # before tie_qkv: the ties were all in ``tie``
        return cls(**d)


@dataclass(frozen=True)
class LayerInfo(LayerCost):
    """One quantized layer: the cost model's fields (FQN, MACs per sample per denoiser call, weight count, gene: None
    if pinned, pinned bits, ``wino``: (in_channels, out_channels, out_h, out_w) per sample of a Winograd-eligible
    conv of a supernet with ``winograd`` tiles, else None) and the wrapped module's kind and input split (skip
    concatenations)."""

    kind: str = ""
    split: int | None = None

    def table_row(self) -> dict:
        """The layer's fields as a dict (``wino`` only for a Winograd-eligible layer: old tables unchanged)."""
        d = dict(self.__dict__)
        if d.get("wino") is None:
            d.pop("wino", None)
        return d
