"""Evaluating an encoder: weighted kNN, a linear probe, and the one-class anomaly protocol.

Everything here runs on torch alone (no FAISS), so that it also runs on machines where only
PyTorch is installed; exact cosine search in torch is what FAISS's Flat index computes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.anomaly import DEFAULT_K as ANOMALY_K
from retrieval.anomaly import auroc, knn_distance
from retrieval.embed import embed_collection, open_collection
from retrieval.errors import RetrievalError
from simclr.device import pick_device
from simclr.encoder import Encoder
from simclr.knn import (
    KNN_K,
    KNN_TEMPERATURE,
    TIE_MARGIN,
    KNNResult,
    canonical_topk,
    knn_evaluate,
    score_predictions,
    topk_neighbours,
    weighted_vote,
)

if TYPE_CHECKING:  # FAISS is imported only where an index is used: training machines may lack it
    from index import IndexStore

log = logging.getLogger(__name__)


@dataclass
class LabelledFeatures:
    vectors: torch.Tensor  # (n, d) unit rows
    labels: torch.Tensor  # (n,) int64 into classes, -1 unknown
    classes: list[str]
    source: str


def embed_labelled(encoder: Encoder, source: str, classes: list[str] | None = None, batch_size: int = 256, progress: bool = True) -> LabelledFeatures:
    """Embed a labelled source; labels are mapped onto ``classes`` (or the source's own)."""
    coll = open_collection(source)
    emb = embed_collection(encoder, coll, batch_size=batch_size, progress=progress)
    names = classes if classes is not None else sorted({lbl for lbl in emb.items.labels if lbl is not None})
    if not names:
        raise RetrievalError(f"{source} has no labels (a folder needs one subfolder per class)")
    labels = torch.from_numpy(emb.items.label_ids(names))
    return LabelledFeatures(torch.from_numpy(emb.vectors), labels, names, coll.source)


def features_from_store(store: IndexStore) -> LabelledFeatures:
    """The labelled vectors of a loaded index (exact float32 copies from a Flat index)."""
    if not store.manifest.classes:
        raise RetrievalError(f"index {store.path} has no labels")
    return LabelledFeatures(_unit(store.exact_vectors()), torch.from_numpy(store.label_ids()), store.manifest.classes, str(store.path))


def features_from_index(path: str | Path) -> LabelledFeatures:
    """The labelled vectors of an index folder."""
    from index import IndexStore

    return features_from_store(IndexStore.load(path))


def _unit(vectors: np.ndarray) -> torch.Tensor:
    """Stored embeddings as unit vectors: untouched when they are (a Flat index's exact copies, so
    that they equal freshly computed ones bit for bit), renormalised when stored at lower precision."""
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    return v if ((v.norm(dim=1) - 1).abs() < 1e-5).all() else F.normalize(v, dim=1)


def _query_labels(queries: LabelledFeatures, classes: list[str], k: int, temperature: float) -> torch.Tensor:
    """The queries' labels as ids into the gallery's ``classes`` (-1: unlabelled), after checking
    the kNN settings and that the queries have no class the gallery lacks."""
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise RetrievalError(f"temperature must be positive, got {temperature}")
    remap = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(queries.classes) - set(classes))
    if unknown:
        raise RetrievalError(f"query classes not in the gallery: {', '.join(unknown[:5])}")
    q_labels = torch.tensor([remap[queries.classes[i]] if i >= 0 else -1 for i in queries.labels.tolist()])
    if not (q_labels >= 0).any():
        raise RetrievalError(f"{queries.source} has no labelled items")
    return q_labels


def knn_eval_index(queries: LabelledFeatures, store: IndexStore, gallery: LabelledFeatures, k: int = KNN_K,
                   temperature: float = KNN_TEMPERATURE) -> KNNResult:
    """Weighted kNN of labelled queries through a gallery index's own FAISS search; ``gallery`` is
    :func:`features_from_store` of that index."""
    q_labels = _query_labels(queries, gallery.classes, k, temperature)
    keep = q_labels >= 0
    q = queries.vectors[keep]
    _, ids = store.search(q.numpy(), k + TIE_MARGIN)
    # The same float64 re-ranking of the candidates as knn-eval's torch path: the same neighbours.
    sims, idx = canonical_topk(q, gallery.vectors, torch.from_numpy(ids), k)
    neighbour_labels = torch.where(idx >= 0, gallery.labels[idx.clamp(min=0)], -1)
    probs = weighted_vote(sims, neighbour_labels, len(gallery.classes), temperature)
    return score_predictions(probs, q_labels[keep], len(gallery.classes))


