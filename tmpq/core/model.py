"""Loading diffusers denoisers from local directories (the embedded models and any hub-style checkout).

Two layouts are accepted, through one code path:
- a pipeline directory (``model_index.json`` + ``unet/`` or ``transformer/`` + ``scheduler/``), as
  ``save_pretrained`` writes and as hub checkouts such as a CIFAR-10 DDPM come;
- a bare denoiser directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), optionally with a
  ``scheduler_config.json`` beside it (otherwise diffusers' DDPM defaults: 1000 linear-beta steps).
The denoiser's class comes from its ``config.json`` (``_class_name``) and must have a denoiser adapter
(:mod:`tmpq.core.adapters`). Weights are read from safetensors only; pickled ``.bin`` weights are refused.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.resources
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler

from tmpq.core.adapters import (
    Conditioning,
    adapter_classes,
    adapter_for,
    bind_conditioning,
    bind_time_axis,
    conditioning_of,
    decoder_of,
    denoiser_of,
    sample_shape,
    set_decoder,
    set_text_parts,
    text_parts_of,
)
from tmpq.core.choices import DTYPES as DTYPE_NAMES
from tmpq.core.errors import TmpqError
from tmpq.core.timeaxis import TimeAxis, is_flow, time_axis

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tmpq never downloads weights
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# package data, located through importlib.resources (a wheel, an editable install and a checkout alike)
ASSETS = Path(str(importlib.resources.files("tmpq").joinpath("assets")))
EMBEDDED_MODEL_DIR = ASSETS / "mnist16-ddpm"
EMBEDDED_DIT_DIR = ASSETS / "mnist16-dit"
EMBEDDED_FLOW_DIR = ASSETS / "mnist16-flow"
EMBEDDED = {"embedded": EMBEDDED_MODEL_DIR, "embedded-dit": EMBEDDED_DIT_DIR, "embedded-flow": EMBEDDED_FLOW_DIR}
DENOISER_FOLDERS = ("unet", "transformer")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# model.dtype: the dtype the FP denoiser (and its VAE / text encoder) computes in
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def embedded_unet_config(resolution: int = 16) -> dict:
    """The architecture of the embedded denoiser (about 1 M parameters at 16x16, attention at the 4x4 level)."""
    return dict(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


@dataclass(frozen=True)
class ModelConfig:
    """The model of a run (a run config's ``[model]`` section is this class).

    - ``path``: ``"embedded"`` (the MNIST UNet), ``"embedded-dit"`` (the class-conditional MNIST DiT) or a local
      model directory.
    - ``guidance_scale``: classifier-free guidance of every sampling of the run (calibration, search, validation,
      export); 1 = none. Class- and text-conditional models only. A guidance-distilled model (Flux with
      ``guidance_embeds``) takes it as its ``guidance`` input instead (one pass, as ``FluxPipeline``'s
      ``guidance_scale``; its default there is 3.5, here 1 unless set); a Flux without (schnell) takes none.
    - ``null_label``: a class-conditional model's unconditional label, -1 = its adapter's (a DiT: its extra embedding
      row; a class UNet has none, and diffusers has no convention for one).
    - ``prompts``: a text-conditional model's prompts (image ``i`` of every sampling is conditioned on prompt
      ``i % len(prompts)``; the null pass of guidance on the empty prompt), encoded once by the model directory's
      own FP text encoder (``text_encoder/`` + ``tokenizer/``, the optional package ``transformers``; Stable
      Diffusion 3's: its CLIP encoders and optional T5, Flux's: its CLIP and T5 encoders, PixArt's: its T5 with the
      attention masks, through its pipeline's ``encode_prompt``).
    - ``dtype``: ``"fp32"`` | ``"bf16"`` | ``"fp16"``, the dtype the denoiser (and its VAE and text encoder) computes
      in. The sampler's state and scheduler arithmetic stay fp32 (:func:`tmpq.core.sampler.sample_batch`); quantizers
      compute in fp32 and round their output once to this dtype (:class:`tmpq.quant.quantizer.AffineQuantizer`).
    """

    path: str = "embedded"
    guidance_scale: float = 1.0
    null_label: int = -1
    prompts: tuple[str, ...] = ()
    dtype: str = "fp32"

    def __post_init__(self):
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not self.guidance_scale >= 0:
            raise TmpqError(f"model.guidance_scale: must be a number >= 0 (1 = no guidance), got "
                            f"{self.guidance_scale!r}")
        if isinstance(self.null_label, bool) or not isinstance(self.null_label, int) or self.null_label < -1:
            raise TmpqError(f"model.null_label: must be a label >= 0, or -1 for the adapter's, got {self.null_label!r}")
        if isinstance(self.prompts, str) or not isinstance(self.prompts, (list, tuple)) \
                or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise TmpqError(f"model.prompts: must be a list of non-empty strings, got {self.prompts!r}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise TmpqError(f"model.dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def embedded_dit_config(resolution: int = 16) -> dict:
    """The architecture of the embedded class-conditional pixel DiT: patch 2 (64 tokens at 16x16), 4 blocks of 4
    heads x 32, adaLN-zero conditioning on the timestep and the digit class (10 classes + the null label 10)."""
    return dict(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        patch_size=2,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )


def embedded_mmdit_config(resolution: int = 16) -> dict:
    """The architecture of the embedded class-conditional flow MMDiT (Stable Diffusion 3's ``SD3Transformer2DModel``
    on pixels): patch 2 (64 image tokens at 16x16), 4 joint blocks of 3 heads x 32, the digit class given as its
    family takes text: 4 learned tokens of width 64 through the caption projection into the joint attention, and a
    learned pooled vector of width 64 added to the timestep embedding (:data:`CLASS_TOKENS_NAME`)."""
    return dict(
        sample_size=resolution,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=64,
        caption_projection_dim=96,
        pooled_projection_dim=64,
        pos_embed_max_size=resolution // 2,
    )


# a model directory's learned class conditioning, beside model_index.json: "prompt_embeds" [labels, L, D] and
# "pooled_prompt_embeds" [labels, D'], row c for class c and the null label (the null pass of guidance) last: the
# embedded MMDiT's text. The stock pipeline takes them as its prompt_embeds / pooled_prompt_embeds (and negative_*).
CLASS_TOKENS_NAME = "class_tokens.safetensors"


def load_class_tokens(root: Path, unet, dtype: torch.dtype = torch.float32) -> dict | None:
    """The :class:`Conditioning` fields of a model directory's learned class tokens (:data:`CLASS_TOKENS_NAME`), or
    None when it has none; a file that does not fit the denoiser is refused in one line naming it."""
    path = Path(root) / CLASS_TOKENS_NAME
    if not path.is_file():
        return None
    t = check_safetensors(path)
    config = getattr(unet, "config", {})
    joint, pooled = config.get("joint_attention_dim"), config.get("pooled_projection_dim")
    if joint is None or pooled is None:
        raise TmpqError(f"{path}: class tokens condition a joint-attention transformer with pooled projections "
                        f"(SD3Transformer2DModel), not {type(unet).__name__}")
    tok, pool = t.get("prompt_embeds"), t.get("pooled_prompt_embeds")
    if tok is None or pool is None or set(t) != {"prompt_embeds", "pooled_prompt_embeds"}:
        raise TmpqError(f"{path}: expected exactly the tensors prompt_embeds and pooled_prompt_embeds, got "
                        f"{sorted(t)}")
    n = tok.shape[0]
    if tok.dim() != 3 or tok.shape[2] != joint or pool.shape != (n, pooled) or n < 2:
        raise TmpqError(f"{path}: prompt_embeds {list(tok.shape)} and pooled_prompt_embeds {list(pool.shape)} must be "
                        f"[classes + 1, tokens, {joint}] and [classes + 1, {pooled}] (the null label last)")
    if not (torch.isfinite(tok).all() and torch.isfinite(pool).all()):
        raise TmpqError(f"{path}: holds non-finite values (NaN / inf)")
    tok, pool = tok.to(dtype), pool.to(dtype)
    return {"prompt_embeds": tok[:-1], "null_embeds": tok[-1:], "pooled_embeds": pool[:-1], "null_pooled": pool[-1:],
            "prompt_labels": tuple(range(n - 1))}


def save_class_tokens(unet, out: Path) -> None:
    """Write the learned class tokens bound to ``unet`` (:func:`load_class_tokens`' fields) into ``out``."""
    from safetensors.torch import save_file

    c = conditioning_of(unet)
    save_file({"prompt_embeds": torch.cat([c.prompt_embeds, c.null_embeds]).float().contiguous(),
               "pooled_prompt_embeds": torch.cat([c.pooled_embeds, c.null_pooled]).float().contiguous()},
              str(Path(out) / CLASS_TOKENS_NAME), metadata={"labels": "digit classes 0-9, then the null label 10"})


def embedded_scheduler_config() -> dict:
    """DDPM training noise schedule of the embedded model (diffusers defaults, written out)."""
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon")


@dataclass
class LoadedModel:
    """A denoiser, the noise-schedule config it was trained with, and its :class:`Conditioning` (guidance scale,
    null label, prompt embeddings), which the loaders also bind to the denoiser so that everything sampling it
    (sampler, calibration capture, candidate evaluator, validation) conditions and guides it alike."""

    unet: torch.nn.Module
    scheduler_config: dict
    path: Path
    conditioning: Conditioning = Conditioning()

    @property
    def guidance_scale(self) -> float:
        """The guidance scale it samples at (classifier-free, or a guidance-distilled model's guidance input)."""
        return self.conditioning.sampling_scale

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def time_axis(self) -> TimeAxis:
        """The time axis the denoiser was trained on (DDPM or flow matching; :mod:`tmpq.core.timeaxis`)."""
        return TimeAxis.of(self.scheduler_config)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The denoiser's sample (a latent model's latent)."""
        return sample_shape(self.unet)

    @property
    def image_channels(self) -> int:
        """Channels of the images metrics see (a latent model's VAE output)."""
        vae = decoder_of(self.unet)
        if vae is None:
            return self.sample_shape[0]
        # AutoencoderDC's config names only in_channels (it reconstructs them)
        return int(getattr(vae.config, "out_channels", None) or vae.config.in_channels)


def check_safetensors(path: Path) -> dict:
    """Read a safetensors file fully and return its tensors; a damaged or truncated one raises a one-line
    ``TmpqError``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TmpqError(f"corrupt or truncated weights file {path}: {msg}") from None


def resolve_model_dir(path: str | os.PathLike | None) -> tuple[Path, Path, dict]:
    """Find the denoiser directory and the scheduler config inside a local model directory."""
    key = "embedded" if path in (None, "") else path
    root = EMBEDDED[key] if isinstance(key, str) and key in EMBEDDED else Path(key)
    if not root.exists():
        raise TmpqError(f"model directory not found: {root}")
    if not root.is_dir():
        raise TmpqError(f"model path is not a directory: {root}")
    if (root / "model_index.json").is_file() or any((root / f).is_dir() for f in DENOISER_FOLDERS):
        unet_dir = next((root / f for f in DENOISER_FOLDERS if (root / f).is_dir()), root / "unet")
        sched_file = root / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = root
        sched_file = root / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file():
        raise TmpqError(f"no denoiser config.json in model directory {unet_dir}")
    if sched_file.is_file():
        try:
            sched_cfg = json.loads(sched_file.read_text())
        except json.JSONDecodeError as exc:
            raise TmpqError(f"malformed scheduler config {sched_file}: {exc}") from None
        if not isinstance(sched_cfg, dict):
            raise TmpqError(f"malformed scheduler config {sched_file}: expected a JSON object")
        time_axis(sched_cfg, str(sched_file))
    else:
        sched_cfg = embedded_scheduler_config()
    return root, unet_dir, sched_cfg


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLWan")  # DC: Sana's deep-compression autoencoder; KLWan: Wan's video VAE


def _config_key(config_file: Path, what: str, key: str, default=None):
    """One key of a ``config.json`` (``default`` when it has none); a damaged file is one line."""
    try:
        return json.loads(config_file.read_text()).get(key, default)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
        raise TmpqError(f"malformed {what} config {config_file}: {exc}") from None


def _class_name(config_file: Path, what: str, default: str | None = None) -> str | None:
    """The ``_class_name`` a diffusers ``config.json`` names (``default`` when it names none)."""
    return _config_key(config_file, what, "_class_name", default)


def _from_pretrained(cls: type, folder: Path, what: str = "model", weights: tuple[str, ...] = (WEIGHTS_NAME,),
                     **load_kw):
    """``cls`` (a diffusers or transformers class) from a local folder holding one of ``weights``, safetensors only
    (pickled ``.bin`` weights refused; a single safetensors file checked before loading), in eval mode without
    gradients; every failure is one line."""
    present = [w for w in weights if (folder / w).is_file()]
    if not present:
        if any(folder.glob("*.bin")):
            raise TmpqError(f"{folder} has only pickled .bin weights; convert them to safetensors first")
        raise TmpqError(f"no {weights[0]} in {what} directory {folder}")
    if present[0].endswith(".safetensors"):
        check_safetensors(folder / present[0])
    try:
        model = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, **load_kw)
    except Exception as exc:
        raise TmpqError(f"cannot load {cls.__name__} from {folder}: {str(exc).splitlines()[0]}") from None
    check_finite(model, folder)
    return model.eval().requires_grad_(False)


def _load_keep_fp32(cls: type, folder: Path, dtype: torch.dtype):
    """A denoiser whose class keeps some modules in fp32 (``_keep_in_fp32_modules``, Wan's time embedder, norms and
    scale-shift tables). diffusers loads such a class only with ``low_cpu_mem_usage``, which needs the package
    ``accelerate``: with it, its own ``from_pretrained``; without it, the same model built from its config (unknown
    config keys kept, as ``from_pretrained`` keeps them) with the safetensors weights loaded strictly, cast to
    ``dtype`` except the parameters of those modules (diffusers' rule: a name containing one of them)."""
    from diffusers.utils import is_accelerate_available

    if is_accelerate_available():
        return _from_pretrained(cls, folder, **_dtype_kw(dtype))
    from safetensors.torch import load_file

    _from_pretrained_checks(folder)
    try:
        model = cls.from_config(cls.load_config(str(folder), local_files_only=True))
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    except Exception as exc:
        raise TmpqError(f"cannot load {cls.__name__} from {folder}: {str(exc).splitlines()[0]}") from None
    if dtype != torch.float32:
        keep = tuple(cls._keep_in_fp32_modules)
        for name, p in model.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    check_finite(model, folder)
    return model.eval().requires_grad_(False)


def _from_pretrained_checks(folder: Path) -> None:
    """What :func:`_from_pretrained` checks of a diffusers weights folder before loading: a safetensors file, complete
    (pickled ``.bin`` weights refused)."""
    if not (folder / WEIGHTS_NAME).is_file():
        if any(folder.glob("*.bin")):
            raise TmpqError(f"{folder} has only pickled .bin weights; convert them to safetensors first")
        raise TmpqError(f"no {WEIGHTS_NAME} in model directory {folder}")
    check_safetensors(folder / WEIGHTS_NAME)


@torch.no_grad()
def check_finite(model: torch.nn.Module, where: Path | str) -> None:
    """Refuse a model with a NaN or infinite weight (a damaged or diverged checkpoint): every later step would fail
    far from the cause (calibration ranges, every evaluation). One line naming the first such parameter."""
    for name, t in model.named_parameters():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise TmpqError(f"{where}: parameter {name} has {kind} values; the model is damaged")


def _dtype_kw(dtype: torch.dtype, key: str = "torch_dtype") -> dict:
    """``from_pretrained``'s dtype argument; none for fp32, so the default path loads exactly as before."""
    return {} if dtype == torch.float32 else {key: dtype}


def _load_vae(root: Path, dtype: torch.dtype = torch.float32):
    """The FP VAE of a latent pipeline directory (``vae/``) in ``dtype``, or None. In fp16 a VAE whose config sets
    ``force_upcast`` (diffusers' Stable Diffusion VAEs: fp16 overflows in them) stays fp32, as diffusers' pipelines
    upcast it; :func:`tmpq.core.adapters.decode` casts the latents to the VAE's dtype."""
    vae_dir = root / "vae"
    if not (vae_dir / "config.json").is_file():
        return None
    name = _class_name(vae_dir / "config.json", "VAE")
    if name not in VAE_CLASSES:
        raise TmpqError(f"{vae_dir}: VAE class {name!r} is not supported (one of {', '.join(VAE_CLASSES)})")
    if dtype == torch.float16 and _config_key(vae_dir / "config.json", "VAE", "force_upcast", False):
        dtype = torch.float32
    return _from_pretrained(getattr(diffusers, name), vae_dir, "VAE", low_cpu_mem_usage=False, **_dtype_kw(dtype))


TEXT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


# a text pipeline's encoders and tokenizers by folder, in pairs (Stable Diffusion: the first; Stable Diffusion 3: two
# CLIP encoders with projection and, optionally, T5; Flux: CLIP and T5)
TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def _load_text(root: Path, dtype: torch.dtype = torch.float32) -> dict | None:
    """The FP text parts (encoders in ``dtype``) of a text pipeline directory, by folder name: ``text_encoder/`` +
    ``tokenizer/`` and any further pair of :data:`TEXT_PARTS` present, loaded with ``transformers`` from local files,
    safetensors only; None without ``text_encoder/``."""
    if not (root / "text_encoder" / "config.json").is_file():
        return None
    parts = {}
    for te_name, tk_name in TEXT_PARTS:
        if (root / te_name / "config.json").is_file():
            parts[te_name], parts[tk_name] = _load_text_pair(root, te_name, tk_name, dtype)
    return parts


def _load_text_pair(root: Path, te_name: str, tk_name: str, dtype: torch.dtype):
    """One text encoder (in ``dtype``) and its tokenizer from ``root/te_name`` and ``root/tk_name``."""
    te, tk = root / te_name, root / tk_name
    try:
        import transformers
    except ImportError:
        raise TmpqError(f"{te}: loading a text encoder needs the optional package transformers "
                        f"(pip install 'tmpq[text]')") from None
    arch = (_config_key(te / "config.json", "text encoder", "architectures") or ["CLIPTextModel"])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        raise TmpqError(f"{te}: text encoder class {arch!r} is not in transformers {transformers.__version__}")
    if not tk.is_dir():
        raise TmpqError(f"{root}: a {te_name}/ without its {tk_name}/")
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype
    key = "dtype" if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    encoder = _from_pretrained(cls, te, "text encoder", TEXT_WEIGHTS, **_dtype_kw(dtype, key))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tk), local_files_only=True)
    except Exception as exc:
        raise TmpqError(f"cannot load the tokenizer of {root}: {str(exc).splitlines()[0]}") from None
    return encoder, tokenizer


def pipeline_text_parts(pipe) -> dict | None:
    """The text parts a live pipeline holds (its attributes named in :data:`TEXT_PARTS` that are not None), or None
    without a ``text_encoder`` and ``tokenizer``."""
    parts = {n: getattr(pipe, n, None) for pair in TEXT_PARTS for n in pair}
    if parts["text_encoder"] is None or parts["tokenizer"] is None:
        return None
    return {n: v for n, v in parts.items() if v is not None}


@torch.no_grad()
def encode_prompts(encoder, tokenizer, prompts, device="cpu") -> torch.Tensor:
    """Prompt embeddings ``[P, L, D]`` as diffusers' Stable Diffusion pipelines compute them (padded to the
    tokenizer's ``model_max_length``, the encoder's last hidden state, its attention mask only when its config asks
    for one), so that a stock pipeline conditions an export exactly as tmpq did."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    mask = ids.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder.to(device)(ids.input_ids.to(device), attention_mask=mask)[0]


@torch.no_grad()
def encode_text(unet, parts: dict, prompts, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(embeds, pooled)`` of ``prompts`` for ``unet``'s denoiser from its text ``parts`` (:data:`TEXT_PARTS`):
    Stable Diffusion 3's (token embeddings ``[P, L, joint_attention_dim]`` and pooled ``[P, pooled_projection_dim]``)
    from ``StableDiffusion3Pipeline.encode_prompt`` of a pipeline assembled from these parts, so that tmpq and the
    stock pipeline condition alike; Flux's (T5's token embeddings, CLIP's pooled output) from
    ``FluxPipeline.encode_prompt`` likewise; any other text model's from :func:`encode_prompts` (pooled None)."""
    denoiser = denoiser_of(unet)
    if isinstance(denoiser, diffusers.FluxTransformer2DModel):
        return _encode_flux(denoiser, parts, prompts, device)
    if isinstance(denoiser, diffusers.WanTransformer3DModel):
        return _encode_wan(denoiser, parts, prompts, device), None
    if not isinstance(denoiser, diffusers.SD3Transformer2DModel):
        return encode_prompts(parts["text_encoder"], parts["tokenizer"], prompts, device), None
    names = [n for pair in TEXT_PARTS for n in pair]
    pipe = _text_pipeline(diffusers.StableDiffusion3Pipeline, denoiser, parts, names, device,
                          "is conditioned by two CLIP text encoders")
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                              device=torch.device(device), do_classifier_free_guidance=False)
    return embeds, pooled


