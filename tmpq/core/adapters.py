"""Denoiser adapters: how tmpq calls each denoiser class, with its conditioning.

Everything in tmpq that runs a denoiser (the sampler, calibration capture, the supernet's profiling and calibration,
sensitivity probes, int8 profiling) goes through the adapter of the denoiser's class instead of calling
``unet(x, t)``. An adapter says:

- ``kind(model)``: ``"none"`` (unconditional), ``"class"`` (``class_labels``) or ``"text"``
  (``encoder_hidden_states``; Stable Diffusion 3's and Flux's also ``pooled_projections``, PixArt's and Sana's also
  ``encoder_attention_mask``);
- ``eps(model, x, t, cond)``: the noise prediction for ``x`` at timesteps ``t`` under ``cond`` (a dict of keyword
  tensors with one row per sample, empty for unconditional models). A model that also predicts a variance
  (``out_channels = 2 * in_channels``, as DiT's) gives its first ``in_channels`` channels;
- ``conditions(model, indices, labels)``: the conditioning of noise-bank images ``indices`` (class models: label
  ``classes[index % len(classes)]``, or the given ``labels``; text models: prompt ``index % len(prompts)``), and
  ``null(model, cond)``: the unconditional counterpart that classifier-free guidance pairs with it;
- ``default_pins(model)``: the layers kept at fixed bits when a config does not say (the layers that touch the
  image: the first and the last; a DiT also its adaLN conditioning path, which runs once per image);
- ``feature_module(model)``: a module in the middle whose output summarises a sample (calibration strategy eda);
- ``model_time`` / ``index_time``: what the model is called with at tmpq's integer timesteps, and back;
  ``tokens(model)``: the image tokens its dynamic shifting is resolved at; ``embeds_guidance(model)``: whether it
  takes the guidance scale as an input (a guidance-distilled Flux: one pass, no null pass) instead of classifier-free
  guidance.

A wrapper around a denoiser (the quantized supernet) exposes it as ``.denoiser``; adapters see through it. Adapters
are found by class, subclasses included, the most recently registered first: :func:`register_adapter` adds one for
another class (see ``ToyAdapter`` in tests/test_adapters.py for a complete small one).

Conventions that differ between models are settings of one model, not of its adapter: a :class:`Conditioning`
value (the guidance scale, a class-conditional ``UNet2DModel``'s null label (diffusers has no convention for it), a
text model's prompt embeddings and the empty prompt's). The model handles (``LoadedModel``, ``DiffusionModel``) hold
it; :func:`bind_conditioning` files it in the one registry below, keyed by the denoiser object, so that what sees
only the denoiser (the sampler, the supernet's pass routing and profiling, a stock pipeline's call after
``apply_export``) finds it there. The registry holds weak references and sets nothing on the module: the user's
object is left as it was, and a copy of a denoiser is unbound until its loader binds it.
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKLWan,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    SanaTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)

from tmpq.core.cost import output_macs
from tmpq.core.errors import TmpqError
from tmpq.core.timeaxis import TimeAxis, is_flow

KINDS = ("none", "class", "text")


@dataclasses.dataclass(frozen=True, eq=False)
class Conditioning:
    """How one model is conditioned and guided, everything that differs between models of a class:

    - ``guidance_scale``: classifier-free guidance of its sampling (1 = none);
    - ``null_label``: a class model's unconditional label (None: its adapter's; a class UNet has none);
    - ``prompt_embeds`` ``[P, L, D]``: a text model's prompts, encoded (image ``i`` takes prompt ``i % P``);
    - ``null_embeds`` ``[1, L, D]``: the empty prompt's embedding (the null pass of a text model's guidance);
    - ``pooled_embeds`` ``[P, D']`` / ``null_pooled`` ``[1, D']``: the same prompts' pooled embeddings, for a model
      conditioned on both (Stable Diffusion 3's and Flux's ``pooled_projections``; None for the others);
    - ``prompt_mask`` ``[P, L]`` / ``null_mask`` ``[1, L]``: the tokenizer's attention masks of the prompts and of
      the empty prompt, for a model that attends to the text tokens under them (PixArt's ``encoder_attention_mask``;
      None for the others);
    - ``embedded_guidance``: a guidance-distilled model's guidance scale, which it takes as an input of its one pass
      (Flux's ``guidance`` with ``guidance_embeds``: no null pass, so its ``guidance_scale`` stays 1); None for the
      others. :attr:`sampling_scale` is the scale a model samples at, whichever of the two it is;
    - ``prompt_labels``: the class each row of ``prompt_embeds`` stands for, when a text-conditioned model takes
      learned class tokens as its text (the embedded MMDiT: :data:`tmpq.core.model.CLASS_TOKENS_NAME`); sampling then
      takes class labels, and class accuracy is measured; None for a model conditioned on prompts.
    """

    guidance_scale: float = 1.0
    null_label: int | None = None
    prompt_embeds: torch.Tensor | None = None
    null_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    null_mask: torch.Tensor | None = None
    embedded_guidance: float | None = None
    prompt_labels: tuple[int, ...] | None = None

    @property
    def sampling_scale(self) -> float:
        """The guidance scale sampling runs at: a guidance-distilled model's embedded guidance, else the classifier-free
        ``guidance_scale``."""
        return self.guidance_scale if self.embedded_guidance is None else self.embedded_guidance

    def replace(self, **changes) -> "Conditioning":
        """This conditioning with the given fields changed (``None`` values leave a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


UNCONDITIONED = Conditioning()
# the one place a denoiser's Conditioning is found from the denoiser alone (see the module doc)
_BOUND: "weakref.WeakKeyDictionary[torch.nn.Module, Conditioning]" = weakref.WeakKeyDictionary()
# and its FP companions, held beside it the same way (not attributes of the module: a copy of the denoiser does not
# drag a VAE along, and nothing is set on a diffusers module): "vae" and "text" ((encoder, tokenizer))
_PARTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
# and the time axis it was trained on (tmpq.core.timeaxis): DDPM unless its loader binds another
_AXIS: "weakref.WeakKeyDictionary[torch.nn.Module, TimeAxis]" = weakref.WeakKeyDictionary()


def denoiser_of(model):
    """The denoiser inside a wrapper (``.denoiser``), or the model itself."""
    return getattr(model, "denoiser", model)


class DenoiserAdapter:
    """Base adapter: a denoiser called as ``model(x, t, **cond)`` that returns ``.sample`` (or a tuple / a tensor),
    whose ``config`` has ``in_channels`` and ``sample_size``. Subclasses set ``cls`` and override what differs."""

    cls: type = object

    def matches(self, model) -> bool:
        return isinstance(model, self.cls)

    def kind(self, model) -> str:
        return "none"

    def sample_shape(self, model) -> tuple[int, int, int]:
        """(channels, height, width) of one sample, from the config (``sample_size`` an int or a pair)."""
        size = model.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(model.config.in_channels), int(h), int(w))

    def check(self, model) -> None:
        """Refuse, in one line, a configuration this adapter would sample wrongly: a prediction whose channels are
        neither the sample's nor twice them (a learned variance), i.e. extra input channels used as conditioning
        (inpainting, concatenated control) or a different output space; a sample size that is not positive, or
        that the denoiser's resolution steps (``size_multiple``) do not divide."""
        cfg = model.config
        name = type(model).__name__
        c, h, w = self.sample_shape(model)
        out = getattr(cfg, "out_channels", None) or c
        if out not in (c, 2 * c):
            raise TmpqError(f"{name}: out_channels = {out} with in_channels = {c}: tmpq samples denoisers that "
                            f"predict the sample's own channels (or twice them, with a learned variance); extra "
                            f"input channels used as conditioning are not served")
        if min(h, w) < 1:
            raise TmpqError(f"{name}: sample_size {cfg.sample_size!r} must be positive")
        k = self.size_multiple(model)
        if h % k or w % k:
            raise TmpqError(f"{name}: sample_size {cfg.sample_size!r} is not a multiple of {k} (the model's "
                            f"downsampling / patch size) in both dimensions, so its output would not have the "
                            f"sample's shape")

    def size_multiple(self, model) -> int:
        """What each spatial dimension of a sample must be a multiple of: 2 per downsampling block of a UNet, the
        patch size of a transformer."""
        blocks = getattr(model, "down_blocks", None)
        if blocks is not None:
            return 2 ** sum(1 for b in blocks if getattr(b, "downsamplers", None))
        return int(getattr(model.config, "patch_size", None) or 1)

    def scheduler_config(self, model, config: dict) -> dict:
        """The model's noise-schedule config with what its own pipeline's sampler implies where the config is silent
        (the loaders apply it to a directory's and a live pipeline's scheduler config); unchanged by default."""
        return config
    def tokens(self, model) -> int:
        """The image tokens of one sample, (H / patch) * (W / patch): the token count a flow model's dynamic shifting
        is resolved at (:func:`tmpq.core.model.bind_axis`)."""
        c, h, w = self.sample_shape(model)
        patch = int(getattr(model.config, "patch_size", None) or 1)
        return (h // patch) * (w // patch)

    def embeds_guidance(self, model) -> bool:
        """Whether the model takes the guidance scale as an input (a guidance-distilled model: one pass, no null
        pass; :func:`guided_eps` routes the scale into its call) instead of classifier-free guidance."""
        return False

    def model_time(self, model, t: torch.Tensor) -> torch.Tensor:
        """What the model is called with at tmpq's integer timesteps ``t``: ``t`` itself on the DDPM axis (the same
        tensor), sigma(t) * N (float32, as diffusers' flow pipelines call it) on a flow axis."""
        axis = time_axis_of(model)
        if not axis.flow:
            return t
        u = (t.double() + 1.0) / axis.num_train_timesteps
        sigma = axis.shift * u / (1.0 + (axis.shift - 1.0) * u)
        return (sigma.float() * axis.num_train_timesteps)

    def index_time(self, model, t: torch.Tensor) -> torch.Tensor:
        """tmpq's integer timesteps of model times ``t`` (the inverse of :meth:`model_time`, rounded to the grid)."""
        axis = time_axis_of(model)
        if not axis.flow:
            return t
        s = (t.double() / axis.num_train_timesteps).clamp(0.0, 1.0)
        u = s / (axis.shift - (axis.shift - 1.0) * s)
        return torch.round(u * axis.num_train_timesteps - 1.0).to(torch.int64)

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict):
        """One forward of ``model`` (the denoiser or a wrapper around it) at model times ``t`` (what the model is
        called with: :func:`model_time` of tmpq's integer timesteps); returns what the model returns."""
        return model(x, t, **cond)

    def eps(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model's prediction (noise, or a flow model's velocity) at integer timesteps ``t`` of its axis."""
        out = self.call(model, x, model_time(model, t), cond)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else out

    # conditioning (unconditional by default)
    def classes(self, model) -> list[int]:
        return []

    def null_label(self, model) -> int | None:
        return None

    def conditions(self, model, indices: Sequence[int], labels=None, device=None) -> dict:
        kind = self.kind(model)
        if kind == "class":
            return {"class_labels": _labels(indices, labels, self.classes(model), device)}
        if kind == "text":
            indices = prompt_indices(model, indices, labels)
            embeds = conditioning_of(model).prompt_embeds
            if embeds is None:
                raise TmpqError(f"{type(model).__name__} is text-conditional: give prompts (model.prompts in a run "
                                f"config) so that tmpq can condition it")
            idx = torch.tensor([int(i) % len(embeds) for i in indices])
            return {"encoder_hidden_states": embeds[idx].to(device)}
        if labels is not None:
            raise TmpqError(f"labels: {type(model).__name__} is not class-conditional")
        return {}

    def null(self, model, cond: dict) -> dict:
        kind = self.kind(model)
        if kind == "class":
            null = self.null_label(model)
            if null is None:
                raise TmpqError(f"guidance: {type(model).__name__} has no null label (set model.null_label to the "
                                f"label it was trained to treat as unconditional, or keep guidance_scale = 1)")
            return {"class_labels": torch.full_like(cond["class_labels"], null)}
        if kind == "text":
            empty = conditioning_of(model).null_embeds
            if empty is None:
                raise TmpqError(f"guidance: {type(model).__name__} has no empty-prompt embedding")
            h = cond["encoder_hidden_states"]
            return {"encoder_hidden_states": empty.to(h.device, h.dtype).expand(h.shape[0], -1, -1)}
        raise TmpqError(f"guidance: {type(model).__name__} is unconditional (keep guidance_scale = 1)")

    def null_rows(self, model, kwargs: dict, n: int) -> torch.Tensor:
        """Which of the ``n`` rows of a denoiser call (its keyword arguments) are the null pass of guidance: a class
        model's rows at its null label, a text model's rows at the empty prompt's embedding (to float tolerance: a
        stock pipeline encodes it in its own batch)."""
        none = torch.zeros(n, dtype=torch.bool)
        kind, null = self.kind(model), self.null_label(model)
        if kind == "class" and kwargs.get("class_labels") is not None and null is not None:
            labels = torch.as_tensor(kwargs["class_labels"]).reshape(-1).cpu()
            return (labels.expand(n) if labels.numel() == 1 else labels) == null
        empty, h = conditioning_of(model).null_embeds, kwargs.get("encoder_hidden_states")
        if kind == "text" and h is not None and empty is not None and h.shape[1:] == empty.shape[1:]:
            empty = empty.to(h.device, h.dtype)
            return ((h - empty).abs().flatten(1).amax(1) <= 1e-4 * (1.0 + float(empty.abs().amax()))).cpu()
        return none

    def example(self, model, n: int, device) -> dict:
        """Valid conditioning for ``n`` samples (profiling and int8 checks)."""
        if self.kind(model) == "text" and conditioning_of(model).prompt_embeds is None:
            dim = int(model.config.cross_attention_dim)
            return {"encoder_hidden_states": torch.zeros(n, 1, dim, device=device)}
        return self.conditions(model, range(n), device=device)

    def default_pins(self, model) -> dict[str, list[int]]:
        return {}

    def stream_pairs(self, model) -> list[tuple[str, str]]:
        """(image-stream Linear, text-stream Linear) FQN pairs of a joint attention, whose activation ranges
        ``supernet.stream_ranges = "shared"`` ties; none for a model without joint attention."""
        return []

    def feature_module(self, model):
        return None


def _labels(indices: Sequence[int], labels, classes: list[int], device) -> torch.Tensor:
    if labels is None:
        out = [classes[int(i) % len(classes)] for i in indices]
    elif isinstance(labels, int):
        out = [labels] * len(indices)
    else:
        out = [int(v) for v in labels]
        if len(out) != len(indices):
            raise TmpqError(f"labels: {len(out)} labels for {len(indices)} images")
    bad = [v for v in out if v not in classes]
    if bad:
        raise TmpqError(f"labels: {bad[0]} is not a class of this model ({classes[0]}..{classes[-1]})")
    return torch.tensor(out, dtype=torch.int64, device=device)


class UNet2DAdapter(DenoiserAdapter):
    """``UNet2DModel``: unconditional, or class-conditional with ``num_class_embeds`` (the null label of guidance
    is a setting of each model, in its :class:`Conditioning`; it is not a class)."""

    cls = UNet2DModel

    def kind(self, model) -> str:
        return "class" if model.config.num_class_embeds else "none"

    def classes(self, model) -> list[int]:
        n = model.config.num_class_embeds or 0
        return [c for c in range(n) if c != self.null_label(model)]

    def null_label(self, model) -> int | None:
        return conditioning_of(model).null_label

    def default_pins(self, model) -> dict[str, list[int]]:
        return {"conv_in": [8, 16], "conv_out": [16, 16]}

    def feature_module(self, model):
        return model.mid_block


class UNet2DConditionAdapter(DenoiserAdapter):
    """``UNet2DConditionModel`` (Stable Diffusion's): ``encoder_hidden_states`` from a text encoder; tmpq holds
    the embeddings of the run's prompts and of the empty prompt in the model's :class:`Conditioning`."""

    cls = UNet2DConditionModel

    def kind(self, model) -> str:
        return "text"

    def default_pins(self, model) -> dict[str, list[int]]:
        return {"conv_in": [8, 16], "conv_out": [16, 16]}

    def feature_module(self, model):
        return model.mid_block


class DiTAdapter(DenoiserAdapter):
    """``DiTTransformer2DModel``: ``class_labels`` of ``num_embeds_ada_norm`` classes; the null label is the extra
    embedding row label dropout trains (index ``num_embeds_ada_norm``, as diffusers' ``DiTPipeline`` uses)."""

    cls = DiTTransformer2DModel

    def kind(self, model) -> str:
        return "class"

    def call(self, model, x, t, cond):
        return model(x, timestep=t, **cond)

    def classes(self, model) -> list[int]:
        return list(range(int(model.config.num_embeds_ada_norm)))

    def null_label(self, model) -> int | None:
        own = conditioning_of(model).null_label
        return int(model.config.num_embeds_ada_norm) if own is None else own

    def default_pins(self, model) -> dict[str, list[int]]:
        # the conditioning path too: the adaLN-zero modulation of every block (its timestep / label embedder's
        # Linears and the Linear that makes shift, scale and gate) and the final layer's (proj_out_1). They run once
        # per image, not per token (about 1 % of the MACs of the embedded DiT), and their 8-bit activations were the
        # largest single sources of the W8A8 error on it (results/dit/diag: pinned at 16-bit activations, the paired
        # pixel MSE of W8A8 at 100 steps drops from 1.37e-3 to 0.80e-3)
        cond = {name: [8, 16] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                and (name == "proj_out_1" or re.fullmatch(r"transformer_blocks\.\d+\.norm1\.(emb\..+|linear)", name))}
        return {"pos_embed.proj": [8, 16], **cond, "proj_out_2": [16, 16]}

    def feature_module(self, model):
        return model.transformer_blocks[len(model.transformer_blocks) // 2]


def prompt_indices(model, indices: Sequence[int], labels=None) -> list[int]:
    """The noise-bank indices that pick each image's prompt row (image i takes row ``i % P``): ``indices`` as they
    are, or, given class ``labels`` (one int for all, or one per image), the row of each label, for a model whose
    prompts are learned class tokens (:attr:`Conditioning.prompt_labels`); other text models refuse labels."""
    if labels is None:
        return list(indices)
    known = conditioning_of(model).prompt_labels
    if known is None:
        raise TmpqError(f"labels: {type(denoiser_of(model)).__name__} is conditioned on prompts, not on class labels")
    return [known.index(v) for v in _labels(indices, labels, list(known), None).tolist()]


def image_labels(model, indices: Sequence[int]) -> torch.Tensor | None:
    """The class label each of the images ``indices`` is conditioned on (balanced over the classes, as sampling
    conditions them): a class model's labels, a class-token model's prompt labels; None for any other model."""
    inner = denoiser_of(model)
    adapter = adapter_for(inner)
    kind = adapter.kind(inner)
    if kind == "class":
        return adapter.conditions(inner, indices)["class_labels"]
    known = conditioning_of(inner).prompt_labels
    if kind == "text" and known is not None:
        return torch.tensor([known[int(i) % len(known)] for i in indices], dtype=torch.int64)
    return None


def _per_prompt(values, indices, device, missing: str) -> torch.Tensor:
    """The rows of a per-prompt tensor (``[P, ...]``) for noise-bank images ``indices`` (image i takes prompt
    ``i % P``, as the token embeddings do); ``missing`` is the one-line error when the model has none."""
    if values is None:
        raise TmpqError(missing)
    idx = torch.tensor([int(i) % len(values) for i in indices])
    return values[idx].to(device)


def _empty_rows(empty, like: torch.Tensor, missing: str) -> torch.Tensor:
    """The empty prompt's ``[1, ...]`` tensor repeated for every row of ``like`` (the null pass of guidance), on its
    device and dtype; ``missing`` is the one-line error when the model has none."""
    if empty is None:
        raise TmpqError(missing)
    return empty.to(like.device, like.dtype).expand(like.shape[0], -1)


class SD3Adapter(DenoiserAdapter):
    """``SD3Transformer2DModel`` (Stable Diffusion 3's MMDiT, a flow-matching model): called with the timestep by
    keyword, ``encoder_hidden_states`` ``[L, joint_attention_dim]`` (the CLIP and T5 token embeddings) and
    ``pooled_projections`` ``[pooled_projection_dim]`` (the two CLIP encoders' pooled outputs), both from the
    pipeline's own ``encode_prompt`` (:func:`tmpq.core.model.encode_text`); the null pass of guidance is the empty
    prompt's pair, as ``StableDiffusion3Pipeline`` computes it."""

    cls = SD3Transformer2DModel

    def kind(self, model) -> str:
        return "text"

    def call(self, model, x, t, cond):
        return model(x, timestep=t, **cond)

    def conditions(self, model, indices, labels=None, device=None) -> dict:
        indices = prompt_indices(model, indices, labels)  # class labels of a class-token model: their rows
        cond = super().conditions(model, indices, None, device)  # the token embeddings; refuses without prompts
        return {**cond, "pooled_projections": _per_prompt(
            conditioning_of(model).pooled_embeds, indices, device,
            f"{type(model).__name__} is conditioned on pooled prompt embeddings too: encode its prompts with its "
            f"pipeline's text encoders (model.prompts in a run config)")}

    def null(self, model, cond: dict) -> dict:
        out = super().null(model, {"encoder_hidden_states": cond["encoder_hidden_states"]})
        return {**out, "pooled_projections": _empty_rows(conditioning_of(model).null_pooled, cond["pooled_projections"],
                                                         f"guidance: {type(model).__name__} has no empty-prompt "
                                                         f"pooled embedding")}

    def example(self, model, n: int, device) -> dict:
        c = conditioning_of(model)
        if c.prompt_embeds is None or c.pooled_embeds is None:
            return {"encoder_hidden_states": torch.zeros(n, 1, int(model.config.joint_attention_dim), device=device),
                    "pooled_projections": torch.zeros(n, int(model.config.pooled_projection_dim), device=device)}
        return self.conditions(model, range(n), device=device)

    def default_pins(self, model) -> dict[str, list[int]]:
        # as the DiT's: the layers that touch the image or the conditioning once per sample, not per image token:
        # the patch embedding (the image's first layer), the timestep and pooled-text embedders and the caption
        # projection (the text stream's first layer), the adaLN modulation Linears of both streams of every block
        # (shift / scale / gate) and of the final norm, at W8A16; the output projection (the last layer) at W16A16.
        # They are a small share of the MACs (the per-token attention and MLP Linears dominate); not measured here
        embed = re.compile(r"time_text_embed\..+|context_embedder|norm_out\.linear"
                           r"|transformer_blocks\.\d+\.norm1(_context)?\.linear")
        cond = {name: [8, 16] for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and embed.fullmatch(name)}
        return {"pos_embed.proj": [8, 16], **cond, "proj_out": [16, 16]}

    def stream_pairs(self, model) -> list[tuple[str, str]]:
        # the joint attention of every block: each image-stream projection and its text-stream twin (the last
        # block's text stream ends before its output projection)
        names = {name for name, _ in model.named_modules()}  # Linears, or the layers a supernet wraps them in
        out = []
        for i in range(len(model.transformer_blocks)):
            a = f"transformer_blocks.{i}.attn"
            out += [(f"{a}.{img}", f"{a}.{txt}") for img, txt in (("to_q", "add_q_proj"), ("to_k", "add_k_proj"),
                                                                  ("to_v", "add_v_proj"), ("to_out.0", "to_add_out"))
                    if f"{a}.{img}" in names and f"{a}.{txt}" in names]
        return out

    def feature_module(self, model):
        # a block returns (text stream, image stream), and the last one None for its text stream: the middle
        # block's image-stream MLP is the module whose output summarises the image
        return model.transformer_blocks[len(model.transformer_blocks) // 2].ff


class PixArtAdapter(DenoiserAdapter):
    """``PixArtTransformer2DModel`` (PixArt-Sigma's / -Alpha's DiT, DDPM axis, epsilon and a learned variance):
    called with the timestep by keyword, ``encoder_hidden_states`` (the T5 encoder's last hidden state) with
    ``encoder_attention_mask`` (the tokenizer's attention mask), both from the stock pipeline's own ``encode_prompt``
    (:func:`tmpq.core.model.encode_masked`), and ``added_cond_kwargs``: ``{"resolution": None, "aspect_ratio":
    None}`` as ``PixArtSigmaPipeline`` passes them, or, for a model whose ``use_additional_conditions`` asks for
    them, the image's (height, width) in pixels and height / width, as ``PixArtAlphaPipeline`` computes them. The
    null pass of guidance is the empty prompt's embedding and mask, as the stock pipeline's negative prompt."""

    cls = PixArtTransformer2DModel

    def kind(self, model) -> str:
        return "text"

    def call(self, model, x, t, cond):
        return model(x, timestep=t, added_cond_kwargs=self.added_conditions(model, x, cond), **cond)

    def added_conditions(self, model, x: torch.Tensor, cond: dict) -> dict:
        """The ``added_cond_kwargs`` of a call on ``x``: None values unless the model uses additional conditions;
        then, per row, ``resolution`` = (height, width) of the decoded image (the latent's size times the VAE's
        scale factor, 2 ** (len(block_out_channels) - 1), 8 without a VAE) and ``aspect_ratio`` = height / width, in
        the prompt embeddings' dtype, as ``PixArtAlphaPipeline`` passes them at its default size."""
        if not getattr(denoiser_of(model), "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        vae = decoder_of(model)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        h, w = int(x.shape[-2]) * scale, int(x.shape[-1]) * scale
        embeds = cond.get("encoder_hidden_states")
        dtype = embeds.dtype if embeds is not None else x.dtype
        n = x.shape[0]
        return {"resolution": torch.tensor([h, w]).repeat(n, 1).to(dtype=dtype, device=x.device),
                "aspect_ratio": torch.tensor([float(h / w)]).repeat(n, 1).to(dtype=dtype, device=x.device)}

    def conditions(self, model, indices, labels=None, device=None) -> dict:
        cond = super().conditions(model, indices, labels, device)  # the token embeddings; refuses without prompts
        return {**cond, "encoder_attention_mask": _per_prompt(
            conditioning_of(model).prompt_mask, indices, device,
            f"{type(model).__name__} attends to its prompts under their attention mask: encode its prompts with its "
            f"pipeline's text encoder (model.prompts in a run config)")}

    def null(self, model, cond: dict) -> dict:
        out = super().null(model, {"encoder_hidden_states": cond["encoder_hidden_states"]})
        return {**out, "encoder_attention_mask": _empty_rows(conditioning_of(model).null_mask,
                                                             cond["encoder_attention_mask"],
                                                             f"guidance: {type(model).__name__} has no empty-prompt "
                                                             f"attention mask")}

    def example(self, model, n: int, device) -> dict:
        c = conditioning_of(model)
        if c.prompt_embeds is None or c.prompt_mask is None:
            dim = int(model.config.caption_channels or model.config.cross_attention_dim)
            return {"encoder_hidden_states": torch.zeros(n, 1, dim, device=device),
                    "encoder_attention_mask": torch.ones(n, 1, dtype=torch.int64, device=device)}
        return self.conditions(model, range(n), device=device)

    def scheduler_config(self, model, config: dict) -> dict:
        # PixArt ships DPMSolverMultistepScheduler, whose config has no clip_sample: its sampler never clips the x0
        # prediction, and its latents (the VAE's scaled posterior) often leave [-1, 1]. tmpq's DDIM would read the
        # missing key as DDIM's default (clip) and damage the images: say explicitly that it does not clip
        if is_flow(config) or "clip_sample" in config:
            return config
        return {**config, "clip_sample": False}

    def default_pins(self, model) -> dict[str, list[int]]:
        # as the DiT's: the layers that touch the image or run once per sample, not per image token: the patch
        # embedding (the image's first layer), the adaLN-single path (the timestep embedder's Linears, any
        # resolution / aspect-ratio embedders, and the one Linear that makes every block's shift / scale / gate:
        # PixArt's blocks share it and keep only a learned table each) and the caption projection (the text
        # stream's first layer, once per text token) at W8A16; the output projection (the last layer) at W16A16.
        # They are a small share of the MACs (the per-token attention and MLP Linears dominate); not measured here
        embed = re.compile(r"adaln_single\..+|caption_projection\..+")
        cond = {name: [8, 16] for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and embed.fullmatch(name)}
        return {"pos_embed.proj": [8, 16], **cond, "proj_out": [16, 16]}

    def feature_module(self, model):
        return model.transformer_blocks[len(model.transformer_blocks) // 2]


class FluxAdapter(SD3Adapter):
    """``FluxTransformer2DModel`` (FLUX.1's MMDiT, a flow-matching model), called as ``FluxPipeline`` calls it.

    Its sample is the VAE latent ``[C, H, W]`` (``C = in_channels / 4``), as every other model's, so that the noise
    bank, calibration data, the solvers and the VAE decode stay image-shaped; :meth:`call` packs it into the
    transformer's 2 x 2 patch tokens ``[(H / 2) * (W / 2), 4 C]`` (``hidden_states``, with their ``img_ids``) and
    unpacks the prediction, exactly as ``FluxPipeline`` packs its latents. ``FluxPipeline`` draws its noise as the
    unpacked latent (one ``randn`` per image from its generator) and packs it: with
    :func:`tmpq.core.sampler.noise_generators` both start from the same numbers. Every step of a flow solver is
    elementwise, so packing commutes with it.

    - time: the transformer takes ``timestep = sigma`` (the pipeline divides the scheduler's sigma * 1000 by 1000;
      the model multiplies by 1000 again): :meth:`model_time` is the flow axis' sigma * N / 1000, :meth:`index_time`
      its inverse, so the supernet routes a stock pipeline's calls too;
    - conditioning: ``encoder_hidden_states`` (T5's token embeddings, ``txt_ids`` all zero) and
      ``pooled_projections`` (CLIP's pooled output), encoded by ``FluxPipeline.encode_prompt``;
    - guidance: a guidance-distilled model (``guidance_embeds``, FLUX.1 dev) takes the scale as its ``guidance``
      input, one pass, no null pass (:meth:`embeds_guidance`; the scale lives in
      :attr:`Conditioning.embedded_guidance`); a model without (FLUX.1 schnell) samples unguided;
    - the sample size: a transformer config has none. It is the latent of the VAE's ``sample_size`` (pixels, rounded
      to the 2 x 2 packing as ``FluxPipeline.prepare_latents`` rounds a height), else ``FluxPipeline``'s default
      latent of 128 x 128.
    """

    cls = FluxTransformer2DModel
    DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size: its latent height and width when the caller gives none

    def sample_shape(self, model) -> tuple[int, int, int]:
        vae = decoder_of(model)
        size = getattr(vae.config, "sample_size", None) if vae is not None else None
        if size is None:
            h = w = self.DEFAULT_LATENT
        else:
            blocks = getattr(vae.config, "block_out_channels", None)
            scale = 2 ** (len(blocks) - 1) if blocks else 8  # FluxPipeline.vae_scale_factor
            ph, pw = (size, size) if isinstance(size, int) else tuple(size)
            h, w = 2 * (int(ph) // (scale * 2)), 2 * (int(pw) // (scale * 2))
        return (int(model.config.in_channels) // 4, int(h), int(w))

    def check(self, model) -> None:
        cfg = model.config
        name = type(model).__name__
        if int(cfg.in_channels) % 4 or int(getattr(cfg, "patch_size", 1) or 1) != 1:
            raise TmpqError(f"{name}: in_channels = {cfg.in_channels} and patch_size = {cfg.patch_size}: tmpq packs "
                            f"latents into 2 x 2 tokens as FluxPipeline does (in_channels a multiple of 4, patch 1)")
        out = getattr(cfg, "out_channels", None) or cfg.in_channels
        if out != cfg.in_channels:
            raise TmpqError(f"{name}: out_channels = {out} with in_channels = {cfg.in_channels}: tmpq samples "
                            f"denoisers that predict the sample's own channels; extra input channels used as "
                            f"conditioning (Flux Fill / Depth / Canny) are not served")
        c, h, w = self.sample_shape(model)
        if min(h, w) < 2:
            raise TmpqError(f"{name}: a latent of {h} x {w} is smaller than one 2 x 2 token (the VAE's sample_size)")

    def size_multiple(self, model) -> int:
        return 2

    def tokens(self, model) -> int:
        c, h, w = self.sample_shape(model)
        return (h // 2) * (w // 2)

    def embeds_guidance(self, model) -> bool:
        return bool(getattr(model.config, "guidance_embeds", False))

    def model_time(self, model, t):
        return super().model_time(model, t) / 1000  # FluxPipeline: timestep / 1000, in the timestep's dtype

    def index_time(self, model, t):
        return super().index_time(model, torch.as_tensor(t) * 1000)

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` latents as Flux's tokens ``[B, (H / 2) * (W / 2), 4 C]``, each token one 2 x 2 patch
        (channel-major, then row, then column within the patch)."""
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of :meth:`pack` for ``h`` x ``w`` latents."""
        b, n, d = tokens.shape
        return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """``img_ids`` ``[(H / 2) * (W / 2), 3]`` of ``h`` x ``w`` latents: (0, token row, token column)."""
        rows = torch.arange(h // 2, dtype=dtype, device=device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, dtype=dtype, device=device).repeat(h // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=1)

    def call(self, model, x, t, cond):
        b, c, h, w = x.shape
        cond = dict(cond)
        text = cond.pop("encoder_hidden_states")
        guidance = cond.pop("guidance", None)
        inner = denoiser_of(model)
        if self.embeds_guidance(inner) and guidance is None:
            guidance = torch.full((b,), conditioning_of(inner).sampling_scale, dtype=torch.float32, device=x.device)
        out = model(hidden_states=self.pack(x), timestep=t, guidance=guidance if self.embeds_guidance(inner) else None,
                    encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, dtype=text.dtype,
                                                                    device=text.device),
                    img_ids=self.image_ids(h, w, x.device, x.dtype), return_dict=False, **cond)
        return self.unpack(out[0], h, w)

    def conditions(self, model, indices, labels=None, device=None) -> dict:
        cond = super().conditions(model, indices, labels, device)
        if self.embeds_guidance(model):
            cond["guidance"] = torch.full((len(cond["pooled_projections"]),), conditioning_of(model).sampling_scale,
                                          dtype=torch.float32, device=device)
        return cond

    def null(self, model, cond: dict) -> dict:
        if self.embeds_guidance(model):
            raise TmpqError(f"guidance: {type(model).__name__} (guidance_embeds) takes the guidance scale as an input, "
                            f"in one pass: it has no null pass")
        raise TmpqError(f"guidance: {type(model).__name__} without guidance_embeds samples unguided, as FluxPipeline "
                        f"does (keep guidance_scale = 1)")

    def null_rows(self, model, kwargs: dict, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.bool)  # no call of Flux is a null pass

    def example(self, model, n: int, device) -> dict:
        c = conditioning_of(model)
        if c.prompt_embeds is not None and c.pooled_embeds is not None:
            return self.conditions(model, range(n), device=device)
        out = {"encoder_hidden_states": torch.zeros(n, 1, int(model.config.joint_attention_dim), device=device),
               "pooled_projections": torch.zeros(n, int(model.config.pooled_projection_dim), device=device)}
        if self.embeds_guidance(model):
            out["guidance"] = torch.full((n,), c.sampling_scale, dtype=torch.float32, device=device)
        return out

    def default_pins(self, model) -> dict[str, list[int]]:
        # as SD3's: the layers that touch the image or the conditioning once per sample rather than per image
        # token, at W8A16: the image tokens' first layer (x_embedder), the timestep / guidance / pooled-text
        # embedders, the text stream's first layer (context_embedder), and the adaLN modulation Linears (shift / scale
        # / gate) of both streams of every double block (norm1, norm1_context), of every single block (norm.linear)
        # and of the final norm; the output projection (the last layer, the velocity itself) at W16A16. The
        # modulation Linears run once per sample (their MACs are a small share; the per-token attention and MLP
        # Linears dominate) and their error shifts every token's features alike. Not measured on a trained Flux
        embed = re.compile(r"time_text_embed\..+|context_embedder|x_embedder|norm_out\.linear"
                           r"|transformer_blocks\.\d+\.norm1(_context)?\.linear"
                           r"|single_transformer_blocks\.\d+\.norm\.linear")
        cond = {name: [8, 16] for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and embed.fullmatch(name)}
        return {**cond, "proj_out": [16, 16]}

    def feature_module(self, model):
        # the middle double block's image-stream MLP (a single block's output holds the text tokens too)
        if len(model.transformer_blocks):
            return model.transformer_blocks[len(model.transformer_blocks) // 2].ff
        return model.single_transformer_blocks[len(model.single_transformer_blocks) // 2].proj_mlp


class SanaAdapter(PixArtAdapter):
    """``SanaTransformer2DModel`` (Sana's linear-attention DiT on a deep-compression autoencoder's latents, flow
    matching), called as ``SanaPipeline`` calls it: the timestep by keyword, ``encoder_hidden_states`` (Gemma 2's
    last hidden state) with ``encoder_attention_mask``, both from the stock pipeline's own ``encode_prompt``
    (:func:`tmpq.core.model.encode_sana`: its default complex human instruction and 300 tokens), and no
    ``added_cond_kwargs``. The prompts, the empty prompt and the null pass are PixArt's (embeddings and masks).

    - time: ``SanaPipeline`` calls the transformer with the scheduler's timestep (sigma * N on the flow axis of its
      ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``) times the config's ``timestep_scale``;
      :meth:`model_time` is that product (in float32, in the pipeline's order), :meth:`index_time` its inverse;
    - not served: ``guidance_embeds`` (Sana-Sprint: ``SanaSprintPipeline`` and its SCM sampler), refused in one line.
    """

    cls = SanaTransformer2DModel

    def check(self, model) -> None:
        if getattr(model.config, "guidance_embeds", False):
            raise TmpqError(f"{type(model).__name__}: guidance_embeds = True (Sana-Sprint, sampled by "
                            f"SanaSprintPipeline's consistency sampler) is not served; tmpq serves SanaPipeline's "
                            f"models")
        super().check(model)

    def call(self, model, x, t, cond):
        return model(x, timestep=t, **cond)

    def timestep_scale(self, model) -> float:
        return float(getattr(model.config, "timestep_scale", 1.0) or 1.0)

    def model_time(self, model, t):
        return super().model_time(model, t) * self.timestep_scale(model)  # SanaPipeline: t * timestep_scale

    def index_time(self, model, t):
        return super().index_time(model, torch.as_tensor(t) / self.timestep_scale(model))

    def scheduler_config(self, model, config: dict) -> dict:
        return config  # not PixArt's DDPM-axis clip_sample default: Sana's schedulers are flow schedulers

    def default_pins(self, model) -> dict[str, list[int]]:
        # as PixArt's: the layers that touch the image or run once per sample, not per image token: the patch
        # embedding (the image's first layer, a Conv2d), the adaLN-single path (the timestep embedder's Linears and
        # time_embed.linear, the t_block that makes every block's shift / scale / gate; the blocks and the final norm
        # keep only learned scale_shift_tables, parameters, not layers) and the caption projection (the text stream's
        # first layer, once per text token) at W8A16; the output projection (the last layer) at W16A16. The blocks'
        # attention Linears and GLUMBConv convolutions are searched. Not measured on a trained Sana
        embed = re.compile(r"time_embed\..+|caption_projection\..+")
        cond = {name: [8, 16] for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and embed.fullmatch(name)}
        return {"patch_embed.proj": [8, 16], **cond, "proj_out": [16, 16]}


_REGISTRY: list[DenoiserAdapter] = [UNet2DAdapter(), UNet2DConditionAdapter(), DiTAdapter(), SD3Adapter(),
                                    PixArtAdapter(), FluxAdapter(), SanaAdapter()]  # (WanAdapter: below)


def register_adapter(adapter: DenoiserAdapter) -> None:
    """Use ``adapter`` for models of its class (``adapter.cls``, subclasses included), ahead of every adapter
    registered before it."""
    if not isinstance(adapter, DenoiserAdapter):
        raise TmpqError(f"register_adapter: expected a DenoiserAdapter, got {type(adapter).__name__}")
    _REGISTRY.insert(0, adapter)


def adapter_for(model) -> DenoiserAdapter:
    inner = denoiser_of(model)
    for a in _REGISTRY:
        if a.matches(inner):
            return a
    raise TmpqError(f"no denoiser adapter for {type(inner).__name__}; register one with tmpq.register_adapter "
                    f"(known: {', '.join(sorted({a.cls.__name__ for a in _REGISTRY}))})")


def bind_conditioning(model, cond: Conditioning) -> None:
    """File ``cond`` as the conditioning of ``model``'s denoiser (replacing any before); the model loaders call it."""
    if not isinstance(cond, Conditioning):
        raise TmpqError(f"conditioning: expected a Conditioning, got {type(cond).__name__}")
    _BOUND[denoiser_of(model)] = cond


def conditioning_of(model) -> Conditioning:
    """The conditioning bound to ``model``'s denoiser (unconditioned, unguided when none is)."""
    return _BOUND.get(denoiser_of(model), UNCONDITIONED)


def set_conditioning(model, null_label: int | None = None, prompt_embeds: torch.Tensor | None = None,
                     null_embeds: torch.Tensor | None = None, pooled_embeds: torch.Tensor | None = None,
                     null_pooled: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                     null_mask: torch.Tensor | None = None) -> None:
    """Change the given fields of ``model``'s bound conditioning (e.g. the null label of a class UNet that a stock
    pipeline holds after ``apply_export``)."""
    bind_conditioning(model, conditioning_of(model).replace(null_label=null_label, prompt_embeds=prompt_embeds,
                                                            null_embeds=null_embeds, pooled_embeds=pooled_embeds,
                                                            null_pooled=null_pooled, prompt_mask=prompt_mask,
                                                            null_mask=null_mask))


def sample_shape(model) -> tuple[int, int, int]:
    inner = denoiser_of(model)
    return adapter_for(inner).sample_shape(inner)


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance_scale: float = 1.0) -> torch.Tensor:
    """The (classifier-free guided) noise prediction: one batched call of the conditional and the null pass when
    ``guidance_scale != 1``: ``eps_null + s * (eps_cond - eps_null)``.

    A model that takes its guidance as an input (:meth:`DenoiserAdapter.embeds_guidance`, Flux with
    ``guidance_embeds``) runs one pass with ``guidance_scale`` as that input (``cond["guidance"]``, as its pipeline
    passes it); it never runs a null pass."""
    a = adapter_for(model)
    if a.embeds_guidance(denoiser_of(model)):
        scale = torch.full((x.shape[0],), float(guidance_scale), dtype=torch.float32, device=x.device)
        return a.eps(model, x, t, {**cond, "guidance": scale})
    if guidance_scale == 1.0:
        return a.eps(model, x, t, cond)
    both = with_null(model, cond)  # refuses a model that cannot guide
    e = a.eps(model, torch.cat([x, x]), torch.cat([t, t]), both)
    e_c, e_u = e.chunk(2)
    return e_u + guidance_scale * (e_c - e_u)


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x_t, t, cond) of a calibration batch: ``(x, t)`` (unconditional) or ``(x, t, cond)``."""
    x, t, *rest = batch
    return x, t, (rest[0] if rest else {})


def forward(model, batch):
    """One denoiser call on a calibration batch, through the model's adapter (what observation passes run)."""
    x, t, cond = unpack(batch)
    return denoise(model, x, t, cond)


def predict(model, batch) -> torch.Tensor:
    """The noise prediction of ``model`` on a calibration batch (distillation targets)."""
    x, t, cond = unpack(batch)
    return adapter_for(model).eps(model, x, t, cond)


def rows(cond: dict, idx) -> dict:
    """The rows ``idx`` (a slice, a mask or indices) of every conditioning tensor."""
    return {k: v[idx] for k, v in cond.items()}


def with_null(model, cond: dict) -> dict:
    """``cond`` followed by its null counterpart, row for row (the two passes of classifier-free guidance)."""
    inner = denoiser_of(model)
    null = adapter_for(inner).null(inner, cond)
    return {k: torch.cat([cond[k], null[k]]) for k in cond}


def select(batch, mask: torch.Tensor):
    """The rows ``mask`` of a calibration batch, its conditioning included."""
    x, t, cond = unpack(batch)
    return (x[mask], t[mask], rows(cond, mask))


def adapter_classes() -> list[type]:
    """The denoiser classes that have an adapter (model loading picks among them by ``_class_name``)."""
    return [a.cls for a in _REGISTRY]


def set_decoder(model, vae) -> None:
    """A latent model's VAE (``AutoencoderKL`` / ``AutoencoderTiny``, FP): samples are decoded through it before any
    metric. It is held beside the denoiser, not inside it: never quantized, not in its state dict, not in its BitOPs."""
    _PARTS.setdefault(denoiser_of(model), {})["vae"] = vae


def decoder_of(model):
    return _PARTS.get(denoiser_of(model), {}).get("vae")


def set_text_encoder(model, encoder, tokenizer) -> None:
    """A text model's FP text encoder and tokenizer, held beside the denoiser as its VAE is (never quantized): they
    encode the run's prompts once (:func:`tmpq.core.model.encode_prompts`) and travel into its export."""
    set_text_parts(model, {"text_encoder": encoder, "tokenizer": tokenizer})


def text_encoder_of(model):
    """``(text_encoder, tokenizer)`` of a text model loaded from a pipeline directory, or None."""
    parts = text_parts_of(model)
    return None if parts is None else (parts["text_encoder"], parts["tokenizer"])


def set_text_parts(model, parts: dict) -> None:
    """Every FP text part of a text model by its pipeline name (``text_encoder``, ``tokenizer`` and, for Stable
    Diffusion 3, ``text_encoder_2`` / ``tokenizer_2`` / ``text_encoder_3`` / ``tokenizer_3``, a part the pipeline
    runs without being None), held beside the denoiser as :func:`set_text_encoder` holds Stable Diffusion's pair."""
    if parts.get("text_encoder") is None or parts.get("tokenizer") is None:
        raise TmpqError("text encoder: a text_encoder and its tokenizer are needed")
    _PARTS.setdefault(denoiser_of(model), {})["text"] = dict(parts)


def text_parts_of(model) -> dict | None:
    """The text parts of a text model by pipeline name (:func:`set_text_parts`), or None."""
    parts = _PARTS.get(denoiser_of(model), {}).get("text")
    return None if parts is None else dict(parts)


def bind_like(copy, source) -> None:
    """Give ``copy`` (a copy of ``source``'s denoiser) the conditioning, time axis, VAE and text encoder of
    ``source``: a copy starts unbound, so that copying a denoiser never copies its companions."""
    bind_conditioning(copy, conditioning_of(source))
    bind_time_axis(copy, time_axis_of(source))
    parts = _PARTS.get(denoiser_of(source))
    if parts:
        _PARTS[denoiser_of(copy)] = dict(parts)


def bind_time_axis(model, axis: TimeAxis) -> None:
    """File the time axis ``model``'s denoiser was trained on (the model loaders call it)."""
    _AXIS[denoiser_of(model)] = axis


def time_axis_of(model) -> TimeAxis:
    """The time axis bound to ``model``'s denoiser (DDPM when none is)."""
    return _AXIS.get(denoiser_of(model), _DDPM)


_DDPM = TimeAxis()


def model_time(model, t: torch.Tensor) -> torch.Tensor:
    """What ``model`` is called with at tmpq's integer timesteps ``t``, as its adapter says
    (:meth:`DenoiserAdapter.model_time`): ``t`` itself on the DDPM axis (the same tensor), sigma(t) * N (float32, as
    diffusers' flow pipelines call it) on a flow axis; Flux's transformer takes that divided by 1000, as
    ``FluxPipeline`` calls it."""
    inner = denoiser_of(model)
    return adapter_for(inner).model_time(inner, t)


def index_time(model, t: torch.Tensor) -> torch.Tensor:
    """tmpq's integer timesteps of model times ``t`` (the inverse of :func:`model_time`, rounded to the grid): how
    the supernet routes a call by its timestep, whether tmpq's sampler or a stock pipeline made it."""
    inner = denoiser_of(model)
    return adapter_for(inner).index_time(inner, t)


def denoise(model, x: torch.Tensor, t: torch.Tensor, cond: dict):
    """One forward of ``model`` through its adapter at tmpq's integer timesteps ``t``; returns what the model
    returns (hooks see the call as the model's own)."""
    return adapter_for(model).call(model, x, model_time(model, t), cond)


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from the sampler's final ``latents``: through the model's VAE when it has one (latents
    divided by its ``scaling_factor``, plus its ``shift_factor`` when its config has one), else the latents are the
    images."""
    vae = decoder_of(model)
    if vae is None:
        return latents.clamp(-1.0, 1.0)
    if isinstance(vae, AutoencoderKLWan):  # a video VAE: its own per-channel latent statistics
        return _decode_wan(vae, latents)
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    dtype = next(vae.parameters()).dtype
    z = latents.to(dtype) / scale
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # a VAE with a latent mean (SD3's, Flux's): its pipelines decode latents / scale + shift
        z = z + float(shift)
    return vae.decode(z).sample.float().clamp(-1.0, 1.0)


@torch.no_grad()
def decoder_cost(model) -> dict | None:
    """The FP VAE decoder's cost per decoded image (a video model's: per video) (reported beside the denoiser's, never
    searched): its Conv2d / Conv3d / Linear MACs, measured with hooks on one decode, and the BitOPs of those MACs at 32 x 32 bits. None without a
    VAE."""
    vae = decoder_of(model)
    if vae is None:
        return None
    macs = []

    def hook(mod, inp, out):
        macs.append(output_macs(out, mod.weight))

    # Conv3d: a video VAE's (causal) 3-D convolutions; the image VAEs have none
    hooks = [m.register_forward_hook(hook) for m in vae.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
    try:
        latent = torch.zeros(1, *sample_shape(model), device=next(vae.parameters()).device)
        decode(model, latent)
    finally:
        for h in hooks:
            h.remove()
    return {"class": type(vae).__name__, "macs": sum(macs), "bitops_fp32": sum(macs) * 32 * 32}


def _decode_wan(vae, latents: torch.Tensor) -> torch.Tensor:
    """Videos ``[B, 3, F', H', W']`` in [-1, 1] from Wan latents ``[B, C, F, H, W]``, as ``WanPipeline`` decodes them
    (in its order of operations: latents / (1 / std) + mean, per channel, in the VAE's dtype)."""
    dtype = next(vae.parameters()).dtype
    z = latents.to(dtype)
    view = (1, int(vae.config.z_dim), 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(view).to(z.device, z.dtype)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std).view(view)).to(z.device, z.dtype)
    return vae.decode(z / inv_std + mean, return_dict=False)[0].float().clamp(-1.0, 1.0)


class WanAdapter(DenoiserAdapter):
    """``WanTransformer3DModel`` (Wan 2.1's text-to-video DiT, flow matching), called as ``WanPipeline`` calls it.

    - the sample is a video latent ``[C, F, H, W]`` (frames included; the noise bank, calibration data and the flow
      solvers act elementwise on any shape): the transformer config's ``sample_size`` ``[F, H, W]`` in latent units
      when it has one (a key diffusers keeps and saves), else ``WanPipeline``'s default call (81 frames of 480 x 832
      pixels) through the VAE's ``scale_factor_temporal`` / ``scale_factor_spatial`` (4 and 8):
      ``(num_frames - 1) // 4 + 1`` latent frames. The VAE decodes a video ``[B, 3, F', H', W']``
      (:func:`_decode_wan`); feature extractors score a video as its frames (:mod:`tmpq.evaluators.features`);
    - time: ``timestep`` = sigma * N of the flow axis, one per video (``t.expand(B)``, float32), as every flow model
      here; UniPC with ``use_flow_sigmas`` / ``flow_shift`` (Wan's repositories) and ``FlowMatchEulerDiscreteScheduler``
      are both read as the flow axis;
    - conditioning: ``encoder_hidden_states``, UMT5's token embeddings, zeroed past each prompt's length, from
      ``WanPipeline.encode_prompt`` (:func:`tmpq.core.model.encode_text`); no attention mask, no pooled embedding;
    - guidance: classifier-free, the null pass at the empty prompt (``WanPipeline``'s default negative prompt),
      which it runs as a second call: ``guidance_ranges = "separate"`` runs tmpq's passes the same way. Wan 2.2's
      two-stage sampling (``transformer_2`` / ``boundary_ratio``, ``guidance_scale_2``) and per-token timesteps
      (``expand_timesteps``) are refused where a pipeline sets them; image-conditioned (I2V) transformers too.
    """

    cls = WanTransformer3DModel
    DEFAULT_VIDEO = (81, 480, 832)  # WanPipeline.__call__'s num_frames, height, width

    def kind(self, model) -> str:
        return "text"

    def sample_shape(self, model) -> tuple[int, int, int, int]:
        size = getattr(model.config, "sample_size", None)
        c = int(model.config.in_channels)
        if size is None:
            vae = decoder_of(model)
            st = int(getattr(vae.config, "scale_factor_temporal", 4)) if vae is not None else 4
            ss = int(getattr(vae.config, "scale_factor_spatial", 8)) if vae is not None else 8
            frames, h, w = self.DEFAULT_VIDEO
            return (c, (frames - 1) // st + 1, h // ss, w // ss)
        if not (isinstance(size, (list, tuple)) and len(size) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise TmpqError(f"{type(model).__name__}: sample_size {size!r} must be [frames, height, width] of the "
                            f"latent video (positive integers)")
        return (c, *(int(v) for v in size))

    def check(self, model) -> None:
        cfg, name = model.config, type(model).__name__
        if getattr(cfg, "image_dim", None) or getattr(cfg, "added_kv_proj_dim", None):
            raise TmpqError(f"{name}: an image-conditioned (image-to-video) transformer (image_dim / "
                            f"added_kv_proj_dim set); tmpq serves Wan's text-to-video transformer")
        out = getattr(cfg, "out_channels", None) or cfg.in_channels
        if out != cfg.in_channels:
            raise TmpqError(f"{name}: out_channels = {out} with in_channels = {cfg.in_channels}: tmpq samples "
                            f"denoisers that predict the sample's own channels")
        shape, patch = self.sample_shape(model)[1:], tuple(int(p) for p in cfg.patch_size)
        if any(s % p for s, p in zip(shape, patch)):
            raise TmpqError(f"{name}: a latent video of {list(shape)} (frames, height, width) is not a multiple of "
                            f"the patch size {list(patch)}")

    def size_multiple(self, model) -> int:
        return int(model.config.patch_size[1])

    def tokens(self, model) -> int:
        n = 1
        for s, p in zip(self.sample_shape(model)[1:], model.config.patch_size):
            n *= int(s) // int(p)
        return n

    def call(self, model, x, t, cond):
        return model(hidden_states=x, timestep=t, return_dict=False, **cond)

    def example(self, model, n: int, device) -> dict:
        if conditioning_of(model).prompt_embeds is None:
            return {"encoder_hidden_states": torch.zeros(n, 1, int(model.config.text_dim), device=device)}
        return self.conditions(model, range(n), device=device)

    def default_pins(self, model) -> dict[str, list[int]]:
        # as the other DiTs': what runs once per video or once per text token rather than per video token: the
        # condition embedder's Linears (timestep embedder, the time projection that makes every block's shift /
        # scale / gate, the text projection: the text stream's first layer) at W8A16, the output projection (the
        # last layer, the velocity itself) at W16A16. The patch embedding is a Conv3d, which tmpq does not wrap: it
        # stays FP (not in the search space, not in the BitOPs), as the blocks' and the output's scale_shift_table
        # parameters do. Not measured on a trained Wan
        cond = {name: [8, 16] for name, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.startswith("condition_embedder.")}
        return {**cond, "proj_out": [16, 16]}

    def feature_module(self, model):
        return model.blocks[len(model.blocks) // 2]


_REGISTRY.append(WanAdapter())