def knn_eval(queries: LabelledFeatures, gallery: LabelledFeatures, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> KNNResult:
    """Weighted-kNN accuracy of labelled queries against a labelled gallery (same class names)."""
    q_labels = _query_labels(queries, gallery.classes, k, temperature)
    keep = q_labels >= 0
    g_keep = gallery.labels >= 0
    return knn_evaluate(queries.vectors[keep], q_labels[keep], gallery.vectors[g_keep], gallery.labels[g_keep],
                        len(gallery.classes), k, temperature)


def linear_probe(train: LabelledFeatures, test: LabelledFeatures, weight_decay: float = 1e-4, steps: int = 200) -> float:
    """Top-1 of a linear classifier trained on frozen features (SimCLR's linear evaluation,
    without augmentation): standardised features, full-batch L-BFGS on cross-entropy."""
    keep = train.labels >= 0
    x, y = train.vectors[keep].float(), train.labels[keep]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    c = len(train.classes)
    w = torch.zeros(x.shape[1], c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    t_keep = test.labels >= 0
    xt = (test.vectors[t_keep].float() - mean) / std
    with torch.no_grad():
        pred = (xt @ w + b).argmax(1)
    return float((pred == test.labels[t_keep]).float().mean())


@dataclass
class AnomalyEval:
    k: int
    per_class: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_class.values())))

    def to_dict(self) -> dict:
        return {"k": self.k, "mean_auroc": self.mean, "per_class": self.per_class}

    def lines(self) -> list[str]:
        out = [f"one-class kNN-distance AUROC (k={self.k})"]
        out += [f"  {name:<20} {100 * value:6.2f}%" for name, value in self.per_class.items()]
        out.append(f"mean {100 * self.mean:.2f}%")
        return out


def one_class_eval(train: LabelledFeatures, test: LabelledFeatures, k: int = ANOMALY_K) -> AnomalyEval:
    """The one-class protocol: for each class c the gallery is the training items of c, the
    queries are all test items, and the anomalies are the test items of other classes.
    Scores are mean cosine distances to the k nearest gallery items; AUROC per class."""
    result = AnomalyEval(k)
    for c, name in enumerate(train.classes):
        gallery = train.vectors[train.labels == c]
        if gallery.shape[0] == 0:
            continue
        sims, _ = topk_neighbours(test.vectors, gallery, k)
        scores = knn_distance(sims.numpy(), k)
        result.per_class[name] = auroc(scores, (test.labels != c).numpy())
    if not result.per_class:
        raise RetrievalError("no class has training items")
    return result


@dataclass
class KnnReport:
    """What ``retrieval knn-eval`` reports."""

    k: int
    temperature: float
    top1: float
    top5: float
    per_class: dict[str, float]
    queries: int
    linear_probe_top1: float | None = None
    confusion_png: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def lines(self) -> list[str]:
        out = [f"weighted kNN (k={self.k}, T={self.temperature}) on {self.queries} queries",
               f"top-1 {100 * self.top1:.2f}%   top-5 {100 * self.top5:.2f}%"]
        out += [f"  {name:<20} {100 * acc:6.2f}%" for name, acc in self.per_class.items()]
        if self.linear_probe_top1 is not None:
            out.append(f"linear probe top-1 {100 * self.linear_probe_top1:.2f}%")
        if self.confusion_png is not None:
            out.append(f"confusion matrix: {self.confusion_png}")
        return out


def knn_report(encoder: str | Path | None = None, train: str = "fashion-mnist:train", test: str = "fashion-mnist:test",
               gallery_index: str | Path | None = None, query_index: str | Path | None = None, k: int = KNN_K,
               temperature: float = KNN_TEMPERATURE, probe: bool = False, confusion: str | Path | None = None,
               device: str = "auto", progress: bool = True) -> KnnReport:
    """Weighted kNN of a labelled test split against a labelled train split: embedded with
    ``encoder``, or read from two index folders (searched through the gallery's own index)."""
    if (gallery_index is None) != (query_index is None):
        raise RetrievalError("--gallery-index and --query-index go together")
    if gallery_index is not None:
        from index import IndexStore

        store = IndexStore.load(gallery_index)
        gallery, queries = features_from_store(store), features_from_index(query_index)
        result = knn_eval_index(queries, store, gallery, k, temperature)
    else:
        if encoder is None:
            raise RetrievalError("give --encoder (or --gallery-index and --query-index)")
        enc = Encoder.load(encoder, pick_device(device))
        gallery = embed_labelled(enc, train, progress=progress)
        queries = embed_labelled(enc, test, classes=gallery.classes, progress=progress)
        result = knn_eval(queries, gallery, k, temperature)
    report = KnnReport(k, temperature, result.top1, result.top5, dict(zip(gallery.classes, result.per_class)),
                       int(result.predictions.numel()))
    if probe:
        report.linear_probe_top1 = linear_probe(gallery, queries)
    if confusion is not None:
        save_confusion_png(result.confusion, gallery.classes, confusion, f"kNN top-1 {100 * result.top1:.2f}%")
        report.confusion_png = str(confusion)
    return report


def save_confusion_png(confusion: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> None:
    """A confusion-matrix heat map (rows: true class, columns: predicted), row-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.numpy().astype(np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