def _text_pipeline(cls, denoiser, parts: dict, names, device, needs: str):
    """A stock pipeline ``cls`` of two text encoders or more, assembled from ``denoiser`` and the loaded text
    ``parts`` named ``names`` (its VAE left out, its scheduler a stand-in: only ``encode_prompt`` is called); a
    missing second encoder or tokenizer is one line (``needs``: what the model is conditioned by)."""
    missing = [n for n in ("text_encoder_2", "tokenizer_2") if parts.get(n) is None]
    if missing:
        raise TmpqError(f"model.prompts: {type(denoiser).__name__} {needs}; no {missing[0]}")
    return cls(transformer=denoiser, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
               **{n: (v.to(device) if isinstance(v, torch.nn.Module) else v)
                  for n, v in ((n, parts.get(n)) for n in names)})


def pixart_pipeline(denoiser) -> type:
    """The stock pipeline of a ``PixArtTransformer2DModel``: ``PixArtAlphaPipeline`` for one that uses additional
    (resolution, aspect ratio) conditions (only that pipeline passes them), else ``PixArtSigmaPipeline``."""
    if getattr(denoiser, "use_additional_conditions", False):
        return diffusers.PixArtAlphaPipeline
    return diffusers.PixArtSigmaPipeline


@torch.no_grad()
def encode_masked(unet, parts: dict, prompts, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [P, L, D], attention mask [P, L])`` of ``prompts`` for a PixArt denoiser, from the stock pipeline's
    ``encode_prompt`` (:func:`pixart_pipeline`, assembled from the loaded T5 encoder and tokenizer) with what the
    stock call passes by default: its ``max_sequence_length`` (Sigma's 300, Alpha's 120) and ``clean_caption``
    (True: the captions cleaned as diffusers cleans them with ``bs4`` and ``ftfy`` installed; without them diffusers
    itself falls back to lower-casing and stripping, with a warning, and so does tmpq, silently), so that tmpq and
    ``pipe(prompt=...)`` condition alike in one environment."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    denoiser = denoiser_of(unet)
    cls = pixart_pipeline(denoiser)
    call = inspect.signature(cls.__call__).parameters
    clean = bool(call["clean_caption"].default) and is_bs4_available() and is_ftfy_available()
    pipe = cls(transformer=denoiser, scheduler=diffusers.DPMSolverMultistepScheduler(), vae=None,
               text_encoder=parts["text_encoder"].to(device), tokenizer=parts["tokenizer"])
    embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            device=torch.device(device), clean_caption=clean,
                                            max_sequence_length=call["max_sequence_length"].default)
    return embeds, mask


