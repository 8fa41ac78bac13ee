"""Winograd-domain convolution on int8 GEMMs (tmpq.deploy.winograd_int8): equal to its fake-quant twin up to float
rounding per F(m, 3), granularity, zero-point, odd sizes, input quantization and tuned scales; fallbacks named with
their reason; the check catches a wrong code."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.deploy import winograd_int8 as wi8
from tmpq.deploy.winograd_int8 import CHECK_TOL, WinogradInt8Conv2d, check, convert, int_mm_available
from tmpq.quant import QuantError
from tmpq.quant.winograd import WinogradConv2d

pytestmark = pytest.mark.skipif(not int_mm_available(), reason="no CPU torch._int_mm in this PyTorch build")


def _conv_data(seed: int = 0, cin: int = 12, cout: int = 10, h: int = 9, w: int = 7):
    """A small conv with per-channel weight magnitudes and SiLU-like inputs at an odd size (9 x 7: partial tiles)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(cout, cin, 3, 3, generator=g) * torch.rand(cout, 1, 1, 1, generator=g) * 0.2)
    xs = [F.silu(torch.randn(2, cin, h, w, generator=g) * 1.5 + 0.3) for _ in range(2)]
    return conv, xs


@pytest.mark.parametrize("m", (2, 4, 6))
@pytest.mark.parametrize("granularity", ("tensor", "group"))
def test_equals_the_fake_quant_twin(m, granularity):
    conv, xs = _conv_data(m)
    layer = WinogradConv2d(conv, m, 8, 8, granularity)  # asymmetric V: the zero-point term is folded
    layer.calibrate(xs[:1])  # the second input leaves the calibrated range: both clamp alike
    module, row = convert(layer, xs, name="conv")
    assert isinstance(module, WinogradInt8Conv2d) and row["int8"] and row["why"] == ""
    assert row["check_err"] <= CHECK_TOL and row["check_rel_max"] < 1e-4
    with torch.no_grad():
        want, got = layer(xs[1]), module(xs[1])
    assert got.shape == want.shape == conv(xs[1]).shape == (2, 10, 9, 7)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert module.u_codes.dtype == torch.int8 and module.u_codes.shape == ((m + 2) ** 2, 12, 10)


def test_symmetric_input_quant_tuned_scales_and_bf16():
    conv, xs = _conv_data(7, h=6, w=11)
    layer = WinogradConv2d(conv, 4, 8, 8, "tensor", x_bits=8, a_symmetric=True)
    layer.calibrate(xs)
    layer.tune_scales(steps=3)  # non-trivial s_B / s_G: the transforms and U's codes change
    assert not torch.allclose(layer.s_B, torch.ones(6))
    module, row = convert(layer, xs)
    assert row["int8"], row["why"]
    assert module.shift == 0 and row["check_err"] <= CHECK_TOL
    xb = xs[0].bfloat16()
    with torch.no_grad():
        got, want = module(xb), layer(xb)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()  # bf16 output rounding


def test_int_mm_sums_extreme_codes_exactly():
    a = torch.full((24, 256), -128, dtype=torch.int8)
    b = torch.full((256, 16), -128, dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b), torch.full((24, 16), 256 * 128 * 128, dtype=torch.int32))


@pytest.mark.parametrize("kwargs, reason", [
    ({"m_bits": 8}, "m_bits 8: M is requantized"),
    ({"w_bits": None}, "full-precision U"),
    ({"a_bits": 12}, "w_bits 8 / a_bits 12: int8 GEMMs need codes of at most 8 bits"),
])
def test_fallbacks_name_their_reason(kwargs, reason):
    conv, xs = _conv_data()
    layer = WinogradConv2d(conv, 2, **{"w_bits": 8, "a_bits": 8, **kwargs})
    layer.calibrate(xs)
    module, row = convert(layer, xs, name="down.conv")
    assert module is layer and not row["int8"] and row["fqn"] == "down.conv"
    assert row["why"].startswith(reason) and "\n" not in row["why"]
    with pytest.raises(QuantError, match=reason.split(":")[0].split(" / ")[-1]):
        WinogradInt8Conv2d(layer)


def test_uncalibrated_is_refused():
    conv, _ = _conv_data()
    with pytest.raises(QuantError, match="not calibrated"):
        convert(WinogradConv2d(conv, 4), [])


def test_a_wrong_code_is_caught_and_falls_back(monkeypatch):
    conv, xs = _conv_data(3)
    layer = WinogradConv2d(conv, 4, 8, 8, "group")
    layer.calibrate(xs)
    module = WinogradInt8Conv2d(layer)
    module.u_codes[5, 3, 2] += 1  # one weight code off by one
    assert check(layer, module, xs)["err"] > 100 * CHECK_TOL
    good = wi8.WinogradInt8Conv2d.codes

    def off_by_one(self, v):  # a kernel that rounds one activation code the other way
        q = good(self, v)
        q[0, 0, 0] = q[0, 0, 0] + (1 if q[0, 0, 0] < 127 else -1)
        return q

    monkeypatch.setattr(wi8.WinogradInt8Conv2d, "codes", off_by_one)
    module, row = convert(layer, xs)
    assert module is layer and not row["int8"]
    assert row["why"].startswith("its int8 GEMMs disagree with fake quantization") and row["check_err"] > CHECK_TOL


@pytest.mark.parametrize("cin, cout", [(1, 8), (8, 1)])
def test_one_channel_operands(cin, cout):
    """Cin = 1 / Cout = 1 (the UNet's first and last convs): size-1 GEMM dimensions whose strides the kernel
    misread before the operands got canonical strides."""
    conv, xs = _conv_data(4, cin=cin, cout=cout)
    layer = WinogradConv2d(conv, 4, 8, 8, "group")
    layer.calibrate(xs)
    _, row = convert(layer, xs)
    assert row["int8"], row["why"]
