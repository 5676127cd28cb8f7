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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from index import IndexStore
from retrieval.anomaly import DEFAULT_K as ANOMALY_K
from retrieval.anomaly import DEFAULT_PERCENTILE, Calibration, knn_distance
from retrieval.errors import RetrievalError
from simclr.encoder import Encoder
from simclr.errors import SimCLRError
from simclr.images import image_to_tensor, read_image
from simclr.knn import weighted_vote

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
KNN_K = 200
KNN_TEMPERATURE = 0.07


@dataclass
class Hit:
    rank: int
    id: int
    similarity: float
    ref: str
    label: str | None


@dataclass
class Prediction:
    label: str | None
    probabilities: dict[str, float]
    neighbours: int


@dataclass
class AnomalyScore:
    score: float
    percentile: float
    threshold: float
    unusual: bool
    k: int

    @property
    def verdict(self) -> str:
        return "unusual" if self.unusual else "normal"


@dataclass
class Answer:
    """Everything the service says about one query; ``error`` is set when it could not be read."""

    query: str
    hits: list[Hit] = field(default_factory=list)
    prediction: Prediction | None = None
    anomaly: AnomalyScore | None = None
    error: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.anomaly is not None:
            d["anomaly"]["verdict"] = self.anomaly.verdict
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class Options:
    """What to answer and with which parameters."""

    k: int = 10
    classify: bool = False
    knn_k: int = KNN_K
    temperature: float = KNN_TEMPERATURE
    anomaly: bool = False
    anomaly_k: int | None = None
    percentile: float | None = None
    nprobe: int | None = None
    ef_search: int | None = None

    def check(self) -> None:
        for name in ("k", "knn_k"):
            if getattr(self, name) < 1:
                raise RetrievalError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.anomaly_k is not None and self.anomaly_k < 1:
            raise RetrievalError(f"anomaly k must be >= 1, got {self.anomaly_k}")
        if self.temperature <= 0:
            raise RetrievalError(f"temperature must be positive, got {self.temperature}")
        for name in ("nprobe", "ef_search"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RetrievalError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RetrievalError("device cuda was asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RetrievalError(f"unknown device {name!r}; use auto, cpu or cuda") from None


class Service:
    """Loads the encoder and the index once; thread-safe answers for the CLI and the app."""

    def __init__(self, store: IndexStore, encoder: Encoder):
        self.store = store
        self.encoder = encoder
        self._lock = threading.Lock()
        self._calibrations: dict[int, Calibration] = {}
        self._ref_ids: dict[str, int] | None = None
        self._label_cache: np.ndarray | None = None
        saved = store.arrays.get("calibration")
        cal = store.manifest.extra.get("calibration")
        if saved is not None and cal:
            self._calibrations[int(cal["k"])] = Calibration(int(cal["k"]), saved, float(cal.get("percentile", DEFAULT_PERCENTILE)))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, index_dir: str | Path, encoder: str | Path | None = None, force: bool = False, device: str = "auto") -> "Service":
        """Open an index folder with its own encoder, or with ``encoder`` if its checksum matches.

        Raises:
            RetrievalError: the encoder differs from the one the index was built with (both
                checksums named), unless ``force``; or its dimension differs (always).
        """
        store = IndexStore.load(index_dir)
        path = Path(encoder) if encoder is not None else Path(index_dir) / ENCODER_FILE
        enc = Encoder.load(path, pick_device(device))
        check_encoder(store, enc, force)
        return cls(store, enc)

    # ------------------------------------------------------------------ facts
    def facts(self) -> dict[str, Any]:
        m = self.store.manifest
        spec = self.encoder.spec
        return {
            "items": m.count,
            "classes": len(m.classes),
            "index_type": m.factory,
            "dimension": m.dim,
            "sources": m.sources,
            "encoder": f"{spec.arch} ({spec.stem} stem, {spec.image_size}px, {spec.in_channels}ch"
                       f"{', whitened' if self.encoder.whitened else ''})",
            "encoder_sha256": m.encoder_sha256,
            "trained_on": spec.trained_on,
            "created": m.created_at,
            "updated": m.updated_at,
            "path": str(self.store.path),
        }

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

    def embed(self, queries: Sequence[str | Path | bytes | Image.Image]) -> tuple[np.ndarray, list[str | None], list[int | None]]:
        """Vectors (n, d) for the queries, an error for each unreadable one (its row is zero),
        and the item id of each query that names an indexed item."""
        vectors = np.zeros((len(queries), self.encoder.dim), np.float32)
        errors: list[str | None] = [None] * len(queries)
        items: list[int | None] = [None] * len(queries)
        tensors: dict[int, torch.Tensor] = {}
        for i, q in enumerate(queries):
            item = self.resolve_item(q) if isinstance(q, str) else None
            try:
                if item is not None:
                    vectors[i] = self.item_vector(item)
                    items[i] = item
                else:
                    tensors[i] = self._tensor(q)
            except (SimCLRError, RetrievalError) as exc:
                errors[i] = str(exc)
        if tensors:
            rows = list(tensors)
            with self._lock:
                vectors[rows] = self.encoder.embed(torch.stack([tensors[i] for i in rows])).cpu().numpy()
        return vectors, errors, items

    # ------------------------------------------------------------------ answering
    def calibration(self, k: int, percentile: float | None = None) -> Calibration:
        """The calibration for anomaly scores at ``k`` (computed and cached when not stored)."""
        if k not in self._calibrations:
            from retrieval.indexing import calibrate

            self._calibrations[k] = calibrate(self.store, k)
        cal = self._calibrations[k]
        if percentile is not None and percentile != cal.percentile:
            cal = Calibration(cal.k, cal.scores, percentile)
        return cal

    def answer_vectors(
        self, queries: Sequence[str], vectors: np.ndarray, errors: Sequence[str | None], opts: Options,
        items: Sequence[int | None] | None = None,
    ) -> list[Answer]:
        """Answers for embedded queries (one index search for the whole batch).

        A query that is an indexed item (``items``) is left out of its own neighbours, so
        that its label and anomaly score are leave-one-out, as in the calibration.
        """
        opts.check()
        store = self.store
        count = store.manifest.count
        anomaly_k = opts.anomaly_k or self._default_anomaly_k()
        wanted = max(opts.k, opts.knn_k if opts.classify else 0, anomaly_k if opts.anomaly else 0)
        ok = [i for i, e in enumerate(errors) if e is None]
        answers = [Answer(query=str(q), error=e) for q, e in zip(queries, errors)]
        if not ok:
            return answers
        own = np.array([items[i] if items is not None and items[i] is not None else -1 for i in ok])
        with self._lock:
            sims, ids = store.search(vectors[ok], wanted + int((own >= 0).any()), opts.nprobe, opts.ef_search)
        sims, ids = _drop_own(sims, ids, own, wanted)
        count = count - int((own >= 0).any())
        note = f"k={opts.k} is larger than the index ({count} items); answering with all {count}" if opts.k > count else None
        labels = store.items.labels
        classes = store.manifest.classes
        label_ids = self._label_ids()
        cal = self.calibration(anomaly_k, opts.percentile) if opts.anomaly else None
        scores = knn_distance(sims, anomaly_k) if opts.anomaly else None
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
                for r, (s, j) in enumerate(zip(sims[row, : opts.k], ids[row, : opts.k])) if j >= 0
            ]
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
        vectors, errors, items = self.embed(queries)
        names = [q if isinstance(q, str) else str(q) if isinstance(q, Path) else "image" for q in queries]
        return self.answer_vectors(names, vectors, errors, opts, items)

    def ask_stream(self, queries: Iterable[str], opts: Options, batch_size: int = 64, workers: int = 2) -> Iterator[Answer]:
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

    def _finish(self, chunk: list[str], future, opts: Options) -> list[Answer]:  # noqa: ANN001
        vectors, errors, items = future.result()
        return self.answer_vectors(chunk, vectors, errors, opts, items)

    def _label_ids(self) -> np.ndarray:
        if self._label_cache is None or len(self._label_cache) != self.store.manifest.count:
            self._label_cache = self.store.label_ids()
        return self._label_cache

    def _default_anomaly_k(self) -> int:
        cal = self.store.manifest.extra.get("calibration")
        return int(cal["k"]) if cal else ANOMALY_K


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


def _drop_own(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (-1: none) and keep k columns."""
    if not (own >= 0).any():
        return sims[:, :k], ids[:, :k]
    is_own = ids == own[:, None]
    # Rows without their own id among the results lose their last column instead.
    is_own[~is_own.any(1), -1] = True
    keep = ~is_own
    width = ids.shape[1] - 1
    return sims[keep].reshape(-1, width)[:, :k], ids[keep].reshape(-1, width)[:, :k]


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
