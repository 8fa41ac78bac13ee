import torch
import torch.nn as nn

from tmpq.quant.adaround import AdaRoundQuantizer
from tmpq.quant.layers import QuantConv2d, QuantLinear
from tmpq.quant.reconstruct import capture_block, reconstruct_block


def test_adaround_init_soft_is_fp_and_hard_is_nearest():
    w = torch.randn(4, 9)
    q = AdaRoundQuantizer(4, (4, 9), observer="minmax")  # no clipping: soft rounding can reproduce every weight
    q.observe(w)
    q.freeze()
    q.init_rounding(w)
    nearest = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point.int(), 0, q.qmin, q.qmax)
    assert torch.allclose(q(w), nearest, atol=1e-6)
    q.hard.fill_(False)
    assert torch.allclose(q(w), w, atol=1e-3 * float(q.scale.max()))


def test_adaround_state_dict_round_trip():
    w = torch.randn(3, 5)
    q = AdaRoundQuantizer(4, (3, 5))
    q.observe(w)
    q.freeze()
    q.init_rounding(w)
    q2 = AdaRoundQuantizer(4, (3, 5))
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(w), q(w))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, scale=1.0):
        h = torch.relu(self.conv(x)) * scale
        return self.lin(h.mean(dim=(2, 3)))


def test_reconstruction_beats_round_to_nearest():
    torch.manual_seed(0)
    block = Block()
    data = [torch.randn(16, 4, 6, 6) for _ in range(4)]
    cache = capture_block(block, block, lambda: [block(x, scale=2.0) for x in data])
    assert len(cache.inputs) == 4 and cache.inputs[0][1] == {"scale": 2.0}
    block.conv = QuantConv2d(block.conv, w_bits=(3,), a_bits=(8,), w_rounding="adaround", w_observer="minmax")
    block.lin = QuantLinear(block.lin, w_bits=(3,), a_bits=(8,), w_rounding="adaround", w_observer="minmax")
    for layer in (block.conv, block.lin):
        layer.calibrate_weights()
        layer.set_bits(0, None)
    res = reconstruct_block(block, cache, iters=300, lr=1e-2)
    assert res["layers"] == 2
    assert res["loss_after"] < 0.8 * res["loss_before"]
    # the learned rounding is hard (0/1) afterwards and persists across forwards
    q = block.conv.w_quant[0]
    w = block.conv.module.weight
    grid = (q(w) / q.scale.view(-1, 1, 1, 1))
    assert torch.allclose(grid, grid.round(), atol=1e-4)
