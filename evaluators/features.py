"""Feature extractors for FID / KID. Each maps images in [-1, 1] ([N, C, H, W]) to float64 features [N, D].

- ``domain``: the embedded MNIST classifier's penultimate layer (tmpq trains it; weights committed).
- ``inception``: pytorch-fid's InceptionV3 (pool3, 2048-d) from a *local* weights file; never downloaded.
- ``random``: a tiny CNN with fixed seeded random weights, for tests.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tmpq.core.errors import TmpqError
from tmpq.core.fileio import file_sha256
from tmpq.evaluators.classifier import CLASSIFIER_DIR, FEATURE_DIM, load_classifier

EXTRACTORS = ("domain", "inception", "random")


class FeatureExtractor:
    """Base class: ``name``, ``fingerprint`` (identifies the weights), ``dim``; call on images in [-1, 1]."""

    name = "base"
    fingerprint = ""
    dim = 0
    batch_size = 500

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = False) -> np.ndarray:
        if images.ndim == 5:  # videos [N, C, F, H, W] (a video model's decoded samples): scored as their N * F frames
            images = images.transpose(1, 2).flatten(0, 1)
        if images.ndim != 4:
            raise TmpqError(f"{self.name} extractor: images must be [N, C, H, W] (or videos [N, C, F, H, W]), got "
                            f"shape {tuple(images.shape)}")
        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=f"features ({self.name})", disable=not progress,
                      unit="batch", dynamic_ncols=True):
            out.append(self._features(images[i:i + self.batch_size].float()).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim}


class DomainExtractor(FeatureExtractor):
    """Penultimate features of the embedded MNIST classifier (128-d).

    Example:
        >>> ext = DomainExtractor()
        >>> ext(torch.zeros(2, 1, 16, 16)).shape
        (2, 128)
    """

    name = "domain"

    def __init__(self, path: Path | str | None = None):
        self.model, self.manifest = load_classifier(path)
        if not self.manifest.get("feature_scale"):
            raise TmpqError(f"domain classifier manifest in {path or CLASSIFIER_DIR} has no feature_scale")
        self.scale = 1.0 / float(self.manifest["feature_scale"])
        self.dim = FEATURE_DIM
        self.fingerprint = file_sha256(Path(path or CLASSIFIER_DIR) / "model.safetensors")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise TmpqError(f"domain extractor: expects 1-channel digits, got {x.shape[1]} channels")
        r = self.model.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return self.model.features(x) * self.scale


class RandomExtractor(FeatureExtractor):
    """A tiny deterministic random CNN (seeded), for tests: any channel count and size.

    Example:
        >>> RandomExtractor(seed=0, dim=8)(torch.zeros(3, 1, 16, 16)).shape
        (3, 8)
    """

    name = "random"

    def __init__(self, seed: int = 0, dim: int = 32, in_channels: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.Tanh(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, dim)).eval()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
        self.dim = dim
        self.fingerprint = f"random-seed{seed}-dim{dim}-c{in_channels}"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@contextmanager
def _local_fid_weights(path: Path):
    """Make pytorch-fid read its Inception weights from ``path`` instead of its download URL."""
    import pytorch_fid.inception as pfi

    def load_local(url, *args, **kwargs):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = load_local
    try:
        yield
    finally:
        pfi.load_state_dict_from_url = original


class InceptionExtractor(FeatureExtractor):
    """pytorch-fid's FID InceptionV3 (pool3, 2048-d), weights from a local file (``pt_inception-2015-12-05-*.pth``
    or a safetensors copy). Grey images are repeated to 3 channels; inputs are resized to 299 by pytorch-fid."""

    name = "inception"
    batch_size = 50

    def __init__(self, weights: Path | str | None):
        if not weights:
            raise TmpqError("inception extractor: no weights file given (--inception-weights PATH); "
                            "tmpq never downloads them")
        path = Path(weights)
        if not path.is_file():
            raise TmpqError(f"inception weights file not found: {path}")
        try:
            from pytorch_fid.inception import InceptionV3
        except Exception as exc:  # torchvision missing or broken
            raise TmpqError(f"pytorch-fid cannot be imported ({str(exc).splitlines()[0]})") from None
        try:
            with _local_fid_weights(path):
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                         normalize_input=True, use_fid_inception=True).eval()
        except Exception as exc:
            raise TmpqError(f"inception weights file {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
        self.dim = 2048
        self.fingerprint = file_sha256(path)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (x + 1.0) / 2.0  # pytorch-fid takes [0, 1]
        return self.model(x)[0].flatten(1)


def make_extractor(name: str, inception_weights: str | Path | None = None, seed: int = 0) -> FeatureExtractor:
    """Build a named extractor; bad names or missing files fail here, before any sampling."""
    if name == "domain":
        return DomainExtractor()
    if name == "inception":
        return InceptionExtractor(inception_weights)
    if name == "random":
        return RandomExtractor(seed=seed)
    raise TmpqError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
