"""Export and atomic writes under file-system faults: another file system for temporary files, a full disk, a
read-only file system, a dangling ``--out`` link. Every fault is one line naming the real destination (never a hidden
staging file), and nothing is left behind: no partial export, no empty parent directory."""
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tmpq.core.errors import TmpqError
from tmpq.core.fileio import atomic_directory, atomic_write, atomic_write_bytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A tiny searched run and the key of one of its Pareto candidates."""
    from tests.test_export import searched_tiny_run

    run, key = searched_tiny_run(tmp_path_factory.mktemp("faults"))
    return run.path, key


@pytest.fixture
def mounted(tmp_path):
    """``mount(name, options)``: a fresh tmpfs at ``tmp_path / name`` (skips the test where mounting is not
    permitted: it needs root); unmounted afterwards."""
    points = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); needs root")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def _one_line_error(code: int, err: str, *names: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmpq: error: "), err
    assert "Traceback" not in err and ".tmp" not in err, err  # never a hidden staging file
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def test_export_into_a_missing_parent_stages_beside_it_across_file_systems(searched, tmp_path, monkeypatch, capsys):
    run, key = searched
    # temporary files on another file system than the destination: the final rename must not cross them
    other = Path("/dev/shm")
    if other.is_dir() and os.access(other, os.W_OK) and other.stat().st_dev != tmp_path.stat().st_dev:
        elsewhere = Path(tempfile.mkdtemp(dir=other))
        monkeypatch.setenv("TMPDIR", str(elsewhere))
        monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    else:
        elsewhere = None
    staged = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*a, **kw):
        staged.append(Path(real_mkdtemp(*a, **kw)))
        return str(staged[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    out = tmp_path / "exports" / "deeper" / "best"
    try:
        code, stdout, err = run_cli(["export", run, "--candidate", key, "--out", out], capsys)
    finally:
        if elsewhere is not None:
            shutil.rmtree(elsewhere, ignore_errors=True)
    assert code == 0, err
    assert (out / "tmpq_export.json").is_file()
    assert staged and all(p.parent == out.parent for p in staged)  # staged beside the destination
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["deeper"]
    assert [p.name for p in out.parent.iterdir()] == ["best"]  # no staging directory left
    # every directory created gets a plain mkdir's mode (not mkdtemp's owner-only 0700)
    want = 0o777 & ~_umask()
    dirs = [tmp_path / "exports", out.parent, out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in dirs} == {oct(want)}


def test_full_disk_is_one_line_and_leaves_nothing(searched, mounted, capsys):
    run, key = searched
    full = mounted("full", "size=64k")
    out = full / "a" / "b" / "best"
    code, _, err = run_cli(["export", run, "--candidate", key, "--out", out], capsys)
    line = _one_line_error(code, err, str(out), "no space left on device")
    assert "SafetensorError" not in line and "Errno" not in line
    assert os.listdir(full) == []  # neither the staged export nor the parents it created


def test_read_only_file_system_is_one_line_naming_out(searched, mounted, capsys):
    run, key = searched
    ro = mounted("ro", "size=1m,ro")
    out = ro / "best"
    code, _, err = run_cli(["export", run, "--candidate", key, "--out", out], capsys)
    _one_line_error(code, err, str(out), "read-only file system")
    assert os.listdir(ro) == []


@pytest.mark.parametrize("fault, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/hidden/.best.x.tmp/unet"), "permission denied"),
    # what safetensors raises when the disk fills under its writer
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on device"),
])
def test_a_write_fault_mid_export_is_one_line_and_cleans_up(searched, tmp_path, monkeypatch, fault, reason):
    """Without a mount: the export's first write fails half-way (a file already written in the staging directory)."""
    import tmpq.jobs.export as export

    run, key = searched

    def failing(unet, scheduler_config, out, manifest=None):
        (Path(out) / "unet").mkdir(parents=True)
        (Path(out) / "unet" / "half.safetensors").write_bytes(b"half")
        raise fault

    monkeypatch.setattr(export, "save_pipeline_dir", failing)
    out = tmp_path / "new" / "parents" / "best"
    with pytest.raises(TmpqError) as info:
        export.export_candidate(run, key, out)
    msg = str(info.value)
    assert msg == f"cannot write export {out}: {reason}"
    assert os.listdir(tmp_path) == []  # the staging directory and both created parents are gone


def test_an_existing_empty_out_is_filled_and_a_failure_keeps_it(searched, tmp_path, monkeypatch):
    import tmpq.jobs.export as export

    run, key = searched
    out = tmp_path / "best"
    out.mkdir()

    def failing(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(export, "save_pipeline_dir", failing)
        with pytest.raises(TmpqError, match="no space left on device"):
            export.export_candidate(run, key, out)
    assert out.is_dir() and os.listdir(out) == [] and os.listdir(tmp_path) == ["best"]
    export.export_candidate(run, key, out)
    assert (out / "tmpq_export.json").is_file() and os.listdir(tmp_path) == ["best"]


def test_a_dangling_out_link_is_one_line_naming_out(searched, tmp_path, capsys):
    run, key = searched
    link = tmp_path / "best"
    link.symlink_to(tmp_path / "gone" / "target")
    code, _, err = run_cli(["export", run, "--candidate", key, "--out", link], capsys)
    _one_line_error(code, err, f"--out {link}", "dangling symbolic link")
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["best"]


def test_atomic_write_errors_name_the_file_not_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "evaluations.parquet"
    real_mkstemp = tempfile.mkstemp

    def denied(*a, dir=None, prefix="", suffix="", **kw):  # what mkstemp raises in a read-only folder
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(TmpqError) as info:
        atomic_write_bytes(target, b"x")
    assert str(info.value) == f"cannot write {target}: permission denied"
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)

    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as a failing write() raises it

    with pytest.raises(TmpqError) as info:
        atomic_write(target, disk_full)
    assert str(info.value) == f"cannot write {target}: no space left on device"
    assert os.listdir(tmp_path) == []


def test_atomic_write_on_a_read_only_mount_names_the_file(mounted):
    ro = mounted("ro", "size=64k,ro")
    with pytest.raises(TmpqError) as info:
        atomic_write_bytes(ro / "final.json", b"{}")
    assert str(info.value) == f"cannot write {ro / 'final.json'}: read-only file system"


def test_an_inner_writer_naming_its_staged_file_is_renamed_to_the_destination(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(TmpqError) as info:
        with atomic_directory(out, "export") as staged:
            raise TmpqError(f"cannot write {staged / 'quantizers.safetensors'}: no space left on device")
    assert str(info.value) == f"cannot write {out / 'quantizers.safetensors'}: no space left on device"
    assert os.listdir(tmp_path) == []
