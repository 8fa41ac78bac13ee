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
