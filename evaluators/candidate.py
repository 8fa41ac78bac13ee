"""The candidate evaluator that a search worker wraps: it holds the supernet, the noise bank and the FP teacher's
outputs, and turns a (timesteps, bits) candidate into objectives. Paired evaluation: every candidate is sampled from
the same bank indices (same initial noise), so candidate differences are not sampling noise.

Proxies (each result row names proxy, version, N and seed):
- ``fid`` (default): FID (and KID) of the candidate's N images against the reference statistics (small-N FID). The
  noise is common to all candidates, so the small-N bias and most of its sampling noise are shared and cancel in the
  ranking: over 32 diverse candidates (5-20 steps, all bit mixes) FID at N = 128 ranks like FID at N = 10,000 (Kendall
  tau in results/search/README.md) at ~1 % of its cost.
- ``paired-feat``: mean squared distance, in the domain extractor's feature space, between each candidate image and
  the FP full-schedule teacher image from the same noise; ``paired_pixel_mse`` is reported beside it (always computed).
  It needs no reference data, but it measures closeness to the teacher's trajectories rather than sample quality: a
  few-step schedule whose samples are good but differ from the 100-step ones scores badly.

The FP teacher (``teacher_steps`` of DDIM on the bank images) is sampled on first use: by the paired proxy, by the
companion metrics (``companions=True``, the default: ``paired_feat`` and ``paired_pixel_mse`` beside a ``fid`` proxy)
and by the report's FP grid. A search with the ``fid`` proxy leaves the companions out (``tmpq.jobs.search``), which
spares each worker the teacher's 100 FP steps (about 12 s at N = 128 on 2 cores).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tmpq.core.candidate import DEFAULT_SOLVER, Candidate, Solver
from tmpq.core.errors import TmpqError
from tmpq.core.reuse import reusing
from tmpq.core.sampler import make_scheduler, sample_images
from tmpq.core.schedules import SCHEDULES, make_timesteps
from tmpq.evaluators.features import EXTRACTORS, RandomExtractor, make_extractor
from tmpq.evaluators.quality import (
    Reference,
    embedded_reference,
    load_reference,
    score_features,
)

PROXIES = ("paired-feat", "fid")
PROXY_VERSION = 1


@dataclass(frozen=True)
class ProxyConfig:
    """The fast quality proxy of candidates (a run config's ``[proxy]`` section is this class).

    - ``name``: ``fid`` (FID of the candidate's images against reference statistics) or ``paired-feat`` (feature
      distance to the FP teacher's images on the same noise).
    - ``n_images`` / ``seed``: images per candidate and their noise-bank seed; ``batch_size``: images per denoiser call.
    - ``teacher_steps`` / ``teacher_schedule``: the FP teacher's schedule (paired proxies and companions).
    - ``reference``: reference statistics (.npz, pytorch-fid format, of the model's training data, same extractor);
      "" = the embedded MNIST digits (1-channel models only).
    - ``extractor``: "auto" = the domain digit classifier for 1-channel models, else a seeded random CNN on the
      model's channels; "inception" = pytorch-fid's InceptionV3 from ``inception_weights`` (a local file: tmpq never
      downloads), the usual choice for RGB models.
    """

    name: str = "fid"
    n_images: int = 128
    seed: int = 0
    teacher_steps: int = 100
    teacher_schedule: str = "uniform"
    batch_size: int = 128
    reference: str = ""
    extractor: str = "auto"
    inception_weights: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key, choices in (("name", PROXIES), ("teacher_schedule", SCHEDULES),
                             ("extractor", ("auto", *EXTRACTORS))):
            if getattr(self, key) not in choices:
                raise TmpqError(f"proxy.{key}: must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key, low in (("n_images", 2), ("teacher_steps", 1), ("batch_size", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TmpqError(f"proxy.{key}: must be an integer >= {low}, got {v!r}")


class CandidateEvaluator:
    """Objectives of candidates on one supernet (built once per worker and kept). Every image (teacher and
    candidates) is conditioned and guided as the model's conditioning says (bound by its loader).

    Example:
        >>> ev = CandidateEvaluator(net, scheduler, extractor, ref, ProxyConfig(n_images=64))  # doctest: +SKIP
        >>> ev.evaluate(candidate)["fid_proxy"]  # doctest: +SKIP
    """

    def __init__(self, net, scheduler, extractor, ref: Reference | None, cfg: ProxyConfig, companions: bool = True,
                 reuse_branch: int = 0):
        if cfg.name == "fid" and ref is None:
            raise TmpqError("proxy.name = fid needs reference statistics")
        self.net, self.scheduler, self.extractor, self.ref, self.cfg = net, scheduler, extractor, ref, cfg
        self.companions = companions or cfg.name != "fid"
        self.reuse_branch = reuse_branch  # the depth a candidate's reuse calls cut at (search.reuse_branch)
        self._teacher: tuple[torch.Tensor, np.ndarray] | None = None
        self._solvers: dict = {}
        net.set_fp()

    def _teacher_pair(self) -> tuple[torch.Tensor, np.ndarray]:
        if self._teacher is None:
            ts = make_timesteps(self.cfg.teacher_schedule, self.cfg.teacher_steps,
                                self.scheduler.config.num_train_timesteps)
            with torch.no_grad():
                imgs = self.images(Candidate.fp(ts))
            self._teacher = (imgs, self.extractor(imgs))
        return self._teacher

    @property
    def teacher(self) -> torch.Tensor:
        """The FP teacher's images from the proxy's bank (sampled on first use)."""
        return self._teacher_pair()[0]

    @property
    def teacher_feats(self) -> np.ndarray:
        return self._teacher_pair()[1]

    def solver(self, solver: Solver = DEFAULT_SOLVER):
        """The scheduler of ``solver`` (the evaluator's own for DDIM), built once."""
        if solver.is_default:
            return self.scheduler
        if solver not in self._solvers:
            self._solvers[solver] = make_scheduler(self.scheduler.config, *solver)
        return self._solvers[solver]

    def _sample(self, cand: Candidate, on_step, n: int, seed: int) -> torch.Tensor:
        def run(step_hook):
            return sample_images(self.net.unet, self.solver(cand.solver), cand.timesteps, n, seed=seed,
                                 batch_size=min(self.cfg.batch_size, n), progress=False, on_step=step_hook)

        if cand.reuse and not self.reuse_branch:
            raise TmpqError("candidate reuse: this evaluator has no reuse branch (search.reuse_branch)")
        with reusing(self.net.unet, cand.reuse, self.reuse_branch, cand.calls) as dc:
            if dc.on_step is None or on_step is None:
                return run(on_step or dc.on_step)

            def both(k, t, x):
                dc.on_step(k, t, x)
                on_step(k, t, x)

            return run(both)

    @torch.no_grad()
    def images(self, cand: Candidate, n: int | None = None, seed: int | None = None) -> torch.Tensor:
        """The candidate's images (the proxy's bank images by default): its bits (the FP model for ``bits=None``),
        its convolution algorithms (Winograd options), its solver, and its reused calls at this evaluator's
        ``reuse_branch``."""
        n = self.cfg.n_images if n is None else n
        seed = self.cfg.seed if seed is None else seed
        on_step = None
        self.net.set_algos(cand.algos if cand.bits is not None else ())  # FP: direct convs (set_fp ignores algos)
        if cand.bits is None:
            self.net.set_fp()
        elif cand.per_group:
            steps = list(reversed(cand.bits))  # step k (descending t) lies in group n-1-k

            def on_step(k, t, x):
                self.net.set_bits(steps[k])

            self.net.set_bits(steps[0])
        else:
            self.net.set_bits(cand.bits)
        return self._sample(cand, on_step, n, seed)

    @torch.no_grad()
    def evaluate(self, cand: Candidate) -> dict:
        """Objectives of one candidate: ``fid_proxy`` (the configured proxy) and its companions."""
        t0 = time.perf_counter()
        imgs = self.images(cand)
        check_finite_images(imgs)
        feats = self.extractor(imgs)
        out = {}
        if self.companions:
            teacher, teacher_feats = self._teacher_pair()
            out.update({"paired_pixel_mse": float((imgs - teacher).pow(2).mean()),
                        "paired_feat": float(np.mean(np.sum((feats - teacher_feats) ** 2, axis=1)))})
        if self.cfg.name == "fid":
            s = score_features(feats, self.ref)
            out.update({"fid_small": s["fid"], **({"kid_small": s["kid"]} if "kid" in s else {})})
            out["fid_proxy"] = s["fid"]
        else:
            out["fid_proxy"] = out["paired_feat"]
        out["eval_s"] = time.perf_counter() - t0
        return out

    def proxy_info(self) -> dict:
        return {"name": self.cfg.name, "version": PROXY_VERSION, "teacher": f"{self.cfg.teacher_schedule}"
                f"{self.cfg.teacher_steps}", "extractor": self.extractor.name}


def check_finite_images(imgs: torch.Tensor) -> None:
    """Refuse images with NaN or infinite pixels (the quantized model diverged on this candidate) before any metric:
    the failure row then says so, instead of a linear-algebra error from deep inside the FID."""
    bad = ~torch.isfinite(imgs.reshape(len(imgs), -1)).all(dim=1)
    if bool(bad.any()):
        raise TmpqError(f"non-finite images: {int(bad.sum())} of {len(imgs)} sampled images have NaN or infinite "
                        f"pixels (the quantized model diverges at this candidate)")


PROXY_HINT = "; set proxy.reference or use proxy.name = paired-feat"


def check_reference(reference: str, channels: int, key: str = "proxy.reference", hint: str = PROXY_HINT) -> None:
    """Refuse FID without a usable reference (cheap: no features computed): a missing file, or no file for a model
    that is not 1-channel (the embedded digits are the only built-in reference)."""
    if reference and not Path(reference).is_file():
        raise TmpqError(f"{key}: no such file {reference}")
    if not reference and channels != 1:
        raise TmpqError(f"{key}: FID on a {channels}-channel model needs reference statistics of its data (an .npz in "
                        f"pytorch-fid format){hint}")


def check_extractor(channels: int, name: str, inception_weights: str) -> None:
    """Refuse (cheaply, before any work) an extractor that cannot read this model's images or has no weights."""
    if name == "domain" and channels != 1:
        raise TmpqError(f"proxy.extractor: the domain extractor reads 1-channel digits; this model has {channels} "
                        "channels (use auto, random or inception)")
    if name == "inception" and not Path(inception_weights or "").is_file():
        raise TmpqError(f"proxy.inception_weights: no such file {inception_weights!r} (needed by proxy.extractor = "
                        "inception; tmpq never downloads weights)")


def scoring_extractor(channels: int, name: str = "auto", inception_weights: str = ""):
    """The extractor that scores a model's images. ``auto``: the domain (digit) classifier for 1-channel models, the
    seeded random CNN on the model's channels otherwise; ``inception``: pytorch-fid's InceptionV3 from a local
    weights file. Reference statistics must come from the same extractor (its fingerprint is checked)."""

    check_extractor(channels, name, inception_weights)
    if name == "auto":
        name = "domain" if channels == 1 else "random"
    if name == "random":
        return RandomExtractor(seed=0, in_channels=channels)
    return make_extractor(name, inception_weights or None)


def quality_reference(reference: str, extractor, channels: int, key: str = "proxy.reference",
                      hint: str = "") -> Reference:
    """``reference`` statistics (.npz) if given, else the embedded digits (1-channel models only; refused otherwise,
    naming ``key``, with ``hint``)."""
    check_reference(reference, channels, key, hint)
    if reference:
        return load_reference(reference, extractor)

    return embedded_reference(extractor)


def proxy_reference(cfg: ProxyConfig, extractor, channels: int) -> Reference | None:
    """The reference of the ``fid`` proxy (``None`` for the paired proxy)."""
    if cfg.name != "fid":
        return None
    return quality_reference(cfg.reference, extractor, channels, hint=PROXY_HINT)
