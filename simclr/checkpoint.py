"""Atomic, safe-to-load checkpoint files.

Files are written to a temporary name in the same folder, flushed to disk and renamed over
the old file, so a crash or a full disk never leaves a half-written checkpoint in place.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, so a file
carrying a pickled payload is refused instead of executed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.errors import first_line
from simclr.errors import SimCLRError


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically; on failure the previous file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SimCLRError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, type(exc).__name__)
        kept = " (the previous file is intact)" if path.exists() else ""
        raise SimCLRError(f"cannot write {path}: {reason}{kept}") from None
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle.
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def safe_load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a file written by :func:`atomic_save`, refusing anything but tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise SimCLRError(f"{what} {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise SimCLRError(f"{what} {path} is not a PyTorch file (it is {'empty' if not magic else f'something else: it starts with {magic!r}'})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or carrying code
        first = first_line(exc, type(exc).__name__)
        if "Unsupported global" in str(exc):
            first = "it holds Python objects other than tensors (refused for safety)"
        elif "Weights only load failed" in str(exc):
            first = "it is corrupt or not a PyTorch file"
        elif "PytorchStreamReader failed" in first:  # a zip archive cut short or damaged
            first = f"it is truncated or corrupt ({first.split('. ')[0].rsplit(': ', 1)[-1]})"
        raise SimCLRError(f"{what} {path} cannot be loaded: {first}") from None
    if not isinstance(obj, dict):
        raise SimCLRError(f"{what} {path} is not a {what} file")
    return obj


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
