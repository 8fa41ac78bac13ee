"""tmpq: timestep x mixed-precision co-optimisation of diffusion models.

One face: ``import tmpq`` is cheap (no torch); each public name loads its module on first use (a module-level
``__getattr__`` over the name table below):

- ``tmpq.RunConfig`` (``RunConfig.preset("tiny")``, ``cfg.with_(**{"search.population": 8})``) and
  ``tmpq.DiffusionModel`` (``.load(dir)``, ``.from_pipeline(pipe)``);
- the jobs ``tmpq.search(model, config, run_dir)`` -> ``Run``, ``tmpq.validate(run, ...)``,
  ``tmpq.export(run, key=None, out=...)`` -> export directory, ``tmpq.run(model, config, run_dir)`` (the main job);
- ``tmpq.load_run``, ``tmpq.apply_export`` (``load_export``, ``read_export``), ``tmpq.register_adapter``,
  ``tmpq.DenoiserAdapter``, ``tmpq.TmpqError``, ``tmpq.TmpqPipeline`` (loads any export whose kind has no stock
  diffusers pipeline: ``tmpq.TmpqPipeline.from_pretrained(EXPORT)``).

``tmpq.search`` is also the search library's package (``tmpq.search.space``, ...): calling it runs the search job.
"""
import importlib as _importlib
import logging as _logging
import types as _types

import tmpq.search as _search_package
from tmpq.core.version import __version__ as __version__

# With torchao installed (the gpu extra), every diffusers model load imports it, and torchao 0.18 beside diffusers
# 0.42 logs two warnings that concern neither the user's model nor tmpq (a deprecated torch pytree registration, and
# diffusers looking for torchao classes that moved); they would turn tmpq's one-line errors into three lines.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# public name -> the module that defines it (loaded on first access, then cached in this module)
_NAMES = {
    "DenoiserAdapter": "tmpq.core.adapters", "register_adapter": "tmpq.core.adapters",
    "DiffusionModel": "tmpq.core.handle", "TmpqError": "tmpq.core.errors",
    "Candidate": "tmpq.core.candidate", "Solver": "tmpq.core.candidate",
    "TmpqPipeline": "tmpq.deploy.pipelines", "apply_export": "tmpq.deploy.bundle", "load_export": "tmpq.deploy.bundle", "read_export": "tmpq.deploy.bundle",
    "RunConfig": "tmpq.jobs.config", "Run": "tmpq.jobs.run", "load_run": "tmpq.jobs.run",
    "validate": "tmpq.api", "export": "tmpq.api", "pick": "tmpq.api", "run": "tmpq.api",
}
__all__ = sorted([*_NAMES, "search"])


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'tmpq' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _SearchPackage(_types.ModuleType):
    """The ``tmpq.search`` package, callable: ``tmpq.search(model, config, run_dir)`` is :func:`tmpq.api.search`
    (the package name and the job's name coincide; attribute access still reaches the library's modules)."""

    def __call__(self, *args, **kwargs):
        return _importlib.import_module("tmpq.api").search(*args, **kwargs)


_search_package.__class__ = _SearchPackage
search = _search_package
