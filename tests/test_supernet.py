"""Supernet on a tiny UNet built from config: wrapping, genes, switching, cost model, calibration, persistence."""
import pytest
import torch
import torch.nn as nn

from conftest import calib_batches as _data
from conftest import interrupted_then_resumed, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.supernet import QuantSupernet, SupernetConfig
from tmpq.supernet.calibration import blocks

TIE_QKV = (r"(.*attentions\.\d+)\.to_[qkv]$",)


@pytest.fixture(scope="module")
def calibrated():
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax",
                                                    tie=TIE_QKV))
    net.calibrate(_data(), progress=False)
    return net


def test_every_conv_and_linear_is_wrapped_with_genes_and_pins():
    unet = tiny_unet()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())
    net = QuantSupernet(unet, SupernetConfig(time_groups=1, tie=TIE_QKV))
    assert len(net.layers) == n_layers
    pinned = {i.fqn for i in net.infos if i.pinned}
    assert pinned == {"conv_in", "conv_out"}
    tied = [g for g in net.genes if len(g) == 3]
    assert tied and all(all(".to_" in n for n in g) for g in tied)
    assert net.num_genes == n_layers - 2 - 2 * len(tied)


def test_skip_concat_convs_get_split_quantizers():
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1))
    splits = {i.fqn: i.split for i in net.infos if i.split}
    assert "up_blocks.0.resnets.0.conv1" in splits and "up_blocks.0.resnets.0.conv_shortcut" in splits
    for fqn, s in splits.items():
        assert 0 < s < net.layers[fqn].module.weight.shape[1]


def _hook_bitops(unet, net, alloc):
    """Reference count: hooks on the FP modules of a fresh copy, MACs = out elements x weight fan-in."""
    total = 0
    bits = {}
    for info in net.infos:
        bits[info.fqn] = info.pinned if info.pinned else alloc[info.gene]

    def hook(name):
        def f(mod, inp, out):
            nonlocal total
            w, a = bits[name]
            total += (out.numel() // out.shape[0]) * mod.weight[0].numel() * w * a
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        unet(torch.zeros(2, 1, 8, 8), torch.tensor([3, 900]))
    for h in hs:
        h.remove()
    return total


def test_bitops_equals_hook_reference():
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, tie=TIE_QKV))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        alloc = [((8, 6, 4)[int(torch.randint(3, (1,), generator=g))], (8, 6)[int(torch.randint(2, (1,), generator=g))])
                 for _ in range(net.num_genes)]
        assert net.bitops(alloc) == _hook_bitops(tiny_unet(), net, alloc)


def test_size_mb_counts_bits():
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, pin={}))
    total = sum(p.numel() for p in net.unet.parameters())
    q = sum(i.params for i in net.infos)
    assert net.size_mb([(8, 8)] * net.num_genes) == pytest.approx((8 * q + 32 * (total - q)) / 8e6)
    assert net.size_mb([(4, 8)] * net.num_genes) < net.size_mb([(8, 8)] * net.num_genes)


def test_switching_is_instant_and_orders_errors(calibrated):
    net = calibrated
    x, t = _data(1, seed=5)[0]
    with torch.no_grad():
        net.set_fp()
        ref = net(x, t).sample
        errs = {}
        for wa in [(8, 8), (6, 6), (4, 6)]:
            net.set_uniform(*wa)
            errs[wa] = (net(x, t).sample - ref).pow(2).mean().item()
        net.set_uniform(8, 8)
        again = (net(x, t).sample - ref).pow(2).mean().item()
    assert errs[(8, 8)] < errs[(6, 6)] < errs[(4, 6)]
    assert again == errs[(8, 8)]  # switching back serves the same calibrated option


@pytest.mark.parametrize("mode", ["per-option", "random-path"])
def test_calibration_modes_freeze_every_option(mode):
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax"))
    net.calibrate(_data(2), mode=mode, progress=False)
    for layer in net.layers.values():
        assert all(bool(q.frozen) for q in layer.a_quant) and all(bool(q.frozen) for q in layer.w_quant)


def test_save_load_round_trip(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "supernet.safetensors")
    fresh = QuantSupernet(tiny_unet(), calibrated.config)
    fresh.load(path)
    x, t = _data(1, seed=7)[0]
    with torch.no_grad():
        for wa in [(8, 8), (4, 6)]:
            calibrated.set_uniform(*wa)
            fresh.set_uniform(*wa)
            assert torch.equal(calibrated(x, t).sample, fresh(x, t).sample)