@torch.no_grad()
def encode_sana(unet, parts: dict, prompts, device="cpu", empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [P, L, D], attention mask [P, L])`` of ``prompts`` for a Sana denoiser, from the stock
    ``SanaPipeline.encode_prompt`` (a pipeline assembled from the loaded Gemma 2 encoder and tokenizer) with what the
    stock call passes by default: its ``max_sequence_length`` (300), ``complex_human_instruction`` (prepended to every
    prompt, then the first token and the last ``max_sequence_length - 1`` kept) and ``clean_caption`` (False; where
    True, as :func:`encode_masked` reads it). ``empty``: the pipeline's negative prompt, the empty one, encoded as the
    stock call encodes it for guidance (without the instruction, padded to ``max_sequence_length``), once per prompt
    of ``prompts`` (pass one)."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    call = inspect.signature(diffusers.SanaPipeline.__call__).parameters
    clean = bool(call["clean_caption"].default) and is_bs4_available() and is_ftfy_available()
    pipe = diffusers.SanaPipeline(transformer=denoiser_of(unet), scheduler=diffusers.DPMSolverMultistepScheduler(),
                                  vae=None, text_encoder=parts["text_encoder"].to(device), tokenizer=parts["tokenizer"])
    embeds, mask, null, null_mask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=empty, negative_prompt="", device=torch.device(device),
        clean_caption=clean, max_sequence_length=call["max_sequence_length"].default,
        complex_human_instruction=call["complex_human_instruction"].default)
    return (null, null_mask) if empty else (embeds, mask)


