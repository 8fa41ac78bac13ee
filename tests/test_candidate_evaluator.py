import pytest
import torch

from conftest import tiny_unet
from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError
from tmpq.core.model import embedded_scheduler_config
from tmpq.core.sampler import make_scheduler
from tmpq.core.schedules import quadratic_timesteps
from tmpq.evaluators.candidate import CandidateEvaluator, ProxyConfig
from tmpq.evaluators.features import RandomExtractor
from tmpq.evaluators.fid import FeatureStats
from tmpq.evaluators.quality import Reference
from tmpq.supernet import QuantSupernet, SupernetConfig


@pytest.fixture(scope="module")
def evaluator():
    net = QuantSupernet(tiny_unet(), SupernetConfig(w_observer="minmax", a_observer="minmax"))
    g = torch.Generator().manual_seed(0)
    net.calibrate([(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g))],
                  progress=False)
    ext = RandomExtractor(seed=0, dim=8)
    ref_feats = ext(torch.rand(64, 1, 8, 8) * 2 - 1)
    ref = Reference(FeatureStats.from_features(ref_feats), ref_feats)
    cfg = ProxyConfig(name="paired-feat", n_images=8, teacher_steps=20, batch_size=8)
    return CandidateEvaluator(net, make_scheduler(embedded_scheduler_config()), ext, ref, cfg), net


def test_paired_proxy_is_deterministic_and_orders_bits(evaluator):
    ev, net = evaluator
    ts = quadratic_timesteps(5)
    hi = ev.evaluate(Candidate(ts, [(8, 8)] * net.num_genes))
    hi2 = ev.evaluate(Candidate(ts, [(8, 8)] * net.num_genes))
    lo = ev.evaluate(Candidate(ts, [(4, 6)] * net.num_genes))
    assert hi["fid_proxy"] == hi2["fid_proxy"]
    assert hi["paired_pixel_mse"] < lo["paired_pixel_mse"]


def test_more_steps_get_closer_to_teacher(evaluator):
    ev, net = evaluator
    few = ev.evaluate(Candidate(quadratic_timesteps(2), [(8, 8)] * net.num_genes))
    many = ev.evaluate(Candidate(quadratic_timesteps(15), [(8, 8)] * net.num_genes))
    assert many["paired_pixel_mse"] < few["paired_pixel_mse"]


def test_bad_proxy_config():
    with pytest.raises(TmpqError, match="proxy.name"):
        ProxyConfig(name="clip").validate()
    with pytest.raises(TmpqError, match="n_images"):
        ProxyConfig(n_images=1).validate()


def test_per_group_bits_switch_per_step(evaluator):
    ev, net = evaluator
    ts = quadratic_timesteps(4)
    hi, lo = tuple([(8, 8)] * net.num_genes), tuple([(4, 6)] * net.num_genes)
    # the same allocation in every group is the shared-bits candidate, value for value
    assert ev.evaluate(Candidate(ts, (hi,) * 4, per_group=True))["fid_proxy"] == ev.evaluate(Candidate(ts, hi))["fid_proxy"]
    seen = []
    real_set_bits = net.set_bits

    def spy(alloc):
        seen.append(tuple(alloc))
        real_set_bits(alloc)

    net.set_bits = spy
    try:
        mixed = ev.evaluate(Candidate(ts, (lo, hi, hi, hi), per_group=True))  # group 0 (smallest t) low: the last step runs at W4A6
    finally:
        del net.set_bits
    assert seen[1:] == [hi, hi, hi, lo]  # seen[0]: the set before sampling; then one per step, descending t
    assert mixed["fid_proxy"] != ev.evaluate(Candidate(ts, (hi,) * 4, per_group=True))["fid_proxy"]
    with pytest.raises(TmpqError, match="per-group bits"):
        Candidate(ts, (hi,) * 3, per_group=True)


def test_fp_reference_of_a_schedule(evaluator):
    ev, net = evaluator
    from tmpq.core.schedules import make_timesteps

    ts = make_timesteps("uniform", 20)  # the teacher's own schedule (uniform, 20 steps): FP gives the teacher exactly
    fp = ev.evaluate(Candidate.fp(ts))
    assert fp["paired_pixel_mse"] == 0.0 and fp["fid_proxy"] == pytest.approx(0.0, abs=1e-9)
    assert ev.evaluate(Candidate(ts, [(4, 6)] * net.num_genes))["paired_pixel_mse"] > 0.0


def test_fid_proxy_without_companions_never_samples_the_teacher(evaluator):
    ev, net = evaluator
    cfg = ProxyConfig(name="fid", n_images=8, teacher_steps=20, batch_size=8)
    ts, alloc = quadratic_timesteps(5), [(6, 6)] * net.num_genes
    bare = CandidateEvaluator(net, ev.scheduler, ev.extractor, ev.ref, cfg, companions=False)
    full = CandidateEvaluator(net, ev.scheduler, ev.extractor, ev.ref, cfg)
    a, b = bare.evaluate(Candidate(ts, alloc)), full.evaluate(Candidate(ts, alloc))
    assert bare._teacher is None and "paired_feat" not in a and "paired_pixel_mse" not in a
    assert a["fid_proxy"] == b["fid_proxy"] and b["paired_pixel_mse"] > 0
    # the companions are the paired proxy's values: the same teacher, sampled on first use
    assert torch.equal(full.teacher, ev.teacher)
