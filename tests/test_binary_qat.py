"""Quantization-aware training of binarized denoisers (quant.distill.qat), BinaryDM's low-rank representation
mimicking and progressive initialisation, and the size / OPs accounting of benchmarks.binary, on the tiny UNet."""
import math

import torch
import torch.nn as nn

from benchmarks.binary import build_student, layer_macs, progressive_for, size_and_ops
from conftest import calib_batches, tiny_unet
from tmpq.quant.binarize import MultiBasisBinarizer
from tmpq.quant.distill import Progressive, frozen_copy, lrm_loss, pca_bases, qat
from tmpq.quant.layers import QuantLayer


def _student(kind: str, a_bits: int = 8):
    torch.set_num_threads(1)
    unet = tiny_unet()
    calib = calib_batches(1, seed=5, batch=8)[0]
    student, layers = build_student(unet, kind, a_bits, calib)
    return unet, student, layers


def _stream(i: int):
    g = torch.Generator().manual_seed(100 + i % 4)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)


def test_qat_lowers_the_output_loss_of_a_binarized_model():
    unet, student, layers = _student("plain")
    assert all(isinstance(lay.w_quant[0], MultiBasisBinarizer) for lay, n in layers.items() if n != "conv_in"
               and not n.startswith("time_embedding") and n != "conv_out")
    evals = [_stream(i) for i in range(2)]
    res = qat(student, frozen_copy(unet), _stream, iters=25, lr=2e-3, eval_data=evals, seed=0)
    assert res["loss_after"] < 0.8 * res["loss_before"]
    assert res["params"] > 0 and len(res["curve"]) >= 1
    assert not any(p.requires_grad for p in student.parameters())  # left frozen for sampling


def test_plain_binarizer_forward_is_scale_times_sign_after_training():
    unet, student, layers = _student("plain", 32)
    qat(student, frozen_copy(unet), _stream, iters=3, lr=1e-2, seed=0)
    lay = next(lay for lay, n in layers.items() if n == "down_blocks.0.resnets.0.conv1")
    q = lay.w_quant[lay.w_index]
    assert q.bases == 1 and lay.a_index is None
    w = lay.module.weight
    expect = q.alpha[0].view(-1, 1, 1, 1) * torch.where(w >= 0, 1.0, -1.0)
    with torch.no_grad():
        assert torch.equal(lay.quantized_weight(), expect)
    # the scale was trained, not left at its greedy initial value mean |w|
    assert not torch.allclose(q.alpha[0], w.abs().mean((1, 2, 3)))


def test_lrm_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    feats = [torch.randn(4, 16, 6, 6), torch.randn(4, 10, 32)]
    bases = pca_bases(feats, rank_div=4)
    assert [tuple(k.shape) for k in bases] == [(16, 4), (32, 8)]
    assert float(lrm_loss(feats, feats, bases)) == 0.0
    other = [f + 0.1 * torch.randn_like(f) for f in feats]
    assert float(lrm_loss(other, feats, bases)) > 0.0
    # a difference orthogonal to the teacher's principal directions is not penalised (the low-rank space)
    k = bases[0]
    rows = feats[0].movedim(1, -1).reshape(-1, 16)
    ortho = rows - (rows @ k) @ k.T  # remove the projected part
    shifted = (rows + ortho).reshape(4, 6, 6, 16).movedim(-1, 1)
    assert float(lrm_loss([shifted], feats[:1], bases[:1])) < 1e-8


def test_progressive_initialisation_switches_groups_on_from_the_middle_outwards():
    unet, student, layers = _student("binarydm")
    prog = progressive_for(layers, stage_iters=3)
    names = {lay: n for lay, n in layers.items()}
    order = [[names[lay] for lay in g] for g in prog.groups]
    assert all(n.startswith("mid_block") for n in order[0]) and order[0]
    assert all(n.startswith(("down_blocks.0", "up_blocks.2")) for n in order[3])
    edge = [lay for lay, n in layers.items() if n in ("conv_in", "conv_out")]
    prog.start()
    assert all(lay.w_index is None and lay.a_index is None for g in prog.groups for lay in g)
    assert all(lay.w_index == 0 for lay in edge)  # the W8 edge layers are not staged
    mid = prog.groups[0][0]
    with torch.no_grad():  # the weights moved while the layer ran in FP: the binarizer re-fits them when switched on
        mid.module.weight.mul_(3.0)
    prog.step(0)
    assert prog.on == 1 and mid.w_index == 0
    assert torch.allclose(mid.w_quant[0].alpha[0], mid.module.weight.abs().flatten(1).mean(1))
    prog.step(2)
    assert prog.on == 1
    prog.step(3)
    assert prog.on == 2
    prog.finish()
    assert prog.on == len(prog.groups)
    assert all(lay.w_index == 0 and lay.a_index == 0 for g in prog.groups for lay in g)
    # BinaryDM's two-basis layers sit on the full-resolution level only
    bases = {names[lay]: lay.w_quant[0].bases for lay in layers if isinstance(lay.w_quant[0], MultiBasisBinarizer)}
    assert bases["down_blocks.0.resnets.0.conv1"] == 2 and bases["down_blocks.1.resnets.0.conv1"] == 1


def test_qat_with_lrm_and_progressive_runs_and_ends_fully_quantized():
    unet, student, layers = _student("binarydm", 4)
    prog = progressive_for(layers, stage_iters=2)
    res = qat(student, frozen_copy(unet), _stream, iters=10, lr=1e-3, eval_data=[_stream(0)], progressive=prog,
              lrm_modules=("down_blocks.0", "mid_block", "up_blocks.1"), lrm_weight=0.1, seed=0, log_every=1)
    assert all(math.isfinite(v) for _, a, b in res["curve"] for v in (a, b))
    assert res["curve"][0][2] > 0.0  # the LRM term was computed
    assert all(isinstance(m, QuantLayer) and m.w_index == 0 for m in layers)
    assert all(m.a_index == 0 for m in layers)


def test_size_and_ops_on_a_hand_computed_layer():
    model = nn.Sequential(nn.Conv2d(4, 8, 3))  # 288 weights, 8 biases
    macs, attn = {"0": 1000}, 50
    fp = size_and_ops(model, {}, macs, attn)
    assert fp == {"size_bytes": (288 + 8) * 4, "ops": 1050.0}
    one = size_and_ops(model, {"0": (1, 4, "binary")}, macs, attn)
    assert one == {"size_bytes": (288 * 1 + 8 * 32 + 8 * 32) / 8, "ops": 1000 * 1 * 4 / 64 + 50}
    two = size_and_ops(model, {"0": (2, 32, "binary")}, macs, attn)  # two sign bases: 2 bits, 2 scales per channel
    assert two == {"size_bytes": (288 * 2 + 2 * 8 * 32 + 8 * 32) / 8, "ops": 1000 * 2 * 32 / 64 + 50}
    lsq = size_and_ops(model, {"0": (2, 8, "affine")}, macs, attn)
    assert lsq["size_bytes"] == (288 * 2 + 8 * 32 + 8 * 32) / 8


def test_layer_macs_counts_convolutions_linears_and_attention():
    macs, attn = layer_macs(tiny_unet(), size=8)
    assert macs["conv_in"] == 8 * 8 * 8 * (1 * 3 * 3)  # 8 out channels x 8x8 pixels x 9 inputs each
    assert macs["time_embedding.linear_1"] == 32 * 8  # tiny UNet: 8 -> 32
    assert attn > 0
