"""Every damaged run or export file is one line on stderr, exit 2, and changes nothing.

A fuzz through the CLI (in-process): truncations, byte flips, wrong JSON types, empty, missing, unreadable and
misplaced files of a tiny run directory (validated and exported once) under the commands that read them. A case may
legitimately still succeed (a flip that leaves valid data, a torn last log line, a file that command never reads): it
must leave the files unchanged too (a writing command may only add its own outputs), and is counted apart.
"""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.test_search_service import tiny_cfg
from tmpq.cli import main

VALIDATE = dict(n=4, seeds=(1, 2), calib_per_step=2, batch_size=4)
ROOT = os.geteuid() == 0  # root reads a chmod 000 file anyway: no permission cases


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """``(root, validated key, exported key)``: root/run (searched, one point validated over two seeds) and
    root/exp (an export of a point that has no validated quantizers, when the front has two points)."""
    import tmpq.jobs.validate as fin
    from tests.conftest import tiny_unet
    from tmpq.core.model import embedded_scheduler_config, save_pipeline_dir
    from tmpq.jobs.export import export_candidate
    from tmpq.jobs.run import load_run
    from tmpq.jobs.search import run_search

    root = tmp_path_factory.mktemp("corrupt")
    save_pipeline_dir(tiny_unet(), embedded_scheduler_config(), root / "tiny-ddpm")
    run = run_search(tiny_cfg(root / "tiny-ddpm", generations=1), root / "run", progress=False).path
    df = fin.validate_run(run, fin.ValidateConfig(top_k=1, **VALIDATE), progress=False)
    vkey = df["key"].iloc[0]
    keys = load_run(run).pareto()["key"].tolist()
    ekey = next((k for k in keys if k != vkey), vkey)
    export_candidate(run, ekey, root / "exp")
    return root, vkey, ekey


