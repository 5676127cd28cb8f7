"""The on-disk index folder.

::

    DIR/
      manifest.json    format version, encoder checksum and description, dimension, metric,
                       FAISS factory string, count, data sources, classes, timestamps
      index.faiss      the FAISS index (ids are row numbers of the items table)
      items.jsonl      one line per item: id, ref (file path or dataset:split:n), label, hash
      vectors.npy      the embeddings (float16), for appends, re-indexing and calibration
      <name>.npy       named arrays (for example the anomaly calibration)

A folder is always written whole into a temporary sibling and swapped in by renames
(:func:`replace_folder`), so an interrupted build leaves the previous index untouched;
leftovers of an interrupted swap are recovered or removed by the next open or write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import ann
from index.errors import IndexStoreError
from index.items import ITEMS, Items

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.faiss"
VECTORS = "vectors.npy"


@dataclass
class Manifest:
    """What an index folder holds and how it was made."""

    dim: int
    factory: str
    count: int
    encoder_sha256: str
    encoder: dict[str, Any] = field(default_factory=dict)
    metric: str = "inner_product"
    sources: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str, where: Path) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IndexStoreError(f"{where} is corrupt (invalid JSON: {exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise IndexStoreError(f"{where} is corrupt (expected a JSON object)")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexStoreError(f"{where}: index format version {version!r} is not supported (expected {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise IndexStoreError(f"{where} is corrupt ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class IndexStore:
    """An index folder in memory: manifest, FAISS index, items, vectors and named arrays."""

    def __init__(
        self,
        manifest: Manifest,
        index: faiss.Index,
        items: Items,
        vectors: np.ndarray,
        arrays: dict[str, np.ndarray] | None = None,
        path: Path | None = None,
    ):
        self.manifest = manifest
        self.index = index
        self.items = items
        self.vectors = vectors
        self.arrays = dict(arrays or {})
        self.path = path
        self._search_index: faiss.Index | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        items: Items,
        encoder_sha256: str,
        encoder: dict[str, Any] | None = None,
        factory: str = "auto",
        sources: list[str] | None = None,
        memory_budget: int = ann.DEFAULT_MEMORY_BUDGET,
    ) -> "IndexStore":
        """A new index over ``vectors`` (n, d), unit-normalised, with one item per row."""
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise IndexStoreError(f"{vectors.shape[0] if vectors.ndim else 0} vectors for {len(items)} items")
        if len(items) == 0:
            raise IndexStoreError("cannot build an index of zero items")
        index, factory = ann.build(vectors, factory, memory_budget)
        stamp = now()
        manifest = Manifest(
            dim=int(vectors.shape[1]), factory=factory, count=len(items), encoder_sha256=encoder_sha256,
            encoder=dict(encoder or {}), sources=list(sources or []),
            classes=sorted({lbl for lbl in items.labels if lbl is not None}), created_at=stamp, updated_at=stamp,
        )
        return cls(manifest, index, items, vectors.astype(np.float16))

    def append(self, vectors: np.ndarray, items: Items, sources: list[str] | None = None) -> None:
        """Add vectors and their items; the existing ones are kept as they are."""
        if vectors.shape[0] != len(items):
            raise IndexStoreError(f"{vectors.shape[0]} vectors for {len(items)} items")
        if len(items) == 0:
            return
        if vectors.shape[1] != self.manifest.dim:
            raise IndexStoreError(f"vectors of dimension {vectors.shape[1]} do not fit an index of dimension {self.manifest.dim}")
        ann.add(self.index, vectors)
        self.vectors = np.concatenate([np.asarray(self.vectors), vectors.astype(np.float16)])
        self.items.extend(items)
        m = self.manifest
        m.count = len(self.items)
        m.sources = m.sources + [s for s in (sources or []) if s not in m.sources]
        m.classes = sorted(set(m.classes) | {lbl for lbl in items.labels if lbl is not None})
        m.updated_at = now()
        self._search_index = None

    # ------------------------------------------------------------------ searching
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query (q, d): similarities and ids (q, min(k, count))."""
        if self._search_index is None:
            self._search_index = ann.to_gpu(self.index)
        ann.set_search_params(self._search_index, nprobe, ef_search)
        return ann.search(self._search_index, queries, k)

    def label_ids(self) -> np.ndarray:
        return self.items.label_ids(self.manifest.classes)

    def exact_vectors(self) -> np.ndarray:
        """(n, d) float32 vectors: the Flat index's own copies, else the stored float16 ones."""
        if isinstance(faiss.downcast_index(self.index), faiss.IndexFlat):
            return self.index.reconstruct_n(0, self.index.ntotal)
        return np.asarray(self.vectors, dtype=np.float32)

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path, files: dict[str, Path] | None = None) -> None:
        """Write the whole folder atomically (see :func:`replace_folder`), with copies of ``files``
        (name in the folder -> source path) swapped in together."""
        path = Path(path)
        self.manifest.arrays = sorted(self.arrays)

        def fill(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / INDEX))
            np.save(tmp / VECTORS, np.asarray(self.vectors, dtype=np.float16))
            self.items.write(tmp / ITEMS)
            for name, arr in self.arrays.items():
                np.save(tmp / f"{name}.npy", arr)
            for name, source in (files or {}).items():
                shutil.copyfile(source, tmp / name)
            (tmp / MANIFEST).write_text(self.manifest.to_json())

        replace_folder(path, fill)
        self.path = path
        # The saved vectors are the ones to use from now on (and may be memory-mapped).
        self.vectors = np.load(path / VECTORS, mmap_mode="r")

    def save_array(self, name: str, arr: np.ndarray) -> None:
        """Add one named array to the saved folder in place (a cache; atomic per file)."""
        if self.path is None:
            raise IndexStoreError("the index has not been saved yet")
        self.arrays[name] = arr
        tmp = self.path / f".{name}.{uuid.uuid4().hex}.npy"
        np.save(tmp, arr)
        os.replace(tmp, self.path / f"{name}.npy")

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "IndexStore":
        """Open an index folder; every missing or corrupt file is named in the error."""
        path = Path(path).expanduser()
        recover(path)
        if not path.exists():
            raise IndexStoreError(f"index folder {path} not found")
        if not path.is_dir():
            raise IndexStoreError(f"{path} is not an index folder (it is a file)")
        manifest_path = path / MANIFEST
        try:
            manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"), manifest_path)
        except FileNotFoundError:
            raise IndexStoreError(f"{manifest_path} not found ({path} is not an index folder)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IndexStoreError(f"{manifest_path} cannot be read ({exc})") from None
        index_path = path / INDEX
        if not index_path.is_file():
            raise IndexStoreError(f"{index_path} not found (the index folder is incomplete)")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise IndexStoreError(f"{index_path} is corrupt ({lines[-1] if lines else 'unreadable'})") from None
        items = Items.read(path / ITEMS)
        vectors = _load_npy(path / VECTORS, mmap)
        arrays = {name: _load_npy(path / f"{name}.npy", False) for name in manifest.arrays}
        for name in os.listdir(path):
            # Caches written after the folder (save_array) are not listed in the manifest.
            stem = name[:-4]
            if name.endswith(".npy") and not name.startswith(".") and stem not in arrays and name != VECTORS:
                try:
                    arrays[stem] = _load_npy(path / name, False)
                except IndexStoreError as exc:
                    log.warning("ignoring %s", exc)
        counts = {"manifest.json": manifest.count, ITEMS: len(items), INDEX: index.ntotal, VECTORS: vectors.shape[0]}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise IndexStoreError(f"index folder {path} is inconsistent (item counts differ: {detail})")
        if index.d != manifest.dim or vectors.shape[1] != manifest.dim:
            raise IndexStoreError(f"index folder {path} is inconsistent (dimension {manifest.dim} in the manifest, {index.d} in {INDEX})")
        return cls(manifest, index, items, vectors, arrays, path)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise IndexStoreError(f"{path} not found (the index folder is incomplete)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise IndexStoreError(f"{path} is corrupt ({exc})") from None


# ---------------------------------------------------------------------- atomic folders

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


def recover(path: Path) -> None:
    """Repair what an interrupted :func:`replace_folder` left behind.

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
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1]
            kept = " (the previous index is intact)" if path.exists() else ""
            raise IndexStoreError(f"cannot write index to {path}: {reason}{kept}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
