"""Writing a folder atomically, and repairing what an interrupted write left behind.

A folder is written whole into a temporary sibling (``.NAME.tmp-PID-XXXX``) and swapped in by
renames, the previous one moved aside to ``.NAME.old-XXXX`` for the instant of the swap. Only
writers repair (:func:`recover`); readers use :func:`readable` and never change the disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from common.errors import last_line
from index.errors import IndexStoreError

log = logging.getLogger(__name__)


def _siblings(path: Path, kind: str) -> Iterator[Path]:
    prefix = f".{path.name}.{kind}-"
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if p.name.startswith(prefix):
                yield p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def readable(path: Path) -> Path:
    """The folder to read for ``path``: itself, or, when a write was interrupted between moving
    the old folder aside and moving the new one in, the folder it moved aside (nothing is
    changed on disk; the next write puts it back)."""
    if path.exists():
        return path
    olds = sorted(_siblings(path, "old"), key=lambda p: p.stat().st_mtime)
    if olds:
        log.warning("%s is missing after an interrupted write; reading %s (the next write restores it)", path, olds[-1])
        return olds[-1]
    return path


def recover(path: Path) -> None:
    """Repair what an interrupted :func:`replace_folder` left behind (writers only).

    A build killed after moving the old folder aside gets the old folder back; temporary
    folders of builds whose process is gone are removed.
    """
    olds = sorted(_siblings(path, "old"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        try:
            os.rename(olds[-1], path)
            log.warning("restored %s from an interrupted write", path)
            olds = olds[:-1]
        except OSError:
            return
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _siblings(path, "tmp"):
        pid = tmp.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder atomically: ``fill`` writes into a temporary sibling, which replaces ``path``.

    On any failure (a full disk, a read-only folder, an exception in ``fill``) the temporary
    folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise IndexStoreError(f"cannot write index to {path}: {exc.strerror or exc}") from None
    old = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.rename(old, path)
        if isinstance(exc, (OSError, RuntimeError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else last_line(exc, type(exc).__name__)
            kept = " (the previous index is intact)" if path.exists() else ""
            raise IndexStoreError(f"cannot write index to {path}: {reason}{kept}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
