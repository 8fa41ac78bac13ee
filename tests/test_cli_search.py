import shutil

from test_cli import assert_clean_error, run

from conftest import REPO


def test_search_then_pareto_then_resume(tiny_model_dir, tmp_path):
    cfg = tmp_path / "tiny.toml"
    shutil.copy(REPO / "configs" / "tiny.toml", cfg)
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n\n' + cfg.read_text())
    res = run("search", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "generation 2/2" in res.stdout
    res = run("pareto", str(tmp_path / "run"))
    assert res.returncode == 0 and "fid_proxy" in res.stdout
    res = run("search", "--resume", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr

    import tmpq

    r = tmpq.load_run(tmp_path / "run")
    assert len(r.evaluations) >= 6 and not r.pareto().empty


def test_search_bad_config_leaves_no_run_dir(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[search]\npopulation = 0\n")
    assert_clean_error(run("search", "--config", str(cfg), "--run-dir", str(tmp_path / "run")),
                       "search.population: must be >= 2, got 0")
    assert not (tmp_path / "run").exists()
    assert_clean_error(run("pareto", str(tmp_path / "nope")), "not a tmpq run directory")
