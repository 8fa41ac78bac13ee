"""The FID benchmark of Winograd W8A8 (benchmarks/winograd_fid.py) in miniature: a tiny 16x16 UNet, 2 DDIM steps,
4 images per seed, real FID rows against the real digits; arms differ only in the replaced 3x3 convs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from benchmarks.winograd_fid import SECTION, calibrate_arms, fid_rows, rows_log, swapped, target_convs, write_report
from tests.conftest import tiny_unet
from tmpq.core.model import embedded_scheduler_config, load_model
from tmpq.core.schedules import make_timesteps
from tmpq.evaluators.features import make_extractor
from tmpq.evaluators.quality import Reference, embedded_reference
from tmpq.quant.layers import QuantConv2d
from tmpq.quant.winograd import WinogradConv2d


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark runs (many small GEMMs: two threads on shared cores are far slower);
    conftest restores the count afterwards."""
    torch.set_num_threads(1)


def test_the_embedded_unet_has_26_winograd_convs():
    convs = target_convs(load_model("embedded").unet)
    assert len(convs) == 26 and {"conv_in", "conv_out"} <= set(convs)


def test_arms_differ_only_in_the_replaced_convs():
    unet = tiny_unet(16)
    convs = target_convs(unet)
    n_convs = sum(isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) and c.stride == (1, 1) for c in unet.modules())
    assert len(convs) == n_convs >= 5
    before = dict(unet.named_modules())
    ts = make_timesteps("uniform", 2)
    layers, info = calibrate_arms(unet, embedded_scheduler_config(), ["direct", "F4-b", "F6-c"], ts, 2, 1000,
                                  tune_steps=2)
    assert dict(unet.named_modules()) == before  # calibration leaves the model as it was
    for arm, kind in (("direct", QuantConv2d), ("F4-b", WinogradConv2d), ("F6-c", WinogradConv2d)):
        assert set(layers[arm]) == set(convs)
        with swapped(unet, layers[arm]):
            now = dict(unet.named_modules())
            changed = {k for k in before if k in now and now[k] is not before[k]}
            assert changed == set(convs)  # exactly those convs, nothing else
            assert all(isinstance(now[k], kind) and now[k].module is convs[k] for k in convs)
        assert all(unet.get_submodule(k) is c for k, c in convs.items())  # restored
    assert bool(layers["F6-c"]["conv_in"].frozen) and layers["F6-c"]["conv_in"].s_B.std() > 0  # tuned
    assert torch.equal(layers["F4-b"]["conv_in"].s_B, torch.ones(6))  # default transforms
    # an FP Winograd arm gives the FP model's output: the swap changes nothing but how those convs compute
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 100])
    with torch.no_grad():
        ref = unet(x, t).sample
        with swapped(unet, {k: WinogradConv2d(c, 4, None, None) for k, c in convs.items()}):
            got = unet(x, t).sample
    assert torch.allclose(got, ref, atol=1e-4) and not torch.equal(got, ref)


def test_fid_rows_fields_resume_and_report(tmp_path):
    unet, cfg = tiny_unet(16), embedded_scheduler_config()
    convs = len(target_convs(unet))
    out = tmp_path / "w"
    (out).mkdir()
    (out / "README.md").write_text("# layer-level part\n\nkept table\n")
    log = rows_log(out)
    arms = ["fp", "direct", "F4-c", "twin-F4", "int8-F4"]
    ext = make_extractor("domain")
    ref = Reference(embedded_reference(ext).stats)  # the real digits' statistics; no features: FID only, no KID
    rows = fid_rows(unet, cfg, arms, 2, 4, [0, 1], log=log, calib_images=2, tune_steps=2,
                    batch_size=4, extractor=ext, ref=ref)
    assert [(r["arm"], r["seed"]) for r in rows] == [(a, s) for a in arms for s in (0, 1)]
    for r in rows:
        assert r["kind"] == "fid" and r["steps"] == 2 and r["n"] == 4 and r["calib_seed"] == 1000
        assert r["threads"] == torch.get_num_threads() and r["images_per_s"] > 0
        assert r["fid"] > 0 and r["replaced"] == (0 if r["arm"] == "fp" else convs)
    by = {(r["arm"], r["seed"]): r for r in rows}
    assert by[("F4-c", 0)]["tune_steps"] == 2 and "tune_steps" not in by[("direct", 0)]
    assert by[("int8-F4", 0)]["int8_layers"] == convs and by[("int8-F4", 0)]["int8_fallbacks"] == []
    assert by[("fp", 0)]["fid"] != by[("fp", 1)]["fid"]  # the seeds are different noise
    assert by[("fp", 0)]["fid"] != by[("F4-c", 0)]["fid"]  # the arms compute differently
    text = (out / "fid.jsonl").read_text()
    assert len(text.splitlines()) == 10 and all(json.loads(line)["command"] for line in text.splitlines())
    # resumable: a second call finds every row and appends nothing
    assert fid_rows(unet, cfg, arms, 2, 4, [0, 1], log=rows_log(out)) == []
    assert (out / "fid.jsonl").read_text() == text
    for _ in range(2):  # the section is replaced, not repeated; the layer-level part stays
        write_report(out, rows_log(out))
    readme = (out / "README.md").read_text()
    assert readme.startswith("# layer-level part\n\nkept table\n") and readme.count(SECTION) == 1
    assert "### 2 uniform DDIM steps, N = 4 per seed" in readme and "| F4-c |" in readme
    assert f"int8-F4: {convs} of {convs} convs on int8 GEMMs" in readme


def test_target_convs_skip_what_winograd_cannot_compute():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, stride=2), nn.Conv2d(2, 2, 1),
                        nn.Conv2d(2, 2, 3, padding=1, groups=2))
    assert list(target_convs(net)) == ["0"]
