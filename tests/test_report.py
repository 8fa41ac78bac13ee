"""tmpq report: the HTML page renders in headless Chromium and every image on it loads."""
import re
import shutil
import subprocess
import sys

import pytest

from tests.test_search_service import tiny_cfg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("report")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    # with a step-count gene: the report's baselines cover every step choice
    run = run_search(tiny_cfg(root / "tiny-ddpm", generations=1, step_choices=[2, 3]), root / "run",
                     progress=False).path
    from tmpq.jobs.run import load_run

    r = load_run(run)
    r.export(r.pareto().sort_values("bitops")["key"].iloc[0])  # the report marks it
    r = subprocess.run([sys.executable, "-m", "tmpq", "report", str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return run


def test_report_files(reported):
    from tmpq.jobs.run import load_run

    out = reported / "report"
    page = (out / "report.html").read_text()
    front = load_run(reported).pareto()
    for k in front["key"]:
        assert f"grid_{k}.png" in page and (out / f"grid_{k}.png").is_file()
    assert (out / "pareto.png").is_file() and (out / "grid_fp.png").is_file() and (out / "baselines.json").is_file()
    import json

    names = [b["name"] for b in json.loads((out / "baselines.json").read_text())]
    assert {n.split()[-1] for n in names} == {"2", "3"} and "2/3 steps" in page
    peak = load_run(reported).evaluations["peak_mib"].max()
    assert peak > 100 and f"peak resident memory: {peak:.0f} MiB" in page  # the search's memory, as logged
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(not s.startswith("/") for s in srcs)  # relative: the folder can be moved or served


def test_report_says_how_far_each_front_point_is_from_the_searchs_seeds(reported):
    """"From seed": a point's genes against the nearest uniform option of the first generation (0 = a seed)."""
    import numpy as np

    from tmpq.core.candidate import Candidate
    from tmpq.jobs.report import seed_distances
    from tmpq.jobs.run import load_run

    run = load_run(reported)
    front, space = run.pareto(), run.space
    seeds = space.uniform_seeds(max(1, run.config["search"]["population"] // 2))
    got = seed_distances(space, run.config, front)
    assert set(got) == set(front["key"])
    for _, p in front.iterrows():
        genome = space.encode(Candidate.from_dict(p))
        assert got[p["key"]] == min(int(np.sum(genome != s)) for s in seeds)
    seed_keys = {space.decode(s).key for s in seeds}
    assert all(got[k] == 0 for k in set(front["key"]) & seed_keys)
    assert all(got[k] > 0 for k in set(front["key"]) - seed_keys)
    page = (reported / "report" / "report.html").read_text()
    assert "<th>from seed</th>" in page and page.count("a seed</td>") == sum(v == 0 for v in got.values())
    no_seeds = {**run.config, "search": {**run.config["search"], "uniform_seeds": False}}
    assert seed_distances(space, no_seeds, front) == {}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make setup installs it)")
def test_report_renders_in_headless_chromium_with_all_images(reported, tmp_path):
    page = reported / "report" / "report.html"
    n_imgs = page.read_text().count("<img ")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    m = re.search(r'data-images="(\d+)/(\d+)"', r.stdout)
    assert m, "the page's load handler did not run"
    assert int(m.group(2)) == n_imgs and int(m.group(1)) == n_imgs  # every image decoded


def test_report_shows_per_layer_bits_and_how_to_export_each_point(reported):
    import json

    from PIL import Image

    from tmpq.jobs.run import load_run

    run = load_run(reported)
    page = (reported / "report" / "report.html").read_text()
    front = run.pareto().sort_values("bitops")
    exported = run.exports["key"].tolist()
    assert exported == [front["key"].iloc[0]]
    rows = re.findall(r"<tr( class=\"exported\")?><td><b>(P\d+)</b><br><code>(\w+)</code>(.*?)</tr>", page, re.S)
    assert [(name, k) for _, name, k, _ in rows] == [(f"P{i + 1}", k) for i, k in enumerate(front["key"])]
    for marked, _, k, rest in rows:
        if k in exported:
            assert marked and "<b>exported</b>" in rest and str(reported / "exports" / k[:8]) in rest
        else:  # the command that exports it where tmpq status and the report find it
            assert not marked and f"tmpq export {reported} --candidate {k} --out {reported}/exports/{k[:8]}" in rest
    assert '<img src="bits.png"' in page
    layers = json.loads((reported / "search_space.json").read_text())["layers"]
    searched = [lay for lay in layers if lay["gene"] is not None]
    with Image.open(reported / "report" / "bits.png") as im:  # a row of at least 14 pixels per searched layer
        assert len(searched) > 20 and im.size[1] >= 14 * len(searched)
    assert all(lay["fqn"] in page for lay in layers if lay["pinned"])  # named as not shown


def test_save_grid_lays_images_out_with_white_gaps(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from tmpq.core.grid import save_grid

    imgs = torch.stack([torch.full((1, 2, 3), v) for v in (-1.0, 0.0, 1.0)])  # black, grey, white; 2 x 3 pixels
    g = np.array(Image.open(save_grid(imgs, tmp_path / "g.png", nrow=2, scale=2)))
    assert g.shape == (2 * (2 * 3 + 1), 2 * (2 * 4 + 1))  # 2 rows x 2 columns of 2x3 images, 1-pixel gaps, x2
    assert (g[2:6, 2:8] == 0).all() and (g[2:6, 10:16] == 128).all() and (g[8:12, 2:8] == 255).all()
    assert (g[:2] == 255).all() and (g[:, 8:10] == 255).all() and (g[8:12, 10:16] == 255).all()  # gaps, empty cell
    one = np.array(Image.open(save_grid(imgs[:1], tmp_path / "one.png", nrow=8, scale=1)))
    assert one.shape == (4, 5) and (one[1:3, 1:4] == 0).all() and one[0].min() == 255  # a lone image keeps its border


def test_save_grid_lays_each_video_out_as_a_row_of_its_frames(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from tmpq.core.grid import save_grid

    # 2 videos of 3 frames, 1 x 1 pixel each: video v, frame f has value (v * 3 + f) / 3 - 1
    vids = torch.tensor([[[-1.0, -2 / 3, -1 / 3]], [[0.0, 1 / 3, 2 / 3]]]).reshape(2, 1, 3, 1, 1)
    g = np.array(Image.open(save_grid(vids, tmp_path / "v.png", scale=1)))
    assert g.shape == (2 * 2 + 1, 3 * 2 + 1)  # 2 rows (videos) x 3 columns (frames), 1-pixel gaps
    cells = g[1::2, 1::2]
    expected = ((vids.reshape(2, 3) + 1) * 127.5).round().numpy()
    assert (cells == expected).all()
