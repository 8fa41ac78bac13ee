"""Winograd-domain quantized convolution (quant.winograd): exact transforms, FP equality with F.conv2d, the scale
invariance of the FP result, quantized error orderings, refusals and state_dict round trips."""
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tmpq.quant import QuantError
from tmpq.quant.winograd import POINTS, WinogradConv2d, cook_toom, exact_correlation_check, transforms, \
    winograd_conv2d

TILES = (2, 4, 6)


def _layer_data(seed: int = 0, cin: int = 16, cout: int = 16, n: int = 2, size: int = 12):
    """A conv with trained-looking weights (per-channel scales) and SiLU-like inputs, real-looking enough for the
    orderings below."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(cout, cin, 3, 3, generator=g) * torch.rand(cout, 1, 1, 1, generator=g) * 0.2)
    xs = [F.silu(torch.randn(n, cin, size, size, generator=g) * 1.5 + 0.3) for _ in range(2)]
    return conv, xs


def _rel_err(layer, conv, xs) -> float:
    with torch.no_grad():
        num = sum(float((layer(x) - conv(x)).pow(2).sum()) for x in xs)
        return num / sum(float(conv(x).pow(2).sum()) for x in xs)


@pytest.mark.parametrize("m", TILES)
def test_transforms_are_exact_and_shaped(m):
    at, g, bt = cook_toom(m)
    assert exact_correlation_check(at, g, bt)
    a, gg, b = transforms(m)
    assert (a.shape, gg.shape, b.shape) == ((m, m + 2), (m + 2, 3), (m + 2, m + 2))
    assert a.dtype == torch.float64
    # an exact rational check with non-unit data: correlation of integers stays exact
    d = [Fraction(3 * i - 5) for i in range(m + 2)]
    w = [Fraction(2), Fraction(-7), Fraction(1, 3)]
    u = [sum(g[j][k] * w[k] for k in range(3)) for j in range(m + 2)]
    v = [sum(bt[j][i] * d[i] for i in range(m + 2)) for j in range(m + 2)]
    y = [sum(at[i][j] * u[j] * v[j] for j in range(m + 2)) for i in range(m)]
    assert y == [sum(w[k] * d[i + k] for k in range(3)) for i in range(m)]
    # a broken matrix is caught
    bad = [row[:] for row in bt]
    bad[0][0] += 1
    assert not exact_correlation_check(at, g, bad)


def test_points_are_the_documented_ones():
    assert [str(p) for p in POINTS[6]] == ["0", "1", "-1", "2", "-2", "1/2", "-1/2"]
    with pytest.raises(QuantError, match="distinct"):
        cook_toom(2, 3, [0, 1, 1])


@pytest.mark.parametrize("m", TILES)
def test_fp_equals_conv2d(m):
    g = torch.Generator().manual_seed(m)
    for h, w, pad in [(12, 12, 1), (7, 13, 1), (1, 1, 1), (9, 5, 0)]:
        x = torch.randn(2, 5, h, w, generator=g, dtype=torch.float64)
        wt = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
        b = torch.randn(4, generator=g, dtype=torch.float64)
        ref = F.conv2d(x, wt, b, padding=pad)
        y = winograd_conv2d(x, wt, b, m, pad)
        assert y.shape == ref.shape
        assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
        y32 = winograd_conv2d(x.float(), wt.float(), b.float(), m, pad)
        assert (y32.double() - ref).abs().max() <= 2e-5 * ref.abs().max()  # F(6,3): ~5e-6 measured


@pytest.mark.parametrize("m", TILES)
def test_fp_result_is_invariant_to_the_scales(m):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64)
    wt = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    s_b = torch.rand(m + 2, generator=g, dtype=torch.float64) * 4 + 0.1
    s_g = torch.rand(m + 2, generator=g, dtype=torch.float64) * 4 + 0.1
    seen = {}
    y = winograd_conv2d(x, wt, None, m, s_B=s_b, s_G=s_g, stages={"V": lambda t: seen.setdefault("V", t)})
    assert torch.allclose(y, F.conv2d(x, wt, padding=1), rtol=0, atol=1e-11)
    plain = {}
    winograd_conv2d(x, wt, None, m, stages={"V": lambda t: plain.setdefault("V", t)})
    # position (i, j) of V is rescaled by s_B[i] s_B[j]
    assert torch.allclose(seen["V"], plain["V"] * torch.outer(s_b, s_b).reshape(-1, 1, 1))


def test_group_beats_tensor_and_m2_is_easiest():
    conv, xs = _layer_data()
    errs = {}
    for m in TILES:
        for gran in ("tensor", "group"):
            layer = WinogradConv2d(conv, m, 8, 8, gran)
            layer.calibrate(xs)
            errs[m, gran] = _rel_err(layer, conv, xs)
    for m in TILES:
        assert errs[m, "group"] <= errs[m, "tensor"]
    assert errs[2, "group"] < errs[4, "group"] < errs[6, "group"]
    fp = WinogradConv2d(conv, 4, None, None)
    assert _rel_err(fp, conv, xs) < 1e-10


def test_tuning_lowers_the_objective_and_keeps_fp():
    conv, xs = _layer_data()
    layer = WinogradConv2d(conv, 4, 8, 8, "group", x_bits=8, m_bits=8)
    layer.calibrate(xs)
    before = _rel_err(layer, conv, xs)
    r = layer.tune_scales(steps=20)
    assert r["after"] <= r["before"] and r["after"] < 0.5 * r["before"]
    assert _rel_err(layer, conv, xs) < 0.5 * before  # and it carries over to the real inputs
    assert (layer.s_B > 0).all() and (layer.s_G > 0).all()
    with torch.no_grad():  # the FP pipeline at the tuned scales is still the conv
        y = winograd_conv2d(xs[0].double(), conv.weight.double(), conv.bias.double(), 4, s_B=layer.s_B.double(),
                            s_G=layer.s_G.double())
        assert torch.allclose(y, conv(xs[0]).double(), atol=1e-5)


def test_group_quantization_of_v_and_u_is_scale_invariant():
    """Per-position grids absorb diagonal scales exactly: with FP M, tuned == untuned to float rounding."""
    conv, xs = _layer_data()
    a = WinogradConv2d(conv, 4, 8, 8, "group")
    a.calibrate(xs)
    b = WinogradConv2d(conv, 4, 8, 8, "group")
    b.calibrate(xs)
    with torch.no_grad():
        b.s_B.copy_(torch.linspace(0.5, 2.0, 6))
        b.s_G.copy_(torch.linspace(1.5, 0.25, 6))
    b.freeze_weights()
    ea, eb = _rel_err(a, conv, xs), _rel_err(b, conv, xs)
    assert eb == pytest.approx(ea, rel=1e-2)
    t = WinogradConv2d(conv, 4, 8, 8, "tensor")
    t.calibrate(xs)
    e0 = _rel_err(t, conv, xs)
    t.s_B.copy_(b.s_B)
    t.s_G.copy_(b.s_G)
    t.freeze_weights()
    assert _rel_err(t, conv, xs) != pytest.approx(e0, rel=1e-2)  # one grid over all positions: not invariant


def test_refusals():
    for conv, what in [(nn.Conv2d(2, 2, 1), "kernel_size"), (nn.Conv2d(2, 2, 3, stride=2), "stride"),
                       (nn.Conv2d(2, 2, 3, dilation=2), "dilation"), (nn.Conv2d(2, 2, 3, groups=2), "groups"),
                       (nn.Conv2d(2, 2, 3, padding_mode="reflect"), "padding_mode")]:
        with pytest.raises(QuantError, match=what) as e:
            WinogradConv2d(conv, 4)
        assert "\n" not in str(e.value)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(QuantError, match="m: F"):
        WinogradConv2d(conv, 3)
    with pytest.raises(QuantError, match="granularity"):
        WinogradConv2d(conv, 4, granularity="channel")
    with pytest.raises(QuantError, match="a_bits"):
        WinogradConv2d(conv, 4, a_bits=1)
    with pytest.raises(QuantError, match="WinogradConv2d wraps"):
        WinogradConv2d(nn.Linear(2, 2), 4)
    layer = WinogradConv2d(conv, 4)
    with pytest.raises(QuantError, match="before calibration"):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(QuantError, match="seen no inputs"):
        layer.freeze()


def test_state_dict_round_trip_and_no_weight_copy():
    conv, xs = _layer_data()
    src = WinogradConv2d(conv, 6, 8, 8, "group", m_bits=8)
    assert src.module.weight is conv.weight
    assert sum(p.numel() for p in src.parameters()) == sum(p.numel() for p in conv.parameters())
    src.calibrate(xs)
    src.tune_scales(steps=5)
    other, _ = _layer_data(seed=1)
    other.load_state_dict(conv.state_dict())
    dst = WinogradConv2d(other, 6, 8, 8, "group", m_bits=8)
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        assert torch.equal(src(xs[0]), dst(xs[0]))
    assert torch.equal(dst.s_B, src.s_B) and not torch.equal(dst.s_B, torch.ones(8))
