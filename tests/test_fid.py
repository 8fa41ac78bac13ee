import json

import numpy as np
import pytest

from tmpq.core.errors import TmpqError
from tmpq.evaluators.fid import FeatureStats, frechet_distance, kid


def _random_stats(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d,seed", [(4, 0), (32, 1), (128, 2)])
def test_frechet_matches_pytorch_fid(d, seed):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(seed)
    mu1, s1 = _random_stats(rng, d)
    mu2, s2 = _random_stats(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_frechet_basic_properties():
    rng = np.random.default_rng(0)
    mu, s = _random_stats(rng, 16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    assert frechet_distance(np.zeros(3), np.eye(3), np.full(3, 2.0), np.eye(3)) == pytest.approx(12.0)
    assert frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), 4 * np.eye(1)) == pytest.approx(1.0)
    with pytest.raises(TmpqError, match="different extractors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_detects_shift_and_is_near_zero_for_same_distribution():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, _ = kid(a, b, n_subsets=20, subset_size=300)
    shifted, _ = kid(a, b + 1.0, n_subsets=20, subset_size=300)
    assert abs(same) < 0.02
    assert shifted > 0.2


def test_stats_npz_round_trip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    st = FeatureStats.from_features(feats, extractor={"name": "random", "fingerprint": "abc", "dim": 6},
                                    source="test", resolution=16)
    path = st.save(tmp_path / "ref.npz")
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    assert back.n == 50 and back.meta["source"] == "test" and back.meta["extractor"]["fingerprint"] == "abc"
    with np.load(path) as f:  # what pytorch-fid reads
        assert set(f.files) >= {"mu", "sigma"}
        np.testing.assert_allclose(f["sigma"][:], np.cov(feats, rowvar=False))
    side = json.loads((tmp_path / "ref.npz.json").read_text())
    assert side["format"] == "tmpq.feature-stats" and side["n"] == 50
    assert not list(tmp_path.glob("*.tmp"))


def test_stats_mismatched_extractors_refused(tmp_path):
    rng = np.random.default_rng(0)
    a = FeatureStats.from_features(rng.normal(size=(20, 3)), extractor={"name": "x", "fingerprint": "aaa"})
    b = FeatureStats.from_features(rng.normal(size=(20, 3)), extractor={"name": "y", "fingerprint": "bbb"})
    with pytest.raises(TmpqError, match="different extractors"):
        a.fid(b)


def test_stats_bad_files(tmp_path):
    with pytest.raises(TmpqError, match="not found"):
        FeatureStats.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(TmpqError, match="cannot read statistics file"):
        FeatureStats.load(bad)
    with pytest.raises(TmpqError, match=r"must end in \.npz"):
        FeatureStats.from_features(np.ones((3, 2)) * np.arange(3)[:, None]).save(tmp_path / "x.txt")
