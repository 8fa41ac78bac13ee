"""tmpq's own diffusers pipeline, for the exports no stock pipeline samples: a pixel-space DiT (diffusers'
``DiTPipeline`` needs a VAE) and a class-conditional ``UNet2DModel`` (``DDPMPipeline`` passes no class labels).

``TmpqPipeline.from_pretrained(EXPORT)`` loads any export in one call, quantized
(:func:`tmpq.deploy.bundle.apply_export` runs as diffusers finishes loading), and
``pipe(batch_size=..., class_labels=..., guidance_scale=...)`` samples the exported schedule through tmpq's sampler:
with ``generator=tmpq.core.sampler.noise_generators(n, seed)`` it draws the images of
``tmpq sample EXPORT --n n --seed seed``. A plain model directory (no ``tmpq_export.json``) loads in full
precision and samples uniform DDIM steps.

diffusers resolves a model_index.json's ``_class_name`` as an attribute of the ``diffusers`` module (a class named in a
``[module, class]`` pair is loaded from a ``.py`` file in the directory, which needs ``trust_remote_code``). Importing
this module (any ``tmpq.deploy`` import does) therefore registers ``TmpqPipeline`` there, under its own name and
under ``tmpq.Pipeline``, the name earlier exports and the embedded DiT's directory carry: after that
``diffusers.DiffusionPipeline.from_pretrained(EXPORT)`` loads them as this class.
"""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from tmpq.core.adapters import adapter_for
from tmpq.core.errors import TmpqError
from tmpq.core.model import bind_axis
from tmpq.core.sampler import make_scheduler, sample_batch
from tmpq.core.schedules import make_timesteps
from tmpq.deploy.bundle import EXPORT_JSON, apply_export

PIPELINE_NAMES = ("TmpqPipeline", "tmpq.Pipeline")  # model_index.json names this class answers to
DEFAULT_STEPS = 50  # uniform DDIM steps of a plain (not exported) model directory


class _Noise:
    """The initial noise of one call, in the noise bank's interface (:func:`tmpq.core.sampler.sample_batch`)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def initial(self, indices) -> torch.Tensor:
        return self.x

    def eta(self, indices, step):  # pragma: no cover - exports sample with eta = 0
        raise TmpqError("TmpqPipeline samples with eta = 0")


class TmpqPipeline(DiffusionPipeline):
    """A denoiser (``unet`` or ``transformer``) and its scheduler, sampled as tmpq samples (see the module
    docstring). After loading an export: ``tmpq_timesteps`` (the exported schedule) and ``tmpq_plan``
    (:class:`tmpq.deploy.plan.QuantPlan`)."""

    model_cpu_offload_seq = "unet->transformer"
    _optional_components = ["unet", "transformer"]
    tmpq_scales_inputs = True  # its sampler scales initial noise and model inputs for sigma-space solvers

    def __init__(self, scheduler, unet=None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise TmpqError("TmpqPipeline: give exactly one denoiser, unet or transformer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)

    def register_to_config(self, **kwargs):
        """diffusers records the directory a pipeline was loaded from here, right after building it: an export
        directory is applied at that point, whichever class ``from_pretrained`` was called on."""
        super().register_to_config(**kwargs)
        path = kwargs.get("_name_or_path")
        if path is not None and getattr(self, "tmpq_plan", None) is None and (Path(path) / EXPORT_JSON).is_file():
            apply_export(self, path)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, generator=None, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample ``batch_size`` images.

        ``class_labels`` (class models): one label for all, one per image, or None for balanced labels (image i gets
        class ``i % classes``, as ``tmpq sample``); ``guidance_scale``: classifier-free guidance (default: the
        exported one, 1 for a plain model); ``num_inference_steps``: an export samples its own schedule (None or its
        step count; another count raises one line); ``generator``: one ``torch.Generator`` or one per image;
        ``output_type``: ``"pil"``, ``"np"`` (NHWC in [0, 1]) or ``"pt"`` (NCHW in [0, 1])."""
        unet = self.denoiser
        plan = getattr(self, "tmpq_plan", None)
        if plan is not None:
            self.scheduler.set_timesteps(num_inference_steps)  # refuses another step count, naming both
            timesteps, scheduler = list(self.tmpq_timesteps), self.scheduler
            guidance = plan.guidance_scale if guidance_scale is None else float(guidance_scale)
        else:
            config = bind_axis(unet, dict(self.scheduler.config), "TmpqPipeline: scheduler")  # a flow model's too
            scheduler = make_scheduler(config)
            timesteps = make_timesteps("uniform", num_inference_steps or DEFAULT_STEPS,
                                       scheduler.config.num_train_timesteps)
            guidance = 1.0 if guidance_scale is None else float(guidance_scale)
        if output_type not in ("pil", "np", "pt"):
            raise TmpqError(f"output_type: expected pil, np or pt, got {output_type!r}")
        if class_labels is not None and not isinstance(class_labels, int):
            class_labels = [int(v) for v in torch.as_tensor(class_labels).reshape(-1).tolist()]
        adapter = adapter_for(unet)
        shape = (batch_size, *adapter.sample_shape(unet))
        device = next(unet.parameters()).device
        x = diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=torch.device("cpu"),
                                                     dtype=torch.float32)
        images = sample_batch(unet, scheduler, timesteps, _Noise(x.to(device)), list(range(batch_size)),
                              labels=class_labels, guidance_scale=guidance).cpu()
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def _register() -> None:
    """Make diffusers resolve :data:`PIPELINE_NAMES` (see the module docstring)."""
    for name in PIPELINE_NAMES:
        setattr(diffusers, name, TmpqPipeline)


_register()

__all__ = ["TmpqPipeline"]
