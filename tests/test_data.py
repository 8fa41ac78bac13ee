import pytest

import tmpq.core.data as data
from tmpq.core.errors import TmpqError


def test_splits_are_disjoint_and_cover():
    tr, ho = data.split_indices("train"), data.split_indices("heldout")
    h0, h1 = data.split_indices("half0"), data.split_indices("half1")
    assert len(tr) == 4000 and len(ho) == 1000 and not set(tr) & set(ho)
    assert len(h0) == len(h1) == 2500 and not set(h0) & set(h1)
    assert sorted(set(tr) | set(ho)) == list(range(5000))


def test_load_digits_shapes_and_range():
    x, y = data.load_digits("heldout", 16)
    assert x.shape == (1000, 1, 16, 16) and y.shape == (1000,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    x28, _ = data.load_digits("heldout", 28)
    assert x28.shape == (1000, 1, 28, 28)


def test_content_hash_is_verified(monkeypatch):
    x, y = data._raw_mnist()
    x = x.copy()
    x[0, 0] ^= 1
    monkeypatch.setattr(data, "_raw_mnist", lambda: (x, y))
    with pytest.raises(TmpqError, match="sha256"):
        data.load_digits()


def test_bad_split_and_resolution():
    with pytest.raises(TmpqError, match="unknown data split"):
        data.load_digits("test")
    with pytest.raises(TmpqError, match="resolution"):
        data.load_digits("all", 32)