def text_conditioning(unet, parts: dict, prompts, device="cpu") -> dict:
    """The :class:`Conditioning` fields of ``prompts`` and of the empty prompt for ``unet``'s denoiser, encoded by its
    text ``parts`` (:func:`encode_text`; a PixArt model's with their attention masks, :func:`encode_masked`; a Sana
    model's likewise, :func:`encode_sana`); the prompts' fields are None without prompts."""
    if isinstance(denoiser_of(unet), diffusers.SanaTransformer2DModel):
        null, null_mask = encode_sana(unet, parts, [""], device, empty=True)
        embeds, mask = encode_sana(unet, parts, prompts, device) if prompts else (None, None)
        return dict(null_embeds=null, null_mask=null_mask, prompt_embeds=embeds, prompt_mask=mask)
    if isinstance(denoiser_of(unet), diffusers.PixArtTransformer2DModel):
        null, null_mask = encode_masked(unet, parts, [""], device)
        embeds, mask = encode_masked(unet, parts, prompts, device) if prompts else (None, None)
        return dict(null_embeds=null, null_mask=null_mask, prompt_embeds=embeds, prompt_mask=mask)
    null, null_pooled = encode_text(unet, parts, [""], device)
    embeds, pooled = encode_text(unet, parts, prompts, device) if prompts else (None, None)
    return dict(null_embeds=null, prompt_embeds=embeds, null_pooled=null_pooled, pooled_embeds=pooled)
