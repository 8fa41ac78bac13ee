"""The time axis a model was trained on is read from its scheduler config: a flow-matching scheduler or an unknown
class is refused in one line (exit 2 from the CLI) before anything samples, where tmpq once sampled a flow model as
DDPM and exited 0."""
import json
import subprocess
import sys

import pytest
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

from conftest import tiny_unet
from tmpq.core.errors import TmpqError
from tmpq.core.model import ModelConfig, embedded_scheduler_config, load_model, save_pipeline_dir
from tmpq.core.timeaxis import time_axis


def _with_scheduler(tmp_path, config: dict):
    root = tmp_path / "m"
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def test_a_flow_matching_directory_is_refused_in_one_line_by_the_cli(tmp_path):
    root = _with_scheduler(tmp_path, {})
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))  # as diffusers writes it
    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", "--model", str(root), "--steps", "5", "--n", "2",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "FlowMatchEulerDiscreteScheduler is a flow-matching scheduler" in lines[0], lines
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "MyOwnScheduler", "num_train_timesteps": 1000}, "unknown scheduler class 'MyOwnScheduler'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "is a flow-matching scheduler"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"}, "is a flow-matching scheduler"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "noise"}, "prediction_type 'noise' is not one of"),
])
def test_unknown_or_flow_schedulers_are_refused_naming_the_file(tmp_path, config, match):
    root = _with_scheduler(tmp_path, config)
    with pytest.raises(TmpqError, match=match) as err:
        load_model(ModelConfig(path=str(root)))
    assert str(root / "scheduler" / "scheduler_config.json") in str(err.value) and "\n" not in str(err.value)


def test_ddpm_axis_schedulers_are_served_and_a_live_flow_pipeline_is_refused():
    import tmpq

    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        assert time_axis({"_class_name": name, "prediction_type": "v_prediction"}, "x") == "ddpm"
    assert time_axis(embedded_scheduler_config(), "x") == "ddpm"  # no class named: tmpq's own configs
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TmpqError, match="model: the pipeline's scheduler: FlowMatchEulerDiscreteScheduler is a "
                                        "flow-matching scheduler"):
        tmpq.DiffusionModel.from_pipeline(pipe)
