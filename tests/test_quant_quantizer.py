"""Quantizer maths against PyTorch's reference fake-quant ops, observers, phases and state_dict round trips."""
import pytest
import torch

from tmpq.quant import AffineQuantizer, QuantError, fake_quant, qrange
from tmpq.quant.functional import affine_params


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (6, True), (4, False), (2, True)])
def test_per_tensor_bit_exact_with_torch(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 16, 5, 5, generator=g) * 3
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = affine_params(x.min().reshape(1), x.max().reshape(1), bits, symmetric)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    assert torch.equal(fake_quant(x, scale, zp, qmin, qmax), ref)
    q = AffineQuantizer(bits, symmetric, "tensor")
    q.observe(x)
    q.freeze()
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (6, False), (4, True), (3, False)])
def test_per_channel_bit_exact_with_torch(bits, symmetric):
    g = torch.Generator().manual_seed(10 + bits)
    w = torch.randn(6, 3, 3, 3, generator=g) * torch.linspace(0.1, 4, 6).view(6, 1, 1, 1)
    q = AffineQuantizer(bits, symmetric, "channel", channels=6)
    q.observe(w)
    q.freeze()
    qmin, qmax = qrange(bits, symmetric)
    ref = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point.to(torch.int32), 0, qmin, qmax)
    assert torch.equal(q(w), ref)


def test_gradients_match_torch_straight_through():
    x = (torch.randn(64) * 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    scale, zp = torch.tensor([0.05]), torch.tensor([3.0])
    fake_quant(x, scale, zp, 0, 15).sum().backward()
    torch.fake_quantize_per_tensor_affine(x2, 0.05, 3, 0, 15).sum().backward()
    assert torch.equal(x.grad != 0, x2.grad != 0)  # same clipping mask as torch
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)  # scale * (1 / scale) is 1 up to round-off
    assert 0 < x.grad.sum() < 63  # some inputs are clipped


