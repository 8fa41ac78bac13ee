"""Crash-safe writes: contents, permissions like a plain open(), and a failed write leaves the old file."""
import pytest

from tmpq.core.fileio import atomic_write, atomic_write_bytes


def test_new_file_gets_plain_open_permissions(tmp_path):
    import tmpq.core.fileio as fio

    atomic_write_bytes(tmp_path / "a.json", b"{}")
    with open(tmp_path / "b.json", "wb") as f:  # what a plain open gives under this process's umask
        f.write(b"{}")
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~fio._UMASK
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_rewrite_keeps_the_mode_and_a_failed_write_keeps_the_file(tmp_path):
    p = tmp_path / "rows.json"
    atomic_write_bytes(p, b"old")
    p.chmod(0o640)
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and p.stat().st_mode & 0o777 == 0o640

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"new" and [q.name for q in tmp_path.iterdir()] == ["rows.json"]
