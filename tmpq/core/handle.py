"""The model handle: one diffusion model held in memory, from a directory or from a live diffusers pipeline.

A :class:`DiffusionModel` is what the Python face (``tmpq.search``, ``tmpq.run``, ``tmpq.validate``,
``tmpq.export``) takes beside a directory path. It holds the denoiser, its training noise schedule, its conditioning
kind, optional guidance settings and its *source*: the ``model.path`` its runs record. A pipeline loaded from a local
directory records that directory (so ``tmpq validate RUN`` and the other commands can reload it later; the weights
fingerprint every run and supernet file carries refuses it if the weights changed); any other one records
``live:<class>``, which only the Python session holding the model can serve. The jobs see the handle through
:func:`tmpq.core.model.serving`: their ordinary ``load_model(cfg.model)`` then returns a fresh copy of the live
denoiser, so nothing is saved and reloaded, and the user's pipeline is never modified.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from tmpq.core.adapters import adapter_for, decoder_of, set_decoder, set_text_parts, text_parts_of
from tmpq.core.errors import TmpqError
from tmpq.core.model import (
    DENOISER_FOLDERS,
    EMBEDDED,
    LIVE_PREFIX,
    LoadedModel,
    ModelConfig,
    bind_axis,
    condition,
    load_model,
    pipeline_text_parts,
    serving,
)
from tmpq.core.timeaxis import time_axis


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a denoiser's parameter names, shapes and fp32 values in name order: the same digest as
    ``tmpq.supernet.model_fingerprint`` of an FP model, which runs and supernet files record."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _copy_to(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``module`` on ``device`` in ``dtype`` (cast only when it differs: diffusers warns on a cast)."""
    out = copy.deepcopy(module).to(device)
    if any(p.dtype != dtype for p in out.parameters()):
        out = out.to(dtype=dtype)
    return out.eval().requires_grad_(False)


def _source_of(path: str | os.PathLike) -> str:
    """A directory as a run records it: an embedded model by its name, any other as given."""
    for name, folder in EMBEDDED.items():
        if Path(path).resolve() == folder.resolve():
            return name
    return str(path)


