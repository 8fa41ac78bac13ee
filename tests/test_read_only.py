"""Reading a run never changes it: a corrupt line of a log is a one-line error naming file and line, a torn last line
is skipped by readers and only a resuming writer moves it into a side file; quant's and OS errors reach the CLI as the
same one line."""
import builtins
import io
import json
import subprocess
import sys

import pytest

from tests.test_search_service import tiny_cfg
from tmpq.cli import main
from tmpq.core.candidate import Candidate
from tmpq.core.errors import TmpqError
from tmpq.search.rundir import EvalResult, RunDir


def _result(i: int) -> EvalResult:
    return EvalResult(key=f"k{i:04d}", status="ok", candidate=Candidate((800, 400, 0), ((8, 8), (6, 6))),
                      objectives={"fid_proxy": 1.0 / (i + 1), "bitops": 10.0 * (i + 1)},
                      proxy={"name": "paired-mse", "version": 1}, n_images=4, generation=i // 6, origin="test")


def _run(tmp_path, n=300, fingerprint="f1"):
    """A run directory with a valid config and ``n`` logged evaluations (no search needed to read it)."""
    run = RunDir.create(tmp_path / "run", tiny_cfg(tmp_path / "model").to_dict(), {}, fingerprint=fingerprint)
    with open(run.log_path, "w") as f:
        f.writelines(_result(i).to_json() + "\n" for i in range(n))
    return run


def _damage_line(path, no: int) -> bytes:
    """Overwrite a byte range in the middle of line ``no`` (1-based); returns the damaged file's bytes."""
    lines = path.read_bytes().split(b"\n")
    ln = bytearray(lines[no - 1])
    ln[40:48] = b"\x00#\xff}{,]\x01"
    lines[no - 1] = bytes(ln)
    path.write_bytes(b"\n".join(lines))
    return path.read_bytes()


def test_pareto_on_a_corrupt_middle_line_exits_2_naming_the_line_and_changes_nothing(tmp_path):
    import tmpq

    run = _run(tmp_path)
    damaged = _damage_line(run.log_path, 101)
    r = subprocess.run([sys.executable, "-m", "tmpq", "pareto", str(run.path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmpq: error: ")
    assert f"{run.log_path}, line 101: malformed evaluation log" in lines[0]
    assert run.log_path.read_bytes() == damaged  # not one evaluation deleted
    with pytest.raises(TmpqError, match="line 101"):
        tmpq.load_run(run.path).evaluations
    with pytest.raises(TmpqError, match="line 101"):  # the resuming writer refuses too, and deletes nothing
        RunDir.reopen(run.path, "f1")
    assert run.log_path.read_bytes() == damaged and not list(run.path.glob("*.torn-*"))


@pytest.mark.parametrize("line", ['{"key": "k", "status": "ok"}', "[1, 2]", '"x"', "{}",
                                  json.dumps({**json.loads(_result(0).to_json()), "status": "weird"}),
                                  json.dumps({**json.loads(_result(0).to_json()), "objectives": "x"}),
                                  json.dumps({**json.loads(_result(0).to_json()), "extra": 1})])
def test_a_wrong_record_with_a_newline_after_it_is_an_error_even_last(tmp_path, line):
    run = _run(tmp_path, n=3)
    with open(run.log_path, "a") as f:
        f.write(line + "\n")
    before = run.log_path.read_bytes()
    with pytest.raises(TmpqError, match=r"evaluations.jsonl, line 4: "):
        run.replay()
    with pytest.raises(TmpqError, match="line 4"):
        run.recover()
    assert run.log_path.read_bytes() == before


def test_readers_skip_a_torn_last_line_without_touching_it(tmp_path, monkeypatch, capsys):
    import tmpq

    run = _run(tmp_path, n=10)
    with open(run.log_path, "a") as f:
        f.write(_result(10).to_json()[:57])  # a crash (or an append in flight) mid-line
    before = run.log_path.read_bytes()
    opened = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **k):
        opened.append((str(file), mode))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    r = tmpq.load_run(run.path)
    assert len(r.evaluations) == 10 and len(r.pareto()) == 10
    assert main(["pareto", str(run.path)]) == 0 and "k0009" in capsys.readouterr().out
    monkeypatch.undo()
    assert run.log_path.read_bytes() == before and not list(run.path.glob("*.torn-*"))
    writes = [(f, m) for f, m in opened if str(run.path) in f and any(c in m for c in "wax+")]
    assert not writes and any(f.endswith("evaluations.jsonl") for f, _ in opened)


def test_the_resuming_writer_moves_a_torn_last_line_to_a_side_file(tmp_path):
    run = _run(tmp_path, n=5)
    good = run.log_path.read_bytes()
    torn = _result(5).to_json()[:33].encode()
    run.log_path.write_bytes(good + torn)
    again = RunDir.reopen(run.path, "f1")
    assert run.log_path.read_bytes() == good
    assert (run.path / "evaluations.jsonl.torn-1").read_bytes() == torn
    again.append(_result(6))
    assert [r.key for r in again.replay()] == ["k0000", "k0001", "k0002", "k0003", "k0004", "k0006"]
    # a second crash keeps the first side file; a complete last record only lacking its newline is kept
    run.log_path.write_bytes(run.log_path.read_bytes() + b'{"key": "k9')
    run.append(_result(7))  # an append after a crash recovers first, as reopen does
    assert (run.path / "evaluations.jsonl.torn-2").read_bytes() == b'{"key": "k9'
    run.log_path.write_bytes(run.log_path.read_bytes() + _result(8).to_json().encode())
    RunDir.reopen(run.path, "f1").append(_result(9))
    assert [r.key for r in run.replay()][-3:] == ["k0007", "k0008", "k0009"]
    assert sorted(p.name for p in run.path.glob("*.torn-*")) == ["evaluations.jsonl.torn-1",
                                                                 "evaluations.jsonl.torn-2"]


def test_search_resume_after_a_torn_last_line(tiny_model_dir, tmp_path):
    """A real resumed search: the torn evaluation is kept in the side file, re-evaluated, and nothing repeats."""
    from tmpq.jobs.search import run_search

    cfg = tiny_cfg(tiny_model_dir, generations=1)
    run = run_search(cfg, tmp_path / "run", progress=False)
    lines = run.log_path.read_bytes().split(b"\n")[:-1]
    torn = lines[-1][: len(lines[-1]) // 2]
    run.log_path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + torn)
    run_search(cfg, tmp_path / "run", resume=True, progress=False)
    assert (run.path / "evaluations.jsonl.torn-1").read_bytes() == torn
    keys = [json.loads(ln)["key"] for ln in run.log_path.read_text().splitlines()]
    assert keys == [json.loads(ln)["key"] for ln in lines]  # the lost evaluation redone, nothing repeated


def test_row_log_reads_without_changing_and_repairs_only_when_appending(tmp_path, capsys):
    from tmpq.core.rowlog import RowLog

    path = tmp_path / "final" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text('{"key": "a", "seed": 1}\n{"key": "b", "seed": 1}\n{"key": "c", "se')
    before = path.read_bytes()
    log = RowLog(path, ("key", "seed"))
    assert log.has(key="a", seed=1) and log.has(key="b", seed=1) and not log.has(key="c", seed=1)
    assert path.read_bytes() == before
    log.append({"key": "c", "seed": 1})
    assert (tmp_path / "final" / "rows.jsonl.torn-1").read_text() == '{"key": "c", "se'
    assert [json.loads(ln)["key"] for ln in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"key": "a", "seed": 1}\n{"key": "b", "se\n{"key": "c", "seed": 1}\n')
    before = path.read_bytes()
    with pytest.raises(TmpqError, match=r"rows.jsonl, line 2: malformed row log"):
        RowLog(path, ("key", "seed"))
    assert path.read_bytes() == before


def test_file_readers_name_the_file(tmp_path, monkeypatch):
    from tmpq.core.fileio import read_json, read_parquet

    with pytest.raises(TmpqError, match=r"cannot read the run config .*nope.json: No such file"):
        read_json(tmp_path / "nope.json", "run config")
    with pytest.raises(TmpqError, match=r"cannot read the run config .*: Is a directory"):
        read_json(tmp_path, "run config")
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(TmpqError, match=r"a.json: malformed run config \(expected a JSON object, got list\)"):
        read_json(tmp_path / "a.json", "run config")
    (tmp_path / "x.parquet").write_bytes(b"PAR1\x00\x01garbage")
    with pytest.raises(TmpqError, match=r"x.parquet: corrupt or truncated evaluation table"):
        read_parquet(tmp_path / "x.parquet", "evaluation table")
    real_open = builtins.open

    def denied(file, mode="r", *a, **k):
        if str(file).endswith("a.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(TmpqError, match=r"cannot read the run config .*a.json: Permission denied"):
        read_json(tmp_path / "a.json", "run config")


def test_quant_and_os_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import tmpq.commands
    from tmpq.quant.quantizer import QuantError

    def quant_fails(path):
        raise QuantError("bits: 1 is not a supported bit-width (2..16)")

    monkeypatch.setattr(tmpq.commands, "load_run", quant_fails)
    assert main(["pareto", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "tmpq: error: bits: 1 is not a supported bit-width (2..16)\n"

    def os_fails(path):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(tmpq.commands, "load_run", os_fails)
    assert main(["pareto", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"tmpq: error: {tmp_path / 'run' / 'x'}: Permission denied\n"
