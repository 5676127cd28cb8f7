"""The on-disk index folder.

::

    DIR/
      manifest.json    format version, encoder checksum and description, dimension, metric,
                       FAISS factory string, count, data sources, classes, timestamps
      index.faiss      the FAISS index (ids are row numbers of the items table)
      items.jsonl      one line per item: id, ref (file path or dataset:split:n), label, hash
      vectors.npy      the embeddings (float16), for appends, re-indexing and calibration
      <name>.npy       named arrays listed in the manifest (the anomaly calibration, the 2-D map,
                       the thumbnails of near-duplicate checks)
      encoder.pt       a copy of the encoder the vectors were made with

The folder is written by :meth:`IndexStore.save` alone, always whole into a temporary sibling
swapped in by renames (:mod:`index.folder`), so an interrupted build leaves the previous index
untouched. :meth:`IndexStore.load` only reads: it never writes, repairs or caches into the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from common.errors import last_line
from index import ann, ivf
from index.errors import IndexStoreError
from index.folder import readable, replace_folder
from index.items import ITEMS, Items
from index.manifest import MANIFEST, CentroidInfo, EncoderInfo, Manifest, SearchInfo, now
from index.rerank import rerank

log = logging.getLogger(__name__)

INDEX = "index.faiss"
VECTORS = "vectors.npy"


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
        self.folder = path  # where the files are read from (see load)
        self._search_index: faiss.Index | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        items: Items,
        encoder_sha256: str,
        encoder: EncoderInfo | None = None,
        factory: str = "auto",
        sources: list[str] | None = None,
        memory_budget: int = ann.DEFAULT_MEMORY_BUDGET,
        progress: bool = False,
    ) -> "IndexStore":
        """A new index over ``vectors`` (n, d), unit-normalised, with one item per row.

        ``vectors`` may be a memory-mapped float16 array: it is read a chunk at a time and kept
        as it is (a collection larger than memory is never loaded whole).
        """
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise IndexStoreError(f"{vectors.shape[0] if vectors.ndim else 0} vectors for {len(items)} items")
        if len(items) == 0:
            raise IndexStoreError("cannot build an index of zero items")
        index, factory = ann.build(vectors, factory, memory_budget, progress=progress)
        stamp = now()
        k_factor, nprobe = ann.rerank_depth(factory), ann.default_nprobe(index)
        manifest = Manifest(
            dim=int(vectors.shape[1]), factory=factory, count=len(items), encoder_sha256=encoder_sha256,
            encoder=encoder or EncoderInfo(), sources=list(sources or []),
            classes=sorted({lbl for lbl in items.labels if lbl is not None}), created_at=stamp, updated_at=stamp,
            search=SearchInfo(k_factor, nprobe, memory_budget) if k_factor or nprobe else None,
            centroids=_centroid_info(index, vectors),
        )
        return cls(manifest, index, items, vectors if vectors.dtype == np.float16 else vectors.astype(np.float16))

    def append(self, vectors: np.ndarray, items: Items, sources: list[str] | None = None,
               progress: bool = False) -> str | None:
        """Add vectors and their items; the existing ones are kept as they are.

        An inverted file keeps the lists it was trained with: the new vectors go into them
        without retraining. Returns a note when the new vectors lie farther from the centroids
        than the indexed ones did at build time by more than :data:`index.ivf.DRIFT_FACTOR`
        (a rebuild would retrain them), else ``None``.
        """
        if vectors.shape[0] != len(items):
            raise IndexStoreError(f"{vectors.shape[0]} vectors for {len(items)} items")
        if len(items) == 0:
            return None
        if vectors.shape[1] != self.manifest.dim:
            raise IndexStoreError(f"vectors of dimension {vectors.shape[1]} do not fit an index of dimension {self.manifest.dim}")
        note = _drift_note(self.manifest.centroids, self.index, vectors)
        ivf.add_chunks(self.index, vectors, progress)
        self.vectors = np.concatenate([np.asarray(self.vectors), vectors.astype(np.float16)])
        self.items.extend(items)
        m = self.manifest
        m.count = len(self.items)
        m.sources = m.sources + [s for s in (sources or []) if s not in m.sources]
        m.classes = sorted(set(m.classes) | {lbl for lbl in items.labels if lbl is not None})
        m.updated_at = now()
        self._search_index = None
        if note:
            log.warning("%s", note)
        return note

    # ------------------------------------------------------------------ searching
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None,
               k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query (q, d): similarities and ids (q, min(k, count)).

        A compressed index built with re-ranking (the manifest's ``search``) proposes
        ``k * k_factor`` candidates that are re-ranked exactly from the stored vectors
        (:mod:`index.rerank`); ``k_factor`` overrides the manifest's depth (0: no re-ranking;
        for a FAISS refine index, ``...,RFlat``, it sets the refine stage's own depth), ``nprobe``
        its lists to visit.
        """
        if k_factor is not None and k_factor < 0:
            raise IndexStoreError(f"k_factor must be >= 0, got {k_factor}")
        if self._search_index is None:
            self._search_index = ann.to_gpu(self.index)
        info = self.manifest.search
        refine = isinstance(faiss.downcast_index(self.index), faiss.IndexRefine)
        depth = 0 if refine else (k_factor if k_factor is not None else (info.k_factor if info else 0))
        ann.set_search_params(self._search_index, nprobe or (info.nprobe if info else None), ef_search,
                              k_factor if refine else None)
        if depth == 0:
            return ann.search(self._search_index, queries, k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, candidates = ann.search(self._search_index, queries, k * depth)
        return rerank(self.vectors, queries, candidates, k)

    def label_ids(self) -> np.ndarray:
        return self.items.label_ids(self.manifest.classes)

    def exact_vectors(self) -> np.ndarray:
        """(n, d) float32 vectors: the Flat index's own copies, else the stored float16 ones."""
        if isinstance(faiss.downcast_index(self.index), faiss.IndexFlat):
            return self.index.reconstruct_n(0, self.index.ntotal)
        return np.asarray(self.vectors, dtype=np.float32)

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path, encoder_file: str | Path | None = None) -> None:
        """Write the whole folder atomically (see :func:`index.folder.replace_folder`), with a copy
        of ``encoder_file`` under the manifest's encoder file name when given, or the folder's
        current copy carried over."""
        path = Path(path)
        self.manifest.arrays = sorted(self.arrays)
        encoder_name = self.manifest.encoder.file
        if encoder_file is None and self.path is not None and (self.folder / encoder_name).is_file():
            encoder_file = self.folder / encoder_name
        # Read before the swap: the folder's own copy is about to be moved aside.
        try:
            encoder_bytes = None if encoder_file is None else Path(encoder_file).read_bytes()
        except OSError as exc:
            raise IndexStoreError(f"cannot read encoder file {encoder_file}: {exc.strerror or exc}") from None

        def fill(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / INDEX))
            np.save(tmp / VECTORS, np.asarray(self.vectors, dtype=np.float16))
            self.items.write(tmp / ITEMS)
            for name, arr in self.arrays.items():
                np.save(tmp / f"{name}.npy", arr)
            if encoder_bytes is not None:
                (tmp / encoder_name).write_bytes(encoder_bytes)
            (tmp / MANIFEST).write_text(self.manifest.to_json())

        replace_folder(path, fill)
        self.path = self.folder = path
        # The saved vectors are the ones to use from now on (and may be memory-mapped).
        self.vectors = np.load(path / VECTORS, mmap_mode="r")

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "IndexStore":
        """Open an index folder for reading; every missing or corrupt file is named in the error.

        Nothing on disk is changed: a folder left half-swapped by an interrupted write is read
        from the copy it moved aside (:func:`index.folder.readable`).
        """
        path = Path(path).expanduser()
        folder = readable(path)
        if not folder.exists():
            raise IndexStoreError(f"index folder {path} not found")
        if not folder.is_dir():
            raise IndexStoreError(f"{path} is not an index folder (it is a file)")
        manifest_path = folder / MANIFEST
        try:
            manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"), manifest_path)
        except FileNotFoundError:
            raise IndexStoreError(f"{manifest_path} not found ({path} is not an index folder)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise IndexStoreError(f"{manifest_path} cannot be read ({exc})") from None
        index_path = folder / INDEX
        if not index_path.is_file():
            raise IndexStoreError(f"{index_path} not found (the index folder is incomplete)")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise IndexStoreError(f"{index_path} is corrupt ({last_line(exc, 'unreadable')})") from None
        items = Items.read(folder / ITEMS)
        vectors = _load_npy(folder / VECTORS, mmap)
        arrays = {name: _load_npy(folder / f"{name}.npy", mmap) for name in manifest.arrays}
        _check_vectors(folder / VECTORS, vectors, manifest, len(items), index.ntotal)
        counts = {"manifest.json": manifest.count, ITEMS: len(items), INDEX: index.ntotal, VECTORS: vectors.shape[0]}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise IndexStoreError(f"index folder {path} is inconsistent (item counts differ: {detail})")
        a = manifest.anomaly
        # (an anomaly space joining the search vectors to the features has two parts: twice the width)
        shape = (vectors.shape[0], vectors.shape[1] * (2 if a is not None and a.embedding_space else 1))
        if a is not None and (a.vectors not in arrays or arrays[a.vectors].shape != shape):
            got = arrays[a.vectors].shape if a.vectors in arrays else "none"
            raise IndexStoreError(f"index folder {path} is inconsistent ({a.vectors}.npy has shape {got}, expected {shape})")
        if index.d != manifest.dim or vectors.shape[1] != manifest.dim:
            raise IndexStoreError(f"index folder {path} is inconsistent (dimension {manifest.dim} in the manifest, {index.d} in {INDEX})")
        store = cls(manifest, index, items, vectors, arrays, path)
        store.folder = folder
        return store

    @property
    def encoder_path(self) -> Path:
        """The folder's copy of its encoder."""
        if self.path is None:
            raise IndexStoreError("the index has not been saved yet")
        return self.folder / self.manifest.encoder.file


def _check_vectors(path: Path, vectors: np.ndarray, manifest: Manifest, items: int, ntotal: int) -> None:
    """Refuse a stored vector file that does not belong to the index (the others agreeing):
    re-ranking and appends read it row by row, so a wrong one would answer silently wrong."""
    if len({manifest.count, items, ntotal}) != 1:
        return  # the general count check names every file
    if vectors.ndim != 2 or vectors.shape != (ntotal, manifest.dim):
        got = f"{vectors.shape[0]} vectors of dimension {vectors.shape[1]}" if vectors.ndim == 2 else f"shape {vectors.shape}"
        raise IndexStoreError(f"{path} does not match the index: it holds {got}, the index {ntotal} of dimension "
                              f"{manifest.dim} (rebuild the index folder)")


def _centroid_info(index: faiss.Index, vectors: np.ndarray) -> CentroidInfo | None:
    """The inverted file's fit, measured on indexed vectors left out of training where possible."""
    cents = ivf.centroids(index)
    if cents is None:
        return None
    rows = ivf.held_out_rows(index, vectors.shape[0])
    return CentroidInfo(nlist=len(cents), train_count=ivf.train_size(index, vectors.shape[0]),
                        distance=round(ivf.centroid_distance(cents, vectors[rows]), 6), count=len(rows))


def _drift_note(info: CentroidInfo | None, index: faiss.Index, vectors: np.ndarray) -> str | None:
    cents = ivf.centroids(index)
    if info is None or cents is None or info.distance <= 0:
        return None
    rows = ivf.sample_rows(vectors.shape[0], ivf.DRIFT_SAMPLE, 0)
    distance = ivf.centroid_distance(cents, vectors[rows])
    ratio = distance / info.distance
    if ratio <= ivf.DRIFT_FACTOR:
        return None
    return (f"the new vectors lie {ratio:.2f} times farther from the index's {info.nlist} centroids than the indexed "
            f"ones did at build time (mean cosine distance {distance:.4f} against {info.distance:.4f}; the note shows "
            f"above {ivf.DRIFT_FACTOR:g}x): the collection has drifted from what the inverted lists were trained on, "
            "and rebuilding the index (without --append) would retrain them for better recall")


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise IndexStoreError(f"{path} not found (the index folder is incomplete)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise IndexStoreError(f"{path} is corrupt ({exc})") from None
