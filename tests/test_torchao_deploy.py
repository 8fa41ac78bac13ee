"""The torchao int8 path of an export (``tmpq speed --device cuda``), run on the CPU: the per-layer config map,
conversion through ``quantize_``, the numeric check against fake quantization, and the named fallbacks."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: one thread is faster, and steady on a busy machine (conftest restores the count afterwards)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """``(time_groups, symmetric activations) -> supernet file``: a tiny-UNet supernet calibrated once per module
    and setting."""
    from tests.conftest import calib_batches, tiny_unet
    from tmpq.supernet import QuantSupernet, SupernetConfig

    pytest.importorskip("torchao")
    root, files = tmp_path_factory.mktemp("torchao"), {}

    def get(time_groups: int, a_sym: bool = False):
        if (time_groups, a_sym) not in files:
            net = QuantSupernet(tiny_unet(), SupernetConfig(w_bits=(8, 4), a_bits=(8, 6), time_groups=time_groups,
                                                            w_observer="minmax", a_symmetric=a_sym))
            net.calibrate(calib_batches(n=2, batch=2), progress=False)
            files[time_groups, a_sym] = net.save(root / f"sn{time_groups}{a_sym}.safetensors")
        return files[time_groups, a_sym]
    return get


def _quantized_unet(calibrated, w: int, a: int, time_groups: int = 1, a_sym: bool = False):
    """The calibrated tiny-UNet supernet at uniform ``W{w}A{a}`` (first and last layers pinned at 16 bits)."""
    from tests.conftest import tiny_unet
    from tmpq.supernet import QuantSupernet

    net = QuantSupernet.from_file(tiny_unet(), calibrated(time_groups, a_sym))
    net.set_uniform(w, a)
    return net.unet


def _probe_and_inputs():
    """Inputs at high and at low noise, one call each (a time-grouped supernet routes one group per call)."""
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([900, 850, 300, 20])

    def run(u):
        with torch.no_grad():
            return torch.cat([u(x[:2], t[:2]).sample, u(x[2:], t[2:]).sample])
    return run


@pytest.mark.parametrize("w,a,time_groups,a_sym", [(8, 8, 1, False), (4, 6, 2, False), (8, 6, 1, True)])
def test_converted_layers_compute_what_fake_quantization_computes(calibrated, w, a, time_groups, a_sym):
    """Asymmetric and symmetric 8- and 6-bit activations (the exported quantizer's levels shifted into int8, the top
    clamped in float below 8 bits), 8- and 4-bit weight grids, one and two time groups."""
    from tmpq.deploy.int8 import CHECK_TOL, SplitInt8Conv2d, TimeGroupedInt8
    from tmpq.deploy.torchao_int8 import plan, to_torchao_int8, torchao_layers
    from tmpq.quant.layers import QuantLayer

    unet = _quantized_unet(calibrated, w, a, time_groups, a_sym)
    probe = _probe_and_inputs()
    ref = probe(unet)
    expected = plan(unet)
    unet, rows = to_torchao_int8(unet, probe, device="cpu")
    assert [r["fqn"] for r in rows] == list(expected)
    converted = [r for r in rows if r["int8"]]
    # everything W8A8-representable converts (both convs, via im2col, and the attention Linears); the 16-bit pins not
    assert {r["fqn"] for r in rows if not r["int8"]} == {"conv_in", "conv_out"}
    assert all(r["why"].startswith("16-bit") for r in rows if not r["int8"])
    assert {r["kind"] for r in converted} == {"Conv2d", "Linear"}
    assert all(r["check_err"] <= CHECK_TOL for r in converted)
    # the matmul weights really are torchao Int8Tensors (one per converted matmul, per time group, per split half)
    assert torchao_layers(unet) >= len(converted) * time_groups
    assert sum(isinstance(m, QuantLayer) for m in unet.modules()) == 2
    # the up blocks' convs over skip concatenations run as two halves, each with its own activation quantizer
    assert any(isinstance(m, SplitInt8Conv2d) for m in unet.modules())
    assert any(isinstance(m, TimeGroupedInt8) for m in unet.modules()) == (time_groups > 1)
    # end to end: each layer is float rounding away from fake quantization, but a rounding difference can move an
    # activation across a level boundary of the next quantizer (as another thread count can in fake quantization)
    out = probe(unet)
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3


def test_a_layer_failing_the_check_falls_back_and_is_named(calibrated, monkeypatch):
    from tmpq.deploy import torchao_int8
    from tmpq.quant.layers import QuantLayer

    unet = _quantized_unet(calibrated, 8, 8)
    probe = _probe_and_inputs()
    target = "down_blocks.0.resnets.0.conv1"
    real = torchao_int8._run_mm
    monkeypatch.setattr(torchao_int8, "_run_mm",
                        lambda mod, v: real(mod, v) * (1.001 if mod.name == target else 1.0))  # a wrong kernel
    unet, rows = torchao_int8.to_torchao_int8(unet, probe, device="cpu")
    row = next(r for r in rows if r["fqn"] == target)
    assert not row["int8"] and "disagrees with fake quantization" in row["why"] and row["check_err"] > 1e-5
    assert isinstance(unet.get_submodule(target), QuantLayer)  # it stays fake-quant
    assert sum(r["int8"] for r in rows) == len(rows) - 3  # conv_in, conv_out and the wrong one


def test_speed_on_a_cuda_device_without_cuda_is_one_line(tmp_path, capsys):
    """Checked before anything is loaded (torchao included: this runs without it too)."""
    from tests.conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(["speed", tmp_path / "no-export", "--device", "cuda"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0] and "no CUDA" in lines[0], err
    code, _, err = run_cli(["speed", tmp_path / "no-export", "--device", "gpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device" in err
