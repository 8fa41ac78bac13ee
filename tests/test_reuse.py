"""Reuse of deep features (tmpq.core.reuse) and the recompute / reuse gene: a reuse call skips the deep part and
stands in its last full result (the same input gives exactly the full output), the cost model counts only the shallow
layers on reuse calls, and a search with the gene logs, keys and evaluates candidates that reuse."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_unet
from tests.test_search_service import tiny_cfg
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.reuse import DeepCache, deep_modules, reuse_plan, reused_layers
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.jobs.run import load_run
from tmpq.jobs.search import run_search
from tmpq.search.space import Candidate


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(2)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _call(model, x, t):
    kw = {"class_labels": torch.arange(len(x)) % 10} if hasattr(model, "transformer_blocks") else {}
    if hasattr(model, "transformer_blocks"):
        return model(x, timestep=t, **kw).sample
    return model(x, t).sample


def _deep_leaf_calls(model, branch):
    """Forward hooks counting calls of every Conv2d / Linear inside the deep part."""
    calls = {"n": 0}
    deep = reused_layers(model, branch)
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
             for name, m in model.named_modules() if name in deep and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return calls, hooks


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
@torch.no_grad()
def test_a_reuse_call_skips_the_deep_part_and_stands_in_its_last_result(make):
    model = make()
    x = torch.randn(4, 1, 8, 8)
    x2 = x + 0.1 * torch.randn_like(x)
    t, t2 = torch.full((4,), 600), torch.full((4,), 500)
    full, full2 = _call(model, x, t), _call(model, x2, t2)
    calls, hooks = _deep_leaf_calls(model, 1)
    try:
        with DeepCache(model, [False, True, True], branch=1) as dc:
            dc.on_step(0)
            a = _call(model, x, t)
            n_full = calls["n"]
            dc.on_step(1)
            b = _call(model, x, t)  # the same input: exactly the full output
            dc.on_step(2)
            c = _call(model, x2, t2)  # a new input: the shallow part runs on it, the deep part does not
        assert n_full > 0 and calls["n"] == n_full
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(a, full)
    if hasattr(model, "transformer_blocks"):  # input + (output - input) of the deep range: equal up to rounding
        torch.testing.assert_close(b, full, rtol=0, atol=1e-5)
    else:  # the deep blocks' own cached outputs: exactly
        assert torch.equal(b, full)
    assert not torch.equal(c, full) and not torch.equal(c, full2)
    assert torch.equal(_call(model, x2, t2), full2)  # the model's own forwards are back after the with block
    assert "forward" not in vars(model.transformer_blocks[1] if hasattr(model, "transformer_blocks")
                                 else model.mid_block)


@torch.no_grad()
def test_the_stock_pipeline_hook_reuses_only_inside_a_trajectory_and_runs_other_calls_in_full():
    """With ``timesteps`` (no sampler loop: a stock pipeline's denoiser calls drive it), a direct forward before any
    trajectory, or past the plan's last call, runs the whole model, exactly, instead of failing on an empty cache."""
    model = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    t = {v: torch.full((2,), v) for v in (900, 500, 300, 100, 700)}
    full = {v: _call(model, x, tv) for v, tv in t.items()}
    calls, hooks = _deep_leaf_calls(model, 1)
    try:
        with DeepCache(model, [False, True, False], branch=1, timesteps=[900, 500, 100]) as dc:
            assert torch.equal(_call(model, x, t[300]), full[300])  # before any trajectory: full, no error
            n0 = calls["n"]
            assert n0 > 0 and dc.full_calls == dc.reuse_calls == 0
            assert torch.equal(_call(model, x, t[900]), full[900])
            n1 = calls["n"]
            reused = _call(model, x, t[500])  # the plan's reuse call: the deep part does not run
            assert calls["n"] == n1 and not torch.equal(reused, full[500])
            _call(model, x, t[100])
            assert (dc.full_calls, dc.reuse_calls) == (2, 1)
            assert torch.equal(_call(model, x, t[700]), full[700])  # past the plan: full again, counted nowhere
            assert (dc.full_calls, dc.reuse_calls) == (2, 1) and calls["n"] == n1 + 2 * n0
    finally:
        for h in hooks:
            h.remove()


def test_sampling_with_an_all_full_plan_is_bit_identical_and_reuse_changes_images():
    unet = tiny_unet()
    sched = make_scheduler(embedded_scheduler_config())
    ts = [900, 700, 500, 300, 100]
    ref = sample_images(unet, sched, ts, 6, batch_size=4, progress=False)
    with DeepCache(unet, [False] * 5) as dc:
        same = sample_images(unet, sched, ts, 6, batch_size=4, progress=False, on_step=dc.on_step)
    with DeepCache(unet, reuse_plan([1, 3], 5)) as dc:
        other = sample_images(unet, sched, ts, 6, batch_size=4, progress=False, on_step=dc.on_step)
    assert torch.equal(ref, same)
    assert dc.full_calls == 3 * 2 and dc.reuse_calls == 2 * 2  # two batches, each its own trajectory
    assert not torch.equal(ref, other) and torch.isfinite(other).all()


def test_reuse_is_refused_in_one_line_where_it_cannot_work():
    with pytest.raises(TmpqError, match="first denoiser call cannot reuse"):
        DeepCache(tiny_unet(), [True, False])
    with pytest.raises(TmpqError, match="branch must be < 2"):
        deep_modules(tiny_unet(), 2)
    with pytest.raises(TmpqError, match="no deep/shallow split known for Linear"):
        deep_modules(torch.nn.Linear(2, 2), 1)
    with pytest.raises(TmpqError, match=r"within 1\.\.4"):
        reuse_plan([0, 2], 5)


def test_a_search_with_the_reuse_gene(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, population=8, generations=2, reuse_branch=1)
    run = run_search(cfg, tmp_path / "run", progress=False)
    space = load_run(run.path).space
    assert space.reuse_branch == 1 and space.reuse_genes == space.max_calls - 1
    deep = set(space.deep_layers)
    assert deep and deep < {lay.fqn for lay in space.layers}
    rows = [json.loads(ln) for ln in run.log_path.read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows)
    reusing = [r for r in rows if r.get("reuse")]
    assert reusing, "a population of 8 over 2 generations draws some reuse genes"
    for r in rows:
        c = Candidate.from_dict(r)
        assert c.key == r["key"] and space.decode(space.encode(c)) == c
        # a reuse call costs the shallow layers only: exactly the deep layers' BitOPs less per reused call
        plain = Candidate(c.timesteps, c.bits, c.solver)
        per_call_deep = sum(lay.macs * w * a for lay in space.layers if lay.fqn in deep
                            for w, a in [c.bits[lay.gene] if lay.gene is not None else lay.pinned])
        assert space.bitops(c) == pytest.approx(space.bitops(plain) - len(c.reuse) * per_call_deep, rel=1e-12)
    # candidates without reuse keep the keys they had before the gene existed
    r0 = next(r for r in rows if not r.get("reuse"))
    assert Candidate.from_dict(r0).key == Candidate(tuple(r0["timesteps"]),
                                                     tuple(tuple(b) for b in r0["bits"])).key
    # the gene belongs to the time axis: a bits-only search holds it at "never"
    held = space.restrict("bits")
    g = held.mutate(space.encode(Candidate.from_dict(reusing[0])), np.random.default_rng(0), p=1.0)
    assert not held.decode(g).reuse
    with pytest.raises(TmpqError, match="calls must be distinct, ascending"):
        space.encode(Candidate(c.timesteps, c.bits, reuse=(0,)))


def test_a_reuse_point_validates_exports_and_runs_in_the_stock_pipeline(tiny_model_dir, tmp_path):
    """Validation samples the point with its reuse; the export records it; the stock DDPMPipeline after apply_export
    reuses on the same calls (driven by its own denoiser calls) and gives the images tmpq samples from the export."""
    from diffusers import DDPMPipeline

    import tmpq
    import tmpq.jobs.validate as fin
    from tmpq.core.sampler import noise_generators
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate

    run = run_search(tiny_cfg(tiny_model_dir, population=8, generations=1, reuse_branch=1), tmp_path / "run",
                     progress=False)
    front = load_run(run.path).pareto()
    row = next(r for _, r in front.iterrows() if len(r["reuse"]))  # this seed's front has a point that reuses
    row = {"key": row["key"], "reuse": list(row["reuse"])}
    final = fin.validate_run(run.path, fin.ValidateConfig(keys=(row["key"],), n=8, seeds=(1,), calib_per_step=2,
                                                           distill_iters=0, batch_size=8), progress=False)
    assert final["reuse"].tolist() == [row["reuse"]]
    man = export_candidate(run.path, row["key"], tmp_path / "exp")
    assert man["sampler"]["reuse"] == {"branch": 1, "calls": row["reuse"]}
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    dc = unet.tmpq_reuse
    ref = sample_images(unet, sched, ts, 3, seed=0, progress=False)
    assert dc.reuse_calls == len(row["reuse"]) and dc.full_calls == len(ts) - len(row["reuse"])
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(tmp_path / "exp")), tmp_path / "exp")
    img = pipe(batch_size=3, generator=noise_generators(3, 0), output_type="np").images
    out = torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2) * 2 - 1
    assert float((out - ref).abs().max()) < 1e-5
    assert pipe.unet.tmpq_reuse.reuse_calls == len(row["reuse"])
    # tmpq speed times the export with its reuse, on the fake-quant and the int8 path alike
    from tmpq.deploy.int8 import measure_speed

    rows = measure_speed(tmp_path / "exp", n=2, batch_size=2)
    assert rows["reuse"]["calls"] == row["reuse"] and rows["reuse"]["reuse_calls_run"] > 0
    # without the reuse the same export gives other images: the reuse is what ran
    pipe.unet.tmpq_reuse.__exit__(None, None, None)
    plain = pipe(batch_size=3, generator=noise_generators(3, 0), output_type="np").images
    assert float(np.abs(np.asarray(plain) - np.asarray(img)).max()) > 1e-4
