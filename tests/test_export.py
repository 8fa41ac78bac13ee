"""Export of a searched candidate: a self-contained directory that a fresh process turns back into the same
quantized model, with the same samples."""
import json
import subprocess
import sys

import pytest
import torch

from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError


def searched_tiny_run(root):
    """A one-generation search of a seeded tiny model under ``root``: the run and the key of its first front point."""
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search

    model = root / "tiny-ddpm"
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), model)
    run = run_search(tiny_cfg(model, generations=1), root / "run", progress=False)
    return run, load_run(run.path).pareto()["key"].iloc[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tmpq.jobs.export import export_candidate

    root = tmp_path_factory.mktemp("export")
    run, key = searched_tiny_run(root)
    man = export_candidate(run.path, key, root / "exp", command="test")
    return root, run, key, man


def _supernet_samples(run, key, n=6):
    """The candidate's images from the search's own supernet: the reference an export must reproduce."""
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler, sample_images
    from tmpq.jobs.run import load_run
    from tmpq.supernet import QuantSupernet

    row = load_run(run.path).evaluations.set_index("key").loc[key]
    m = load_model(json.loads((run.path / "config.resolved.json").read_text())["model"]["path"])
    net = QuantSupernet.from_file(m.unet, run.path / "supernet.safetensors")
    net.set_bits([tuple(p) for p in row["bits"]])
    return sample_images(m.unet, make_scheduler(m.scheduler_config), list(row["timesteps"]), n, seed=3,
                         batch_size=n, progress=False)


def test_export_manifest_and_files(exported):
    root, run, key, man = exported
    assert man["format"] == "tmpq.export" and man["version"] == 1
    assert man["provenance"]["candidate"] == key
    assert man["sampler"]["timesteps"] == sorted(man["sampler"]["timesteps"], reverse=True)
    assert all({"w_bits", "a_bits", "granularity"} <= set(v) for v in man["layers"].values())
    assert {"quantizers.safetensors", "unet/diffusion_pytorch_model.safetensors"} <= set(man["files"])
    assert not list(root.glob(".exp.*"))  # no temporary directory left behind


def test_apply_export_to_a_stock_pipeline_reproduces_the_search_samples(exported):
    from diffusers import DDPMPipeline

    import tmpq
    from tmpq.core.sampler import sample_images

    root, run, key, man = exported
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(root / "exp")), root / "exp")
    assert pipe.tmpq_timesteps == man["sampler"]["timesteps"]
    imgs = sample_images(pipe.unet, pipe.scheduler, pipe.tmpq_timesteps, 6, seed=3, batch_size=6, progress=False)
    ref = _supernet_samples(run, key)
    assert torch.equal(imgs, ref)
    # the quantized model stays an ordinary module tree: no cycle through the supernet wrapper
    pipe.to("cpu")
    pipe.unet.eval()
    assert not any(".tmpq_supernet." in k for k in pipe.unet.state_dict())
    assert torch.equal(sample_images(pipe.unet, pipe.scheduler, pipe.tmpq_timesteps, 6, seed=3, batch_size=6,
                                     progress=False), ref)


