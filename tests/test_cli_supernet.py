import dataclasses
import json

from test_cli import assert_clean_error, run

from tmpq.supernet import SupernetConfig


def test_profile_tiny(tiny_model_dir):
    res = run("profile", "--model", str(tiny_model_dir), "--tie-qkv")
    assert res.returncode == 0, res.stderr
    assert "pinned W8A16" in res.stdout and "uniform W4A6" in res.stdout and "split@" in res.stdout


def test_calibrate_tiny_and_resume_file_cleanup(tiny_model_dir, tmp_path):
    out = tmp_path / "sn.safetensors"
    res = run("calibrate", "--model", str(tiny_model_dir), "--calib-steps", "2", "--calib-per-step", "4",
              "--sampler-steps", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.is_file() and not (tmp_path / "sn.partial.safetensors").exists()
    side = json.loads((tmp_path / "sn.safetensors.json").read_text())
    assert side["calib_pairs"] == 8 and side["mode"] == "per-option"

    from tmpq.core.model import load_model
    from tmpq.supernet import QuantSupernet

    net = QuantSupernet.from_file(load_model(tiny_model_dir).unet, out)
    assert net.config.w_bits == (8, 6, 4)
    # options left out are a run config's defaults, so the file serves a run with default [supernet] settings
    from tmpq.jobs.config import RunConfig

    assert net.config == dataclasses.replace(RunConfig().supernet, pin={"conv_in": [8, 16], "conv_out": [16, 16]})
    assert side["calibration"] == {**{k: v for k, v in RunConfig().to_dict()["calibration"].items()
                                      if k != "supernet_file"}, "steps": 2, "per_step": 4, "sampler_steps": 4}


def test_calibrate_defaults_are_the_run_configs():
    """One source of defaults: the parser leaves every supernet and calibration option unset, and the command
    fills in the config classes' own defaults (those of a run config's sections)."""
    from tmpq.cli import build_parser
    from tmpq.commands import supernet_config
    from tmpq.jobs.config import RunConfig

    args = build_parser().parse_args(["calibrate"])
    assert supernet_config(args) == RunConfig().supernet
    assert {getattr(args, a) for a in ("w_bits", "a_bits", "tie_qkv", "rounding", "time_groups", "mode",
                                       "strategy", "calib_steps", "seed", "recon_iters")} == {None}
    args = build_parser().parse_args(["calibrate", "--no-tie-qkv", "--time-groups", "1", "--w-bits", "8,4"])
    assert supernet_config(args) == SupernetConfig(tie_qkv=False, time_groups=1, w_bits=(8, 4))


def test_calibrate_bad_bits(tiny_model_dir, tmp_path):
    assert_clean_error(run("calibrate", "--model", str(tiny_model_dir), "--w-bits", "8,0", "--out",
                           str(tmp_path / "x.safetensors")), "supernet.w_bits", "not a supported bit-width")


def test_calibrate_bad_out(tiny_model_dir, tmp_path):
    assert_clean_error(run("calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.pt")),
                       "--out must end in .safetensors")
