"""The time axis a model was trained on is read from its scheduler config: a flow-matching scheduler is sampled on
its own axis (tmpq once sampled a flow model as DDPM and exited 0), an unknown class or an option tmpq does not
reproduce is refused in one line (exit 2 from the CLI) before anything samples."""
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


def test_a_flow_matching_directory_samples_on_its_axis_and_bad_options_are_one_line(tmp_path):
    root = _with_scheduler(tmp_path, {})
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))  # as diffusers writes it
    code = ("import sys; import tmpq.core.adapters as a; from tmpq.cli import main; real = a.DenoiserAdapter.call; "
            "a.DenoiserAdapter.call = lambda self, m, x, t, c: (print('T', float(t.reshape(-1)[0])), "
            "real(self, m, x, t, c))[1]; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "sample", "--model", str(root), "--timesteps", "999,500,0",
                          "--n", "2", "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and (tmp_path / "g.png").is_file(), res.stderr
    calls = [float(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("T ")]
    sigma = [3 * u / (1 + 2 * u) for u in (1.0, 0.501, 0.001)]  # shift 3 on u = (t + 1) / 1000
    assert calls == pytest.approx([1000 * s for s in sigma], abs=1e-3)  # called at sigma * N, not at t
    cfg = dict(FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1).config)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name":
                                                                         "FlowMatchEulerDiscreteScheduler", **cfg}))
    res = subprocess.run([sys.executable, "-m", "tmpq", "sample", "--model", str(root), "--steps", "5", "--n", "2",
                          "--out", str(tmp_path / "h.png")], capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "sets shift_terminal = 0.1" in lines[0], res.stderr
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "MyOwnScheduler", "num_train_timesteps": 1000}, "unknown scheduler class 'MyOwnScheduler'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, "sets use_karras_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1.0}, "shift must be a positive number"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "noise"}, "prediction_type 'noise' is not one of"),
])
def test_unknown_or_flow_schedulers_are_refused_naming_the_file(tmp_path, config, match):
    root = _with_scheduler(tmp_path, config)
    with pytest.raises(TmpqError, match=match) as err:
        load_model(ModelConfig(path=str(root)))
    assert str(root / "scheduler" / "scheduler_config.json") in str(err.value) and "\n" not in str(err.value)


def test_ddpm_axis_schedulers_are_served_and_a_live_flow_pipeline_keeps_its_axis():
    import math

    import tmpq
    from tmpq.core.timeaxis import TimeAxis

    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        assert time_axis({"_class_name": name, "prediction_type": "v_prediction"}, "x") == "ddpm"
    assert time_axis(embedded_scheduler_config(), "x") == "ddpm"  # no class named: tmpq's own configs
    assert time_axis({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "x") == "flow"
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))
    m = tmpq.DiffusionModel.from_pipeline(pipe)
    with m.serving():
        loaded = load_model(ModelConfig(path=m.source))
    assert loaded.time_axis == TimeAxis("flow", 1000, 2.0)
    # dynamic shifting resolves at the model's token count: Flux's rule, mu linear in the tokens
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                            base_shift=0.5, max_shift=1.15)
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=sched)  # an 8 x 8 UNet: 64 tokens
    m = tmpq.DiffusionModel.from_pipeline(pipe)
    with m.serving():
        loaded = load_model(ModelConfig(path=m.source))
    mu = 0.5 + (1.15 - 0.5) * (64 - 16) / (256 - 16)
    assert loaded.time_axis.shift == pytest.approx(math.exp(mu))


def test_dynamic_shifting_resolves_to_diffusers_mu_exactly_at_every_token_count():
    """The static shift a dynamic-shifting config resolves to is exp(mu) of diffusers' own calculate_shift, to the
    last bit, at every square token count 1..128^2 (a pinned export and the stock pipeline then agree on sigmas)."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from tmpq.core.timeaxis import TimeAxis

    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_image_seq_len": 256,
           "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in range(1, 129):
        shift = TimeAxis.resolved_config(cfg, "x", n * n)["shift"]
        assert shift == math.exp(calculate_shift(n * n, 256, 4096, 0.5, 1.15)), n
