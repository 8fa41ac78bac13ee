"""The user documentation stays true: README.md's Python blocks run as written, docs/cli.md is what the parser
prints, and every relative link in README.md and docs/ points at a file of the repository."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO

# a ```python block whose first line is this comment is shown, not run (it needs files the reader has to bring)
NOT_RUNNABLE = "# not-runnable"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_blocks_are_found_and_the_marker_skips_them():
    text = "x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\n# not-runnable: needs a GPU\nboom()\n```\n"
    blocks = python_blocks(text)
    assert blocks == ["print(1)\n", "# not-runnable: needs a GPU\nboom()\n"]
    assert [b.startswith(NOT_RUNNABLE) for b in blocks] == [False, True]


@pytest.mark.slow  # a tiny search on the embedded model: about 70 s of CPU time
def test_the_readme_python_blocks_run_as_written(tmp_path):
    """Each runnable block in order, as a script in one fresh directory (a later block may read what an earlier one
    wrote: the quick start's run and export)."""
    blocks = [b for b in python_blocks((REPO / "README.md").read_text()) if not b.startswith(NOT_RUNNABLE)]
    assert any("tmpq.search(" in b and "tmpq.export(" in b for b in blocks), "the quick start must be runnable"
    for i, block in enumerate(blocks):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(block)
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README python block {i} failed:\n{block}\n{r.stderr[-3000:]}"
    assert (tmp_path / "runs" / "mine" / "evaluations.jsonl").is_file()
    assert (tmp_path / "exports" / "mine" / "tmpq_export.json").is_file()


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", REPO / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parser():
    gen = _gen_cli()
    text = gen.render()
    assert (REPO / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python docs/gen_cli.py"
    from tmpq.cli import build_parser

    commands, _ = gen._subcommands(build_parser())
    assert commands and all(f"\n## tmpq {name}\n" in text for name in commands)


def test_relative_links_point_at_files_of_the_repository():
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing, missing


def test_user_docs_carry_no_session_or_issue_numbers_and_the_readme_stays_short():
    for doc in DOCS:
        hits = re.findall(r"\b(?:sessions?|issues?) \d+", doc.read_text(), flags=re.I)
        assert not hits, f"{doc.relative_to(REPO)}: {hits}"
    assert len((REPO / "README.md").read_text().splitlines()) < 200
