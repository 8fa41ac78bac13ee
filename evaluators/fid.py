"""Frechet distance and KID between feature sets, and reference statistics files (pytorch-fid ``.npz`` + JSON)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_write

STATS_FORMAT = "tmpq.feature-stats"
STATS_VERSION = 1


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``tr sqrt(S1 S2)`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^1/2 S2 S1^1/2`` (same spectrum as ``S1 S2``), which avoids the complex round-off of a general ``sqrtm``.

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
        2.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise TmpqError(f"frechet distance: shapes differ (mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {s1.shape} vs {s2.shape}); the statistics come from different extractors")
    for name, v in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(v).all():  # the eigensolvers below would fail with "did not converge"
            raise TmpqError(f"frechet distance: {name} is not finite (NaN or infinite features: the images or the "
                            f"statistics file hold non-finite values)")
    r1 = _sqrtm_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def kid(feats1: np.ndarray, feats2: np.ndarray, n_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel ``(x.y/d + 1)^3``, averaged over
    random subsets; returns (mean, std). Unbiased, so comparable across sample sizes (unlike FID).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> m, s = kid(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)), n_subsets=10, subset_size=100)
        >>> abs(m) < 0.05
        True
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise TmpqError(f"kid: feature shapes differ: {f1.shape} vs {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise TmpqError(f"kid: needs at least 2 samples on each side, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_subsets)
    for i in range(n_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        vals[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2.0 * kxy.mean())
    return float(vals.mean()), float(vals.std())


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set, with provenance (extractor, N, source, resolution)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, feats: np.ndarray, **meta) -> "FeatureStats":
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise TmpqError(f"feature stats: need [N >= 2, D] features, got shape {feats.shape}")
        if not np.isfinite(feats).all():
            raise TmpqError(f"feature stats: {int((~np.isfinite(feats).all(1)).sum())} of {len(feats)} feature rows "
                            f"are not finite (NaN or infinite images)")
        return cls(feats.mean(0), np.cov(feats, rowvar=False), len(feats), dict(meta))

    def fid(self, other: "FeatureStats") -> float:
        a, b = self.meta.get("extractor", {}), other.meta.get("extractor", {})
        if a.get("fingerprint") and b.get("fingerprint") and a["fingerprint"] != b["fingerprint"]:
            raise TmpqError(f"statistics from different extractors: {a.get('name')} {a['fingerprint'][:12]} "
                            f"vs {b.get('name')} {b['fingerprint'][:12]}")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: Path | str) -> Path:
        """Write ``path`` (.npz with ``mu``, ``sigma``: pytorch-fid's format) and ``path.json`` (provenance), atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            raise TmpqError(f"statistics file must end in .npz: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = {"format": STATS_FORMAT, "version": STATS_VERSION, "n": self.n, **self.meta}
        atomic_write(path, lambda f: np.savez(f, mu=self.mu, sigma=self.sigma))
        atomic_write(sidecar_path(path), lambda f: f.write((json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()))
        return path

    @classmethod
    def load(cls, path: Path | str) -> "FeatureStats":
        path = Path(path)
        if not path.is_file():
            raise TmpqError(f"statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        except Exception as exc:
            raise TmpqError(f"cannot read statistics file {path}: {str(exc).splitlines()[0]}") from None
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise TmpqError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        meta: dict = {}
        sc = sidecar_path(path)
        if sc.is_file():
            try:
                meta = json.loads(sc.read_text())
            except json.JSONDecodeError as exc:
                raise TmpqError(f"malformed statistics sidecar {sc}: {exc}") from None
        n = int(meta.pop("n", 0))
        meta.pop("format", None)
        meta.pop("version", None)
        return cls(mu, sigma, n, meta)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")
