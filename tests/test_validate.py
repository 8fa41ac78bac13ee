"""tmpq validate on a tiny run: per-point re-calibration along the point's schedule, distillation, resumable rows,
final.parquet / final.json, and an export that prefers the validated quantizers."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.test_search_service import tiny_cfg
from tmpq.errors import TmpqError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from search.service import run_search
    from tests.conftest import tiny_unet
    from tmpq.model import embedded_scheduler_config, save_pipeline_dir

    root = tmp_path_factory.mktemp("validate")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    return run_search(tiny_cfg(root / "tiny-ddpm", generations=1), root / "run", progress=False).path


VALIDATE = dict(top_k=3, n=16, seeds=(1, 2), calib_per_step=4, distill_iters=3, batch_size=16)


@pytest.fixture(scope="module")
def validated(tiny_run):
    """The tiny run validated once (final.parquet written); any test that needs it may run first or alone."""
    import evaluators.final as fin

    return fin.validate_run(tiny_run, fin.ValidateConfig(**VALIDATE), progress=False)


def test_validate_is_resumable_and_writes_the_summary(tiny_run, validated, monkeypatch):
    import evaluators.final as fin

    cfg, df = fin.ValidateConfig(**VALIDATE), validated
    assert 1 <= len(df) <= 3 and set(df["seeds"]) == {2}
    assert (tiny_run / "final.parquet").is_file() and json.loads((tiny_run / "final.json").read_text())["n"] == 16
    rows = (tiny_run / "final" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * len(df)
    assert all(json.loads(r)["calib_inputs"] == 4 * len(json.loads(r)["timesteps"]) for r in rows)
    for key in df["key"]:
        assert (tiny_run / "final" / f"{key}.safetensors").is_file()

    def no_work(*a, **k):
        raise AssertionError("finished points must not be recomputed")

    monkeypatch.setattr(fin, "recalibrate_point", no_work)
    again = fin.validate_run(tiny_run, cfg, progress=False)
    assert again["fid_mean"].tolist() == df["fid_mean"].tolist()
    assert len((tiny_run / "final" / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_distillation_never_worsens_the_tuning_loss(tiny_run):
    import evaluators.final as fin
    from tmpq.api import load_run

    p = load_run(tiny_run).pareto().iloc[0]
    cfg = fin.ValidateConfig(n=4, calib_per_step=4, distill_iters=20, distill_lr=1e-3)
    net, _, info = fin.recalibrate_point(tiny_run, p["key"], p["timesteps"], p["bits"], cfg, progress=False)
    assert info["distill_loss_after"] <= info["distill_loss_before"]
    assert all(not q.requires_grad for q in net.unet.parameters())  # tuned scales are frozen again


def test_export_prefers_validated_quantizers(tiny_run, validated, tmp_path):
    from tmpq.export import export_candidate, load_export
    from tmpq.sampler import sample_images

    key = pd.read_parquet(tiny_run / "final.parquet")["key"].iloc[0]
    man = export_candidate(tiny_run, key, tmp_path / "exp")
    assert man["provenance"]["quantizers"].startswith("validated")
    assert "final_fid_mean" in man["metrics"]
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    assert torch.isfinite(sample_images(unet, sched, ts, 2, batch_size=2, progress=False)).all()


def test_validate_cli_errors(tiny_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tmpq", "validate", str(tiny_run), "--candidate", "f" * 16, "--n", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a Pareto point" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "tmpq", "validate", str(tmp_path), "--n", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a tmpq run directory" in r.stderr
    with pytest.raises(TmpqError, match="--n"):
        from evaluators.final import ValidateConfig

        ValidateConfig(n=1).validate()


def test_validation_of_a_three_channel_run_scores_against_the_runs_reference(tmp_path):
    """A 3-channel model: validation uses the run's proxy.reference with the random extractor, and without a
    reference it is refused in one line before any re-calibration."""
    import evaluators.final as fin
    from evaluators.candidate import scoring_extractor
    from evaluators.fid import FeatureStats
    from search.service import run_search
    from tests.conftest import tiny_unet
    from tmpq.config import config_from_dict
    from tmpq.model import embedded_scheduler_config, save_pipeline_dir

    rgb = tmp_path / "rgb-ddpm"
    save_pipeline_dir(tiny_unet(in_channels=3), embedded_scheduler_config(), rgb)
    ext = scoring_extractor(3)
    g = torch.Generator().manual_seed(0)
    stats = FeatureStats.from_features(ext(torch.rand(64, 3, 8, 8, generator=g) * 2 - 1))
    stats.meta["extractor"] = {"name": ext.name, "fingerprint": ext.fingerprint}
    ref = stats.save(tmp_path / "rgb_ref.npz")
    base = tiny_cfg(rgb, generations=1).to_dict()
    vcfg = fin.ValidateConfig(top_k=1, n=8, seeds=(1,), calib_per_step=2, batch_size=8)
    run = run_search(config_from_dict({**base, "proxy": {"name": "fid", "n_images": 8, "reference": str(ref)}}),
                     tmp_path / "run", progress=False).path
    df = fin.validate_run(run, vcfg, progress=False)
    assert len(df) == 1 and df["fid_mean"].iloc[0] > 0
    bare = run_search(config_from_dict({**base, "proxy": {"name": "paired-feat", "n_images": 4}}), tmp_path / "bare",
                      progress=False).path
    with pytest.raises(TmpqError, match="proxy.reference: FID on a 3-channel model .* validation"):
        fin.validate_run(bare, vcfg, progress=False)
    assert not (bare / "final" / "rows.jsonl").exists()
