"""The service layer: one encoder and one index, answering search, kNN classification and
anomaly scoring for single images or batches. The CLI and the web app both call it.

One embedding pass and one index search per batch serve all three answers: the search asks
for as many neighbours as the largest of the three ``k`` and each answer takes its share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from index import IndexStore
from retrieval.anomaly import DEFAULT_K as ANOMALY_K
from retrieval.anomaly import (
    DEFAULT_PERCENTILE,
    Calibration,
    calibrate,
    drop_own,
    knn_distance,
    mean_distance,
    stored_calibration,
    stored_space,
)
from retrieval.answers import AnomalyScore, Answer, Hit, Prediction
from retrieval.duplicates import FOLD_DEPTH, fold_hits
from retrieval.errors import RetrievalError
from retrieval.info import IndexFacts, describe
from retrieval.options import Options
from retrieval.queries import Unreadable
from simclr.device import pick_device
from simclr.encoder import Encoder
from simclr.images import image_to_tensor, read_image
from simclr.knn import weighted_vote

log = logging.getLogger(__name__)

__all__ = ["AnomalyScore", "Answer", "Hit", "Options", "Prediction", "QueryVectors", "Service", "check_encoder"]


@dataclass
class QueryVectors:
    """Queries embedded for answering: ``vectors`` (n, d) in the search space, ``anomaly`` (n, d)
    in the index's anomaly space (``None`` for indexes without one), an error for each query
    that could not be read (its rows are zero), and the item id of each query naming one."""

    vectors: np.ndarray
    anomaly: np.ndarray | None
    errors: list[str | None]
    items: list[int | None]


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
        self._duplicate_threshold: tuple[float, str] | None = None  # measured on first use when not stored
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

    def item_vector(self, item_id: int) -> np.ndarray:
        if not 0 <= item_id < self.store.manifest.count:
            raise RetrievalError(f"item id {item_id} is not in the index (ids 0..{self.store.manifest.count - 1})")
        v = np.asarray(self.store.vectors[item_id], dtype=np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _anomaly_vectors(self) -> np.ndarray | None:
        info = self.store.manifest.anomaly
        return None if info is None else self.store.arrays[info.vectors]

    def anomaly_table(self):  # noqa: ANN201
        """Exact Euclidean search over the gallery's anomaly-space vectors (built once, on first use)."""
        if self._anomaly_table is None and self.space is not None:
            from index.ann import L2Table

            self._anomaly_table = L2Table(self._anomaly_vectors())
        return self._anomaly_table

    def resolve_item(self, query: str) -> int | None:
        """The item id a query names: ``id:N``, a bare N, or a data-set ref such as
        ``fashion-mnist:test:5``. Existing files are always read as images."""
        if query.startswith("id:") and query[3:].isdigit():
            return int(query[3:])
        if Path(query).exists():
            return None
        if query.isdigit():
            return int(query)
        if self._ref_ids is None:
            self._ref_ids = {ref: i for i, ref in enumerate(self.store.items.refs)}
        return self._ref_ids.get(query)

    def embed(self, queries: Sequence[str | Path | bytes | Image.Image | Unreadable]) -> QueryVectors:
        """The queries' vectors in both spaces (one backbone pass), errors and item ids."""
        n, dim = len(queries), self.encoder.dim
        vectors = np.zeros((n, dim), np.float32)
        anomaly = np.zeros((n, dim), np.float32) if self.space is not None else None
        errors: list[str | None] = [None] * n
        items: list[int | None] = [None] * n
        tensors: dict[int, torch.Tensor] = {}
        for i, q in enumerate(queries):
            if isinstance(q, Unreadable):
                errors[i] = q.reason
                continue
            item = self.resolve_item(q) if isinstance(q, str) else None
            try:
                if item is not None:
                    vectors[i] = self.item_vector(item)
                    if anomaly is not None:
                        anomaly[i] = self._anomaly_vectors()[item]
                    items[i] = item
                else:
                    tensors[i] = self._tensor(q)
            except UserError as exc:
                errors[i] = str(exc)
        if tensors:
            rows = list(tensors)
            with self._lock:
                feats = self.encoder.features(torch.stack([tensors[i] for i in rows]))
                vectors[rows] = self.encoder.from_features(feats).cpu().numpy()
            if anomaly is not None:
                anomaly[rows] = self.space.transform(feats.cpu().numpy())
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

    def duplicate_threshold(self) -> tuple[float, str]:
        """The index's near-duplicate threshold and where it comes from, in words (measured once,
        with this service's encoder, when the index has none stored)."""
        if self._duplicate_threshold is None:
            from retrieval.duplicate_threshold import calibrate_threshold, measured, resolve_threshold

            if self.store.manifest.duplicates is not None:
                self._duplicate_threshold = resolve_threshold(self.store, None)
            else:
                with self._lock:
                    self._duplicate_threshold = measured(calibrate_threshold(self.store, self.encoder))
        return self._duplicate_threshold

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
            fold_at = opts.duplicate_threshold if opts.duplicate_threshold is not None else self.duplicate_threshold()[0]
            depth = opts.k * FOLD_DEPTH
        wanted = max(depth, opts.knn_k if opts.classify else 0, anomaly_k if opts.anomaly and legacy else 0)
        ok = [i for i, e in enumerate(errors) if e is None]
        answers = [Answer(query=str(q), error=e) for q, e in zip(queries, errors)]
        if not ok:
            return answers
        own = np.array([items[i] if items[i] is not None else -1 for i in ok])
        with self._lock:
            sims, ids = store.search(vectors[ok], wanted + int((own >= 0).any()), opts.nprobe, opts.ef_search)
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
            with self._lock:
                dists, nn = self.anomaly_table().search(q.anomaly[ok], anomaly_k + int((own >= 0).any()))
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
                a.hits = fold_hits(a.hits, store.vectors, store.items.hashes, fold_at)[: opts.k]
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
                s = float(scores[row])
                a.anomaly = AnomalyScore(
                    score=s, percentile=float(cal.percentile_of(np.array([s]))[0]),
                    threshold=cal.threshold, unusual=s > cal.threshold, k=anomaly_k,
                )
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
