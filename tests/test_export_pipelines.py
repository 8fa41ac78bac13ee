"""Every export loads in one call: ``DiffusionPipeline.from_pretrained(EXPORT)`` gives tmpq's own pipeline where no
stock pipeline samples the kind (the embedded class-conditional pixel DiT, a class-conditional UNet2DModel), quantized,
and ``pipe(class_labels=...)`` draws what ``tmpq sample`` draws; the names earlier directories carry still resolve;
the export's metrics carry what validation computed, class accuracy included."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import tmpq
from tmpq.core.errors import TmpqError

DIT = Path(tmpq.__file__).parent / "assets" / "mnist16-dit"


def _cfg(model_dir, guidance: float):
    from tmpq.jobs.config import config_from_dict

    return config_from_dict({
        "model": {"path": str(model_dir), "guidance_scale": guidance},
        "supernet": {"w_bits": [8, 4], "a_bits": [8], "time_groups": 1},
        "calibration": {"steps": 2, "per_step": 2, "sampler_steps": 2, "batch_size": 4},
        "search": {"engine": "pymoo", "steps": 2, "population": 2, "generations": 1, "seed": 1,
                   "bitops_budget": "none"},
        "proxy": {"n_images": 2, "teacher_steps": 2},
    })


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The embedded DiT searched, validated (class accuracy) and exported; a tiny class-conditional UNet exported."""
    from diffusers import UNet2DModel

    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search
    from tmpq.jobs.validate import ValidateConfig, validate_run

    root = tmp_path_factory.mktemp("pipes")
    run = run_search(_cfg(DIT, 2.0), root / "dit-run", progress=False)
    key = load_run(run.path).pareto()["key"].iloc[0]
    validate_run(run.path, ValidateConfig(n=4, seeds=(1,), calib_per_step=2, batch_size=4, keys=(key,)),
                 progress=False)
    export_candidate(run.path, key, root / "dit")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).eval()
    save_pipeline_dir(unet, embedded_scheduler_config(), root / "cunet-model")
    run = run_search(_cfg(root / "cunet-model", 1.0), root / "cunet-run", progress=False)
    export_candidate(run.path, load_run(run.path).pareto()["key"].iloc[0], root / "cunet")
    return root


def _tmpq_samples(exp, labels):
    from tmpq.core.sampler import sample_images
    from tmpq.deploy.bundle import load_export

    unet, sched, ts, man = load_export(exp)
    imgs = sample_images(unet, sched, ts, len(labels), seed=3, batch_size=len(labels), progress=False, labels=labels,
                         guidance_scale=man["sampler"]["guidance_scale"])
    return (imgs / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("kind", ["dit", "cunet"])
def test_diffusion_pipeline_loads_a_class_export_in_one_call_and_samples_it(exports, kind):
    from diffusers import DiffusionPipeline

    from tmpq.core.sampler import noise_generators
    from tmpq.deploy.pipelines import TmpqPipeline

    exp = exports / kind
    assert json.loads((exp / "model_index.json").read_text())["_class_name"] == "TmpqPipeline"
    pipe = DiffusionPipeline.from_pretrained(str(exp))
    assert isinstance(pipe, TmpqPipeline) and pipe.tmpq_plan is not None  # quantized as it loaded
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 1, 2, 1]
    got = pipe(batch_size=4, class_labels=labels, generator=noise_generators(4, seed=3), output_type="pt").images
    assert torch.equal(got, _tmpq_samples(exp, labels))
    assert len(pipe(batch_size=2, class_labels=1).images) == 2
    with pytest.raises(TmpqError, match="labels: (9|11) is not a class"):
        pipe(batch_size=1, class_labels=[9] if kind == "cunet" else [11])
    with pytest.raises(TmpqError, match=f"num_inference_steps=50: .*exported {len(pipe.tmpq_timesteps)}-step"):
        pipe(batch_size=1, num_inference_steps=50)


def test_the_stock_ddpm_pipeline_on_a_class_unet_export_says_how_to_sample_it(exports):
    from diffusers import DDPMPipeline

    exp = exports / "cunet"
    pipe = tmpq.apply_export(DDPMPipeline.from_pretrained(str(exp)), exp)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(TmpqError, match="class-conditional, but this pipeline calls it without class labels: .*"
                                        "TmpqPipeline.from_pretrained") as err:
        pipe(batch_size=1)
    assert "\n" not in str(err.value)


def test_the_name_earlier_directories_carry_resolves(exports, tmp_path):
    """Earlier exports, and the embedded DiT's own directory, name ``tmpq.Pipeline``; a plain model directory loads
    in full precision and samples uniform DDIM steps."""
    from diffusers import DiffusionPipeline

    from tmpq.core.fileio import file_sha256
    from tmpq.deploy.pipelines import TmpqPipeline

    assert json.loads((DIT / "model_index.json").read_text())["_class_name"] == "tmpq.Pipeline"
    plain = DiffusionPipeline.from_pretrained(str(DIT))
    assert isinstance(plain, TmpqPipeline) and getattr(plain, "tmpq_plan", None) is None
    plain.set_progress_bar_config(disable=True)
    imgs = plain(batch_size=2, class_labels=[0, 7], num_inference_steps=2, output_type="np").images
    assert imgs.shape == (2, 16, 16, 1)
    old = tmp_path / "old"
    shutil.copytree(exports / "dit", old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**index, "_class_name": "tmpq.Pipeline"}, indent=2) + "\n")
    m = json.loads((old / "tmpq_export.json").read_text())
    m["files"]["model_index.json"] = file_sha256(old / "model_index.json")
    (old / "tmpq_export.json").write_text(json.dumps(m))
    pipe = DiffusionPipeline.from_pretrained(str(old))
    assert isinstance(pipe, TmpqPipeline) and pipe.tmpq_plan.guidance_scale == 2.0


def test_the_export_metrics_carry_the_validation_metrics(exports):
    import pandas as pd

    man = json.loads((exports / "dit" / "tmpq_export.json").read_text())
    final = pd.read_parquet(exports / "dit-run" / "final.parquet").iloc[0]
    assert man["metrics"]["final_class_accuracy_mean"] == pytest.approx(final["class_accuracy_mean"])
    assert man["metrics"]["final_kid_mean"] == pytest.approx(final["kid_mean"])
    assert man["metrics"]["final_fid_mean"] == pytest.approx(final["fid_mean"])
    assert "final_fid_std" not in man["metrics"]  # one seed: no spread (NaN is not written)
