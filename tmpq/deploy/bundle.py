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

``apply_export(pipeline_or_unet, DIR, backend=...)`` turns a stock pipeline / UNet of the same model into the exported
model, on fake quantization (the default) or on real int8 kernels checked against it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tmpq.core.adapters import adapter_for, bind_conditioning, bind_time_axis, conditioning_of, set_conditioning
from tmpq.core.choices import BACKENDS
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
from tmpq.deploy import torchao_int8 as ao_int8  # likewise
from tmpq.deploy.plan import LayerOption, QuantPlan, torchao_api
from tmpq.quant.layers import replace_module
from tmpq.supernet import QuantSupernet
from tmpq.supernet.store import read_supernet_file

EXPORT_FORMAT = "tmpq.export"
EXPORT_VERSION = 1
EXPORT_JSON = "tmpq_export.json"
QUANT_FILE = "quantizers.safetensors"
KERNELS = BACKENDS  # apply_export's backend= (and its alias kernels=): fake, int8 (oneDNN, CPU), torchao, auto


class _NotGiven:
    """The default of ``kernels=``, the alias of ``backend=``: told apart from any value a caller passes."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN = _NotGiven()


def requested_backend(backend, kernels, where: str) -> str:
    """The backend a call asks for: ``backend`` (None: not given), or its alias ``kernels``, else ``"fake"``. An
    unknown value, or both given and different, is one line naming them (before anything is loaded)."""
    for name, value in (("backend", backend), ("kernels", kernels)):
        if (name == "backend" and value is None) or value is NOT_GIVEN:
            continue
        if not isinstance(value, str) or value not in BACKENDS:
            raise TmpqError(f"{where}: {name} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    if backend is not None and kernels is not NOT_GIVEN and backend != kernels:
        raise TmpqError(f"{where}: backend={backend!r} and kernels={kernels!r} disagree (kernels is the old name of "
                        f"backend): give one of them")
    return backend if backend is not None else "fake" if kernels is NOT_GIVEN else kernels


def resolve_backend(requested: str, device: torch.device) -> tuple[str, str | None]:
    """What ``requested`` installs on a model on ``device``, and why ``"auto"`` settled for fake quantization
    (None where it did not): auto takes oneDNN int8 on a CPU model, torchao on a CUDA one when torchao imports.
    ``"int8"`` off the CPU and ``"torchao"`` without torchao are one-line refusals."""
    if requested == "auto":
        if device.type == "cpu":
            return "int8", None
        if device.type != "cuda":
            return "fake", f"no real int8 backend runs a model on {device} (int8: the CPU, torchao: CUDA)"
        try:
            torchao_api()
        except TmpqError as exc:
            return "fake", str(exc)
        return "torchao", None
    if requested == "int8" and device.type != "cpu":
        raise TmpqError(f"apply_export: backend='int8' runs oneDNN's CPU kernels, but the model is on {device}: move "
                        f"it to the CPU first, or use backend='torchao' (or 'auto') for torchao's int8 matmuls there")
    if requested == "torchao":
        torchao_api()  # one line when torchao is absent
    return requested, None


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


def apply_export(pipeline_or_unet, export_dir: str | Path, backend: str | None = None, kernels=NOT_GIVEN):
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

    ``backend`` (default ``"fake"``; ``kernels`` is its old name, same values, and both given must agree):
    ``"fake"`` runs every quantized layer as fake quantization (float kernels on the quantized values: tmpq's own
    samples, bit for bit where tmpq's are, not faster). The real backends then convert every layer their kernels run
    exactly, each checked against its fake-quant twin on a few samples along the exported schedule (noise the user
    does not draw); the others stay fake-quant, named in ``denoiser.tmpq_int8["layers"]`` with the reason (the
    summary beside them):

    - ``"int8"``: PyTorch's oneDNN int8 kernels on a CPU model (W8A8 and below: :mod:`tmpq.deploy.int8`; the
      Winograd layers on int8 GEMMs, :mod:`tmpq.deploy.winograd_int8`); a model elsewhere is refused;
    - ``"torchao"``: torchao's int8 matmuls on the model's device (:func:`tmpq.deploy.torchao_int8.deploy_torchao`:
      cuBLAS on CUDA, PyTorch's int8 matmul on the CPU; Winograd layers stay fake-quant); refused without torchao;
    - ``"auto"``: ``"int8"`` on a CPU model, ``"torchao"`` on a CUDA model when torchao imports, else ``"fake"``
      with the reason recorded.

    What was installed is ``denoiser.tmpq_backend`` (and ``pipeline.tmpq_backend``): ``{"requested", "installed",
    "device", "int8_layers", "fallbacks" (quantized layers the real backend left fake-quant), "why" (why auto
    installed fake quantization, else None)}``. The exported reuse of deep features runs on the converted model.

    Returns the same object. Refuses a model whose weights differ from the exported one.

    Example:
        >>> from diffusers import DDPMPipeline
        >>> pipe = apply_export(DDPMPipeline.from_pretrained("exports/best"), "exports/best")  # doctest: +SKIP
        >>> images = pipe(batch_size=4).images  # the exported steps, not DDPMPipeline's 1000  # doctest: +SKIP
    """

    requested = requested_backend(backend, kernels, "apply_export")
    export_dir = Path(export_dir)
    manifest = read_export(export_dir)
    with malformed(export_dir / EXPORT_JSON, "export manifest"):
        plan = QuantPlan.from_export(manifest)
    unet = next((getattr(pipeline_or_unet, a) for a in ("unet", "transformer")
                 if getattr(pipeline_or_unet, a, None) is not None), pipeline_or_unet)
    if not isinstance(unet, torch.nn.Module):
        raise TmpqError(f"apply_export: expected a diffusers denoiser or a pipeline with .unet / .transformer, got "
                        f"{type(pipeline_or_unet).__name__}")
    device = next(unet.parameters()).device
    installed, why_fake = resolve_backend(requested, device)
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
    info = None
    if installed != "fake":
        # before the reuse is installed: the probe runs every layer at every step (a reused call skips the deep
        # layers) and leaves the reuse counters to the user's calls. The reuse wraps the deep blocks' forward, which
        # calls whatever layer modules the blocks hold by then: the int8 ones
        info = _deploy_real(unet, plan, manifest, parts, export_dir, installed)
    record = {"requested": requested, "installed": installed, "device": str(device),
              "int8_layers": info["int8_layers"] if info else 0, "fallbacks": info["fallback_layers"] if info else 0,
              "why": why_fake}
    unet.tmpq_backend = record
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
        pipeline_or_unet.tmpq_backend = record
    return pipeline_or_unet


