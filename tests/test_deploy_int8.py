"""apply_export(..., kernels="int8"): a stock diffusers pipeline runs the export on oneDNN's int8 kernels where they
are exact (checked per layer against fake quantization on samples of the exported schedule), keeps the rest
fake-quant and named, and still runs the export's reuse of deep features, on the int8 modules."""
import numpy as np
import pytest
import torch

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError


@pytest.fixture(scope="module")
def reuse_export(tmp_path_factory):
    """An export of a tiny searched model whose candidate reuses deep features (as tests/test_reuse.py builds its
    own): W8 / W4 weights on 8- / 6-bit activations, the first and last layers pinned at 16 bits."""
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("int8deploy")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "model")
    run = run_search(tiny_cfg(root / "model", population=8, generations=1, reuse_branch=1), root / "run",
                     progress=False)
    ev = load_run(run.path).evaluations
    row = next(r for _, r in ev[ev["status"] == "ok"].iterrows() if len(r["reuse"]))  # this seed has one
    man = export_candidate(run.path, row["key"], root / "exp")
    assert man["sampler"]["reuse"]["calls"]
    return root / "exp", man


@pytest.fixture(scope="module")
def pipes(reuse_export):
    """The export in three stock DDPMPipelines: fake quantization (the default), int8 kernels, and its FP model on
    the same sampler; with the int8 model's reuse counters as apply_export left them."""
    exp, _ = reuse_export
    fake, int8 = _pipe(exp), _pipe(exp, kernels="int8")
    dc = int8.unet.tmpq_reuse
    return {"fake": fake, "int8": int8, "fp": _pipe_fp(exp, fake), "counters": (dc.reuse_calls, dc.full_calls)}


def _pipe(exp, **kw):
    from diffusers import DDPMPipeline

    import tmpq

    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(exp)), exp, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, n=16, seed=0):
    from tmpq.core.sampler import noise_generators

    return np.asarray(pipe(batch_size=n, generator=noise_generators(n, seed), output_type="np").images)


def _int8_leaves(model):
    from tmpq.deploy.int8 import Int8Conv2d, Int8Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Conv2d, Int8Linear))}


def test_int8_pipeline_runs_the_int8_modules_and_draws_the_fake_quant_images(pipes):
    """Every layer the kernels run exactly is an int8 module in the stock pipeline; the 16-bit pins stay fake-quant
    and named. Images: the per-layer check bounds each layer's difference from fake quantization by float rounding
    (1e-5 of the exact magnitude), so most images agree to float rounding; where rounding moves an activation across
    a quantizer's tie, that element takes the neighbouring level and its image drifts, by less than one
    quantization step per flip: far below the quantization error itself (fake quant vs FP), which bounds the
    aggregate (pixel MSE under 2 % of it, max abs under half of its max)."""
    from tmpq.deploy.int8 import SplitInt8Conv2d, TimeGroupedInt8, onednn_available
    from tmpq.quant.layers import QuantLayer

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN int8 kernels")
    fake, int8, fp = pipes["fake"], pipes["int8"], pipes["fp"]
    info = int8.unet.tmpq_int8
    rows = {r["fqn"]: r for r in info["layers"]}
    assert {n for n, r in rows.items() if not r["int8"]} == {"conv_in", "conv_out"}
    assert all("16-bit" in rows[n]["why"] for n in ("conv_in", "conv_out"))
    assert info["int8_layers"] == len(rows) - 2 and info["check_worst_err_int8"] <= 1e-5
    for name, r in rows.items():
        mod = int8.unet.get_submodule(name)
        if r["int8"]:
            assert isinstance(mod, SplitInt8Conv2d | TimeGroupedInt8) or _int8_leaves(mod) == {"": mod}
        else:
            assert isinstance(mod, QuantLayer)
    assert sum(isinstance(m, QuantLayer) for m in int8.unet.modules()) == 2
    a, b, ref = _images(fake), _images(int8), _images(fp)
    per_image = np.abs(a - b).reshape(len(a), -1).max(1)
    assert (per_image <= 1e-5).mean() >= 0.5, per_image
    quant_mse, quant_max = float(((a - ref) ** 2).mean()), float(np.abs(a - ref).max())
    assert float(((a - b) ** 2).mean()) <= 0.02 * quant_mse and per_image.max() <= 0.5 * quant_max


