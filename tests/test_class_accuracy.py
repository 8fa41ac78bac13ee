"""Class accuracy, the conditional-quality metric: the domain classifier's agreement with the requested label."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from tmpq.core.data import load_digits
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler
from tmpq.evaluators.classifier import class_accuracy
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import embedded_reference, evaluate_schedule


def test_class_accuracy_reads_real_digits_and_catches_wrong_labels():
    x, y = load_digits("heldout", 16)
    assert class_accuracy(x, y) >= 0.95  # the classifier's held-out accuracy (manifest: 0.978)
    assert class_accuracy(x, (y + 1) % 10) <= 0.05  # every label wrong
    with pytest.raises(TmpqError, match="class accuracy: one label in 0..9"):
        class_accuracy(x[:4], [1, 2, 3])
    with pytest.raises(TmpqError, match="reads 1 x 16 x 16 digits, got images of shape"):
        class_accuracy(torch.zeros(2, 3, 16, 16), [1, 2])


def test_a_digit_class_model_gets_class_accuracy_beside_fid():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=11).eval()
    from tmpq.core.adapters import set_conditioning

    set_conditioning(model, null_label=10)  # classes 0..9: digits
    ext = make_extractor("domain")
    ref = embedded_reference(ext)
    sched = make_scheduler(embedded_scheduler_config())
    row = evaluate_schedule(model, sched, [500, 0], 20, ext, ref, progress=False, guidance_scale=2.0)
    assert 0.0 <= row["class_accuracy"] <= 1.0 and row["guidance_scale"] == 2.0
    set_conditioning(model, null_label=0)  # classes 1..10: not all digits, no class accuracy
    assert "class_accuracy" not in evaluate_schedule(model, sched, [500, 0], 4, ext, ref, progress=False)
