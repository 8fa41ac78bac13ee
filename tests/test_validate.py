"""tmpq validate on a tiny run: per-point re-calibration along the point's schedule, distillation, block
reconstruction (--recon-iters), resumable rows, final.parquet / final.json, and an export that prefers the validated
quantizers and reproduces the validated samples bit for bit in a fresh process."""
import copy
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.test_search_service import tiny_cfg
from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("validate")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    return run_search(tiny_cfg(root / "tiny-ddpm", generations=1), root / "run", progress=False).path


VALIDATE = dict(top_k=3, n=16, seeds=(1, 2), calib_per_step=4, distill_iters=3, batch_size=16)


@pytest.fixture
def fresh_run(tiny_run, tmp_path):
    """A copy of the tiny run without any validation results, for tests that validate with settings of their own."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("final", "final.parquet", "final.json"))
    return dst


@pytest.fixture(scope="module")
def validated(tiny_run):
    """The tiny run validated once (final.parquet written); any test that needs it may run first or alone."""
    import tmpq.jobs.validate as fin

    return fin.validate_run(tiny_run, fin.ValidateConfig(**VALIDATE), progress=False)


def test_validate_is_resumable_and_writes_the_summary(tiny_run, validated, monkeypatch):
    import tmpq.jobs.validate as fin

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
    monkeypatch.setattr(fin, "_score_fp", no_work)
    again = fin.validate_run(tiny_run, cfg, progress=False)
    assert again["fid_mean"].tolist() == df["fid_mean"].tolist()
    assert len((tiny_run / "final" / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_validation_scores_the_fp_model_on_each_points_own_schedule(tiny_run, validated):
    """fp_fid_mean: the FP model sampled on the point's timesteps with its solver, the same N, noise seeds, extractor
    and reference, so that fid_mean / fp_fid_mean is what the point's quantization adds."""
    from tmpq.core.sampler import make_scheduler, sample_images
    from tmpq.evaluators.candidate import quality_reference, scoring_extractor
    from tmpq.evaluators.quality import score_features
    from tmpq.core.model import ModelConfig, load_model
    from tmpq.jobs.run import load_run

    fp_rows = [json.loads(r) for r in (tiny_run / "final" / "fp_rows.jsonl").read_text().splitlines()]
    schedules = {(tuple(r["timesteps"]), r["solver"], r["order"]) for r in fp_rows}
    assert len(fp_rows) == 2 * len(schedules) and {r["seed"] for r in fp_rows} == {1, 2}  # one row per schedule+seed
    assert validated["fp_fid_mean"].notna().all()
    p = validated.iloc[0]
    cand = Candidate.from_dict(p)
    cfg = load_run(tiny_run).config
    m = load_model(ModelConfig(**cfg["model"]))
    ext = scoring_extractor(1)
    ref = quality_reference(cfg["proxy"].get("reference", ""), ext, 1)
    fids = [score_features(ext(sample_images(m.unet, make_scheduler(m.scheduler_config, *cand.solver),
                                             list(cand.timesteps), 16, seed=s, batch_size=16, progress=False)),
                           ref)["fid"] for s in (1, 2)]
    assert abs(sum(fids) / 2 - p["fp_fid_mean"]) <= 1e-9 * max(1.0, p["fp_fid_mean"])
    assert all(p["fid_mean"] != f for f in fids)  # the quantized point's FID is not the FP one


def test_distillation_never_worsens_the_tuning_loss(tiny_run):
    import tmpq.jobs.validate as fin
    from tmpq.jobs.run import load_run

    p = load_run(tiny_run).pareto().iloc[0]
    cfg = fin.ValidateConfig(n=4, calib_per_step=4, distill_iters=20, distill_lr=1e-3)
    net, _, info = fin.recalibrate_point(tiny_run, Candidate.from_dict(p), cfg, progress=False)
    assert info["distill_loss_after"] <= info["distill_loss_before"]
    assert all(not q.requires_grad for q in net.unet.parameters())  # tuned scales are frozen again


def test_export_prefers_validated_quantizers(tiny_run, validated, tmp_path):
    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export
    from tmpq.jobs.export import export_candidate

    key = pd.read_parquet(tiny_run / "final.parquet")["key"].iloc[0]
    man = export_candidate(tiny_run, key, tmp_path / "exp")
    assert man["provenance"]["quantizers"].startswith("validated")
    assert "final_fid_mean" in man["metrics"]
    unet, sched, ts, _ = load_export(tmp_path / "exp")
    assert torch.isfinite(sample_images(unet, sched, ts, 2, batch_size=2, progress=False)).all()