def test_bad_files(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "s.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    fresh = QuantSupernet(tiny_unet(), calibrated.config)
    with pytest.raises(TmpqError, match="corrupt or truncated supernet file"):
        fresh.load(tmp_path / "trunc.safetensors")
    other = QuantSupernet(tiny_unet(seed=1), calibrated.config)
    with pytest.raises(TmpqError, match="different model"):
        other.load(path)
    with pytest.raises(TmpqError, match="not found"):
        fresh.load(tmp_path / "nope.safetensors")


def test_bad_allocations_and_configs(calibrated):
    net = calibrated
    with pytest.raises(TmpqError, match=f"expected {net.num_genes}"):
        net.set_bits([(8, 8)] * (net.num_genes - 1))
    with pytest.raises(TmpqError, match="weight bits 5 not in options"):
        net.set_bits([(5, 8)] * net.num_genes)
    with pytest.raises(TmpqError, match="activation bits 4 not in options"):
        net.bitops([(8, 4)] * net.num_genes)
    with pytest.raises(TmpqError, match="not a supported bit-width"):
        SupernetConfig(time_groups=1, w_bits=(8, 0))
    with pytest.raises(TmpqError, match=r"not a supported bit-width \(2..16 for activations\)"):
        SupernetConfig(time_groups=1, a_bits=(8, 1))
    with pytest.raises(TmpqError, match="matches no quantized layer"):
        QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, pin={"decoder.*": [8, 8]}))
    with pytest.raises(TmpqError, match="calibration.mode"):
        net.calibrate(_data(1), mode="sometimes")


def test_config_json_round_trip():
    cfg = SupernetConfig(time_groups=1, w_bits=(8, 7, 6, 5), a_bits=(8, 7, 6, 5), tie=TIE_QKV, w_granularity="group",
                         group_size=8)
    assert SupernetConfig.from_json(cfg.to_json()) == cfg


def test_adaround_reconstruction_lowers_block_error():
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_bits=(4,), a_bits=(8,), w_rounding="adaround",
                                                    w_observer="minmax", a_observer="minmax"))
    data = _data(2)
    net.calibrate(data, progress=False)
    names = [n for n, _ in blocks(net)]
    assert "conv_in" in names and "conv_out" in names and any(".resnets." in n for n in names)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # outermost only
    reports = net.reconstruct(data, iters=40, lr=1e-2, progress=False)
    learned = [r for r in reports if r["layers"]]
    assert learned
    assert sum(r["loss_after"] for r in learned) < sum(r["loss_before"] for r in learned)


def test_interrupted_calibration_resumes_per_option(tmp_path):
    cfg = SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax")
    data = _data(2)
    full = QuantSupernet(tiny_unet(), cfg)
    full.calibrate(data, progress=False)

    ckpt = tmp_path / "calib.safetensors"
    resumed, passes = interrupted_then_resumed(cfg, data, ckpt, die_at=2)  # killed during the second option
    assert passes == 1  # only the unfinished option ran again
    for k, v in full.quantizer_state().items():
        assert torch.equal(v, resumed.quantizer_state()[k]), k
    QuantSupernet(tiny_unet(), cfg).load(ckpt)  # now complete


def test_bias_correction_is_part_of_calibration_and_of_the_saved_state(tmp_path):
    data = _data(2)
    on = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax"))
    on.calibrate(data, progress=False)
    shifts = [q.bias_shift for lay in on.layers.values() for q in lay.w_quant]
    assert any(float(s.abs().max()) > 0 for s in shifts)
    path = on.save(tmp_path / "s.safetensors")
    fresh = QuantSupernet(tiny_unet(), on.config)
    fresh.load(path)
    x, t = data[0]
    on.set_uniform(4, 6)
    fresh.set_uniform(4, 6)
    with torch.no_grad():
        assert torch.equal(on(x, t).sample, fresh(x, t).sample)
    off = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax",
                                                    bias_correction=False))
    off.calibrate(data, progress=False)
    assert all(float(q.bias_shift.abs().max()) == 0 for lay in off.layers.values() for q in lay.w_quant)
    with pytest.raises(TmpqError, match="different supernet config"):
        off.load(path)
