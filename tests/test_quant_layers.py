import pytest
import torch
import torch.nn as nn

from tmpq.quant import QuantError
from tmpq.quant.layers import QuantConv2d, QuantLinear, wrap


def _calibrated(layer, x):
    layer.calibrate_weights()
    layer.observing = True
    for i in range(len(layer.a_quant)):
        layer.set_bits(0, i)
        layer(x)
    layer.observing = False
    layer.freeze_activations()
    return layer


def test_fp_passthrough_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = wrap(conv, w_bits=(8, 4), a_bits=(8,))
    x = torch.randn(2, 4, 5, 5)
    assert isinstance(q, QuantConv2d)
    assert torch.equal(q(x), conv(x))  # w_index = a_index = None


def test_options_switch_and_lower_bits_hurt_more():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    q = _calibrated(wrap(lin, w_bits=(8, 6, 4), a_bits=(8, 4), a_observer="minmax"), x)
    ref = lin(x)
    errs = []
    for wi in range(3):
        q.set_bits(wi, 0)
        errs.append((q(x) - ref).pow(2).mean().item())
    assert errs[0] < errs[1] < errs[2]
    q.set_bits(0, 1)
    assert (q(x) - ref).pow(2).mean().item() > errs[0]
    q.set_bits(None, None)
    assert torch.equal(q(x), ref)


def test_weight_is_shared_not_copied():
    lin = nn.Linear(8, 4)
    q = QuantLinear(lin, w_bits=(8,), a_bits=(8,))
    assert q.module.weight is lin.weight
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in lin.parameters())


def test_split_quantization_handles_different_ranges():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        conv.weight[:, :4] *= 400.0  # both halves matter for the output, as a UNet skip does
    x = torch.cat([torch.randn(16, 4, 4, 4) * 0.05, torch.randn(16, 4, 4, 4) * 20], dim=1)
    plain = _calibrated(QuantConv2d(conv, w_bits=(8,), a_bits=(6,), a_observer="minmax"), x)
    split = _calibrated(QuantConv2d(conv, w_bits=(8,), a_bits=(6,), a_observer="minmax", split=4), x)
    ref = conv(x)
    plain.set_bits(None, 0)  # FP weights: isolate the activation quantization
    split.set_bits(None, 0)
    assert (split(x) - ref).pow(2).mean() < (plain(x) - ref).pow(2).mean() / 4


def test_state_dict_round_trip_into_fresh_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(4, 3, 6, 6)
    src = _calibrated(QuantConv2d(conv, w_bits=(8, 4), a_bits=(8, 6), split=1), x)
    dst = QuantConv2d(nn.Conv2d(3, 5, 3), w_bits=(8, 4), a_bits=(8, 6), split=1)
    dst.load_state_dict(src.state_dict())
    for wi, ai in [(0, 0), (1, 1), (1, 0)]:
        src.set_bits(wi, ai)
        dst.set_bits(wi, ai)
        assert torch.equal(src(x), dst(x))


def test_bad_inputs():
    with pytest.raises(QuantError, match="not a supported bit-width"):
        wrap(nn.Linear(4, 4), w_bits=(8, 0), a_bits=(8,))
    with pytest.raises(QuantError, match="no quantized wrapper"):
        wrap(nn.GroupNorm(2, 4), w_bits=(8,), a_bits=(8,))
    q = wrap(nn.Linear(4, 4), w_bits=(8,), a_bits=(8,))
    with pytest.raises(QuantError, match="out of range"):
        q.set_bits(1, 0)
    with pytest.raises(QuantError, match="split"):
        QuantConv2d(nn.Conv2d(4, 4, 1), w_bits=(8,), a_bits=(8,), split=4)


def test_split_inference_kernel_equals_cat_of_quantized_halves():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.cat([torch.randn(6, 3, 5, 5) * 0.1, torch.randn(6, 5, 5, 5) * 7], dim=1)
    q = _calibrated(QuantConv2d(conv, w_bits=(8,), a_bits=(6, 4), split=3), x)
    for i in range(2):
        q.set_bits(0, i)
        qa, qb = q.a_quant[i], q.a_quant_split[i]
        ref = torch.cat([qa(x[:, :3]), qb(x[:, 3:])], dim=1)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            with torch.no_grad():
                fast = q._act(inp)
            assert torch.equal(fast, ref)
        slow = q._act(x.clone().requires_grad_())  # autograd path: the torch.cat of the two halves
        assert torch.equal(slow.detach(), ref)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(6, 2, 3, padding=1), (5, 6, 7, 7)),
                                        (lambda: nn.Linear(6, 3, bias=False), (5, 4, 6))])
def test_bias_correction_removes_the_mean_output_shift_of_every_weight_option(make, shape):
    torch.manual_seed(0)
    mod = make()
    lay = wrap(mod, w_bits=(8, 4, 2), a_bits=(8,), w_observer="minmax")
    lay.calibrate_weights()
    xs = [torch.randn(*shape) + 0.7 for _ in range(3)]  # non-zero mean inputs: rounding errors shift the output
    c = lay.channel_dim

    def mean_out(k):
        lay.set_bits(k, None)
        with torch.no_grad():
            out = torch.cat([lay(x).movedim(c, 0).reshape(lay.module.weight.shape[0], -1) for x in xs], 1)
        return out.mean(1)

    ref = mean_out(None)
    before = [mean_out(k) - ref for k in range(3)]
    lay.begin_bias_correction()
    with torch.no_grad():
        for x in xs:
            assert torch.equal(lay(x), mod(x))  # observing passes the FP output through
    lay.end_bias_correction()
    lay.invalidate_cache()
    for k in range(3):
        after = mean_out(k) - ref
        assert after.abs().max() < 1e-4, (k, after)
        assert before[k].abs().max() > 10 * after.abs().max()
    with pytest.raises(QuantError, match="saw no inputs"):
        lay.begin_bias_correction()
        lay.end_bias_correction()


def test_cached_quantized_weight_follows_the_weights_memory_format():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    q = _calibrated(QuantConv2d(conv, w_bits=(8, 4), a_bits=(8,)), torch.randn(4, 8, 5, 5))
    q.set_bits(1, 0)
    before = q.quantized_weight().clone()
    x = torch.randn(2, 8, 5, 5)
    out = q(x)
    q.to(memory_format=torch.channels_last)  # as the sampler does; the cache was built contiguous
    w = q.quantized_weight()
    assert w.stride() == conv.weight.stride() != before.stride()
    assert torch.equal(w, before)  # same values, no re-quantization drift
    assert torch.allclose(q(x.contiguous(memory_format=torch.channels_last)), out, atol=1e-6)
