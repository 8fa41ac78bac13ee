import json

from test_cli import assert_clean_error, run


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


def test_calibrate_bad_bits(tiny_model_dir, tmp_path):
    assert_clean_error(run("calibrate", "--model", str(tiny_model_dir), "--w-bits", "8,0", "--out",
                           str(tmp_path / "x.safetensors")), "supernet.w_bits", "not a supported bit-width")


def test_calibrate_bad_out(tiny_model_dir, tmp_path):
    assert_clean_error(run("calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x.pt")),
                       "--out must end in .safetensors")
