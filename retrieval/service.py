"""The service layer: one encoder and one index, answering search, kNN classification and
anomaly scoring for single images or batches. The CLI and the web app both call it.

One embedding pass and one index search per batch serve all three answers: the search asks
for as many neighbours as the largest of the three ``k`` and each answer takes its share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.threads import single_thread_numpy_blas
from index import IndexStore, ann
from index.batch_scan import BatchScan
from index.manifest import DuplicatesInfo
from retrieval.anomaly import DEFAULT_K as ANOMALY_K
from retrieval.anomaly import (
    DEFAULT_PERCENTILE,
    UNCALIBRATED,
    Calibration,
    calibrate,
    drop_own,
    knn_distance,
    mean_distance,
    stored_calibration,
    stored_space,
)
from retrieval.answers import AnomalyScore, Answer, Hit, Prediction
from retrieval.duplicate_threshold import DuplicateThreshold
from retrieval.duplicates import FOLD_DEPTH, fold_hits
from retrieval.errors import RetrievalError
from retrieval.info import IndexFacts, describe
from retrieval.options import DEFAULT_INDEX, Options
from retrieval.pixel_match import stored_thumbnails
from retrieval.queries import Unreadable
from simclr.device import pick_device
from simclr.encoder import Encoder
from simclr.images import image_to_tensor, read_image
from simclr.knn import weighted_vote

log = logging.getLogger(__name__)

# Batches from this many queries, on exhaustive indexes of this many items, are scored in one
# pass over the vectors (index.batch_scan): from 8 queries it beats a FAISS scan per query
# (BENCHMARKS.md, "The JSON API").
BATCH_SCAN_MIN_QUERIES = 8
BATCH_SCAN_MIN_ITEMS = 20_000

__all__ = ["AnomalyScore", "Answer", "Hit", "Options", "Prediction", "Prepared", "QueryVectors", "Service", "check_encoder", "open_index"]


@dataclass
class QueryVectors:
    """Queries embedded for answering: ``vectors`` (n, d) in the search space, ``anomaly`` (n, d)
    in the index's anomaly space (``None`` for indexes without one), an error for each query
    that could not be read (its rows are zero), and the item id of each query naming one."""

    vectors: np.ndarray
    anomaly: np.ndarray | None
    errors: list[str | None]
    items: list[int | None]

    def take(self, rows: Sequence[int]) -> QueryVectors:
        """The queries at ``rows``, in that order."""
        rows = list(rows)
        return QueryVectors(self.vectors[rows], None if self.anomaly is None else self.anomaly[rows],
                            [self.errors[i] for i in rows], [self.items[i] for i in rows])


@dataclass
class Prepared:
    """One query ready to embed: a decoded uint8 image (C, H, W), an indexed item's id, or the
    reason it cannot be answered."""

    tensor: torch.Tensor | None = None
    item: int | None = None
    error: str | None = None


class Service:
    """Loads the encoder and the index once; thread-safe answers for the CLI and the app."""

    def __init__(self, store: IndexStore, encoder: Encoder):
        self.store = store
        self.encoder = encoder
        self._lock = threading.Lock()
        self._calibrations: dict[int, Calibration] = {}
        self._ref_ids: dict[str, int] | None = None
        self._label_cache: np.ndarray | None = None
        self.space = stored_space(store)
        self._anomaly_table = None  # built on first use
        self._scans: dict[str, BatchScan | None] = {}  # built on the first large batch
        self._side = ThreadPoolExecutor(1, thread_name_prefix="anomaly-scan")
        self._build = threading.Lock()  # tables built on first use are built once
        self._duplicate_calibration: DuplicatesInfo | None = None  # measured on first use when not stored
        saved = stored_calibration(store)
        if saved is not None:
            self._calibrations[saved.k] = saved

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, index_dir: str | Path, encoder: str | Path | None = None, force: bool = False, device: str = "auto") -> "Service":
        """Open an index folder with its own encoder, or with ``encoder`` if its checksum matches.

        Raises:
            RetrievalError: the encoder differs from the one the index was built with (both
                checksums named), unless ``force``; or its dimension differs (always).
        """
        store = IndexStore.load(index_dir)
        single_thread_numpy_blas()  # a process that answers queries: see common.threads
        path = Path(encoder) if encoder is not None else store.encoder_path
        enc = Encoder.load(path, pick_device(device))
        check_encoder(store, enc, force)
        return cls(store, enc)

    # ------------------------------------------------------------------ facts
    def facts(self) -> IndexFacts:
        return describe(self.store, self.encoder)

    # ------------------------------------------------------------------ inputs
    def _tensor(self, query: str | Path | bytes | Image.Image) -> torch.Tensor:
        spec = self.encoder.spec
        if isinstance(query, Image.Image):
            return image_to_tensor(query, spec.image_size, spec.in_channels)
        return read_image(query, spec.image_size, spec.in_channels)

    def check_item(self, item_id: int) -> None:
        """Raise a one-line error when ``item_id`` is not in the index."""
        if not 0 <= item_id < self.store.manifest.count:
            raise RetrievalError(f"item id {item_id} is not in the index (ids 0..{self.store.manifest.count - 1})")

    def item_of_ref(self, ref: str) -> int | None:
        """The id of the item with this ref (a file path or ``dataset:split:n``), ``None`` for none."""
        if self._ref_ids is None:
            self._ref_ids = {r: i for i, r in enumerate(self.store.items.refs)}
        return self._ref_ids.get(ref)

    def item_vector(self, item_id: int) -> np.ndarray:
        self.check_item(item_id)
        v = np.asarray(self.store.vectors[item_id], dtype=np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _anomaly_vectors(self) -> np.ndarray | None:
        info = self.store.manifest.anomaly
        return None if info is None else self.store.arrays[info.vectors]

    def anomaly_table(self):  # noqa: ANN201
        """Exact Euclidean search over the gallery's anomaly-space vectors (built once, on first use)."""
        with self._build:
            if self._anomaly_table is None and self.space is not None:
                from index.ann import L2Table

                self._anomaly_table = L2Table(self._anomaly_vectors())
        return self._anomaly_table

    # ------------------------------------------------------------------ searching
    def warm_up(self) -> None:
        """Build now what answering builds on first use (the anomaly table, the batch scans), so
        that a server's first requests do not wait for it."""
        self.anomaly_table()
        for name in ("search", "anomaly"):
            self._batch_scan(name)

    def _batch_scan(self, name: str) -> BatchScan | None:
        """A :class:`index.batch_scan.BatchScan` of the index (``"search"``) or of the anomaly
        space (``"anomaly"``), built on first use: for large exhaustive indexes on a CPU only."""
        with self._build:
            return self._scans[name] if name in self._scans else self._new_scan(name)

    def _new_scan(self, name: str) -> BatchScan | None:
        store = self.store
        big = store.manifest.count >= BATCH_SCAN_MIN_ITEMS and self.encoder.device.type == "cpu"
        scan = None
        if big and name == "search" and ann.is_exhaustive(store.index):
            scan = BatchScan(store.vectors, "ip")
        elif big and name == "anomaly" and self.space is not None:
            scan = BatchScan(self._anomaly_vectors(), "l2")
        self._scans[name] = scan
        return scan

    def _search(self, queries: np.ndarray, k: int, opts: Options) -> tuple[np.ndarray, np.ndarray]:
        """The index's top k of each query: a batch of :data:`BATCH_SCAN_MIN_QUERIES` or more in
        one pass over the vectors where that is faster (same results), else the index's search."""
        scan = self._batch_scan("search") if len(queries) >= BATCH_SCAN_MIN_QUERIES else None
        if scan is None:
            return self.store.search(queries, k, opts.nprobe, opts.ef_search)
        sims, ids, redo = scan.search(queries, k)
        if redo.any():  # candidates not proven complete: the index answers those queries
            sims[redo], ids[redo] = self.store.search(queries[redo], k, opts.nprobe, opts.ef_search)
        return sims, ids

    def _anomaly_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (ascending) and ids of each query's k nearest gallery items in the
        anomaly space; batched as :meth:`_search`."""
        scan = self._batch_scan("anomaly") if len(queries) >= BATCH_SCAN_MIN_QUERIES else None
        if scan is None:
            return self.anomaly_table().search(queries, k)
        dists, ids, redo = scan.search(queries, k)
        if redo.any():
            dists[redo], ids[redo] = self.anomaly_table().search(queries[redo], k)
        return dists, ids

    def resolve_item(self, query: str) -> int | None:
        """The item id a query names: ``id:N``, a bare N, or a data-set ref such as
        ``fashion-mnist:test:5``. Existing files are always read as images."""
        if query.startswith("id:") and query[3:].isdigit():
            return int(query[3:])
        if Path(query).exists():
            return None
        if query.isdigit():
            return int(query)
        return self.item_of_ref(query)

    def prepare(self, query: str | Path | bytes | Image.Image | Unreadable) -> Prepared:
        """A query made ready for :meth:`embed_prepared`: an image decoded to the encoder's size,
        the item a query names, or why it cannot be answered (never raises for the query's sake)."""
        if isinstance(query, Unreadable):
            return Prepared(error=query.reason)
        try:
            item = self.resolve_item(query) if isinstance(query, str) else None
            if item is not None:
                self.check_item(item)  # an unknown id is the query's error
                return Prepared(item=item)
            return Prepared(tensor=self._tensor(query))
        except UserError as exc:
            return Prepared(error=str(exc))

    def embed(self, queries: Sequence[str | Path | bytes | Image.Image | Unreadable]) -> QueryVectors:
        """The queries' vectors in both spaces (one backbone pass), errors and item ids."""
        return self.embed_prepared([self.prepare(q) for q in queries])

    def embed_prepared(self, prepared: Sequence[Prepared]) -> QueryVectors:
        """Prepared queries' vectors in both spaces: one backbone pass for all their images."""
        n, dim = len(prepared), self.encoder.dim
        vectors = np.zeros((n, dim), np.float32)
        anomaly = np.zeros((n, self.space.width(dim)), np.float32) if self.space is not None else None
        errors: list[str | None] = [p.error for p in prepared]
        items: list[int | None] = [p.item for p in prepared]
        for i, item in enumerate(items):
            if item is not None:
                vectors[i] = self.item_vector(item)
                if anomaly is not None:
                    anomaly[i] = self._anomaly_vectors()[item]
        rows = [i for i, p in enumerate(prepared) if p.tensor is not None]
        if rows:
            with self._lock:
                feats = self.encoder.features(torch.stack([prepared[i].tensor for i in rows]))
                vectors[rows] = self.encoder.from_features(feats).cpu().numpy()
            if anomaly is not None:
                anomaly[rows] = self.space.map(feats.cpu().numpy(), vectors[rows])
        return QueryVectors(vectors, anomaly, errors, items)

    # ------------------------------------------------------------------ answering
    def calibration(self, k: int, percentile: float | None = None) -> Calibration:
        """The calibration for anomaly scores at ``k`` (computed and cached when not stored)."""
        if k not in self._calibrations:
            table = self.anomaly_table()
            self._calibrations[k] = calibrate(self.store, k, self._default_percentile(), table, self._anomaly_vectors())
        cal = self._calibrations[k]
        if percentile is not None and percentile != cal.percentile:
            cal = Calibration(cal.k, cal.scores, percentile)
        return cal

    def duplicate_threshold(self, similarity: float | None = None, pixels: float | None = None) -> DuplicateThreshold:
        """The near-duplicate thresholds: those given, the rest the index's own (measured once,
        with this service's encoder, when the index has none stored)."""
        from retrieval.duplicate_threshold import resolve_threshold

        return resolve_threshold(self.store, similarity, pixels, measure=self._measured_duplicates)

    def _measured_duplicates(self) -> DuplicatesInfo:
        with self._lock:
            if self._duplicate_calibration is None:
                from retrieval.duplicate_threshold import calibrate_threshold

                self._duplicate_calibration = calibrate_threshold(self.store, self.encoder).info()
        return self._duplicate_calibration

    def answer_vectors(self, queries: Sequence[str], q: QueryVectors, opts: Options) -> list[Answer]:
        """Answers for embedded queries (one index search for the whole batch, and one in the
        anomaly space when scores are asked for).

        A query that is an indexed item (``q.items``) is left out of its own neighbours, so
        that its label and anomaly score are leave-one-out, as in the calibration.
        """
        vectors, errors, items = q.vectors, q.errors, q.items
        opts.check()
        store = self.store
        count = store.manifest.count
        anomaly_k = opts.anomaly_k or self._default_anomaly_k()
        legacy = self.space is None  # cosine anomaly scores on the search results
        fold_at = None
        depth = opts.k
        if opts.exclude_duplicates:
            fold_at = self.duplicate_threshold(opts.duplicate_threshold)
            depth = opts.k * FOLD_DEPTH
        wanted = max(depth, opts.knn_k if opts.classify else 0, anomaly_k if opts.anomaly and legacy else 0)
        ok = [i for i, e in enumerate(errors) if e is None]
        answers = [Answer(query=str(q), error=e) for q, e in zip(queries, errors)]
        if not ok:
            return answers
        own = np.array([items[i] if items[i] is not None else -1 for i in ok])
        in_anomaly_space = None
        if opts.anomaly and not legacy:
            args = (q.anomaly[ok], anomaly_k + int((own >= 0).any()))
            # FAISS scans for one query on one thread: the two scans of a lone query run side by side.
            in_anomaly_space = self._side.submit(self._anomaly_search, *args) if len(ok) == 1 else args
        with self._lock:
            sims, ids = self._search(vectors[ok], wanted + int((own >= 0).any()), opts)
        sims, ids = drop_own(sims, ids, own, wanted)
        count = count - int((own >= 0).any())
        note = f"k={opts.k} is larger than the index ({count} items); answering with all {count}" if opts.k > count else None
        labels = store.items.labels
        classes = store.manifest.classes
        label_ids = self._label_ids()
        cal = self.calibration(anomaly_k, opts.percentile) if opts.anomaly else None
        scores = None
        if opts.anomaly and legacy:
            scores = knn_distance(sims, anomaly_k)
        elif opts.anomaly:
            if isinstance(in_anomaly_space, Future):
                dists, nn = in_anomaly_space.result()
            else:
                with self._lock:
                    dists, nn = self._anomaly_search(*in_anomaly_space)
            dists, _ = drop_own(dists, nn, own, anomaly_k)
            scores = mean_distance(dists, anomaly_k)
        probs = None
        if opts.classify and classes:
            kk = min(opts.knn_k, ids.shape[1])
            nb = np.where(ids[:, :kk] >= 0, label_ids[np.maximum(ids[:, :kk], 0)], -1)
            probs = weighted_vote(torch.from_numpy(sims[:, :kk].copy()), torch.from_numpy(nb), len(classes), opts.temperature).numpy()
        for row, i in enumerate(ok):
            a = answers[i]
            a.note = note
            a.hits = [
                Hit(rank=r + 1, id=int(j), similarity=float(s), ref=store.items.refs[j], label=labels[j])
                for r, (s, j) in enumerate(zip(sims[row, :depth], ids[row, :depth])) if j >= 0
            ]
            if fold_at is not None:
                a.hits = fold_hits(a.hits, store.vectors, store.items.hashes, fold_at.similarity,
                                   stored_thumbnails(store) if fold_at.pixels is not None else None, fold_at.pixels)[: opts.k]
            if probs is not None:
                p = probs[row]
                a.prediction = Prediction(
                    label=classes[int(p.argmax())], neighbours=min(opts.knn_k, count),
                    probabilities={c: float(v) for c, v in zip(classes, p)},
                )
            elif opts.classify:
                a.prediction = Prediction(label=None, probabilities={}, neighbours=0)
                a.note = "the index has no labels, so nothing can be classified"
            if scores is not None and cal is not None:
                a.anomaly = cal.score(float(scores[row]))
                if not cal.calibrated:
                    a.note = "; ".join(filter(None, [a.note, "no anomaly verdict: " + UNCALIBRATED.format(count=store.manifest.count)]))
        return answers

    def ask(self, queries: Sequence[str | Path | bytes | Image.Image], opts: Options) -> list[Answer]:
        """Answer a batch of queries: files, item ids (``id:N``), raw bytes or PIL images."""
        names = [q if isinstance(q, str) else str(q) if isinstance(q, (Path, Unreadable)) else "image" for q in queries]
        return self.answer_vectors(names, self.embed(queries), opts)

    def ask_stream(self, queries: Iterable[str | Unreadable], opts: Options, batch_size: int = 64, workers: int = 2) -> Iterator[Answer]:
        """Answers as they are ready, decoding the next batch while this one is searched.

        Memory stays flat however many queries there are.
        """
        pool = ThreadPoolExecutor(workers)
        try:
            pending = None
            for chunk in _chunks(queries, batch_size):
                future = pool.submit(self.embed, chunk)
                if pending is not None:
                    yield from self._finish(*pending, opts)
                pending = (chunk, future)
            if pending is not None:
                yield from self._finish(*pending, opts)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self, chunk: list[str | Unreadable], future, opts: Options) -> list[Answer]:  # noqa: ANN001
        return self.answer_vectors([str(q) for q in chunk], future.result(), opts)

    def _label_ids(self) -> np.ndarray:
        if self._label_cache is None or len(self._label_cache) != self.store.manifest.count:
            self._label_cache = self.store.label_ids()
        return self._label_cache

    def _default_anomaly_k(self) -> int:
        cal = self.store.manifest.calibration
        return cal.k if cal is not None else ANOMALY_K

    def _default_percentile(self) -> float:
        cal = self.store.manifest.calibration
        return cal.percentile if cal is not None else DEFAULT_PERCENTILE


def open_index(index_dir: str | Path | None, device: str = "auto") -> tuple[Path, Service | None, str]:
    """The service for ``index_dir``, or for the demo's index when it is None: ``(path, service,
    "")``. Only the demo's index may be missing or unreadable: then ``(path, None, why)``, so that
    an entry point can show how to build it; a named index that cannot be opened raises."""
    path = Path(index_dir) if index_dir is not None else DEFAULT_INDEX
    try:
        return path, Service.open(path, device=device), ""
    except UserError as exc:
        if index_dir is not None:
            raise
        return path, None, str(exc)


def check_encoder(store: IndexStore, encoder: Encoder, force: bool = False) -> None:
    m = store.manifest
    if encoder.dim != m.dim:
        raise RetrievalError(
            f"encoder {encoder.path} makes {encoder.dim}-d embeddings but index {store.path} holds {m.dim}-d vectors"
        )
    if encoder.checksum != m.encoder_sha256 and not force:
        raise RetrievalError(
            f"index {store.path} was built with encoder sha256 {m.encoder_sha256[:16]}…, but "
            f"{encoder.path} has sha256 {encoder.checksum[:16]}…; pass --force to use it anyway"
        )


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
