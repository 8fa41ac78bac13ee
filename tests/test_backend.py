"""apply_export(..., backend=...): fake quantization by default, oneDNN int8 (CPU) or torchao int8 by name, and
``auto`` picking the real kernels the model's device runs exactly; ``kernels=`` as its alias; what was installed
recorded in ``denoiser.tmpq_backend``; ``tmpq sample --backend``. No GPU: the CUDA choice of auto is tested on the
decision itself."""
import numpy as np
import pytest
import torch

from tmpq.core.errors import TmpqError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: one thread is faster, and steady on a busy machine (conftest restores the count afterwards)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An export of the first front point of a one-generation search of a tiny model (W8 / W4 on 8- / 6-bit
    activations, first and last layers pinned at 16 bits)."""
    from tests.test_export import searched_tiny_run
    from tmpq.jobs.export import export_candidate

    root = tmp_path_factory.mktemp("backend")
    run, key = searched_tiny_run(root)
    man = export_candidate(run.path, key, root / "exp")
    return root / "exp", man


def _pipe(exp, *args, **kw):
    from diffusers import DDPMPipeline

    import tmpq

    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(exp)), exp, *args, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, n=8, seed=0):
    from tmpq.core.sampler import noise_generators

    return np.asarray(pipe(batch_size=n, generator=noise_generators(n, seed), output_type="np").images)


@pytest.fixture(scope="module")
def fake_and_fp(exported):
    """The fake-quant pipeline (the default) and its images, and the FP model's images on the same sampler: the
    quantization error that bounds how far a real backend may drift."""
    import copy

    from diffusers import DDPMPipeline

    exp, _ = exported
    fake = _pipe(exp)
    fp = DDPMPipeline.from_pretrained(str(exp))
    fp.unet.to(memory_format=torch.channels_last)
    fp.scheduler = copy.deepcopy(fake.scheduler)
    fp.set_progress_bar_config(disable=True)
    return fake, _images(fake), _images(fp)


def _within_int8_tolerance(images, fake_images, fp_images, close: float = 1e-5):
    """As tests/test_deploy_int8.py bounds the int8 images: float rounding per layer, so most images agree to
    ``close``; a flipped quantizer tie drifts one image by less than a step, far below the quantization error."""
    per_image = np.abs(images - fake_images).reshape(len(images), -1).max(1)
    quant_mse = float(((fake_images - fp_images) ** 2).mean())
    assert (per_image <= close).mean() >= 0.5, per_image
    assert float(((images - fake_images) ** 2).mean()) <= 0.02 * quant_mse


def test_the_default_is_fake_quantization_recorded_as_such(exported, fake_and_fp):
    fake, _, _ = fake_and_fp
    assert fake.unet.tmpq_backend == {"requested": "fake", "installed": "fake", "device": "cpu", "int8_layers": 0,
                                      "fallbacks": 0, "why": None}
    assert fake.tmpq_backend is fake.unet.tmpq_backend
    assert not hasattr(fake.unet, "tmpq_int8")


def test_auto_on_a_cpu_model_installs_int8_within_its_tolerance_of_fake(exported, fake_and_fp):
    from tmpq.deploy.int8 import Int8Conv2d, onednn_available

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN int8 kernels")
    exp, man = exported
    _, fake_images, fp_images = fake_and_fp
    auto = _pipe(exp, backend="auto")
    rec, info = auto.unet.tmpq_backend, auto.unet.tmpq_int8
    assert rec["requested"] == "auto" and rec["installed"] == "int8" and rec["why"] is None
    assert rec["int8_layers"] == info["int8_layers"] > 0
    assert rec["fallbacks"] == info["fallback_layers"] == len(man["layers"]) - rec["int8_layers"]
    assert {r["fqn"] for r in info["layers"] if not r["int8"]} == {"conv_in", "conv_out"}  # the 16-bit pins
    assert any(isinstance(m, Int8Conv2d) for m in auto.unet.modules())
    images = _images(auto)
    _within_int8_tolerance(images, fake_images, fp_images)
    # the alias and the positional form install the same kernels: the same images, bit for bit
    for args, kw in (((), {"kernels": "int8"}), (("int8",), {}), ((), {"backend": "int8", "kernels": "int8"})):
        same = _pipe(exp, *args, **kw)
        assert same.unet.tmpq_backend == {**rec, "requested": "int8"}
        assert [r["int8"] for r in same.unet.tmpq_int8["layers"]] == [r["int8"] for r in info["layers"]]
        assert np.array_equal(_images(same), images)


@pytest.mark.parametrize("kw,match", [
    ({"backend": "int8", "kernels": "fake"}, "backend='int8' and kernels='fake' disagree"),
    ({"backend": "auto", "kernels": "int8"}, "backend='auto' and kernels='int8' disagree"),
    ({"backend": "gpu"}, "backend must be one of 'fake', 'int8', 'torchao', 'auto', got 'gpu'"),
    ({"backend": 8}, "backend must be one of .* got 8"),
    ({"kernels": "onednn"}, "kernels must be one of 'fake', 'int8', 'torchao', 'auto', got 'onednn'"),
    ({"kernels": None}, "kernels must be one of .* got None"),
])
def test_conflicting_or_unknown_values_are_one_line_before_anything_changes(exported, kw, match, tmp_path):
    from diffusers import DDPMPipeline

    import tmpq

    exp, _ = exported
    stock = DDPMPipeline.from_pretrained(str(exp))
    with pytest.raises(TmpqError, match=match) as e:
        tmpq.apply_export(stock, exp, **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith("apply_export: ")
    assert not hasattr(stock.unet, "tmpq_supernet") and not hasattr(stock.unet, "tmpq_backend")
    # load_export checks before it reads anything: a directory that does not exist is not the error
    with pytest.raises(TmpqError, match=match) as e:
        tmpq.load_export(tmp_path / "no-export", **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith("load_export: ")


def test_torchao_on_a_cpu_model_runs_torchao_checked_within_its_tolerance_of_fake(exported, fake_and_fp):
    """The decision: torchao's CPU path (PyTorch's int8 x int8 -> int32 matmul) runs, each layer checked against fake
    quantization as on CUDA."""
    pytest.importorskip("torchao")
    from tmpq.deploy.torchao_int8 import torchao_layers

    exp, man = exported
    _, fake_images, fp_images = fake_and_fp
    pipe = _pipe(exp, backend="torchao")
    rec, info = pipe.unet.tmpq_backend, pipe.unet.tmpq_int8
    assert rec["requested"] == rec["installed"] == "torchao" and rec["device"] == "cpu" and rec["why"] is None
    assert rec["int8_layers"] == info["int8_layers"] > 0 and rec["fallbacks"] == info["fallback_layers"]
    assert all(r["backend"] == "torchao" for r in info["layers"]) and len(info["layers"]) == len(man["layers"])
    assert {r["fqn"] for r in info["layers"] if not r["int8"]} == {"conv_in", "conv_out"}
    assert torchao_layers(pipe.unet) >= rec["int8_layers"]
    # torchao scales the int32 sums in another order than oneDNN: float rounding a few times larger per image
    _within_int8_tolerance(_images(pipe), fake_images, fp_images, close=1e-4)


def test_auto_on_cuda_takes_torchao_when_it_imports_else_fake_with_the_reason(monkeypatch):
    """The device decision, without a GPU: a CUDA model gets torchao, or fake quantization with torchao's import
    error recorded; int8 off the CPU and torchao without torchao are one-line refusals."""
    from tmpq.deploy import bundle

    cuda, mps = torch.device("cuda", 0), torch.device("mps")
    monkeypatch.setattr(bundle, "torchao_api", lambda: {})
    assert bundle.resolve_backend("auto", cuda) == ("torchao", None)
    assert bundle.resolve_backend("auto", torch.device("cpu")) == ("int8", None)
    installed, why = bundle.resolve_backend("auto", mps)
    assert installed == "fake" and "mps" in why

    def absent():
        raise TmpqError("the torchao int8 path needs torchao (pip install 'tmpq[gpu]'): No module named 'torchao'")

    monkeypatch.setattr(bundle, "torchao_api", absent)
    assert bundle.resolve_backend("auto", cuda) == ("fake", "the torchao int8 path needs torchao (pip install "
                                                            "'tmpq[gpu]'): No module named 'torchao'")
    with pytest.raises(TmpqError, match="needs torchao"):
        bundle.resolve_backend("torchao", torch.device("cpu"))
    with pytest.raises(TmpqError, match="backend='int8' runs oneDNN's CPU kernels, but the model is on cuda:0") as e:
        bundle.resolve_backend("int8", cuda)
    assert "\n" not in str(e.value) and "backend='torchao'" in str(e.value)
    assert bundle.resolve_backend("fake", cuda) == ("fake", None)


def test_sample_backend_int8_writes_its_grid(exported, tmp_path, capsys):
    from PIL import Image

    from tests.conftest import run_cli
    from tmpq.deploy.int8 import onednn_available

    exp, man = exported
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(["sample", exp, "--backend", "int8", "--n", "4", "--nrow", "2", "--scale", "1",
                                 "--out", out, "--threads", "1"], capsys)
    assert code == 0, err
    w, h = Image.open(out).size
    assert w == h >= 2 * 8  # 2 x 2 images of 8 x 8
    line = next(x for x in stdout.splitlines() if x.startswith("backend: "))
    if onednn_available():
        n8 = len(man["layers"]) - 2
        assert line.startswith("backend: int8 installed int8 on cpu: ") and f"{n8} layers on real int8" in line
    assert f"wrote {out}" in stdout
    code, stdout, _ = run_cli(["sample", exp, "--n", "4", "--out", tmp_path / "fake.png", "--threads", "1"], capsys)
    assert code == 0 and "backend:" not in stdout  # the default says nothing new


@pytest.mark.parametrize("argv,match", [
    (["sample", "--backend", "int8", "--steps", "3"], "--backend int8 applies to an export"),
    (["speed", "no-export", "--backend", "fake"], "--backend fake: fake quantization is always timed"),
    (["sample", "--backend", "cuda"], "invalid choice: 'cuda'"),
])
def test_backend_flags_refuse_in_one_line(argv, match, tmp_path, capsys, tiny_model_dir):
    from tests.conftest import run_cli

    if argv[0] == "sample":
        argv = [*argv, "--model", tiny_model_dir, "--out", tmp_path / "g.png"]
    try:
        code, _, err = run_cli(argv, capsys)
    except SystemExit as e:  # argparse's own refusal (tmpq's parser: one line, status 2)
        code, err = e.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "g.png").exists()
