"""Finite or refused: a NaN weight, a NaN activation range, NaN images and a search where nothing evaluates are each
one clear error at their cause; and the same calibration writes the same supernet bytes."""
import json

import numpy as np
import pytest
import torch

from tests.conftest import calib_batches, tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.supernet import QuantSupernet, SupernetConfig


def test_a_nan_weight_in_a_model_directory_is_refused_at_load(tmp_path):
    from tmpq.core.model import embedded_scheduler_config, load_model, save_pipeline_dir

    unet = tiny_unet()
    with torch.no_grad():
        unet.down_blocks[1].attentions[0].to_q.weight[3, 2] = float("nan")
    save_pipeline_dir(unet, embedded_scheduler_config(), tmp_path / "m")
    with pytest.raises(TmpqError) as info:
        load_model(tmp_path / "m")
    msg = str(info.value)
    assert "\n" not in msg and "down_blocks.1.attentions.0.to_q.weight" in msg and "NaN" in msg
    assert str(tmp_path / "m" / "unet") in msg


def test_an_infinite_weight_is_named_too(tmp_path):
    from tmpq.core.model import embedded_scheduler_config, load_model, save_pipeline_dir

    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias[0] = float("inf")
    save_pipeline_dir(unet, embedded_scheduler_config(), tmp_path / "m")
    with pytest.raises(TmpqError, match=r"parameter conv_out\.bias has infinite values"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("mode", ["per-option", "random-path"])
def test_a_nan_activation_range_is_refused_naming_the_layer(tmp_path, mode):
    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax"))
    data = calib_batches(n=1, batch=2)
    data[0][0][1, 0, 3, 4] = float("nan")  # one NaN input pixel: the first quantized layer observes a NaN range
    ckpt = tmp_path / "sn.partial.safetensors"
    with pytest.raises(TmpqError) as info:
        net.calibrate(data, mode=mode, progress=False, checkpoint=ckpt)
    msg = str(info.value)
    assert msg.startswith("calibration: layer conv_in: non-finite activation range"), msg
    assert not ckpt.exists()  # no checkpoint keeps the NaN ranges


def test_nan_images_and_nan_features_are_refused_before_the_linear_algebra():
    from tmpq.evaluators.candidate import check_finite_images
    from tmpq.evaluators.fid import FeatureStats, frechet_distance

    imgs = torch.zeros(4, 1, 8, 8)
    check_finite_images(imgs)
    imgs[2, 0, 1, 1] = float("nan")
    with pytest.raises(TmpqError, match="non-finite images: 1 of 4 sampled images"):
        check_finite_images(imgs)
    feats = np.random.default_rng(0).normal(size=(8, 3))
    feats[5, 1] = np.nan
    with pytest.raises(TmpqError, match="1 of 8 feature rows are not finite"):
        FeatureStats.from_features(feats)
    sigma = np.eye(3)
    sigma[0, 0] = np.inf
    with pytest.raises(TmpqError, match="sigma1 is not finite"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))


def _fast_cfg(model_dir, **search):
    """The tiny search config with min/max observers (calibrates in a fraction of the MSE search's time)."""
    from tests.test_search_service import tiny_cfg
    from tmpq.jobs.config import config_from_dict

    d = tiny_cfg(model_dir, **search).to_dict()
    d["supernet"].update(w_observer="minmax", a_observer="minmax")
    return d


def test_non_finite_images_are_failure_rows_and_an_all_failed_search_exits_2(tiny_model_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """Every candidate's images NaN (a quantized model that diverges; a damaged supernet file can no longer cause it,
    it is refused at load): each evaluation is a failure row saying so, and the search exits 2."""
    from tests.conftest import run_cli
    from tmpq.evaluators.candidate import CandidateEvaluator
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.search import run_search

    images = CandidateEvaluator.images
    monkeypatch.setattr(CandidateEvaluator, "images", lambda self, *a, **k: images(self, *a, **k) * float("nan"))
    d = _fast_cfg(tiny_model_dir, generations=1, population=4)
    with pytest.raises(TmpqError) as info:
        run_search(config_from_dict(d), tmp_path / "run", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("search: all ") and "evaluations failed" in msg
    assert "non-finite images" in msg and str(tmp_path / "run" / "evaluations.jsonl") in msg
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "failed" and r["error"].startswith("TmpqError: non-finite images")
                        for r in rows)

    # the CLI, resuming that run (every row comes from its log): exit 2, one line
    code, _, err = run_cli(["search", "--resume", tmp_path / "run"], capsys)
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("tmpq: error: ")]
    assert code == 2 and len(errors) == 1 and "evaluations failed" in errors[0] and "Traceback" not in err, err


def test_the_same_calibration_writes_the_same_supernet_bytes(tiny_model_dir, tmp_path):
    from tmpq.core.model import load_model
    from tmpq.core.sampler import make_scheduler
    from tmpq.jobs.config import config_from_dict
    from tmpq.supernet.calib_data import calibrate_to_file

    cfg = config_from_dict(_fast_cfg(tiny_model_dir))
    files = []
    for i in range(2):
        m = load_model(tiny_model_dir)
        net = QuantSupernet(m.unet, cfg.supernet)
        files.append(tmp_path / f"sn{i}.safetensors")
        calibrate_to_file(net, make_scheduler(m.scheduler_config), files[-1], cfg.calibration, progress=False)
    assert files[0].read_bytes() == files[1].read_bytes()
    # and saving one supernet again and again (safetensors' metadata order varies from call to call)
    again = {net.save(tmp_path / f"again{i}.safetensors").read_bytes() for i in range(6)}
    assert again == {files[0].read_bytes()}
    n = int.from_bytes(files[0].read_bytes()[:8], "little")
    meta = json.loads(files[0].read_bytes()[8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta) and {"config", "model_fingerprint", "progress"} <= set(meta)


def test_a_supernet_file_with_unsorted_metadata_still_loads(tmp_path):
    """Files written before the canonical header (metadata in safetensors' hash-map order) load unchanged."""
    from safetensors.torch import save

    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax"))
    net.calibrate(calib_batches(n=1, batch=2), progress=False)
    path = net.save(tmp_path / "sn.safetensors")
    from tmpq.supernet.store import read_supernet_file

    meta, state = read_supernet_file(path)
    old = tmp_path / "old.safetensors"
    shuffled = dict(reversed(list(meta.items())))
    old.write_bytes(save(state, metadata=shuffled))
    fresh = QuantSupernet(tiny_unet(), net.config)
    fresh.load(old)
    assert all(torch.equal(a, b) for a, b in zip(fresh.quantizer_state().values(), net.quantizer_state().values()))


def test_a_supernet_file_with_non_finite_scales_is_refused_at_load(tmp_path):
    """A damaged (or hand-edited) supernet file with a NaN scale is refused when it loads, naming the file and the
    tensor, instead of serving finite garbage through the 8-bit activation path."""
    from safetensors.torch import save

    from tmpq.supernet.store import read_supernet_file

    net = QuantSupernet(tiny_unet(), SupernetConfig(time_groups=1, w_observer="minmax", a_observer="minmax"))
    net.calibrate(calib_batches(n=1, batch=2), progress=False)
    meta, state = read_supernet_file(net.save(tmp_path / "sn.safetensors"))
    name = next(k for k, t in state.items() if t.is_floating_point() and k.endswith("scale"))
    state[name] = torch.full_like(state[name], float("nan"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(state, metadata=meta))
    with pytest.raises(TmpqError, match=rf"^supernet file {bad} holds non-finite quantizer state \({name}\)"):
        QuantSupernet(tiny_unet(), net.config).load(bad)
