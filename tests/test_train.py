"""Short real runs of both trainers: they must write loadable, self-describing artefacts."""
import json

import torch

from tmpq.model import load_model
from tmpq.train import UNetTrainConfig, train_unet


def test_train_unet_writes_loadable_pipeline(tmp_path):
    man = train_unet(UNetTrainConfig(steps=3, batch_size=4, warmup=1), tmp_path / "m", command="tmpq train --steps 3")
    m = load_model(tmp_path / "m")
    assert m.sample_shape == (1, 16, 16)
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(man))
    assert saved["data"]["sha256"] and saved["config"]["seed"] == 0 and saved["command"] == "tmpq train --steps 3"


def test_train_unet_is_seeded(tmp_path):
    cfg = UNetTrainConfig(steps=2, batch_size=4, warmup=1)
    train_unet(cfg, tmp_path / "a")
    train_unet(cfg, tmp_path / "b")
    a, b = load_model(tmp_path / "a").unet.state_dict(), load_model(tmp_path / "b").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_classifier_manifest(tmp_path):
    from evaluators.classifier import ClassifierTrainConfig, train_classifier
    from evaluators.features import DomainExtractor

    man = train_classifier(ClassifierTrainConfig(epochs=1), tmp_path / "c")
    assert 0.0 <= man["metrics"]["heldout_accuracy"] <= 1.0 and man["feature_scale"] > 0
    ext = DomainExtractor(tmp_path / "c")
    assert ext(torch.zeros(2, 1, 16, 16)).shape == (2, 128)
