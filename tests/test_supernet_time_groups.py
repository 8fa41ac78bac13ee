"""Timestep-group calibration (supernet.time_groups): one set of activation ranges and bias corrections per contiguous
group of calibration timesteps, made live by each denoiser call's timestep; weights shared."""
import json

import pytest
import torch

from conftest import interrupted_then_resumed, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.supernet import QuantSupernet, SupernetConfig

CFG = dict(w_observer="minmax", a_observer="minmax")


def _data(ts=(50, 200, 400, 600, 800, 950), per_t: int = 3, seed: int = 0):
    """Batches of one timestep each (as the sampler captures them), two batches per timestep."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(per_t, 1, 8, 8, generator=g), torch.full((per_t,), t)) for t in ts for _ in range(2)]


def _outputs(net, wa, calls):
    net.set_uniform(*wa)
    with torch.no_grad():
        return [net(x, t).sample for x, t in calls]


@pytest.fixture(scope="module")
def grouped():
    net = QuantSupernet(tiny_unet(), SupernetConfig(**CFG, time_groups=3))
    net.calibrate(_data(), progress=False)
    return net


def test_each_group_serves_exactly_what_a_supernet_calibrated_on_that_group_alone_serves(grouped):
    assert grouped.time_starts == [400, 800]  # 6 distinct timesteps in 3 groups of 2
    data = _data()
    probe = _data(seed=3)
    for g, members in enumerate([(50, 200), (400, 600), (800, 950)]):
        alone = QuantSupernet(tiny_unet(), SupernetConfig(**CFG, time_groups=1))
        alone.calibrate([(x, t) for x, t in data if int(t[0]) in members], progress=False)
        calls = [(x, t) for x, t in probe if int(t[0]) in members]
        for wa in [(8, 8), (4, 6)]:
            for a, b in zip(_outputs(grouped, wa, calls), _outputs(alone, wa, calls)):
                assert torch.equal(a, b)
    # and the groups really differ: group 0's state used at group 2's timesteps changes the output
    x, t = probe[-1]
    grouped.set_uniform(4, 6)
    with torch.no_grad():
        live = grouped(x, t).sample
        grouped.time_starts, starts = [], grouped.time_starts  # routing off: whatever is live stays live
        grouped.select_time_group(0)
        stale = grouped(x, t).sample
        grouped.time_starts = starts
    assert not torch.equal(live, stale)


def test_a_call_mixing_groups_is_a_clear_error(grouped):
    x = torch.randn(2, 1, 8, 8)
    grouped.set_uniform(8, 8)
    with pytest.raises(TmpqError, match=r"mixes timesteps of groups \[0, 2\]"):
        grouped(x, torch.tensor([10, 900]))
    with torch.no_grad():
        grouped(x, torch.tensor([400, 799]))  # one group: fine
        grouped(x, 500)  # a scalar timestep as diffusers allows


def test_save_load_and_export_selection_keep_every_group(grouped, tmp_path):
    path = grouped.save(tmp_path / "s.safetensors")
    fresh = QuantSupernet.from_file(tiny_unet(), path)
    assert fresh.time_starts == grouped.time_starts
    calls = _data(seed=5)
    for wa in [(8, 8), (6, 6)]:
        for a, b in zip(_outputs(grouped, wa, calls), _outputs(fresh, wa, calls)):
            assert torch.equal(a, b)
    # a pinned copy keeps time_groups (export / validate build theirs this way)
    assert grouped.pinned_config([(6, 6)] * grouped.num_genes).time_groups == 3


def test_file_without_group_boundaries_is_refused(grouped, tmp_path):
    from safetensors.torch import load_file, save_file

    from tmpq.supernet.store import read_supernet_file

    path = grouped.save(tmp_path / "s.safetensors")
    meta, _ = read_supernet_file(path, tensors=False)
    del meta["time_starts"]
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(TmpqError, match="lacks the boundaries of its 3 timestep groups"):
        QuantSupernet.from_file(tiny_unet(), tmp_path / "bad.safetensors")


def test_fewer_timesteps_than_groups_gives_one_group_per_timestep():
    net = QuantSupernet(tiny_unet(), SupernetConfig(**CFG, time_groups=4))
    net.calibrate(_data(ts=(100, 700)), progress=False)
    assert net.time_starts == [700]
    net.set_uniform(8, 8)
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8), torch.tensor([999]))


def test_interrupted_grouped_calibration_resumes_per_group(tmp_path):
    cfg = SupernetConfig(**CFG, time_groups=3)
    data = _data()
    full = QuantSupernet(tiny_unet(), cfg)
    full.calibrate(data, progress=False)

    ckpt = tmp_path / "calib.safetensors"
    # two options per group: killed in group 3's first option
    resumed, passes = interrupted_then_resumed(cfg, data, ckpt, die_at=5)
    assert passes == 2  # only the unfinished group (its two options) ran again
    for k, v in full.quantizer_state().items():
        assert torch.equal(v, resumed.quantizer_state()[k]), k
    assert QuantSupernet.from_file(tiny_unet(), ckpt).time_starts == [400, 800]


def test_config_checks_and_compatibility():
    with pytest.raises(TmpqError, match="supernet.time_groups: must be a positive integer"):
        SupernetConfig(time_groups=0)
    with pytest.raises(TmpqError, match="does not combine with w_rounding = adaround"):
        SupernetConfig(time_groups=2, w_rounding="adaround")
    assert SupernetConfig.from_json(SupernetConfig(time_groups=3).to_json()).time_groups == 3
    # supernet files written before time_groups and tie_qkv existed meant one set of ranges and ties only in ``tie``
    old = json.loads(SupernetConfig().to_json())
    del old["time_groups"], old["tie_qkv"]
    assert SupernetConfig.from_json(json.dumps(old)) == SupernetConfig(time_groups=1, tie_qkv=False)
    old["tie"], old["group_size"] = [r"(.*attentions\.\d+)\.to_[qkv]$"], None  # --tie-qkv then; group_size unset
    assert SupernetConfig.from_json(json.dumps(old)) == SupernetConfig(time_groups=1, tie_qkv=True)


def test_int8_deployment_keeps_one_static_range_per_group():
    """On any CPU: the int8 kernels compute what fake quantization computes, group by group. Where the kernels sum
    u8 x s8 pairs in 16 bits (no VNNI), the 8-bit layers run split weights that cannot saturate, so this holds there
    too (the subprocess test below runs it with oneDNN capped at AVX2)."""
    from tmpq.deploy.int8 import (
        TimeGroupedInt8,
        int8_summary,
        kernels_saturate,
        onednn_available,
        to_int8,
    )

    if not onednn_available():
        pytest.skip("no oneDNN int8 kernels in this PyTorch build")
    net = QuantSupernet(tiny_unet(), SupernetConfig(**CFG, time_groups=2, pin={}, w_bits=(8,), a_bits=(8,)))
    net.calibrate(_data(), progress=False)
    net.set_uniform(8, 8)
    calls = _data(seed=9)[::3]  # timesteps of both groups, in sampler order and back
    calls = calls + calls[::-1]
    with torch.no_grad():
        ref = [net(x, t).sample for x, t in calls]
        _, rows = to_int8(net.unet, lambda u: [u(x, t) for x, t in _data(seed=4)])
        assert rows and all(r["int8"] for r in rows), [r["why"] for r in rows if not r["int8"]]
        assert all(isinstance(m, TimeGroupedInt8) for n, m in net.unet.named_modules() if n in net.layers)
        out = [net(x, t).sample for x, t in calls]
    s = int8_summary(rows)
    assert 0 <= s["check_worst_err"] < 1e-5
    # 8-bit activations x 8-bit weights can overflow a 16-bit pair: split exactly where the kernels saturate
    assert (s["split_weight_layers"] > 0) == kernels_saturate()
    # float-rounding equal, except where int32 vs float accumulation flips one activation level at an exact tie
    # (measured on this random tiny model: 1 of 4 timesteps at ~3e-5, with time_groups = 1 too); serving the other
    # group's ranges is ~3e-3, saturated 16-bit pairs 0.03-0.06
    errs = sorted(float((a - b).pow(2).mean() / b.pow(2).mean()) for a, b in zip(out, ref))
    assert errs[len(errs) // 2] < 1e-10 and errs[-1] < 3e-4, errs


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_int8_deployment_is_exact_where_the_kernels_saturate(isa):
    """The same test in a process whose oneDNN is capped below VNNI (what an AVX2-only or AVX-512 CPU without VNNI
    runs): the probe sees the saturating kernels and the test above still holds."""
    import os
    import subprocess
    import sys

    from tmpq.deploy.int8 import onednn_available

    if not onednn_available():
        pytest.skip("no oneDNN int8 kernels in this PyTorch build")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
    code = ("import sys, pytest; from tmpq.deploy.int8 import kernels_saturate; assert kernels_saturate(); "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'tests/test_supernet_time_groups.py::test_int8_deployment_keeps_one_static_range_per_group']))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_int8_check_catches_a_wrong_kernel(monkeypatch):
    """A kernel that computes something else (here: one that drops a fraction of a percent of each output, as a
    saturating sum would) is caught by the conversion check: every layer falls back, named, with its error."""
    import tmpq.deploy.int8 as deploy

    if not deploy.onednn_available():
        pytest.skip("no oneDNN int8 kernels in this PyTorch build")
    net = QuantSupernet(tiny_unet(), SupernetConfig(**CFG, pin={}, w_bits=(8,), a_bits=(8,)))
    net.calibrate(_data(), progress=False)
    net.set_uniform(8, 8)
    calls = _data(seed=9)[:4]
    with torch.no_grad():
        ref = [net(x, t).sample for x, t in calls]
    for kind in ("conv", "linear"):
        real = deploy._KERNELS[kind]
        monkeypatch.setitem(deploy._KERNELS, kind, lambda *a, real=real: real(*a) * 0.999)
    with torch.no_grad():
        _, rows = deploy.to_int8(net.unet, lambda u: [u(x, t) for x, t in calls])
        out = [net(x, t).sample for x, t in calls]
    assert rows and not any(r["int8"] for r in rows)
    assert all("disagrees with fake quantization" in r["why"] and r["check_err"] > deploy.CHECK_TOL for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))  # every layer still fake-quant: the same outputs


def test_search_and_export_with_time_groups_reproduce_the_supernet_samples(tiny_model_dir, tmp_path):
    from diffusers import DDPMPipeline

    import tmpq
    from tests.test_export import _supernet_samples
    from tests.test_search_service import tiny_cfg
    from tmpq.core.sampler import sample_images
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search

    d = tiny_cfg(tiny_model_dir, generations=1).to_dict()
    d["supernet"]["time_groups"] = 2
    d.pop("executor")
    run = run_search(config_from_dict(d), tmp_path / "run", progress=False)
    sn = QuantSupernet.from_file(tiny_unet(), run.path / "supernet.safetensors")
    assert sn.config.time_groups == 2 and len(sn.time_starts) == 1
    key = load_run(run.path).pareto()["key"].iloc[0]
    export_candidate(run.path, key, tmp_path / "exp", command="test")
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(tmp_path / "exp")), tmp_path / "exp")
    assert pipe.unet.tmpq_supernet.time_starts == sn.time_starts
    imgs = sample_images(pipe.unet, pipe.scheduler, pipe.tmpq_timesteps, 6, seed=3, batch_size=6, progress=False)
    assert torch.equal(imgs, _supernet_samples(run, key))
