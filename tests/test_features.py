import numpy as np
import pytest
import torch

from tmpq.core.errors import TmpqError
from tmpq.evaluators.features import InceptionExtractor, RandomExtractor, make_extractor


def test_random_extractor_is_deterministic():
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    a, b = RandomExtractor(seed=1, dim=16)(x), RandomExtractor(seed=1, dim=16)(x)
    assert a.shape == (5, 16) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, RandomExtractor(seed=2, dim=16)(x))


def test_domain_classifier_heldout_accuracy():
    """The committed classifier must reach >= 97 % on the held-out split it never trained on."""
    from tmpq.core.data import load_digits
    from tmpq.evaluators.classifier import accuracy, load_classifier

    model, manifest = load_classifier()
    x, y = load_digits("heldout", 16)
    acc = accuracy(model, x, y)
    assert acc >= 0.97
    assert acc == pytest.approx(manifest["metrics"]["heldout_accuracy"], abs=1e-6)


def test_domain_features_separate_real_from_noise():
    from tmpq.core.data import load_digits
    from tmpq.evaluators.fid import FeatureStats

    ext = make_extractor("domain")
    real0, _ = load_digits("half0", 16)
    real1, _ = load_digits("half1", 16)
    noise = torch.rand(1000, 1, 16, 16) * 2 - 1
    s0, s1, sn = (FeatureStats.from_features(ext(x)) for x in (real0[:1000], real1[:1000], noise))
    assert s0.fid(s1) * 10 < s0.fid(sn)


def test_inception_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(TmpqError, match="inception weights file not found"):
        InceptionExtractor(tmp_path / "pt_inception.pth")
    with pytest.raises(TmpqError, match="no weights file given"):
        make_extractor("inception", None)


def test_inception_loads_local_weights_file(tmp_path, monkeypatch):
    """Builds pytorch-fid's FID Inception from a local file (random weights here: no network, no download)."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    with monkeypatch.context() as m:  # make an architecture-compatible state dict without any download
        m.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        net = pfi.fid_inception_v3()
    path = tmp_path / "pt_inception-test.pth"
    torch.save(net.state_dict(), path)

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    ext = InceptionExtractor(path)
    feats = ext(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert len(ext.fingerprint) == 64


def test_unknown_extractor():
    with pytest.raises(TmpqError, match="unknown extractor 'clip'"):
        make_extractor("clip")