def test_export_of_a_validated_point_reproduces_the_validated_samples_in_a_fresh_process(fresh_run, tmp_path,
                                                                                         monkeypatch):
    """The images validate scored, drawn in the validating process from the re-calibrated and distilled quantizers,
    come back bit for bit from the export of that point loaded in a new Python process."""
    import tmpq.core.sampler as sampler
    import tmpq.jobs.validate as fin
    from tmpq.core.model import load_model
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.supernet import QuantSupernet

    drawn = []
    real = fin.sample_images

    def recording(unet, scheduler, timesteps, n, **kw):
        imgs = real(unet, scheduler, timesteps, n, **kw)
        drawn.append({"timesteps": list(timesteps), "n": n, "seed": kw["seed"], "batch_size": kw["batch_size"],
                      "images": imgs.clone()})
        return imgs

    monkeypatch.setattr(fin, "sample_images", recording)  # the name the validate job calls
    cfg = fin.ValidateConfig(top_k=1, n=6, seeds=(2,), calib_per_step=4, distill_iters=3, batch_size=6,
                             fp_reference=False)  # the quantized point's draw only
    key = fin.validate_run(fresh_run, cfg, progress=False)["key"].iloc[0]
    monkeypatch.undo()
    assert len(drawn) == 1 and drawn[0]["seed"] == 2 and drawn[0]["n"] == 6
    scored = drawn[0]
    row = json.loads((fresh_run / "final" / "rows.jsonl").read_text().splitlines()[0])
    assert row["distill_loss_after"] <= row["distill_loss_before"]  # the distilled state is the one exported

    man = export_candidate(fresh_run, key, tmp_path / "exp")
    assert man["provenance"]["quantizers"].startswith("validated")
    assert man["sampler"]["timesteps"] == scored["timesteps"]
    code = ("import sys, torch; from tmpq.deploy.bundle import load_export; from tmpq.core.sampler import sample_images; "
            "torch.set_num_threads(int(sys.argv[3])); u, s, ts, _ = load_export(sys.argv[1]); "
            "torch.save(sample_images(u, s, ts, 6, seed=2, batch_size=6, progress=False), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp"), str(tmp_path / "x.pt"),
                    str(torch.get_num_threads())], check=True)
    fresh = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(fresh, scored["images"])

    # and they are not the search supernet's images of the same point: the export carries the validated state
    p = load_run(fresh_run).pareto().set_index("key").loc[key]
    m = load_model(json.loads((fresh_run / "config.resolved.json").read_text())["model"]["path"])
    net = QuantSupernet.from_file(m.unet, fresh_run / "supernet.safetensors")
    net.set_bits([tuple(int(v) for v in b) for b in p["bits"]])
    searched = real(m.unet, sampler.make_scheduler(m.scheduler_config), list(p["timesteps"]), 6, seed=2,
                    batch_size=6, progress=False)
    assert not torch.equal(searched, fresh)


def test_validate_recon_iters_reconstructs_the_point_and_records_it(fresh_run, monkeypatch):
    """`tmpq validate --recon-iters K` runs BRECQ/AdaRound block reconstruction of the pinned point for K
    iterations: the learned rounding is in the saved quantizers, and the rows record the setting and its time."""
    from tmpq.cli import main
    from tmpq.core.model import load_model
    from tmpq.quant.adaround import AdaRoundQuantizer
    from tmpq.supernet import QuantSupernet

    calls = []
    real = QuantSupernet.reconstruct

    def spy(self, data, iters=200, **kw):
        calls.append({"iters": iters, "reports": real(self, data, iters=iters, **kw)})
        return calls[-1]["reports"]

    monkeypatch.setattr(QuantSupernet, "reconstruct", spy)
    assert main(["validate", str(fresh_run), "--top-k", "1", "--n", "4", "--seeds", "1", "--calib-per-step", "2",
                 "--recon-iters", "8", "--batch-size", "4", "--threads", str(torch.get_num_threads())]) == 0
    assert len(calls) == 1 and calls[0]["iters"] == 8
    reports = calls[0]["reports"]
    assert sum(r["layers"] for r in reports) > 0 and all(r["loss_after"] is not None for r in reports if r["layers"])

    rows = [json.loads(r) for r in (fresh_run / "final" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["recon_s"] >= 0 and json.loads(rows[0]["settings"])["recon_iters"] == 8
    assert rows[0]["time_groups"] == 1  # reconstruction trains one range per quantizer: one set of ranges

    # the saved quantizers are AdaRound weights whose rounding variables moved off round-to-nearest's init, and some
    # weights now round the other way (the quantized weights themselves changed)
    m = load_model(json.loads((fresh_run / "config.resolved.json").read_text())["model"]["path"])
    net = QuantSupernet.from_file(m.unet, fresh_run / "final" / f"{rows[0]['key']}.safetensors")
    assert net.config.w_rounding == "adaround"
    ada = [(lay, q) for lay in net.layers.values() for q in lay.w_quant if isinstance(q, AdaRoundQuantizer)]
    assert ada
    moved = flipped = 0
    for lay, q in ada:
        init = copy.deepcopy(q)
        init.init_rounding(lay.module.weight)
        moved += int((q.alpha != init.alpha).sum())
        flipped += int((q(lay.module.weight) != init(lay.module.weight)).sum())
    assert moved > 0 and flipped > 0


def test_validate_cli_errors(tiny_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tmpq", "validate", str(tiny_run), "--candidate", "f" * 16, "--n", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a Pareto point" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "tmpq", "validate", str(tmp_path), "--n", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a tmpq run directory" in r.stderr
    with pytest.raises(TmpqError, match="--n"):
        from tmpq.jobs.validate import ValidateConfig

        ValidateConfig(n=1).validate()


def test_validation_of_a_three_channel_run_scores_against_the_runs_reference(tmp_path):
    """A 3-channel model: validation uses the run's proxy.reference with the random extractor, and without a
    reference it is refused in one line before any re-calibration."""
    import tmpq.jobs.validate as fin
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.evaluators.candidate import scoring_extractor
    from tmpq.evaluators.fid import FeatureStats
    from tmpq.jobs.config import config_from_dict
    from tmpq.jobs.search import run_search

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