def _encode_flux(denoiser, parts: dict, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's ``(embeds, pooled)`` of ``prompts``: ``FluxPipeline.encode_prompt`` (CLIP ``text_encoder`` pooled, T5
    ``text_encoder_2`` tokens, at the pipeline call's default ``max_sequence_length``) of a pipeline assembled from
    ``parts``."""
    names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    pipe = _text_pipeline(diffusers.FluxPipeline, denoiser, parts, names, device,
                          "is conditioned by a CLIP and a T5 text encoder")
    max_len = inspect.signature(diffusers.FluxPipeline.__call__).parameters["max_sequence_length"].default
    embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=torch.device(device),
                                           max_sequence_length=max_len)
    return embeds, pooled


def _encode_wan(denoiser, parts: dict, prompts, device) -> torch.Tensor:
    """Wan's token embeddings of ``prompts``: ``WanPipeline.encode_prompt`` (UMT5's last hidden state, zeroed past
    each prompt's tokens, at the pipeline call's default ``max_sequence_length``) of a pipeline assembled from the
    loaded UMT5 encoder and tokenizer (its VAE left out, its scheduler a stand-in)."""
    pipe = diffusers.WanPipeline(transformer=denoiser, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                 text_encoder=parts["text_encoder"].to(device), tokenizer=parts["tokenizer"])
    max_len = inspect.signature(diffusers.WanPipeline.__call__).parameters["max_sequence_length"].default
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                   device=torch.device(device), max_sequence_length=max_len)
    return embeds


def refuse_two_stage(index: dict, where: str) -> None:
    """Refuse, in one line, a Wan 2.2 pipeline config (a ``model_index.json`` or a live pipeline's config) that tmpq
    would sample wrongly: two-stage sampling (``transformer_2`` / ``boundary_ratio``: a second denoiser for the
    low-noise steps, with its own ``guidance_scale_2``) or per-token timesteps (``expand_timesteps``)."""
    second = index.get("transformer_2")
    if isinstance(second, (list, tuple)):  # an index entry: [library, class], [None, None] when absent
        second = second[0] if second else None
    if index.get("boundary_ratio") is not None or second is not None:
        raise TmpqError(f"{where}: a two-stage pipeline (transformer_2 / boundary_ratio, Wan 2.2's high- and "
                        f"low-noise experts) is not served: tmpq searches one denoiser")
    if index.get("expand_timesteps"):
        raise TmpqError(f"{where}: expand_timesteps (Wan 2.2's per-token timesteps) is not served")


def condition(unet, cfg: ModelConfig, text, device, where: str, tokens: dict | None = None) -> Conditioning:
    """The :class:`Conditioning` of ``cfg`` for ``unet`` (``text``: its text parts by pipeline name, or None; they
    encode ``cfg.prompts`` and the empty prompt, :func:`text_conditioning`), bound to it; refuses prompts for a model
    without text conditioning and guidance for a model that cannot guide. ``where`` names the model's source in
    messages; ``tokens``: learned class tokens in place of text (:func:`load_class_tokens`)."""
    if cfg.prompts and adapter_for(unet).kind(unet) != "text":
        raise TmpqError(f"model.prompts: {type(unet).__name__} is not text-conditional")
    if cfg.prompts and text is None:
        raise TmpqError(f"model.prompts: {where} to encode them")
    cond = Conditioning(float(cfg.guidance_scale), cfg.null_label if cfg.null_label >= 0 else None)
    if adapter_for(unet).embeds_guidance(unet):  # the scale is a model input (one pass): no classifier-free guidance
        cond = Conditioning(1.0, cond.null_label, embedded_guidance=float(cfg.guidance_scale))
    if text is not None:
        cond = cond.replace(**text_conditioning(unet, text, cfg.prompts, device))
    if tokens is not None:
        cond = cond.replace(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()})
    bind_conditioning(unet, cond)
    if cond.guidance_scale != 1.0:
        adapter = adapter_for(unet)
        adapter.null(unet, adapter.example(unet, 1, "cpu"))  # refuses a model that cannot guide
    return cond


def denoiser_class(config_file: Path) -> type:
    """The class a denoiser directory's ``config.json`` names, among those with a denoiser adapter."""
    name = _class_name(config_file, "denoiser", "UNet2DModel")
    for cls in adapter_classes():
        if cls.__name__ == name:
            return cls
    raise TmpqError(f"{config_file}: no denoiser adapter for {name}; register one with tmpq.register_adapter")


# live models (tmpq.core.handle.DiffusionModel) that load_model serves for their ``model.path`` inside ``serving``
_SERVED: contextvars.ContextVar[dict] = contextvars.ContextVar("tmpq_served_models", default={})
LIVE_PREFIX = "live:"  # model.path of a live model that came from no directory


@contextlib.contextmanager
def serving(path: str, factory):
    """Inside this block (this thread), :func:`load_model` of a config whose ``path`` is ``path`` returns
    ``factory(cfg, device)`` (a fresh ``LoadedModel`` of a model held in memory) instead of reading a directory: the
    jobs then run on a live pipeline's model through their ordinary code paths, without a disk round trip."""
    token = _SERVED.set({**_SERVED.get(), path: factory})
    try:
        yield
    finally:
        _SERVED.reset(token)


def load_model(path: str | os.PathLike | ModelConfig | None = None, device: str = "cpu") -> LoadedModel:
    """Load a denoiser and its noise schedule from a local directory (``None`` / ``"embedded"``: the embedded MNIST
    UNet; ``"embedded-dit"``: the embedded class-conditional DiT), or as a ``ModelConfig`` says (its null label set
    and guidance scale in the result's :class:`Conditioning`, bound to the denoiser; the denoiser, VAE and text
    encoder in its ``dtype``).

    Example:
        >>> m = load_model()              # the embedded MNIST 16x16 model
        >>> m.sample_shape
        (1, 16, 16)
    """
    cfg = path if isinstance(path, ModelConfig) else ModelConfig(path="embedded" if path in (None, "") else str(path))
    live = _SERVED.get().get(cfg.path)
    if live is not None:
        return live(cfg, device)
    if cfg.path.startswith(LIVE_PREFIX):
        raise TmpqError(f"model.path: {cfg.path} is a model that lived in the Python session of its search (no "
                        f"directory); pass it again, e.g. tmpq.export(run, model=pipe)")
    dtype = cfg.torch_dtype
    root, unet_dir, sched_cfg = resolve_model_dir(cfg.path)
    cls = denoiser_class(unet_dir / "config.json")
    if getattr(cls, "_keep_in_fp32_modules", None):  # Wan's: diffusers loads it only with low_cpu_mem_usage
        unet = _load_keep_fp32(cls, unet_dir, dtype).to(device)
    else:
        unet = _from_pretrained(cls, unet_dir, low_cpu_mem_usage=False, **_dtype_kw(dtype)).to(device)
    if device == "cpu" and image_convs(unet):
        unet.to(memory_format=torch.channels_last)  # measured 1.4x faster sampling on 2 CPU cores (52 -> 73 img/s)
    vae = _load_vae(root, dtype)
    if vae is not None:
        set_decoder(unet, vae.to(device))
    text = _load_text(root, dtype)
    if text is not None:
        set_text_parts(unet, text)
    adapter_for(unet).check(unet)
    if isinstance(unet, diffusers.WanTransformer3DModel) and (root / "model_index.json").is_file():
        idx = root / "model_index.json"
        refuse_two_stage({k: _config_key(idx, "pipeline", k) for k in ("transformer_2", "boundary_ratio",
                                                                        "expand_timesteps")}, str(idx))
    tokens = load_class_tokens(root, unet, dtype)
    if tokens is not None and (text is not None or cfg.prompts):
        raise TmpqError(f"{root}: conditioned on learned class tokens ({CLASS_TOKENS_NAME}), so it takes "
                        f"{'no model.prompts' if cfg.prompts else 'no text encoder'}")
    cond = condition(unet, cfg, text, device, f"{root} has no text_encoder/ + tokenizer/", tokens)
    sched_cfg = adapter_for(unet).scheduler_config(unet, sched_cfg)
    sched_cfg = bind_axis(unet, sched_cfg, f"{root}: scheduler config")
    return LoadedModel(unet=unet, scheduler_config=sched_cfg, path=root, conditioning=cond)


def image_convs(unet) -> bool:
    """Whether tmpq's CPU layout (``channels_last``) applies to ``unet``: not to a video denoiser, whose Conv3d
    weights (Wan's patch embedding) have no 4-D channels-last layout."""
    return not any(isinstance(m, torch.nn.Conv3d) for m in unet.modules())


def bind_axis(unet, scheduler_config: dict, where: str) -> dict:
    """Bind the time axis of ``scheduler_config`` to ``unet`` and return the config with a flow model's dynamic
    shifting resolved at the denoiser's token count (:meth:`TimeAxis.resolved_config`; the adapter's ``tokens``:
    (H / patch) * (W / patch), Flux's packed (H / 2) * (W / 2), the ``image_seq_len`` its pipeline computes mu
    from)."""
    inner = denoiser_of(unet)
    resolved = TimeAxis.resolved_config(dict(scheduler_config), where, image_seq_len=adapter_for(inner).tokens(inner))
    bind_time_axis(unet, TimeAxis.of(resolved, where))
    return resolved


def save_pipeline_dir(unet: torch.nn.Module, scheduler_config: dict, out: Path, manifest: dict | None = None) -> None:
    """Write a pipeline directory (model_index.json, unet/ or transformer/, scheduler/, and a latent model's vae/, a
    text model's text_encoder/ + tokenizer/ and further text parts) with safetensors weights, indexed as the stock
    diffusers pipeline of its kind: ``DDPMPipeline`` (a pixel ``UNet2DModel``), ``StableDiffusionPipeline`` (a
    ``UNet2DConditionModel`` with its VAE and text encoder), ``DiTPipeline`` (a ``DiTTransformer2DModel`` with its
    VAE), ``StableDiffusion3Pipeline`` (an ``SD3Transformer2DModel`` with its VAE and two or three text encoders),
    ``PixArtSigmaPipeline`` (a ``PixArtTransformer2DModel`` with its VAE and T5 encoder; ``PixArtAlphaPipeline`` for
    one with additional conditions), ``FluxPipeline`` (a ``FluxTransformer2DModel`` with its VAE, CLIP and T5),
    ``SanaPipeline`` (a ``SanaTransformer2DModel`` with its ``AutoencoderDC`` and Gemma 2 encoder), ``WanPipeline`` (a
    ``WanTransformer3DModel`` with its video VAE and UMT5); any
    other under tmpq's own ``_class_name`` (diffusers has no pipeline for a pixel-space DiT; ``tmpq sample`` renders
    it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = type(unet).__name__
    folder = "transformer" if "Transformer" in name else "unet"
    unet.save_pretrained(str(out / folder), safe_serialization=True)
    if is_flow(scheduler_config):  # a flow model keeps its own scheduler class (stock pipelines sample with it)
        sched_cls = getattr(diffusers, scheduler_config.get("_class_name") or "FlowMatchEulerDiscreteScheduler")
        sched_cls.from_config(scheduler_config).save_pretrained(str(out / "scheduler"))
    else:  # the DDPM training noise schedule (of a config that another DDPM-axis scheduler wrote, its keys)
        sched_cls = DDPMScheduler
        keep = inspect.signature(DDPMScheduler.__init__).parameters
        ddpm = {k: v for k, v in scheduler_config.items() if k in keep or k.startswith("_")}
        DDPMScheduler(**ddpm).save_pretrained(str(out / "scheduler"))
    vae, text = decoder_of(unet), text_parts_of(unet)
    if conditioning_of(unet).prompt_labels is not None:
        save_class_tokens(unet, out)
    index = {"_diffusers_version": _diffusers_version(), "scheduler": ["diffusers", sched_cls.__name__],
             folder: ["diffusers", name]}
    if vae is not None:
        vae.save_pretrained(str(out / "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", type(vae).__name__]
    for part, obj in (text or {}).items():
        if isinstance(obj, torch.nn.Module):
            obj.save_pretrained(str(out / part), safe_serialization=True)
        else:  # a tokenizer
            obj.save_pretrained(str(out / part))
        index[part] = ["transformers", type(obj).__name__]
    if name == "UNet2DModel" and vae is None and not unet.config.num_class_embeds:
        pipeline = "DDPMPipeline"
    elif name == "UNet2DConditionModel" and vae is not None and text is not None:
        pipeline = "StableDiffusionPipeline"
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    elif name == "DiTTransformer2DModel" and vae is not None:
        pipeline = "DiTPipeline"
    elif name == "SD3Transformer2DModel" and vae is not None and text is not None and "text_encoder_2" in text:
        pipeline = "StableDiffusion3Pipeline"  # a part it runs without (T5) is named None, as diffusers saves it
        index.update({n: [None, None] for pair in TEXT_PARTS for n in pair if n not in index},
                     image_encoder=[None, None], feature_extractor=[None, None])
    elif name == "PixArtTransformer2DModel" and vae is not None and text is not None:
        pipeline = pixart_pipeline(unet).__name__  # PixArtSigmaPipeline (PixArtAlphaPipeline: additional conds)
    elif name == "SanaTransformer2DModel" and vae is not None and text is not None:
        pipeline = "SanaPipeline"  # AutoencoderDC, Gemma 2 and its tokenizer
    elif name == "FluxTransformer2DModel" and vae is not None and text is not None and "text_encoder_2" in text:
        pipeline = "FluxPipeline"  # CLIP + T5; its optional IP-adapter parts named None, as diffusers saves them
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    elif name == "WanTransformer3DModel" and vae is not None and text is not None:
        pipeline = "WanPipeline"  # Wan 2.1's one-stage text-to-video, as WanPipeline.save_pretrained writes it
        index.update(transformer_2=[None, None], boundary_ratio=None, expand_timesteps=False)
    else:  # tmpq.deploy.pipelines.TmpqPipeline (registered with diffusers): no stock pipeline samples it
        pipeline = "TmpqPipeline"
    index = {"_class_name": pipeline, **index}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if manifest is not None:
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _diffusers_version() -> str:
    return diffusers.__version__
