"""Crash-safe file writes (write to a temporary file in the same folder, fsync, then atomically rename), and the
read-only readers of run and export files: any damage is one ``TmpqError`` naming the file."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tmpq.core.errors import TmpqError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an ``OSError``'s own, or the ``(os error N)`` that safetensors' and other
    Rust writers put in their messages; None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return int(m.group(1)) if m else None


def write_failure(exc: BaseException, path: Path, what: str = "") -> TmpqError | None:
    """The one-line error for a failed write of ``path`` (``what``: e.g. "export"), naming ``path`` itself and the
    reason ("no space left on device", "read-only file system", ...), never a hidden temporary file; None when
    ``exc`` is not an OS-level failure."""
    code = os_errno(exc)
    if code is None and not isinstance(exc, OSError):
        return None
    if code:
        reason = os.strerror(code)
    else:
        reason = getattr(exc, "strerror", None) or _reason(exc) or type(exc).__name__
    reason = reason[:1].lower() + reason[1:]
    return TmpqError(f"cannot write {what + ' ' if what else ''}{path}: {reason}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary binary file and move it over ``path``; a crash leaves the old file. The file
    gets the permissions a plain ``open(path, "wb")`` would give it (mkstemp's are owner-only). A failing write
    (full disk, read-only file system, no permission) is one ``TmpqError`` naming ``path``."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    except OSError as exc:
        raise write_failure(exc, path) from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failure(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        failure = write_failure(exc, path) if isinstance(exc, Exception) else None
        if failure is not None:
            raise failure from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, outermost first."""
    missing = []
    p = path.parent
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing[::-1]


@contextmanager
def atomic_directory(path: Path, what: str = "directory"):
    """Build a directory in place of ``path`` atomically: yields an empty staging directory beside it (in
    ``path.parent``, so the final rename never crosses file systems), renamed onto ``path`` (absent or an empty
    directory) when the block ends. Missing parents are created first; directories get a plain ``mkdir``'s mode
    (mkdtemp's is owner-only). On any failure the staging directory and the parents it created are removed, and an
    OS-level failure (full disk, read-only file system, no permission: also safetensors' errors wrapping one) is one
    ``TmpqError`` naming ``path`` and the reason."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise TmpqError(f"{path} is a dangling symbolic link (to {os.readlink(path)}); remove it or choose another "
                        f"path")
    created = _missing_parents(path)
    tmp, staged = None, ""
    try:
        for d in created:
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        staged = str(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        os.replace(tmp, path)  # replaces an empty directory atomically (POSIX rename)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:  # not empty any more: someone else's now
                pass
        if isinstance(exc, TmpqError) and staged and staged in str(exc):  # an inner writer named its staged file
            raise TmpqError(str(exc).replace(staged, str(path))) from None
        failure = write_failure(exc, path, what) if isinstance(exc, Exception) else None
        if failure is not None:
            raise failure from None
        raise


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Reading: every read path goes through these, so a missing, unreadable or damaged file is one TmpqError naming it
# (and the line, for JSONL), and nothing is ever opened for writing. Only a resuming writer repairs a torn JSONL tail.

_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of ``path`` (the ``what`` of a run or export); missing, unreadable or a directory is one line."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TmpqError(f"cannot read the {what} {path}: {_reason(exc)}") from None


@contextmanager
def malformed(path: Path, what: str, line: int | None = None):
    """Turn a malformed value met while parsing the block (KeyError, TypeError, ValueError, ...) into one line
    naming the file (and line); a TmpqError from inside gets the file prefixed unless it names it."""
    where = f"{path}, line {line}" if line is not None else str(path)
    try:
        yield
    except TmpqError as exc:
        if str(path) in str(exc):
            raise
        raise TmpqError(f"{where}: {exc}") from None
    except _MALFORMED as exc:
        raise TmpqError(f"{where}: malformed {what} ({_reason(exc)})") from None


def read_json(path: Path, what: str, kind: type | None = dict):
    """The JSON value of a file, which must be a ``kind`` (default: an object)."""
    data = read_bytes(path, what)
    with malformed(path, what):
        value = json.loads(data)
        if kind is not None and not isinstance(value, kind):
            raise TypeError(f"expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string"}


def parse_jsonl(data: bytes, path: Path, parse: Callable, what: str) -> tuple[list, int | None]:
    """:func:`read_jsonl` on bytes already read (e.g. decompressed); ``path`` names them in errors."""
    records, pos = [], 0
    lines = data.split(b"\n")
    for no, line in enumerate(lines, 1):
        if line.strip():
            try:
                with malformed(path, what, no):
                    records.append(parse(line.decode()))
            except TmpqError:
                if no < len(lines):  # a newline follows: corruption, whatever the position
                    raise
                return records, pos  # the last line, without its newline: torn by a crash mid-write
        pos += len(line) + 1
    return records, None


def read_jsonl(path: Path, parse: Callable, what: str) -> tuple[list, int | None]:
    """``(records, torn)``: ``parse(line)`` of every non-blank line, and the byte offset of a torn last line (no
    trailing newline and unparseable: a crash mid-write), else None. The torn line is skipped, never removed here;
    any other bad line is one TmpqError naming the file and line number."""
    return parse_jsonl(read_bytes(path, what), Path(path), parse, what)


def lacks_final_newline(path: Path) -> bool:
    """Whether a JSONL file is non-empty and does not end in a newline (a writer repairs it before appending)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 1, 0))
            return size > 0 and f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def repair_jsonl_tail(path: Path, parse: Callable, what: str) -> Path | None:
    """For a writer about to append (a resumed search or validation): move a torn last line into a side file
    ``<name>.torn-<n>`` (kept, never deleted) and cut it off; give a complete last record its missing newline. A bad
    line anywhere else raises and changes nothing. Returns the side file, if any."""
    path = Path(path)
    data = read_bytes(path, what)
    _, torn = parse_jsonl(data, path, parse, what)
    if torn is None:
        if data and not data.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        return None
    n = 1
    while path.with_name(f"{path.name}.torn-{n}").exists():
        n += 1
    side = path.with_name(f"{path.name}.torn-{n}")
    atomic_write_bytes(side, data[torn:])
    with open(path, "r+b") as f:
        f.truncate(torn)
        f.flush()
        os.fsync(f.fileno())
    logging.getLogger(__name__).warning("%s: moved a torn last line (%d bytes, a crash mid-write) to %s",
                                        path, len(data) - torn, side.name)
    return side


def read_parquet(path: Path, what: str, columns: tuple[str, ...] = ()):
    """A Parquet file as a DataFrame, which must have ``columns``; missing, unreadable or damaged is one line."""
    import pandas as pd
    import pyarrow as pa

    data = read_bytes(path, what)
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except (pa.ArrowException, OSError, *_MALFORMED) as exc:
        raise TmpqError(f"{path}: corrupt or truncated {what} ({_reason(exc)})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TmpqError(f"{path}: malformed {what} (no column {missing[0]!r})")
    return df


def parse_row(line: str) -> dict:
    """One row of a JSONL row log (:class:`tmpq.core.rowlog.RowLog`, ``final/rows.jsonl``): a JSON object."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise TypeError(f"expected a JSON object, got {type(row).__name__}")
    return row