def _tree(path: Path) -> dict:
    """Relative path -> SHA-256 of the bytes ("dir" for a folder) of everything under ``path``."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_dir():
            out[rel] = "dir"
        else:
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                out[rel] = f"unreadable {p.stat().st_size}"
    return out


def _commands(work: Path, vkey: str, ekey: str) -> dict:
    run, exp = str(work / "run"), str(work / "exp")
    return {
        "pareto": ["pareto", run],
        "report": ["report", run, "--no-baselines", "--no-grids", "--threads", "1"],
        "validate": ["validate", run, "--candidate", vkey, "--n", str(VALIDATE["n"]), "--seeds", "1,2",
                     "--calib-per-step", str(VALIDATE["calib_per_step"]), "--batch-size", "4", "--threads", "1"],
        "export": ["export", run, "--candidate", ekey, "--out", str(work / "out"), "--threads", "1"],
        "export-validated": ["export", run, "--candidate", vkey, "--out", str(work / "out"), "--threads", "1"],
        "sample": ["sample", exp, "--n", "1", "--batch-size", "1", "--out", str(work / "g.png"), "--threads", "1"],
    }


# what a command that succeeds may add or rewrite (under the case's work folder); nothing else may change
WRITES = {"report": ("run/report",), "validate": ("run/final.parquet", "run/final.json"), "export": ("out",),
          "export-validated": ("out",), "sample": ("g.png",)}


def _truncate(at):
    return lambda p: p.write_bytes(p.read_bytes()[:at(len(p.read_bytes()))])


def _flip(frac, seed, lo=0, hi=None):
    """Replace one byte (at ``frac`` of the span [lo, hi)) by a different random byte."""
    def mutate(p):
        b = bytearray(p.read_bytes())
        end = len(b) if hi is None else min(hi(b), len(b))
        i = lo + int((end - lo) * frac)
        rng = random.Random(seed)
        b[i] = (b[i] + rng.randrange(1, 256)) % 256
        p.write_bytes(bytes(b))
    return mutate


def _replace(text):
    return lambda p: p.write_bytes(text.encode())


def _remove(p):
    p.unlink()


def _make_dir(p):
    p.unlink()
    p.mkdir()


def _chmod0(p):
    p.chmod(0)


def _line(no, change):
    """Change line ``no`` (1-based; negative from the end) of a JSONL file, keeping its newline."""
    def mutate(p):
        lines = p.read_bytes().split(b"\n")[:-1]
        lines[no if no < 0 else no - 1] = change(lines[no if no < 0 else no - 1])
        p.write_bytes(b"\n".join(lines) + b"\n")
    return mutate


def _set_field(name, value):
    def change(line):
        d = json.loads(line)
        d[name] = value
        return json.dumps(d).encode()
    return change


def _drop_field(name):
    def change(line):
        d = json.loads(line)
        del d[name]
        return json.dumps(d).encode()
    return change


def _file_cases(rel, commands, *, json_file=False, safetensors=False):
    """Truncations, byte flips, an empty file, wrong JSON types, missing, a directory, unreadable."""
    cases = [(f"{rel} truncated at {f:.2f}", rel, _truncate(lambda n, f=f: int(n * f)), commands)
             for f in (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9)]
    cases += [(f"{rel} minus {k} bytes", rel, _truncate(lambda n, k=k: n - k), commands) for k in (1, 2, 7)]
    span = {"hi": (lambda b: 8 + int.from_bytes(b[:8], "little"))} if safetensors else {}
    cases += [(f"{rel} byte flip at {f:.2f}", rel, _flip(f, i, **span), commands)
              for i, f in enumerate((0.0, 0.003, 0.05, 0.13, 0.29, 0.41, 0.5, 0.62, 0.77, 0.88, 0.97, 0.999))]
    cases += [(f"{rel} empty", rel, _replace(""), commands), (f"{rel} missing", rel, _remove, commands),
              (f"{rel} is a directory", rel, _make_dir, commands)]
    if json_file:
        cases += [(f"{rel} is JSON {t}", rel, _replace(t), commands)
                  for t in ("[]", "1", '"x"', "{}", "null", "[{}]", "true", '{"format": []}')]
    if not ROOT:
        cases.append((f"{rel} unreadable", rel, _chmod0, commands))
    return cases


def _jsonl_cases(rel, commands, fields):
    """Damage inside the log: bad lines with a newline after them (corruption wherever they are), whole-file
    truncations (a torn last line: skipped by readers), and the file-level cases."""
    cases = []
    for no in (1, 2, -1):
        cases += [(f"{rel} line {no} cut short", rel, _line(no, lambda ln: ln[: len(ln) // 2]), commands),
                  (f"{rel} line {no} garbage", rel, _line(no, lambda ln: b"\x00\xff garbage"), commands)]
        cases += [(f"{rel} line {no} is {t}", rel, _line(no, lambda ln, t=t: t.encode()), commands)
                  for t in ("[]", "1", '"x"', "{}", "null", "true")]
        cases += [(f"{rel} line {no} byte flip at {f:.2f}", rel, _line(no, lambda ln, f=f: _flipped(ln, f)),
                   commands) for f in (0.0, 0.2, 0.5, 0.8, 0.99)]
    for name, value in fields:
        cases.append((f"{rel} line 2 {name}={value!r}", rel, _line(2, _set_field(name, value)), commands))
        cases.append((f"{rel} line 2 without {name}", rel, _line(2, _drop_field(name)), commands))
    return cases + _file_cases(rel, commands)


def _flipped(line, frac):
    b = bytearray(line)
    i = min(int(len(b) * frac), len(b) - 1)
    b[i] = (b[i] + 97) % 256
    return bytes(b)


def _cases(vkey):
    cases = []
    cases += _file_cases("run/config.resolved.json", ("pareto",), json_file=True)
    cases += _jsonl_cases("run/evaluations.jsonl", ("pareto",),
                          [("key", 1), ("status", "weird"), ("timesteps", "x"), ("timesteps", ["a"]), ("bits", 3),
                           ("objectives", "x"), ("objectives", {"fid_proxy": "x"}), ("proxy", []), ("seed", "1")])
    cases += _file_cases("run/search_space.json", ("report",), json_file=True)
    cases += _jsonl_cases("run/final/rows.jsonl", ("validate",),
                          [("key", 1), ("seed", "1"), ("fid", "x"), ("settings", {}), ("timesteps", 3)])
    cases += _file_cases("run/final.parquet", ("report",))
    cases += _file_cases("run/final.json", ("report",), json_file=True)
    cases += _file_cases("run/supernet.safetensors", ("export",), safetensors=True)
    cases += _file_cases(f"run/final/{vkey}.safetensors", ("export-validated",), safetensors=True)
    cases += _file_cases("exp/tmpq_export.json", ("sample",), json_file=True)
    cases += _file_cases("exp/quantizers.safetensors", ("sample",), safetensors=True)
    # files no read path opens (derived from the log by the search): damage changes no answer and nothing
    cases += [(f"{rel} {what}", rel, m, ("pareto",)) for rel in ("run/evaluations.parquet", "run/pareto.parquet")
              for what, m in (("truncated", _truncate(lambda n: n // 2)), ("empty", _replace("")),
                              ("flipped", _flip(0.5, 0)))]
    for cmd in ("pareto", "report", "validate", "export"):
        cases.append((f"run directory is a file ({cmd})", "run", _run_dir_file, (cmd,)))
        cases.append((f"run directory missing ({cmd})", "run", shutil.rmtree, (cmd,)))
    cases.append(("export directory is a file", "exp", _run_dir_file, ("sample",)))
    return cases


def _run_dir_file(p):
    shutil.rmtree(p)
    p.write_text("not a directory\n")


class _Recompute(Exception):
    """validate reached real work (a torn last row is skipped and its seed redone): a success, stopped here."""


def _changed(before: dict, after: dict) -> set:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_every_damaged_file_is_one_line_exit_2_and_nothing_changes(pristine, tmp_path, capsys, monkeypatch):
    import tmpq.jobs.validate as fin

    root, vkey, ekey = pristine

    def recompute(*a, **k):
        raise _Recompute

    monkeypatch.setattr(fin, "recalibrate_point", recompute)
    cases = _cases(vkey)
    errors, succeeded, problems = 0, [], []
    for i, (name, rel, mutate, commands) in enumerate(cases):
        for cmd in commands:
            work = tmp_path / f"c{i}-{cmd}"
            shutil.copytree(root / "run", work / "run")
            shutil.copytree(root / "exp", work / "exp")
            target = work / rel
            mutate(target)
            before = _tree(work)
            capsys.readouterr()
            try:
                rc = main(_commands(work, vkey, ekey)[cmd])
            except _Recompute:
                rc = 0
            err = capsys.readouterr().err
            if target.exists() and not target.is_dir():
                target.chmod(0o644)
            after = _tree(work)
            changed = _changed(before, after)
            if rc == 2:
                errors += 1
                lines = err.strip().splitlines()
                if (len(lines) != 1 or not lines[0].startswith("tmpq: error: ") or target.name not in lines[0]
                        or "Traceback" in err):
                    problems.append(f"{name} [{cmd}]: stderr {err!r}")
                if changed:
                    problems.append(f"{name} [{cmd}]: failed but changed {sorted(changed)}")
            elif rc == 0:
                succeeded.append(f"{name} [{cmd}]")
                allowed = WRITES.get(cmd, ())
                if any(not any(c == a or c.startswith(a + "/") for a in allowed) for c in changed):
                    problems.append(f"{name} [{cmd}]: succeeded and changed {sorted(changed)}")
            else:
                problems.append(f"{name} [{cmd}]: exit {rc}, stderr {err!r}")
            shutil.rmtree(work, ignore_errors=True)
    assert not problems, "\n".join(problems)
    assert errors >= 200, (errors, succeeded)
    assert len(succeeded) < errors / 3, succeeded  # the fuzz mostly damages what the commands read