def _deploy_real(unet, plan: QuantPlan, manifest: dict, parts: dict | None, export_dir: Path, backend: str) -> dict:
    """The real ``backend`` (:func:`tmpq.deploy.int8.deploy_int8` or
    :func:`tmpq.deploy.torchao_int8.deploy_torchao`) on tmpq's sampler of the exported schedule; returns its
    ``tmpq_int8`` summary. A text model that a stock pipeline holds has no prompts bound (its pipeline encodes them
    per call): the probe borrows the exported prompts, encoded by the pipeline's own text parts, and the model's
    conditioning is restored after it."""
    sampler = plan.sampler
    sched = make_scheduler(manifest["sampler"]["config"], sampler.solver, sampler.order)
    saved = conditioning_of(unet)
    if adapter_for(unet).kind(unet) == "text" and saved.prompt_embeds is None:
        prompts = tuple(manifest.get("conditioning", {}).get("prompts") or ())
        if parts is None or not prompts:
            raise TmpqError(f"apply_export: backend={backend!r} checks each layer on samples of the export "
                            f"{export_dir}, and this text-conditional {type(unet).__name__} has no prompts to sample "
                            f"with: pass the whole pipeline (its text encoder encodes the exported prompts), or use "
                            f"tmpq.load_export(DIR, backend={backend!r})")
        device = next(parts["text_encoder"].parameters()).device
        set_conditioning(unet, **text_conditioning(unet, parts, prompts, device))
    deploy = cpu_int8.deploy_int8 if backend == "int8" else ao_int8.deploy_torchao
    try:
        return deploy(unet, sched, list(sampler.timesteps), plan)
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


def load_export(export_dir: str | Path, device: str = "cpu", prompts=None, backend: str | None = None,
                kernels=NOT_GIVEN):
    """``(unet, scheduler, timesteps, manifest)`` of an export directory: the FP model it contains, quantized, with
    the searched model's conditioning settings (its null label, a text model's prompts unless ``prompts`` names
    others; the guidance scale is ``manifest["sampler"]["guidance_scale"]``); ``backend`` (alias ``kernels``) as
    :func:`apply_export`: what it installed is ``unet.tmpq_backend``."""
    requested = requested_backend(backend, kernels, "load_export")  # before loading anything
    manifest = read_export(export_dir)
    prompts = tuple(prompts or manifest.get("conditioning", {}).get("prompts") or ())
    m = load_model(ModelConfig(path=str(export_dir), prompts=prompts), device=device)
    apply_export(m.unet, export_dir, backend=requested)
    with malformed(Path(export_dir) / EXPORT_JSON, "export manifest"):
        s = QuantPlan.from_export(manifest).sampler
    return m.unet, make_scheduler(m.scheduler_config, s.solver, s.order), list(s.timesteps), manifest
