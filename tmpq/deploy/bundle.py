"""Deployable export of one searched candidate, and applying it to a stock diffusers model.

An export directory is a complete diffusers pipeline directory (``model_index.json``, ``unet/`` or ``transformer/``,
``scheduler/``, and a latent model's ``vae/``, a text model's ``text_encoder/`` + ``tokenizer/`` (and further text
parts): the FP weights, loadable by diffusers alone as a ``DDPMPipeline``, ``StableDiffusionPipeline``,
``DiTPipeline``, ``StableDiffusion3Pipeline``, ``PixArtSigmaPipeline``, ``FluxPipeline``, ``SanaPipeline`` or ``WanPipeline``) plus

- ``tmpq_export.json``: ``format`` / ``version``; the sampler (scheduler class, its config, the searched timesteps,
  eta); per-layer FQN -> ``{w_bits, a_bits, granularity, ...}``; ``modules_to_not_convert``; the candidate's
  metrics; provenance (run, candidate key, fingerprints, tmpq version); SHA-256 of every file;
- ``quantizers.safetensors``: the calibrated quantizer state of exactly the exported bit-widths (one option per
  layer), in tmpq's supernet-file format with every layer pinned, so loading verifies model and config. A layer the
  point runs by Winograd F(m, 3) is pinned ``[w_bits, a_bits, m]`` and its entry in ``tmpq_export.json`` says
  ``"winograd": m``; the file then holds its transformed weight's grid (``U`` per tile position x output channel) and
  its input tiles' ranges (``V`` per tile position) beside its direct quantizers.

``apply_export(pipeline_or_unet, DIR)`` turns a stock pipeline / UNet of the same model into the exported model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tmpq.core.adapters import adapter_for, bind_conditioning, bind_time_axis, conditioning_of, set_conditioning
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import file_sha256, malformed, read_json
from tmpq.core.flow_solvers import FLOW_CLASSES
from tmpq.core.model import (
    ModelConfig,
    image_convs,
    load_model,
    pipeline_text_parts,
    refuse_two_stage,
    text_conditioning,
)
from tmpq.core.reuse import DeepCache, reuse_plan
from tmpq.core.sampler import make_scheduler
from tmpq.core.solvers import CLASSES, check_solver, needs_scaling
from tmpq.deploy import int8 as cpu_int8  # the module (it imports this one): see tmpq.deploy.int8's imports
from tmpq.deploy.plan import LayerOption, QuantPlan
from tmpq.quant.layers import replace_module
from tmpq.supernet import QuantSupernet
from tmpq.supernet.store import read_supernet_file

EXPORT_FORMAT = "tmpq.export"
EXPORT_VERSION = 1
EXPORT_JSON = "tmpq_export.json"
QUANT_FILE = "quantizers.safetensors"
KERNELS = ("fake", "int8")  # apply_export's kernels: fake quantization everywhere, or oneDNN int8 where it is exact


def read_export(path: str | Path, verify: bool = True) -> dict:
    """The manifest of an export directory, read-only; ``verify`` checks every file's SHA-256. A missing, unreadable
    or damaged manifest or file is a one-line ``TmpqError`` naming it."""

    path = Path(path)
    mf = path / EXPORT_JSON
    if not path.is_dir() or not mf.exists():
        raise TmpqError(f"not a tmpq export (no {EXPORT_JSON}): {path}")
    manifest = read_json(mf, "export manifest")
    if manifest.get("format") != EXPORT_FORMAT:
        raise TmpqError(f"{mf}: not a tmpq export (format {manifest.get('format')!r})")
    if manifest.get("version") != EXPORT_VERSION:
        raise TmpqError(f"{mf}: export version {manifest.get('version')} is not supported (this tmpq reads "
                        f"{EXPORT_VERSION})")
    with malformed(mf, "export manifest"):
        _check_manifest(manifest)
    if verify:
        for rel, digest in manifest["files"].items():
            f = path / rel
            if not f.is_file():
                raise TmpqError(f"export {path}: missing file {rel}")
            try:
                actual = file_sha256(f)
            except OSError as exc:
                raise TmpqError(f"cannot read the export file {f}: {exc.strerror or exc}") from None
            if actual != digest:
                raise TmpqError(f"export {path}: {rel} does not match its SHA-256 in {EXPORT_JSON} (modified or "
                                "corrupt)")
    return manifest


def _check_manifest(m: dict) -> None:
    """The fields loading reads, with their types (TypeError / KeyError name the first one that is wrong)."""
    for name in ("sampler", "layers", "files", "provenance"):
        if not isinstance(m[name], dict):
            raise TypeError(f"{name}: expected an object, got {type(m[name]).__name__}")
    if not isinstance(m["sampler"]["config"], dict):
        raise TypeError("sampler.config: expected an object")
    ts = m["sampler"]["timesteps"]
    if not isinstance(ts, list) or not ts or not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
        raise TypeError("sampler.timesteps: expected a non-empty list of integers")
    if not all(isinstance(v, str) and not Path(k).is_absolute() and ".." not in Path(k).parts
               for k, v in m["files"].items()):
        raise TypeError("files: expected relative file names -> SHA-256 strings")
    if QUANT_FILE not in m["files"]:
        raise KeyError(f"files.{QUANT_FILE}")
    if "solver" in m["sampler"]:
        try:
            check_solver(m["sampler"]["solver"], m["sampler"].get("order"))
        except TmpqError as exc:
            raise TypeError(f"sampler.{exc}") from None
    reuse = m["sampler"].get("reuse")
    if reuse is not None and not (isinstance(reuse, dict) and isinstance(reuse.get("branch"), int)
                                  and isinstance(reuse.get("calls"), list)
                                  and all(isinstance(k, int) and not isinstance(k, bool) for k in reuse["calls"])):
        raise TypeError("sampler.reuse: expected {branch: int, calls: [int, ...]}")
    cond = m.get("conditioning", {})
    if not isinstance(cond, dict):
        raise TypeError("conditioning: expected an object")
    prompts = cond.get("prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TypeError("conditioning.prompts: expected a list of non-empty strings")


def apply_export(pipeline_or_unet, export_dir: str | Path, kernels: str = "fake"):
    """Quantize a stock diffusers denoiser (or a pipeline holding one as ``.unet`` or ``.transformer``) in place as
    exported, with the exported conditioning settings (a class model's null label);
    a pipeline also gets the exported sampler (its solver's respaced scheduler, :mod:`tmpq.core.solvers`: DDIM
    unless the search chose another) and ``pipeline.tmpq_timesteps``.

    The pipeline's own call then samples the exported schedule: its scheduler has the searched timesteps pinned
    (:meth:`~tmpq.core.sampler.RespacedDDIMScheduler.pin_timesteps`), installed whatever ``num_inference_steps`` the
    pipeline passes by default (``DDPMPipeline``: 1000), and whatever sigmas and mu a flow pipeline passes
    (``FluxPipeline``'s ``set_timesteps(sigmas=..., mu=...)``); an explicit count other than the schedule's raises one
    line naming both. A Flux export is sampled at the resolution it was searched at (``height`` / ``width`` of its
    VAE's ``sample_size``): the exported scheduler's shift is the one its dynamic shifting gives there. With eta = 0 and ``generator=tmpq.core.sampler.noise_generators(n, seed)``, ``pipe(batch_size=n, ...)``
    gives the images of ``tmpq sample DIR --n n --seed seed``. ``save_pretrained`` of the quantized pipeline / UNet
    raises one line (diffusers would write a model that reloads with random weights): the export is its saved form.

    A layer exported with ``"winograd": m`` becomes a calibrated :class:`tmpq.quant.winograd.WinogradConv2d` (its
    ``U`` grid and ``V`` ranges from the quantizer file): tmpq's own samples of the point ran the same computation.

    ``kernels``: ``"fake"`` (default) runs every quantized layer as fake quantization (float kernels on the
    quantized values: exact, not faster); ``"int8"`` then converts every layer that PyTorch's oneDNN int8 kernels run
    exactly (W8A8 and below: :mod:`tmpq.deploy.int8`; the Winograd layers on int8 GEMMs,
    :mod:`tmpq.deploy.winograd_int8`) on a CPU model, each checked against its fake-quant twin on a
    few samples along the exported schedule (noise the user does not draw); the others stay fake-quant, named in
    ``denoiser.tmpq_int8["layers"]`` with the reason (the summary beside them). The exported reuse of deep features
    runs on the converted model.

    Returns the same object. Refuses a model whose weights differ from the exported one.

    Example:
        >>> from diffusers import DDPMPipeline
        >>> pipe = apply_export(DDPMPipeline.from_pretrained("exports/best"), "exports/best")  # doctest: +SKIP
        >>> images = pipe(batch_size=4).images  # the exported steps, not DDPMPipeline's 1000  # doctest: +SKIP
    """

    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise TmpqError(f"apply_export: kernels must be one of {', '.join(map(repr, KERNELS))}, got {kernels!r}")
    export_dir = Path(export_dir)
    manifest = read_export(export_dir)
    with malformed(export_dir / EXPORT_JSON, "export manifest"):
        plan = QuantPlan.from_export(manifest)
    unet = next((getattr(pipeline_or_unet, a) for a in ("unet", "transformer")
                 if getattr(pipeline_or_unet, a, None) is not None), pipeline_or_unet)
    if not isinstance(unet, torch.nn.Module):
        raise TmpqError(f"apply_export: expected a diffusers denoiser or a pipeline with .unet / .transformer, got "
                        f"{type(pipeline_or_unet).__name__}")
    if kernels == "int8" and next(unet.parameters()).device.type != "cpu":
        raise TmpqError(f"apply_export: kernels='int8' runs oneDNN's CPU kernels, but the model is on "
                        f"{next(unet.parameters()).device}: move it to the CPU first (tmpq speed --device cuda "
                        f"measures the GPU int8 path)")
    check_finite(export_dir / QUANT_FILE)
    if unet is not pipeline_or_unet and getattr(pipeline_or_unet, "config", None) is not None:
        # a Wan 2.2 pipeline: a second transformer for the low-noise steps, or per-token timesteps
        refuse_two_stage({**pipeline_or_unet.config, "transformer_2": getattr(pipeline_or_unet, "transformer_2", None)},
                         f"apply_export: {type(pipeline_or_unet).__name__}")
    bind_time_axis(unet, plan.sampler.time_axis)  # a flow model's calls come at sigma * N: routed on its grid
    if plan.null_label is not None:
        set_conditioning(unet, null_label=plan.null_label)
    parts = pipeline_text_parts(pipeline_or_unet)
    separate = net_config_of(manifest).get("guidance_ranges") == "separate"
    if parts is not None and separate:
        # the null pass is told by the empty prompt's embedding: the pipeline's own encoders give it
        set_conditioning(unet, **text_conditioning(unet, parts, (), next(parts["text_encoder"].parameters()).device))
    if next(unet.parameters()).device.type == "cpu" and image_convs(unet):
        # tmpq's CPU layout (as load_model): the same conv kernels, hence bit-identical samples, on every path
        unet.to(memory_format=torch.channels_last)
    net = QuantSupernet.from_file(unet, export_dir / QUANT_FILE)
    net.set_bits([])
    _check_bits(plan, net, export_dir)
    for fqn in net.layer_algos():  # the Winograd layers (pinned [w, a, m]): a calibrated WinogradConv2d each
        replace_module(unet, fqn, net.layers[fqn].winograd_module())
    # keep the wrapper reachable without registering it as a submodule: it holds ``unet`` itself, and a module
    # cycle sends .eval() / .to() / state_dict() of the user's model (or pipeline) into infinite recursion
    object.__setattr__(unet, "tmpq_supernet", net)
    if manifest.get("conditioning", {}).get("kind") == "class" and not _passes_labels(pipeline_or_unet, unet):
        _refuse_unlabelled_calls(unet, export_dir)

    def refuse_save(*_args, **_kwargs):
        raise TmpqError(f"save_pretrained: a model quantized by tmpq.apply_export does not reload in diffusers (a "
                        f"stock UNet2DModel would start from random weights); its saved form is the export "
                        f"{export_dir}: TmpqPipeline.from_pretrained(DIR) (tmpq.deploy.pipelines), or the stock "
                        f"pipeline's from_pretrained(DIR), then tmpq.apply_export(pipe, DIR)")

    # diffusers would write the wrapped layers' keys, which a stock model ignores (with a warning) on reload
    object.__setattr__(unet, "save_pretrained", refuse_save)
    ts = list(plan.sampler.timesteps)
    if kernels == "int8":
        # before the reuse is installed: the probe runs every layer at every step (a reused call skips the deep
        # layers) and leaves the reuse counters to the user's calls. The reuse wraps the deep blocks' forward, which
        # calls whatever layer modules the blocks hold by then: the int8 ones
        _deploy_int8(unet, plan, manifest, parts, export_dir)
    if plan.reuse is not None and plan.reuse.calls:
        # the exported reuse of deep features, driven by the denoiser's own calls (a stock pipeline's loop has no
        # step hook): a call at the schedule's first timestep starts a trajectory
        dc = DeepCache(unet, reuse_plan(list(plan.reuse.calls), plan.sampler.denoiser_calls or len(ts)),
                       plan.reuse.branch, timesteps=ts)
        dc.__enter__()
        object.__setattr__(unet, "tmpq_reuse", dc)
    if unet is not pipeline_or_unet:
        object.__setattr__(pipeline_or_unet, "save_pretrained", refuse_save)
        solver, flow = plan.sampler.solver, plan.sampler.time_axis.flow
        if needs_scaling(solver, flow) and not _scales_inputs(pipeline_or_unet):
            raise TmpqError(f"apply_export: the export samples with {solver} (sigma space), but "
                            f"{type(pipeline_or_unet).__name__} neither scales its initial noise nor its model inputs "
                            f"(init_noise_sigma, scale_model_input); use a pipeline that does (Stable Diffusion's), "
                            f"tmpq sample {export_dir}, or a search with solvers ddim / dpm++ / unipc")
        sched = (FLOW_CLASSES if flow else CLASSES)[solver].from_config(manifest["sampler"]["config"])
        sched.pin_timesteps(ts, default_steps=_default_steps(pipeline_or_unet))
        pipeline_or_unet.scheduler = sched
        pipeline_or_unet.tmpq_timesteps = ts
        pipeline_or_unet.tmpq_plan = plan
    return pipeline_or_unet


def _deploy_int8(unet, plan: QuantPlan, manifest: dict, parts: dict | None, export_dir: Path) -> None:
    """:func:`tmpq.deploy.int8.deploy_int8` on tmpq's sampler of the exported schedule. A text model that a
    stock pipeline holds has no prompts bound (its pipeline encodes them per call): the probe borrows the exported
    prompts, encoded by the pipeline's own text parts, and the model's conditioning is restored after it."""
    sampler = plan.sampler
    sched = make_scheduler(manifest["sampler"]["config"], sampler.solver, sampler.order)
    saved = conditioning_of(unet)
    if adapter_for(unet).kind(unet) == "text" and saved.prompt_embeds is None:
        prompts = tuple(manifest.get("conditioning", {}).get("prompts") or ())
        if parts is None or not prompts:
            raise TmpqError(f"apply_export: kernels='int8' checks each layer on samples of the export {export_dir}, "
                            f"and this text-conditional {type(unet).__name__} has no prompts to sample with: pass "
                            f"the whole pipeline (its text encoder encodes the exported prompts), or use "
                            f"tmpq.load_export(DIR, kernels='int8')")
        device = next(parts["text_encoder"].parameters()).device
        set_conditioning(unet, **text_conditioning(unet, parts, prompts, device))
    try:
        cpu_int8.deploy_int8(unet, sched, list(sampler.timesteps), plan)
    finally:
        bind_conditioning(unet, saved)


def check_finite(quant_file: Path) -> None:
    """Refuse a quantizer file holding a NaN or infinite value (a broken calibration would sample garbage, or NaN
    images, without an error): one line naming the file and the first such tensor."""
    _, state = read_supernet_file(quant_file)
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise TmpqError(f"{quant_file}: tensor {name} holds {bad} non-finite value(s) (NaN / inf): the export's "
                            f"quantizers are broken; export the candidate again from its run")


def _check_bits(plan: QuantPlan, net: QuantSupernet, export_dir: Path) -> None:
    """The loaded quantizers carry the manifest's bits, layer for layer (else one line naming the first layer)."""
    def show(o: LayerOption) -> str:
        return f"W{o.w_bits}A{o.a_bits}" + (f" Winograd F({o.winograd}, 3)" if o.winograd else "")

    for fqn, layer in net.layers.items():
        opt, live = plan.layers.get(fqn), LayerOption.of(layer)
        if opt is None or (opt.w_bits, opt.a_bits, opt.winograd) != (live.w_bits, live.a_bits, live.winograd):
            want = "absent" if opt is None else show(opt)
            raise TmpqError(f"export {export_dir}: layer {fqn} is {show(live)} in {QUANT_FILE} but {want} in "
                            f"{EXPORT_JSON}")


def _passes_labels(pipeline_or_unet, unet) -> bool:
    """Whether whoever calls this class model passes its labels: tmpq's sampler, or a pipeline whose call takes
    ``class_labels`` (a bare denoiser: its caller)."""
    if pipeline_or_unet is unet:
        return True
    import inspect

    try:
        params = inspect.signature(type(pipeline_or_unet).__call__).parameters
    except (TypeError, ValueError):
        return True
    return "class_labels" in params


def _refuse_unlabelled_calls(unet, export_dir: Path) -> None:
    """A stock pipeline that calls a class-conditional UNet without labels (``DDPMPipeline``) gets one line saying
    how to sample the export instead of diffusers' error deep in the model."""

    def hook(_mod, args, kwargs):
        if kwargs.get("class_labels") is None and len(args) < 3:
            raise TmpqError(f"{type(unet).__name__} of the export {export_dir} is class-conditional, but this "
                            f"pipeline calls it without class labels: load it with "
                            f"tmpq.deploy.pipelines.TmpqPipeline.from_pretrained(DIR) and call pipe(class_labels=...)")
        return None

    unet.register_forward_pre_hook(hook, with_kwargs=True)


def net_config_of(manifest: dict) -> dict:
    """The exported supernet config (an object; {} where an export has none)."""
    cfg = manifest.get("supernet_config")
    return cfg if isinstance(cfg, dict) else {}


def _scales_inputs(pipeline) -> bool:
    """Whether a pipeline's call applies ``init_noise_sigma`` and ``scale_model_input`` (read from its source; True
    where the source cannot be read)."""
    import inspect

    if getattr(type(pipeline), "tmpq_scales_inputs", False):  # tmpq's own pipeline samples as tmpq does
        return True
    try:
        src = inspect.getsource(type(pipeline).__call__)
    except (OSError, TypeError):
        return True
    return "init_noise_sigma" in src and "scale_model_input" in src


def _default_steps(pipeline) -> int | None:
    """The ``num_inference_steps`` a pipeline's call passes when the caller gives none (``DDPMPipeline``: 1000)."""
    import inspect

    try:
        param = inspect.signature(type(pipeline).__call__).parameters.get("num_inference_steps")
    except (TypeError, ValueError):
        return None
    return param.default if param is not None and isinstance(param.default, int) else None


def load_export(export_dir: str | Path, device: str = "cpu", prompts=None, kernels: str = "fake"):
    """``(unet, scheduler, timesteps, manifest)`` of an export directory: the FP model it contains, quantized, with
    the searched model's conditioning settings (its null label, a text model's prompts unless ``prompts`` names
    others; the guidance scale is ``manifest["sampler"]["guidance_scale"]``); ``kernels`` as :func:`apply_export`."""
    if not isinstance(kernels, str) or kernels not in KERNELS:  # before loading anything
        raise TmpqError(f"load_export: kernels must be one of {', '.join(map(repr, KERNELS))}, got {kernels!r}")
    manifest = read_export(export_dir)
    prompts = tuple(prompts or manifest.get("conditioning", {}).get("prompts") or ())
    m = load_model(ModelConfig(path=str(export_dir), prompts=prompts), device=device)
    apply_export(m.unet, export_dir, kernels=kernels)
    with malformed(Path(export_dir) / EXPORT_JSON, "export manifest"):
        s = QuantPlan.from_export(manifest).sampler
    return m.unet, make_scheduler(m.scheduler_config, s.solver, s.order), list(s.timesteps), manifest
