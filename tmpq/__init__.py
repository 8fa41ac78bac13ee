"""tmpq: timestep x mixed-precision co-optimisation of diffusion models."""
import logging as _logging

from tmpq.core.version import __version__ as __version__

# With torchao installed (the gpu extra), every diffusers model load imports it, and torchao 0.18 beside diffusers
# 0.42 logs two warnings that concern neither the user's model nor tmpq (a deprecated torch pytree registration, and
# diffusers looking for torchao classes that moved); they would turn tmpq's one-line errors into three lines.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def load_run(path):
    """Open a search run directory; see :func:`tmpq.api.load_run`."""
    from tmpq.jobs.run import load_run as _load_run

    return _load_run(path)


def apply_export(pipeline_or_unet, export_dir):
    """Quantize a stock diffusers pipeline / UNet as exported by ``tmpq export``; see :func:`tmpq.deploy.bundle.apply_export`."""
    from tmpq.deploy.bundle import apply_export as _apply_export

    return _apply_export(pipeline_or_unet, export_dir)


def register_adapter(adapter):
    """Serve another denoiser class with ``adapter`` (a ``DenoiserAdapter``); see :mod:`tmpq.core.adapters`."""
    from tmpq.core.adapters import register_adapter as _register_adapter

    return _register_adapter(adapter)
