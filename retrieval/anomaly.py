"""kNN-distance anomaly scoring (as in Bergman et al. 2020, "Deep nearest neighbor anomaly
detection"): an item is as unusual as it is far from its k nearest normal items.

Scores are measured in the index's *anomaly space* (:class:`AnomalySpace`), fit on the
gallery itself when the index is built: the backbone's raw pooled features, centred on the
gallery's mean and whitened by the gallery's own covariance (a Mahalanobis metric of what
is normal here), and **not** L2-normalised. The score is the mean Euclidean distance to the k
nearest gallery items in that space.

Why not the search space (the encoder's whitened, normalised embedding, compared by cosine):
on a collection of one kind of thing the encoder's whitening is fit on that kind alone, and
normalising after centring on its mean throws away the distance from the mean, which is the
signal (Fashion-MNIST, one class as the collection: mean AUROC 80% against 96% here;
BENCHMARKS.md, "Anomaly scores"). A gallery with fewer than 2 items a dimension whitens the
directions it can estimate (its n / 2 leading ones) and scales the rest like the last of them;
one under 100 items (and 2 a dimension) uses the raw features as they are (the ``plain``
space). Indexes built before anomaly spaces existed keep the old score, the mean cosine
distance on the search vectors (:func:`knn_distance`).

When the gallery is one kind of a broader collection the encoder was trained on (one product of
a range), the encoder's own whitening, fit on that collection, knows what sets the kinds apart;
a whitening fit on the gallery alone cannot. Then (``retrieval index --anomaly-space auto``, the
default, by where the gallery lies in that whitening's units: :func:`place_gallery`) the search
embedding (that whitening, normalised), whitened on the gallery the same way, joins the raw
features' part (:func:`fit_space`); ``joined`` joins it always, ``features`` never.

A calibration, the leave-one-out scores of gallery items, turns a score into a percentile
among normal items and a verdict at a threshold percentile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.answers import AnomalyScore
from retrieval.errors import RetrievalError

if TYPE_CHECKING:  # FAISS is imported only where an index is used
    from index import IndexStore
    from index.ann import L2Table

DEFAULT_K = 5
DEFAULT_PERCENTILE = 99.0
CALIBRATION_SAMPLE = 10_000
# Added to each eigenvalue of the gallery covariance, as a fraction of the largest: small
# directions are whitened less. 1e-4 measured best for weak encoders (strict protocol, untrained
# network) and within 0.03 of the best for a trained one (BENCHMARKS.md, "Anomaly scores").
DEFAULT_SHRINKAGE = 1e-4
# The anomaly space whitens the n / 2 leading directions of the gallery's covariance and scales
# the rest like the last of those (every direction from 2 items a dimension): a gallery of 2,000
# photos of one part, 1,792-d features, scores defects at 96.7% AUROC this way, 90.8% on raw
# features (BENCHMARKS.md, "An inspection line"); 100 parts, 87.2% against 81.1%. Galleries
# under 100 items (and under 2 a dimension) keep the raw features: the plain space.
MIN_ITEMS_PER_DIM = 2
MIN_WHITEN_ITEMS = 100
PLAIN = "plain"
WHITENED = "gallery-whitened"
# What an anomaly space takes in: the backbone's raw features, or (JOINT) those beside the
# search embedding (the encoder's whitened, normalised vector), each part whitened on the gallery.
# JOINT when the gallery is one part of a broader collection the encoder's whitening was fit on
# (Placement.part): that whitening holds what sets the gallery's kind apart from the collection's
# other kinds, which one fit on the gallery cannot see. Two conditions, in that whitening's units:
# - the gallery's mean lies BROADER_OFFSET times farther from the whitening's centre than
#   sampling alone would put it (a sample of the collection: 0.7-1.0; one class of ten 28-102);
# - and the gallery reaches no farther from that centre, along the direction its mean moved, than
#   a part of the collection can: a part making up a share p of it has a second moment of at most
#   1 / p along any direction (the law of total variance), so PART_REACH = 20 admits parts down to
#   5%. One class of ten reached 4.0-8.8, one line of a range of three 1.5-1.7; a line's parts under
#   0.9 times the light its encoder trained under reached 27, at 0.8 times 224: shifted off the
#   collection rather than a part of it, and there the joined space lost 0.4-1.4 points of defect
#   AUROC to the raw features' alone.
# Joined where both held: an encoder trained on all of Fashion-MNIST, one class as the gallery,
# mean AUROC 97.2 against 96.2 on raw features; three inspection lines, one line's good parts as
# the gallery, its defects as anomalies: 99.5, 99.2, 100.0 against 99.1, 98.8, 100.0, with the
# range's whitening fit on its files read as the index reads them (BENCHMARKS.md, "The reach").
FEATURES = "features"
JOINT = "features+embedding"
BROADER_OFFSET = 3.0
PART_REACH = 20.0
SPACE_MODES = ("auto", "features", "joined")  # joined where the gallery is a part (the default); never; always
DEFAULT_SPACE_MODE = "auto"


@dataclass
class AnomalySpace:
    """A linear map of raw features (n, d) into the space anomaly scores are measured in:
    ``(f - mean) @ matrix`` (``gallery-whitened``), or ``f`` itself (``plain``)."""

    kind: str
    mean: np.ndarray | None = None  # (d,)
    matrix: np.ndarray | None = None  # (d, d)
    shrinkage: float | None = None
    fit_count: int = 0
    placement: "Placement | None" = None  # the gallery in the encoder whitening's units, when it has one
    mode: str | None = None  # the --anomaly-space it was fit with (None: an index built before it was recorded)
    embedding_part: "AnomalySpace | None" = None  # JOINT: the space of the search embedding

    @classmethod
    def fit(cls, features: np.ndarray, shrinkage: float = DEFAULT_SHRINKAGE) -> "AnomalySpace":
        """Fit on a gallery's vectors (n, d): the whitening of its n / 2 leading directions
        (all of them from 2 items a dimension); the plain space below
        ``min(MIN_ITEMS_PER_DIM * d, MIN_WHITEN_ITEMS)`` items."""
        n, dim = features.shape
        if not shrinkage > 0:
            raise RetrievalError(f"anomaly whitening shrinkage must be positive, got {shrinkage}")
        import torch  # the encoder's PCA whitening, fit on the gallery (torch only when fitting)

        from simclr.errors import SimCLRError
        from simclr.whitening import can_whiten, fit_whitening

        if not can_whiten(n, dim, MIN_ITEMS_PER_DIM, MIN_WHITEN_ITEMS):
            return cls(PLAIN, fit_count=n)

        try:
            mean, matrix = fit_whitening(torch.from_numpy(np.asarray(features, dtype=np.float32)), shrinkage,
                                         images_per_direction=MIN_ITEMS_PER_DIM)
        except SimCLRError:  # every feature the same: nothing to whiten
            return cls(PLAIN, fit_count=n)
        return cls(WHITENED, mean.numpy(), matrix.numpy(), shrinkage, n)

    @property
    def input(self) -> str:
        """What it maps: raw features (FEATURES), or those and the search embedding (JOINT)."""
        return JOINT if self.embedding_part is not None else FEATURES

    def map(self, features: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """The same items' raw features (n, d) and search embeddings (n, d) -> their vectors in
        this space (n, :meth:`width`) float32 (the embeddings are read only by a JOINT space)."""
        own = self.transform(features)
        if self.embedding_part is None:
            return own
        return np.hstack([own, self.embedding_part.transform(embeddings)])

    def width(self, dim: int) -> int:
        """The dimension of the space's vectors for ``dim``-d features."""
        return dim * (2 if self.embedding_part is not None else 1)

    def transform(self, features: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Raw features (n, d) -> this part's vectors (n, d) float32 (:meth:`map` maps both parts)."""
        if self.kind == PLAIN:
            return np.asarray(features, dtype=np.float32)
        out = np.empty(features.shape, np.float32)
        for start in range(0, features.shape[0], batch):
            out[start : start + batch] = (np.asarray(features[start : start + batch], np.float32) - self.mean) @ self.matrix
        return out

    def describe(self) -> str:
        what = "raw features beside the search embedding" if self.input == JOINT else "raw features"
        why = "" if self.placement is None else "; " + self.placement.describe()
        if self.mode in ("features", "joined"):
            why += f"; the space as --anomaly-space {self.mode} asks"
        if self.kind == PLAIN:
            return (f"mean Euclidean distance on {what} (plain: the {self.fit_count} gallery items were too few "
                    f"to fit a whitening){why}")
        from simclr.whitening import trusted_directions

        dim = self.matrix.shape[0]
        trusted = trusted_directions(self.fit_count, dim, MIN_ITEMS_PER_DIM)
        part = f", its {trusted} leading directions of {dim}" if trusted < dim else ""
        return (f"mean Euclidean distance on {what}, whitened on the {self.fit_count} gallery items{part} "
                f"(shrinkage {self.shrinkage:g}){why}")


@dataclass(frozen=True)
class EncoderWhitening:
    """The encoder's own whitening, ``(f - mean) @ matrix``, fit on ``count`` images of its training collection."""

    mean: np.ndarray
    matrix: np.ndarray
    count: int

    @classmethod
    def of(cls, encoder) -> "EncoderWhitening | None":
        """An :class:`simclr.encoder.Encoder`'s whitening; ``None`` when it has none."""
        if not encoder.whitened:
            return None
        return cls(encoder.white_mean.double().cpu().numpy(), encoder.white_matrix.double().cpu().numpy(),
                   encoder.whitening_fit_count())

    def embed(self, features: np.ndarray) -> np.ndarray:
        """The search embedding of raw features (n, d): whitened, L2-normalised (as the encoder embeds)."""
        w = (np.asarray(features, np.float64) - self.mean) @ self.matrix
        return (w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def check_space_mode(mode: str, whitened: bool = True) -> None:
    """Refuse, in one line, an ``--anomaly-space`` that is not one of :data:`SPACE_MODES`, or
    ``joined`` for an encoder without a whitening (``whitened``)."""
    if mode not in SPACE_MODES:
        raise RetrievalError(f"unknown anomaly space {mode!r}; known: {', '.join(SPACE_MODES)}")
    if mode == "joined" and not whitened:
        raise RetrievalError("--anomaly-space joined needs an encoder with a whitening (its search embedding is "
                             "what joins the space); this one has none")


def fit_space(features: np.ndarray, embeddings: np.ndarray | None, whitening: EncoderWhitening | None,
              shrinkage: float = DEFAULT_SHRINKAGE, mode: str = DEFAULT_SPACE_MODE) -> AnomalySpace:
    """The anomaly space of a gallery, from its raw features (n, d) and search embeddings (n, d):
    the raw features whitened on the gallery, joined by the embeddings whitened on it with
    ``mode`` ``joined``, or ``auto`` where the gallery is one part of the collection the
    encoder's whitening was fit on (:attr:`Placement.part`); ``embeddings`` ``None``: made from
    the features with ``whitening``, as the encoder makes them. The gallery's placement is
    recorded whatever the mode, where the gallery has the items to whiten its own space: fewer
    cannot tell its spread, on which the placement's sampling noise rests (one item has none)."""
    check_space_mode(mode, whitening is not None)
    for start in range(0, features.shape[0], 65536):  # (a batch at a time: a large gallery is not copied whole)
        if not np.isfinite(features[start : start + 65536]).all():
            raise RetrievalError("the encoder gave NaN or infinite features for the gallery: its weights are "
                                 "broken (a diverged run?); train it again or take an earlier encoder file")
    space = AnomalySpace.fit(features, shrinkage)
    space.mode = mode
    if whitening is None:
        return space
    if space.kind == WHITENED:
        space.placement = place_gallery(features, whitening.mean, whitening.matrix, whitening.count)
    if mode == "joined" or (mode == "auto" and space.placement is not None and space.placement.part):
        space.embedding_part = AnomalySpace.fit(whitening.embed(features) if embeddings is None else embeddings, shrinkage)
    return space


@dataclass(frozen=True)
class Placement:
    """Where a gallery lies in the units of a whitening fit on a collection (:func:`place_gallery`).

    ``offset``: the squared distance of the gallery's mean from the whitening's centre, over what
    sampling alone would put between them (about 1 or less for a sample of the collection).
    ``reach``: the gallery's mean squared distance from that centre along the direction its mean
    moved, less what sampling alone adds to it (about 1 for a sample; at most 1 / p for a part
    making up a share p of the collection).
    """

    offset: float
    reach: float | None = None  # (None: recorded by a build before the reach was)

    @property
    def part(self) -> bool:
        """One part of the collection: apart from its centre, yet within the collection's reach."""
        return self.offset >= BROADER_OFFSET and self.reach is not None and self.reach <= PART_REACH

    def describe(self) -> str:
        where = (f"the gallery's mean lies {self.offset:.1f} times as far from the centre of the encoder whitening's "
                 f"collection as sampling alone would put it")
        if self.reach is None:
            return f"{where} (its reach was not recorded: the index was built before it was)"
        where += f", and reaches {self.reach:.1f} of that collection's units along the way"
        rule = f"a part has an offset from {BROADER_OFFSET:g} and a reach to {PART_REACH:g}"
        if self.part:
            return f"{where}: one part of that collection ({rule})"
        if self.offset < BROADER_OFFSET:
            return f"{where}: a sample of that collection ({rule})"
        return (f"{where}: shifted off that collection ({rule}; or the encoder's whitening was fit on images read "
                f"otherwise than the index reads them: retrieval whiten refits it)")


def place_gallery(features: np.ndarray, mean: np.ndarray, matrix: np.ndarray, fit_count: int,
                  batch: int = 8192) -> Placement:
    """Where a gallery's raw features (n, d) lie in the units of the whitening ``(f - mean) @
    matrix`` fit on ``fit_count`` items of a collection (:class:`Placement`): the squared distance
    of the two centres in those units, over the gallery's own variance in those units times
    ``1 / n + 1 / fit_count`` (the offset); and the mean of the items' squared distances from the
    whitening's centre projected on the direction from it to the gallery's mean, less that same
    variance times ``1 / n + 1 / fit_count`` (the reach: the squared length of the mean's share of
    sampling noise, which the direction takes in whole, is not the gallery's)."""
    n = features.shape[0]
    chunks = range(0, n, batch)  # (float64 a batch at a time: a large gallery is not copied whole)
    part = lambda s: np.asarray(features[s : s + batch], np.float64)  # noqa: E731
    centre = sum(part(s).sum(0) for s in chunks) / n
    shift = (centre - mean) @ matrix
    along = matrix @ (shift / max(float(np.linalg.norm(shift)), 1e-30))
    spread = reach = 0.0
    for s in chunks:
        f = part(s)
        spread += float(np.sum(((f - centre) @ matrix) ** 2))
        reach += float(np.sum(((f - mean) @ along) ** 2))
    spread /= max(n - 1, 1)
    noise = spread * (1 / n + 1 / max(fit_count, 1))
    offset = float(np.sum(shift**2)) / max(noise, 1e-30)
    return Placement(min(offset, 1e12), min(max(reach / n - noise, 0.0), 1e12))  # (finite: they go into JSON)


def mean_distance(dists: np.ndarray, k: int) -> np.ndarray:
    """Scores (q,) from distances (q, >=k) sorted in increasing order (unfilled slots +inf)."""
    top = dists[:, :k].astype(np.float64)
    valid = np.isfinite(top)
    return (np.where(valid, top, 0.0).sum(1) / np.maximum(valid.sum(1), 1)).astype(np.float32)


def knn_distance(sims: np.ndarray, k: int) -> np.ndarray:
    """Scores (q,) from similarities (q, >=k) sorted in decreasing order (unfilled slots -inf)."""
    top = sims[:, :k].astype(np.float64)
    valid = np.isfinite(top)
    dist = np.where(valid, 1.0 - top, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
    return dist.astype(np.float32)


def leave_one_out(sims: np.ndarray, ids: np.ndarray, own_ids: np.ndarray, k: int, distances: bool = False) -> np.ndarray:
    """Scores of gallery items against the rest of the gallery.

    ``sims``/``ids`` (n, k + 1) are the neighbours of the items ``own_ids`` (n,): cosine
    similarities, or with ``distances`` Euclidean distances; each item's own entry is dropped
    (or the last neighbour, if the index did not return it).
    """
    rest, _ = drop_own(sims, ids, own_ids, sims.shape[1] - 1)
    return mean_distance(rest, k) if distances else knn_distance(rest, k)


def drop_own(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours (q, n) without each row's own id (-1: the row has none), ``k`` columns kept.

    Rows whose own id is not among the results lose their last column instead, so that every
    row keeps the same width. Empty result slots (-1) never match the "no own id" marker.
    """
    if not (own >= 0).any():
        return sims[:, :k], ids[:, :k]
    is_own = (ids == own[:, None]) & (own[:, None] >= 0)
    is_own[~is_own.any(1), -1] = True
    keep = ~is_own
    width = ids.shape[1] - 1
    return sims[keep].reshape(-1, width)[:, :k], ids[keep].reshape(-1, width)[:, :k]


@dataclass
class Calibration:
    """Sorted leave-one-out scores of normal items, for percentiles and the threshold."""

    k: int
    scores: np.ndarray  # (m,) sorted ascending
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise RetrievalError(f"threshold percentile must lie in (0, 100), got {self.percentile}")
        self.scores = np.sort(np.asarray(self.scores, dtype=np.float32))

    @property
    def threshold(self) -> float:
        """The score above which a query is unusual (+inf, so none is, where nothing was calibrated)."""
        if self.scores.size == 0:
            return float("inf")
        return float(np.percentile(self.scores, self.percentile))

    @property
    def calibrated(self) -> bool:
        """Whether there are gallery scores to give percentiles and verdicts (a gallery of 2 items or more)."""
        return self.scores.size > 0

    def score(self, score: float) -> AnomalyScore:
        """One query's score with its percentile and verdict (``None`` for both where nothing
        was calibrated)."""
        if not self.calibrated:
            return AnomalyScore(score=score, percentile=None, threshold=None, unusual=None, k=self.k)
        return AnomalyScore(score=score, percentile=float(self.percentile_of(np.array([score]))[0]),
                            threshold=self.threshold, unusual=score > self.threshold, k=self.k)

    def percentile_of(self, scores: np.ndarray) -> np.ndarray:
        """Percent of normal items scoring at most each score (0..100)."""
        if self.scores.size == 0:
            return np.full(len(scores), np.nan)
        return 100.0 * np.searchsorted(self.scores, scores, side="right") / self.scores.size


def auroc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """Area under the ROC curve: the probability that an anomaly outscores a normal item
    (ties count half), computed from ranks (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(is_anomaly, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise RetrievalError("AUROC needs both normal and anomalous items")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def calibrate(store: IndexStore, k: int, percentile: float = DEFAULT_PERCENTILE, table: L2Table | None = None,
              anomaly_vectors: np.ndarray | None = None, sample: int = CALIBRATION_SAMPLE, seed: int = 0) -> Calibration:
    """Leave-one-out anomaly scores of (a sample of) the gallery's own items: in the anomaly space
    (``table`` searching ``anomaly_vectors``) when given, else by cosine on the search vectors."""
    n = store.manifest.count
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    if n < 2:
        return Calibration(k, np.zeros(0, np.float32), percentile)
    if table is not None:
        vectors = np.asarray(anomaly_vectors[rows], dtype=np.float32)
    else:
        vectors = np.asarray(store.vectors[rows], dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = []
    for start in range(0, len(rows), 4096):
        chunk, own = vectors[start : start + 4096], rows[start : start + 4096]
        if table is not None:
            dists, ids = table.search(chunk, k + 1)
            scores.append(leave_one_out(dists, ids, own, min(k, n - 1), distances=True))
        else:
            sims, ids = store.search(chunk, k + 1)
            scores.append(leave_one_out(sims, ids, own, min(k, n - 1)))
    return Calibration(k, np.concatenate(scores), percentile)


# Why a score has no percentile or verdict: the gallery's leave-one-out scores need 2 items.
UNCALIBRATED = "the index has {count} item(s), too few to calibrate a verdict (its items scored against each other: at least 2)"

DRIFT_SAMPLE = 256  # appended items scored against the gallery as it was
DRIFT_MIN_ITEMS = 20  # fewer appended items say nothing about drift
DRIFT_FACTOR = 3.0  # the note shows when this many times the expected share is unusual ...
DRIFT_FLOOR = 0.05  # ... and at least this share


def append_drift_note(gallery: np.ndarray, appended: np.ndarray, cal: Calibration, seed: int = 0) -> str | None:
    """Whether items being appended are unlike the gallery they join: (a sample of) them scored
    in the anomaly space against the gallery as it was (``gallery`` (n, d), before the append),
    at the calibration's k and threshold. A note when far more of them pass the threshold than
    the gallery's own items do (``100 - percentile`` percent); ``None`` otherwise.

    Appends go into the space fit at build time, as new vectors go into trained inverted lists;
    a new kind of normal image is measured in a space fit without it, until the index is rebuilt.
    """
    if len(appended) < DRIFT_MIN_ITEMS or cal.scores.size == 0 or len(gallery) <= cal.k:
        return None
    from index.ann import L2Table

    rows = np.arange(len(appended))
    if len(rows) > DRIFT_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(len(appended), DRIFT_SAMPLE, replace=False))
    dists, _ = L2Table(gallery).search(np.asarray(appended[rows], dtype=np.float32), cal.k)
    share = float((mean_distance(dists, cal.k) > cal.threshold).mean())
    expected = 1.0 - cal.percentile / 100.0
    if share <= max(DRIFT_FACTOR * expected, DRIFT_FLOOR):
        return None
    return (f"{share:.0%} of the appended images score as unusual against the index's gallery (beyond its "
            f"anomaly threshold, which {expected:.0%} of the gallery's own items pass): they are unlike what the "
            "anomaly space was fit on; if they are normal for the collection now, rebuild the index (without "
            "--append) so that the space is fit on them too")


def stored_calibration(store: IndexStore) -> Calibration | None:
    """The calibration saved in an index folder, if any."""
    info = store.manifest.calibration
    scores = store.arrays.get(info.array) if info is not None else None
    if info is None or scores is None:
        return None
    return Calibration(info.k, scores, info.percentile)


def stored_space(store: IndexStore) -> AnomalySpace | None:
    """The anomaly space saved in an index folder; ``None`` for folders built before they existed."""
    info = store.manifest.anomaly
    if info is None:
        return None
    if info.input not in (FEATURES, JOINT):
        raise RetrievalError(f"{store.path}: the anomaly space's input {info.input!r} is unknown "
                             f"(known: {FEATURES}, {JOINT}); rebuild the index")

    def part(kind: str, mean: str, matrix: str) -> AnomalySpace:
        if kind == PLAIN:
            return AnomalySpace(PLAIN, fit_count=info.fit_count)
        return AnomalySpace(WHITENED, np.asarray(store.arrays[mean]), np.asarray(store.arrays[matrix]), info.shrinkage,
                            info.fit_count)

    space = part(info.space, info.mean, info.matrix)
    space.placement = None if info.offset is None else Placement(info.offset, info.reach)
    space.mode = info.mode
    if info.input == JOINT:
        space.embedding_part = part(info.embedding_space or PLAIN, info.embedding_mean, info.embedding_matrix)
    return space