class DiffusionModel:
    """A diffusion model in memory: ``denoiser`` (a diffusers UNet / transformer with a denoiser adapter), its training
    ``scheduler_config``, its ``source`` (the ``model.path`` a run records), and optional ``guidance_scale`` /
    ``null_label`` (None: the run config's ``[model]`` values). A latent model's ``vae`` and a text model's
    ``text`` (its text encoders and tokenizers by pipeline name; an (encoder, tokenizer) pair is read as Stable
    Diffusion's) travel with it.

    Example:
        >>> m = DiffusionModel.load()            # the embedded MNIST DDPM
        >>> m.source, m.conditioning
        ('embedded', 'none')
    """

    def __init__(self, denoiser: torch.nn.Module, scheduler_config: dict, source: str, *,
                 guidance_scale: float | None = None, null_label: int | None = None, vae=None, text=None):
        if hasattr(denoiser, "tmpq_supernet"):
            raise TmpqError("model: this denoiser is quantized by tmpq.apply_export; search its FP model (reload "
                            "the pipeline)")
        adapter_for(denoiser)  # refuses a class without an adapter, naming tmpq.register_adapter
        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        self.source = str(source)
        self.guidance_scale = guidance_scale
        self.null_label = null_label
        self.vae = vae
        # the text parts by pipeline name (an (encoder, tokenizer) pair is Stable Diffusion's text_encoder/tokenizer)
        self.text = {"text_encoder": text[0], "tokenizer": text[1]} if isinstance(text, tuple) else text
        self.config(ModelConfig())  # checks guidance_scale / null_label now, as a run config would

    @staticmethod
    def embedded_dir(name: str = "embedded") -> Path:
        """The directory of an embedded model (``embedded``: the MNIST DDPM pipeline; ``embedded-dit``: the DiT)."""
        if name not in EMBEDDED:
            raise TmpqError(f"model: no embedded model {name!r} (known: {', '.join(EMBEDDED)})")
        return EMBEDDED[name]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, guidance_scale: float | None = None,
             null_label: int | None = None) -> "DiffusionModel":
        """Load a local model directory (``None``: the embedded MNIST DDPM; ``"embedded-dit"``: the embedded DiT);
        see :func:`tmpq.core.model.load_model` for the layouts it reads."""
        source = "embedded" if path in (None, "") else _source_of(path)
        m = load_model(ModelConfig(path=source))
        return cls(m.unet, m.scheduler_config, source, guidance_scale=guidance_scale, null_label=null_label,
                   vae=decoder_of(m.unet), text=text_parts_of(m.unet))

    @classmethod
    def from_pipeline(cls, pipe, *, guidance_scale: float | None = None,
                      null_label: int | None = None) -> "DiffusionModel":
        """A live diffusers pipeline (``.unet`` or ``.transformer``, ``.scheduler``; a latent one's ``.vae``, a text
        one's ``.text_encoder`` + ``.tokenizer``, Stable Diffusion 3's also ``_2`` / ``_3``, Flux's ``_2``), held by
        reference: nothing is copied until a job loads it, and the pipeline itself is never modified."""
        denoiser = next((getattr(pipe, a) for a in DENOISER_FOLDERS
                         if isinstance(getattr(pipe, a, None), torch.nn.Module)), None)
        scheduler = getattr(pipe, "scheduler", None)
        if denoiser is None or scheduler is None or not hasattr(scheduler, "config"):
            raise TmpqError(f"model: expected a diffusers pipeline with .unet or .transformer and .scheduler, got "
                            f"{type(pipe).__name__}")
        # the training noise schedule, whatever sampler the pipeline holds now (a DDIM or DPM-Solver scheduler
        # carries the same betas); the run's sampler is tmpq's own
        own = {**{k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
               "_class_name": type(scheduler).__name__}
        if time_axis(own, "model: the pipeline's scheduler") == "flow":  # flow matching: its own scheduler config
            sched = own
        else:  # the DDPM training noise schedule (with what the model's own sampler implies: its adapter's)
            own_cfg = adapter_for(denoiser).scheduler_config(denoiser, dict(scheduler.config))
            sched = {k: v for k, v in DDPMScheduler.from_config(own_cfg).config.items() if not k.startswith("_")}
        name = getattr(pipe, "name_or_path", None)
        source = _source_of(name) if name and Path(str(name)).is_dir() else LIVE_PREFIX + type(denoiser).__name__
        return cls(denoiser, sched, source, guidance_scale=guidance_scale, null_label=null_label,
                   vae=getattr(pipe, "vae", None), text=pipeline_text_parts(pipe))

    @property
    def conditioning(self) -> str:
        """``none``, ``class`` or ``text`` (the denoiser adapter's kind)."""
        return adapter_for(self.denoiser).kind(self.denoiser)

    @property
    def live(self) -> bool:
        """True when no directory holds this model (``source`` is ``live:<class>``)."""
        return self.source.startswith(LIVE_PREFIX)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The weights fingerprint (SHA-256 over names, shapes, values), as runs record it."""
        return weights_fingerprint(self.denoiser)

    def config(self, base: ModelConfig) -> ModelConfig:
        """A run's ``[model]`` section with this model: ``path`` = ``source``, and the guidance settings given here
        in place of ``base``'s."""
        over = {k: v for k, v in (("guidance_scale", self.guidance_scale), ("null_label", self.null_label))
                if v is not None}
        return dataclasses.replace(base, path=self.source, **over)

    def serving(self):
        """The context inside which the jobs' ``load_model`` of this model's ``source`` returns a copy of it."""
        return serving(self.source, self._loaded)

    def _loaded(self, cfg: ModelConfig, device: str) -> LoadedModel:
        """A fresh ``LoadedModel`` as :func:`tmpq.core.model.load_model` gives for ``cfg`` (the jobs wrap and
        quantize it in place: the held denoiser stays untouched)."""
        dtype = cfg.torch_dtype
        unet = _copy_to(self.denoiser, device, dtype)
        if device == "cpu":
            unet.to(memory_format=torch.channels_last)  # as load_model: the same conv kernels on every path
        if self.vae is not None:
            upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
            set_decoder(unet, _copy_to(self.vae, device, torch.float32 if upcast else dtype))
        text = None
        if self.text is not None:  # the encoders copied, the tokenizers shared
            text = {n: _copy_to(v, device, dtype) if isinstance(v, torch.nn.Module) else v
                    for n, v in self.text.items()}
            set_text_parts(unet, text)
        adapter_for(unet).check(unet)
        cond = condition(unet, cfg, text, device, "the pipeline has no text_encoder + tokenizer")
        sched = bind_axis(unet, self.scheduler_config, "model: the pipeline's scheduler")
        return LoadedModel(unet=unet, scheduler_config=sched, path=Path(self.source), conditioning=cond)

    def __repr__(self) -> str:
        return (f"DiffusionModel({type(self.denoiser).__name__}, source={self.source!r}, "
                f"conditioning={self.conditioning!r})")