def test_the_stock_pipeline_call_samples_the_exported_schedule(exported, tmp_path):
    """``pipe(batch_size=...)`` called as a new user would (no ``num_inference_steps``: DDPMPipeline's default is
    1000) runs the exported timesteps and, on the noise of ``tmpq sample EXPORT --seed 3``, gives its images."""
    import numpy as np
    from diffusers import DDPMPipeline
    from PIL import Image

    import tmpq
    from tmpq.cli import main
    from tmpq.core.sampler import noise_generators, sample_images

    root, run, key, man = exported
    exp, ts = root / "exp", man["sampler"]["timesteps"]
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(exp)), exp)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(int(args[1].reshape(-1)[0])))
    assert len(pipe(batch_size=2).images) == 2 and calls == ts  # PIL images, one denoiser call per exported step
    got = pipe(batch_size=4, generator=noise_generators(4, seed=3), output_type="np").images
    ref = sample_images(pipe.unet, pipe.scheduler, ts, 4, seed=3, batch_size=4, progress=False)
    assert np.array_equal(got, (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())  # bit-identical
    # the default PIL output is the grid `tmpq sample EXPORT` writes, tile for tile
    assert main(["sample", str(exp), "--n", "4", "--seed", "3", "--nrow", "4", "--scale", "1", "--threads",
                 str(torch.get_num_threads()), "--out", str(tmp_path / "g.png")]) == 0
    grid = np.array(Image.open(tmp_path / "g.png"))
    h, w = got.shape[1:3]
    for i, im in enumerate(pipe(batch_size=4, generator=noise_generators(4, seed=3)).images):
        assert np.array_equal(np.array(im), grid[1:1 + h, 1 + i * (w + 1):1 + i * (w + 1) + w])
    # the schedule's own step count is accepted; another one is refused in one line naming both
    calls.clear()
    pipe(num_inference_steps=len(ts))
    assert calls == ts
    with pytest.raises(TmpqError, match=f"num_inference_steps=50: .*exported {len(ts)}-step schedule") as err:
        pipe(num_inference_steps=50)
    assert "\n" not in str(err.value)
    pipe.scheduler.pin_timesteps(None)  # unpinned: stock DDIM spacing again
    calls.clear()
    pipe(num_inference_steps=5)
    assert calls == [800, 600, 400, 200, 0]
    # diffusers would save the quantized UNet as a checkpoint that reloads with random weights: refused
    with pytest.raises(TmpqError, match="save_pretrained: .*tmpq.apply_export"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_export_in_a_fresh_process_gives_identical_samples(exported, tmp_path):
    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export

    root, run, key, man = exported
    code = ("import torch,sys; from tmpq.deploy.bundle import load_export; from tmpq.core.sampler import sample_images;"
            "u,s,ts,_=load_export(sys.argv[1]); torch.save(sample_images(u,s,ts,6,seed=3,batch_size=6,"
            "progress=False), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(root / "exp"), str(tmp_path / "x.pt")], check=True)
    fresh = torch.load(tmp_path / "x.pt", weights_only=True)
    unet, sched, ts, _ = load_export(root / "exp")
    here = sample_images(unet, sched, ts, 6, seed=3, batch_size=6, progress=False)
    assert torch.equal(fresh, here) and torch.equal(here, _supernet_samples(run, key))


def test_export_cli_and_bad_inputs(exported, tmp_path):
    from tmpq.deploy.bundle import read_export
    from tmpq.jobs.export import export_candidate

    root, run, key, man = exported
    r = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(root / "exp"), "--n", "4",
                        "--out", str(tmp_path / "g.png")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "g.png").is_file(), r.stderr
    with pytest.raises(TmpqError, match="no successful evaluation"):
        export_candidate(run.path, "0" * 16, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(TmpqError, match="exists and is not empty"):
        export_candidate(run.path, key, root / "exp")
    # a modified file is caught by its hash; a foreign model is refused by the quantizer file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "exp", bad)
    q = bad / "quantizers.safetensors"
    q.write_bytes(q.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TmpqError, match="quantizers.safetensors does not match its SHA-256"):
        read_export(bad)
    r = subprocess.run([sys.executable, "-m", "tmpq", "sample", str(bad), "--out", str(tmp_path / "b.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "SHA-256" in r.stderr
    from tests.conftest import tiny_unet
    from tmpq.deploy.bundle import apply_export

    with pytest.raises(TmpqError, match="different model"):
        apply_export(tiny_unet(seed=5), root / "exp")


def test_int8_kernels_hold_the_exported_weights_and_stay_close(exported, tmp_path):
    from tmpq.deploy.bundle import load_export
    from tmpq.deploy.int8 import to_int8
    from tmpq.quant.layers import QuantLayer

    root, run, key, man = exported
    unet, sched, ts, _ = load_export(root / "exp")
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 400)
    with torch.no_grad():
        ref = unet(x, t).sample
    n_quant = sum(isinstance(m, QuantLayer) for m in unet.modules())
    unet, layers = to_int8(unet, lambda u: u(x, t))  # raises if an int8 weight differs from the exported grid
    assert len(layers) == n_quant
    # symmetric per-channel weights: every layer runs int8 but the first and last (16-bit pins)
    wide = {r["fqn"] for r in layers if r["a_bits"] > 8}
    assert wide == {"conv_in", "conv_out"}
    assert all(r["int8"] != (r["fqn"] in wide) for r in layers)
    assert all("16-bit" in r["why"] for r in layers if r["fqn"] in wide)
    assert sum(isinstance(m, QuantLayer) for m in unet.modules()) == len(wide)  # the fallbacks stay fake-quant
    with torch.no_grad():
        out = unet(x, t).sample
    assert torch.isfinite(out).all()
    from tmpq.core.model import load_model

    with torch.no_grad():
        fp = load_model(root / "exp").unet(x, t).sample
    err = lambda a: float((a - fp).pow(2).mean() / fp.pow(2).mean())  # noqa: E731
    # the int8 kernels compute what fake quantization computes (same activation quantizers, same weight grid)
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-8, (err(out), err(ref))
    r = subprocess.run([sys.executable, "-m", "tmpq", "speed", str(root / "exp"), "--n", "8", "--batch-size", "8",
                        "--out", str(tmp_path / "speed.json"), "--threads", "1", "--fp-reference", "ddim:2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    rows = json.loads((tmp_path / "speed.json").read_text())
    # the FP reference sampler, timed in the same run, and the one summary line of ratios
    assert rows["fp_reference"]["timesteps"] == [999, 499] and rows["fp_reference_s"] > 0
    summary = next(ln for ln in r.stdout.splitlines() if ln.startswith("summary: int8 "))
    assert f"{rows['fp_reference_s'] / rows['int8_export_s']:.2f}x the FP reference (ddim 2 trailing)" in summary
    assert f"{rows['fp_100_uniform_s'] / rows['int8_export_s']:.2f}x FP DDIM 100" in summary
    assert rows["int8_small_batch_s_per_image"] > 0 and isinstance(rows["int8_timing_suspect"], bool)
    assert ("suspect" in summary) == rows["int8_timing_suspect"]
    bad = subprocess.run([sys.executable, "-m", "tmpq", "speed", str(root / "exp"), "--fp-reference", "ddim"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--fp-reference: expected SOLVER:STEPS[:SPACING]" in bad.stderr
    assert rows["int8_layers"] == n_quant - len(wide) and rows["int8_export_s"] > 0
    # the profiled conv / Linear share is a real fraction and the Amdahl bound follows from it
    share = rows["op_shares"]["fp"]["conv_linear_share"]
    assert 0 < share < 1 and rows["op_shares"]["int8"]["conv_linear_ms"] > 0
    assert rows["speedup_bound_vs_fp100"] == pytest.approx(
        rows["fp_100_uniform_s"] / rows["fp_export_schedule_s"] / (1 - share))


@pytest.mark.parametrize("kernel,stride,padding,a_sym", [(3, 1, 1, False), (1, 1, 0, True), (3, 2, 1, False)])
def test_int8_conv_and_linear_compute_what_fake_quantization_computes(kernel, stride, padding, a_sym):
    """oneDNN's static int8 kernels with the exported activation quantizer and weight grid give the fake-quantized
    layer's output up to float rounding, also where the output leaves the input's range (which PyTorch's dynamic
    quantized Conv2d clips)."""
    from tmpq.deploy.int8 import Int8Conv2d, Int8Linear, onednn_available
    from tmpq.quant.quantizer import AffineQuantizer

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN int8 kernels")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 16, 9, 9, generator=g) * 2.5 - 0.3
    aq = AffineQuantizer(6, symmetric=a_sym)
    aq.observe(x)
    aq.freeze()
    w = torch.randn(24, 16, kernel, kernel, generator=g) * 3.0  # outputs far outside the input's range
    scale = w.abs().amax(dim=(1, 2, 3)) / 31
    w = torch.round(w / scale.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)  # a 6-bit weight grid
    bias = torch.randn(24, generator=g)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(aq(x), w, bias, stride, padding)
        got = Int8Conv2d(torch.nn.Conv2d(16, 24, kernel, stride, padding), w, scale, bias, aq)(x)
    assert want.abs().max() > 10 * x.abs().max()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    lw = w[:, :, 0, 0].contiguous()
    xl = x.permute(0, 2, 3, 1)[:, :3]  # [4, 3, 9, 16]: a Linear over the last dimension
    with torch.no_grad():
        want = torch.nn.functional.linear(aq(xl), lw, bias)
        got = Int8Linear(lw, scale, bias, aq)(xl)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bits,a_sym", [(8, False), (8, True), (6, False), (6, True)])
def test_int8_input_codes_are_the_fake_quantizer_codes(bits, a_sym, fused, layout):
    """The deployed input quantizer (one fused quantize pass to bytes) gives exactly the calibrated quantizer's
    levels, ties and both clamps included, whatever the input's memory layout (a split conv quantizes a channel slice
    of a channels-last tensor)."""
    from tmpq.deploy.int8 import _StaticInput
    from tmpq.quant.quantizer import AffineQuantizer

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 16, 16, generator=g) * 2 + 0.5
    aq = AffineQuantizer(bits, symmetric=a_sym)
    aq.observe(x[:1] * 0.5)  # a range narrower than the data: both clamps are exercised
    aq.freeze()
    s = float(aq.scale.reshape(-1)[0])
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * s  # exact ties (round half to even)
    inp = _StaticInput(aq)
    if fused and not inp.fused:
        pytest.skip("this PyTorch build has no fused per-tensor quantize")
    inp.fused = fused
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":
        x = torch.cat([torch.zeros(2, 3, 16, 16), x], 1).contiguous(memory_format=torch.channels_last)[:, 3:]
        assert x.storage_offset() == 3 and not x.is_contiguous()
    u = inp(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape and int(u.max()) <= aq.qmax - aq.qmin
    got = (u.float() + aq.qmin - float(aq.zero_point.reshape(-1)[0])) * s
    with torch.no_grad():
        assert torch.equal(got, aq(x))


def test_one_call_loads_the_export_quantized_and_samples_its_schedule(exported):
    """``TmpqPipeline.from_pretrained(EXPORT)``: the export quantized in one call (its plan read from the manifest
    agrees with the loaded quantizers), sampling what ``tmpq sample`` samples on the same noise."""
    from diffusers import DiffusionPipeline

    from tmpq.core.sampler import noise_generators, sample_images
    from tmpq.deploy.bundle import load_export
    from tmpq.deploy.pipelines import TmpqPipeline
    from tmpq.deploy.plan import QuantPlan

    root, run, key, man = exported
    exp = root / "exp"
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    pipe = TmpqPipeline.from_pretrained(str(exp))
    pipe.set_progress_bar_config(disable=True)
    plan = QuantPlan.from_export(man)
    assert pipe.tmpq_plan == plan and pipe.tmpq_timesteps == list(plan.sampler.timesteps)
    unet, sched, ts, _ = load_export(exp)
    assert QuantPlan.from_model(unet).layers.keys() == plan.layers.keys()
    assert all((plan.layers[n].w_bits, plan.layers[n].a_bits) == (o.w_bits, o.a_bits)
               for n, o in QuantPlan.from_model(unet).layers.items())
    got = pipe(batch_size=4, generator=noise_generators(4, seed=3), output_type="pt").images
    ref = sample_images(unet, sched, ts, 4, seed=3, batch_size=4, progress=False)
    assert torch.equal(got, (ref / 2 + 0.5).clamp(0, 1))
    assert len(pipe(batch_size=2).images) == 2  # PIL images
    with pytest.raises(TmpqError, match="num_inference_steps=7"):
        pipe(num_inference_steps=7)
    # the model_index.json of an unconditional UNet names diffusers' DDPMPipeline: the stock way still loads it
    assert type(DiffusionPipeline.from_pretrained(str(exp))).__name__ == "DDPMPipeline"
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before  # loading wrote nothing


def test_an_export_with_non_finite_quantizer_scales_is_refused_at_load(exported, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.conftest import run_cli
    from tmpq.core.fileio import file_sha256
    from tmpq.deploy.bundle import load_export
    from tmpq.deploy.pipelines import TmpqPipeline
    from tmpq.supernet.store import read_supernet_file

    root, run, key, man = exported
    bad = tmp_path / "nan"
    shutil.copytree(root / "exp", bad)
    q = bad / "quantizers.safetensors"
    meta, _ = read_supernet_file(q, tensors=False)
    state = load_file(q)
    name = next(k for k in sorted(state) if k.endswith(".a_quant.0.scale") and not k.startswith("conv_in"))
    state[name] = state[name].clone().fill_(float("nan"))
    save_file(state, q, metadata=meta)
    m = json.loads((bad / "tmpq_export.json").read_text())
    m["files"]["quantizers.safetensors"] = file_sha256(q)  # consistent hashes: only the values are wrong
    (bad / "tmpq_export.json").write_text(json.dumps(m))
    for load in (load_export, TmpqPipeline.from_pretrained):
        with pytest.raises(TmpqError, match=f"quantizers.safetensors: tensor {name} holds 1 non-finite") as err:
            load(str(bad))
        assert "\n" not in str(err.value)
    capsys.readouterr()  # the loads' progress bars
    code, _, stderr = run_cli(["sample", bad, "--n", "2", "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and name in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()
