"""The CLI end to end in subprocesses: bad inputs give one line on stderr and exit 2; small real runs work."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tmpq", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=600)


def assert_clean_error(res, *needles):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("tmpq")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_directory(tmp_path):
    assert_clean_error(run("sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")),
                       "model directory not found", "nope")


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    w = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert_clean_error(run("fid", "--model", str(tiny_model_dir), "--n", "4", "--extractor", "random"),
                       "corrupt or truncated weights file", "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("ts,needle", [("10,20,5", "strictly descending"), ("1000,5", "out of range"),
                                        ("9,x", "comma-separated integers")])
def test_bad_timesteps(tiny_model_dir, tmp_path, ts, needle):
    assert_clean_error(run("sample", "--model", str(tiny_model_dir), "--timesteps", ts, "--out",
                           str(tmp_path / "g.png")), needle)


def test_unknown_schedule(tiny_model_dir, tmp_path):
    assert_clean_error(run("sample", "--model", str(tiny_model_dir), "--schedule", "cosine", "--out",
                           str(tmp_path / "g.png")), "unknown schedule 'cosine'")


def test_missing_inception_weights_fails_before_sampling(tiny_model_dir, tmp_path):
    assert_clean_error(run("fid", "--model", str(tiny_model_dir), "--extractor", "inception", "--inception-weights",
                           str(tmp_path / "pt_inception.pth"), "--n", "100000"),
                       "inception weights file not found", "pt_inception.pth")


def test_bad_option_value_is_one_line():
    assert_clean_error(run("fid", "--n", "many"), "invalid int value")


def test_sample_and_fid_on_tiny_model(tiny_model_dir, tmp_path):
    res = run("sample", "--model", str(tiny_model_dir), "--steps", "3", "--n", "6", "--out", str(tmp_path / "g.png"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.png").stat().st_size > 0
    out = tmp_path / "fid.json"
    res = run("fid", "--model", str(tiny_model_dir), "--steps", "2,3", "--schedule", "uniform,quad", "--n", "12",
              "--extractor", "random", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["schedule"], r["steps"]) for r in rows] == [("uniform", 2), ("uniform", 3), ("quad", 2), ("quad", 3)]
    assert all(r["fid"] > 0 and "kid" in r for r in rows)


def test_fid_with_saved_reference(tmp_path):
    ref = tmp_path / "ref.npz"
    res = run("ref-stats", "--out", str(ref), "--ref-split", "half0")
    assert res.returncode == 0, res.stderr
    side = json.loads((tmp_path / "ref.npz.json").read_text())
    assert side["n"] == 2500 and side["extractor"]["name"] == "domain"
    res = run("fid", "--steps", "2", "--n", "16", "--ref", str(ref), "--out", str(tmp_path / "f.json"))
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "f.json").read_text())["rows"][0]
    assert row["ref_n"] == 2500 and "kid" not in row and row["fid"] > 0
    res = run("fid", "--steps", "2", "--n", "16", "--ref", str(ref), "--extractor", "random")
    assert_clean_error(res, "reference statistics", "made with extractor domain")
