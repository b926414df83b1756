"""Writes a crash never leaves half done: a file or folder is written under a hidden temporary name
next to its place and renamed over it when complete. Anything whose name starts with '.' is never
read as a result. A full disk is said as such, with where and how much is free."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tether.errors import TetherError


class DiskFullError(TetherError):
    """The disk filled up while tether wrote a file; nothing half-written was left behind a real name."""

    exit_code = 1


def disk_full(path: Path, err: BaseException) -> DiskFullError | None:
    """The DiskFullError for an error raised while writing `path`, if the disk was full (None if not)."""
    if not (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) and "No space left" not in str(err):
        return None
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free / 2**20
        left = f"{free:.1f} MiB are free there"
    except OSError:
        left = "how much is free there could not be read"
    return DiskFullError(
        f"the disk is full: writing {path} failed ({left}). The partial file was removed and the run's earlier "
        "files are intact; free some space (or point --output elsewhere) and continue with --resume."
    )


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(path, err)
        if full is not None:
            raise full from err
        raise


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Move the old one aside first so the rename below is a plain one; delete it after.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        full = disk_full(target, err)
        if full is not None:
            raise full from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_of(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