def test_lsq_scale_gradient():
    """d out / d scale = round(x/s) - x/s inside the range and qmax (or qmin) - zp outside, as LSQ."""
    scale = torch.tensor([0.5], requires_grad=True)
    x = torch.tensor([0.3, 0.9, 10.0, -10.0])
    fake_quant(x, scale, torch.tensor([0.0]), -4, 3).backward(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert scale.grad.item() == pytest.approx(round(0.6) - 0.6)
    scale.grad = None
    fake_quant(x, scale, torch.tensor([0.0]), -4, 3).backward(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert scale.grad.item() == pytest.approx(3 + (-4))


def test_group_granularity_scales_each_group():
    w = torch.randn(4, 10)
    w[:, 5:] *= 100.0  # second half of every row has a much larger range
    qg = AffineQuantizer(4, True, "group", channels=4, group_size=5, in_features=10)
    qc = AffineQuantizer(4, True, "channel", channels=4)
    for q in (qg, qc):
        q.observe(w)
        q.freeze()
    assert qg.scale.shape == (4, 2)
    err_g = (qg(w) - w)[:, :5].abs().mean()
    err_c = (qc(w) - w)[:, :5].abs().mean()
    assert err_g < err_c / 10


def test_group_padding_round_trip():
    w = torch.randn(3, 7, 3, 3)  # 63 inputs, groups of 8 -> padded
    q = AffineQuantizer(8, False, "group", channels=3, group_size=8, in_features=63)
    q.observe(w)
    q.freeze()
    out = q(w)
    assert out.shape == w.shape and (out - w).abs().max() < 0.05


def _errors(x, bits, percentile=99.9, skip=0):
    errs = {}
    for obs in ("minmax", "percentile", "mse"):
        q = AffineQuantizer(bits, True, "tensor", observer=obs, percentile=percentile)
        q.observe(x)
        q.freeze()
        errs[obs] = (q(x) - x)[skip:].pow(2).mean().item()
    return errs


def test_percentile_clips_a_lone_outlier():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x[0] = 1000.0
    errs = _errors(x, 4, skip=1)  # error on the 19,999 inliers
    assert errs["percentile"] < errs["minmax"] / 20


def test_mse_search_beats_minmax_on_heavy_tails():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    errs = _errors(x, 4)
    assert errs["mse"] < 0.7 * errs["minmax"]
    assert errs["mse"] <= errs["percentile"] * 1.05


def test_activation_observer_accumulates_over_batches():
    q = AffineQuantizer(8, False, "tensor")
    q.observe(torch.tensor([0.0, 1.0]))
    q.observe(torch.tensor([-2.0, 0.5]))
    q.freeze()
    assert q.scale.item() == pytest.approx(3.0 / 255)


def test_state_dict_round_trip_without_warmup():
    src = AffineQuantizer(6, False, "channel", channels=5, observer="mse")
    src.observe(torch.randn(5, 12))
    src.freeze()
    dst = AffineQuantizer(6, False, "channel", channels=5, observer="mse")
    dst.load_state_dict(src.state_dict())  # no forward on dst before loading
    x = torch.randn(5, 12)
    assert torch.equal(dst(x), src(x))


def test_learnable_scale_persists_and_trains():
    q = AffineQuantizer(4, True, "tensor", learnable_scale=True)
    x = torch.randn(256)
    q.observe(x)
    q.freeze()
    assert isinstance(q.scale, torch.nn.Parameter)
    before = q.scale.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (q(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, q.scale.detach())
    after = q.scale.detach().clone()
    q(x)
    q(x)
    assert torch.equal(after, q.scale.detach())  # forwards never reset learned state
    q2 = AffineQuantizer(4, True, "tensor", learnable_scale=True)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.scale.detach(), after)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "not a supported bit-width"),
    (dict(bits=33), "not a supported bit-width"),
    (dict(bits=8, granularity="row"), "granularity"),
    (dict(bits=8, observer="kl"), "observer"),
    (dict(bits=8, granularity="group", channels=2), "group_size"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(QuantError, match=match):
        AffineQuantizer(**kwargs)


def test_use_before_calibration_is_refused():
    q = AffineQuantizer(8)
    with pytest.raises(QuantError, match="before calibration"):
        q(torch.ones(3))
    with pytest.raises(QuantError, match="before any observe"):
        q.freeze()


def test_inference_fast_path_equals_autograd_path():
    x = torch.randn(2, 3, 8, 8) * 5
    q = AffineQuantizer(6, False, "tensor")
    q.observe(x)
    q.freeze()
    with torch.no_grad():
        fast = q(x)
    slow = q(x.clone().requires_grad_())
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("use_bytes", [True, False])
def test_inplace_inference_kernel_bit_exact_over_many_scales(use_bytes, monkeypatch):
    """Both inference paths (the fused quantize-to-bytes pass and the in-place float ops) give the reference op's
    values bit for bit, ties (round half to even) and both clamps included."""
    import tmpq.quant.functional as F
    from tmpq.quant.functional import fake_quant_inference

    monkeypatch.setattr(F, "USE_BYTES", use_bytes)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 8, 6, 6, generator=g) * 4).contiguous(memory_format=torch.channels_last)
    for i in range(200):
        bits, symmetric = (8, 6, 4, 3)[i % 4], bool(i % 2)
        qmin, qmax = qrange(bits, symmetric)
        scale = torch.rand(1, generator=g) * 0.5 + 1e-3
        zp = torch.tensor(0.0) if symmetric else torch.randint(qmin, qmax + 1, (1,), generator=g).float()
        x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * scale  # exact ties at this scale
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)
        out = fake_quant_inference(x, scale, zp, qmin, qmax)
        assert torch.equal(out, ref), (bits, symmetric, float(scale), float(zp))
        assert out.is_contiguous(memory_format=torch.channels_last)  # no layout change before the next conv
        assert torch.equal(out, fake_quant(x, scale, zp, qmin, qmax))