def _pipe_fp(exp, like):
    """The export's FP model in the stock pipeline, on the exported sampler of ``like`` (the FP reference)."""
    import copy

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(exp))
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.scheduler = copy.deepcopy(like.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_int8_model_reuses_deep_features_on_its_int8_modules(reuse_export, pipes):
    """The export's reuse runs on the converted model: a reused denoiser call calls no int8 module of the deep part
    (its cached output stands in), a full call calls one of every deep converted layer (its live time group's), the
    shallow int8 modules run on every call, and the reuse counters count the user's calls only (apply_export's
    probe ran before the reuse was installed)."""
    from tmpq.core.reuse import reused_layers
    from tmpq.deploy.int8 import onednn_available

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN int8 kernels")
    _, man = reuse_export
    pipe = pipes["int8"]
    dc = pipe.unet.tmpq_reuse
    assert pipes["counters"] == (0, 0)
    deep_names = reused_layers(pipe.unet, man["sampler"]["reuse"]["branch"])
    is_deep = lambda n: any(n == d or n.startswith(d + ".") for d in deep_names)  # noqa: E731
    leaves = _int8_leaves(pipe.unet)
    deep_layers = [r["fqn"] for r in pipe.unet.tmpq_int8["layers"] if r["int8"] and is_deep(r["fqn"])]
    assert deep_layers and any(not is_deep(n) for n in leaves)
    per_call: list[dict] = []
    hooks = [pipe.unet.register_forward_pre_hook(lambda *_: per_call.append({"deep": 0, "shallow": 0}))]
    for name, m in leaves.items():
        part = "deep" if is_deep(name) else "shallow"
        hooks.append(m.register_forward_hook(lambda *_, p=part: per_call[-1].__setitem__(p, per_call[-1][p] + 1)))
    before = (dc.reuse_calls, dc.full_calls)
    try:
        _images(pipe, n=2)
    finally:
        for h in hooks:
            h.remove()
    steps, reused = len(man["sampler"]["timesteps"]), set(man["sampler"]["reuse"]["calls"])
    assert len(per_call) == steps
    assert (dc.reuse_calls - before[0], dc.full_calls - before[1]) == (len(reused), steps - len(reused))
    for k, c in enumerate(per_call):
        assert c["shallow"] > 0
        assert (c["deep"] == 0) == (k in reused), (k, c)
        if k not in reused:
            assert c["deep"] >= len(deep_layers)


def test_the_default_stays_fake_quant_and_a_bad_kernels_value_is_one_line(reuse_export, pipes):
    from diffusers import DDPMPipeline

    import tmpq
    from tmpq.deploy.bundle import load_export
    from tmpq.quant.layers import QuantLayer

    exp, man = reuse_export
    pipe = pipes["fake"]
    assert not _int8_leaves(pipe.unet) and not hasattr(pipe.unet, "tmpq_int8")
    assert sum(isinstance(m, QuantLayer) for m in pipe.unet.modules()) == len(man["layers"])
    stock = DDPMPipeline.from_pretrained(str(exp))
    for bad in ("int4", "INT8", None):
        with pytest.raises(TmpqError, match="kernels must be one of 'fake', 'int8'") as e:
            tmpq.apply_export(stock, exp, kernels=bad)
        assert "\n" not in str(e.value)
    assert not hasattr(stock.unet, "tmpq_supernet")  # refused before anything was changed
    with pytest.raises(TmpqError, match="load_export: kernels must be one of"):
        load_export(exp, kernels="onednn")


def test_without_onednn_kernels_every_layer_falls_back_named_with_a_warning(reuse_export, pipes, monkeypatch):
    """A PyTorch build without the kernels: no error, every quantized layer stays fake-quant with the reason, one
    warning line, and the pipeline draws exactly the fake-quant images."""
    import tmpq.deploy.int8 as int8

    monkeypatch.setattr(int8, "onednn_available", lambda: False)
    exp, man = reuse_export
    with pytest.warns(RuntimeWarning, match="no oneDNN int8 kernels") as w:
        pipe = _pipe(exp, kernels="int8")
    assert all("\n" not in str(x.message) for x in w)
    rows = pipe.unet.tmpq_int8["layers"]
    assert len(rows) == len(man["layers"]) and not any(r["int8"] for r in rows)
    assert all(r["why"] == "no oneDNN int8 kernels in this PyTorch build" for r in rows
               if r["fqn"] not in ("conv_in", "conv_out"))
    assert not _int8_leaves(pipe.unet)
    assert np.array_equal(_images(pipe, n=4), _images(pipes["fake"], n=4))
