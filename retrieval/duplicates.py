"""Near-duplicate groups of an index: the items that are the same picture, or nearly so.

Two items are duplicates when they have the same content hash (*exact* copies, from the items
table) or when one is among the other's ``k`` nearest neighbours at a similarity of at least
the threshold (*near* copies: re-encoded, resized, slightly cropped, brightened ...) and, where
the index stores thumbnails, their aligned pixels agree (:mod:`retrieval.pixel_match`). Groups are
the connected components of that graph (single linkage, so every pair above the threshold
lands in one group), found by a vectorised union-find.

The neighbours come from the index's own search, a batch of items at a time, so the memory
is that of the pairs found and a few arrays of one number per item: never a matrix of all
pairs. A Flat index larger than :data:`FLAT_SCAN_LIMIT` is scanned through a temporary
inverted file built from its vectors (exact search of every item against every other grows
with the square of the collection), and the report says so.

The threshold is the index's calibrated one unless given (:mod:`retrieval.duplicate_threshold`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.answers import Hit
from retrieval.pixel_match import pair_scores, pairs_reaching, stored_thumbnails

if TYPE_CHECKING:  # FAISS is imported only where an index is used
    from index import IndexStore
    from retrieval.duplicate_threshold import DuplicateThreshold
    from retrieval.options import DuplicateConfig

log = logging.getLogger(__name__)

DEFAULT_K = 10  # neighbours per item in the graph
FLAT_SCAN_LIMIT = 200_000  # above this, a Flat index is scanned through a temporary IVF index
# IVF lists visited per item: half a search's default (32). On 1M vectors it finds 98% of the
# pairs that 32 lists find, in half the time (BENCHMARKS.md, "Near-duplicates").
SCAN_NPROBE = 16
BATCH = 4096
EXACT = "exact"
NEAR = "near"


@dataclass
class Member:
    """One item of a group: ``similarity`` (and ``pixels``, the aligned pixel score, where the
    index has thumbnails) to the group's first member, and ``exact_of`` the first member of the
    group with the same content (``None`` when it is the first)."""

    id: int
    ref: str
    label: str | None
    similarity: float
    exact_of: int | None = None
    pixels: float | None = None


@dataclass
class Group:
    """Items that are the same picture: ``exact`` when all have one content hash, else ``near``.
    The first member is the one indexed first; the rest follow by similarity to it."""

    kind: str
    members: list[Member]

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class DuplicateReport:
    """What ``retrieval duplicates`` prints: the groups, largest first, and how they were found."""

    index: str
    items: int
    threshold: float  # the least embedding similarity of a pair
    threshold_source: str  # in words: given, or how it was calibrated
    pixel_threshold: float | None  # the least aligned pixel score of a pair (None: no pixel check)
    search: str  # the index searched and its settings, in words
    seconds: float
    groups: list[Group] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {kind: sum(g.kind == kind for g in self.groups) for kind in (NEAR, EXACT)}

    def summary(self) -> str:
        c = self.counts()
        grouped = sum(g.size for g in self.groups)
        pixels = "" if self.pixel_threshold is None else f", pixels {self.pixel_threshold:.4f}"
        return (f"{c[NEAR]} near-duplicate and {c[EXACT]} exact-copy groups ({grouped} of {self.items} items); "
                f"threshold {self.threshold:.4f}{pixels} ({self.threshold_source}); {self.search}; {self.seconds:.1f}s")

    def lines(self) -> list[str]:
        out = [self.summary()]
        for n, g in enumerate(self.groups, 1):
            out.append(f"group {n}  {g.kind}, {g.size} items")
            for m in g.members:
                same = f"  exact copy of {m.exact_of}" if m.exact_of is not None else ""
                pixels = "" if m.pixels is None else f"  {m.pixels:.4f}"
                out.append(f"  {m.id:>8}  {m.similarity:.4f}{pixels}  {(m.label or '-'):<16} {m.ref}{same}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "items": self.items, "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold, "threshold_source": self.threshold_source,
            "search": self.search, "seconds": round(self.seconds, 3),
            "groups": [{"group": n, "kind": g.kind, "size": g.size, "members": [m.__dict__ for m in g.members]}
                       for n, g in enumerate(self.groups, 1)],
        }

    CSV_HEADER = ("group", "kind", "size", "id", "similarity", "pixels", "exact_of", "label", "ref")

    def csv_rows(self) -> list[tuple]:
        """One row per member, under :attr:`CSV_HEADER`."""
        return [(n, g.kind, g.size, m.id, f"{m.similarity:.6f}", "" if m.pixels is None else f"{m.pixels:.6f}",
                 "" if m.exact_of is None else m.exact_of, m.label or "", m.ref)
                for n, g in enumerate(self.groups, 1) for m in g.members]


# ---------------------------------------------------------------------------- union-find
def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on nodes 0..n-1 with edges (a[i], b[i]): each node's
    label is the smallest node of its component.

    A union-find run on all edges at once: every root is hooked under the smallest root it
    has an edge to, then the trees are flattened by pointer jumping, until no edge joins two
    trees. Parents only ever point to smaller nodes, so no cycle can form; each round removes
    at least one root. Memory: one int64 per node and per edge.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        # Edges inside one tree stay inside it (trees only merge): drop them for good.
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


# ---------------------------------------------------------------------------- content hashes
def content_firsts(hashes: list[str]) -> np.ndarray:
    """For each item, the first item with the same content hash (itself when it is the first;
    items without a hash are their own)."""
    n = len(hashes)
    first = np.arange(n, dtype=np.int64)
    seen: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h:
            first[i] = seen.setdefault(h, i)
    return first


# ---------------------------------------------------------------------------- the kNN graph
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def near_pairs(search: Search, vectors: np.ndarray, rows: np.ndarray, first: np.ndarray, threshold: float, k: int,
               batch: int = BATCH, rerank: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (a < b) of distinct contents with a similarity of at least ``threshold`` among
    each queried item's ``k`` nearest neighbours.

    Args:
        search: ``(queries (q, d), k) -> (similarities, ids)`` (q, k'), ids -1 where unfilled.
        vectors: (n, d) the items' vectors (float16 or float32, possibly memory-mapped).
        rows: the items to query (one per content is enough).
        first: (n,) the first item of each item's content (:func:`content_firsts`): pairs are
            between those, so exact copies neither pair with themselves nor fill ``k``.
        threshold: the least similarity of a pair.
        rerank: recompute the neighbours' similarities from ``vectors`` (for indexes whose own
            are approximate, such as product-quantised codes).
    Returns:
        ``a``, ``b`` (int64) and the pairs' similarities (float32), each pair once.
    """
    n = len(first)
    extra = int(np.bincount(first).max()) if n else 1  # an item's own copies come back first
    kk = k + min(extra, k + 1)
    keys, best = [], []
    for start in range(0, len(rows), batch):
        q = rows[start : start + batch]
        x = np.asarray(vectors[q], dtype=np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims, ids = search(x, kk)
        if rerank:
            found = np.asarray(vectors[np.maximum(ids, 0).ravel()], dtype=np.float32).reshape(*ids.shape, -1)
            found /= np.maximum(np.linalg.norm(found, axis=2, keepdims=True), 1e-12)
            sims = np.where(ids >= 0, np.einsum("qd,qkd->qk", x, found), -np.inf)
        nb = np.where(ids >= 0, first[np.maximum(ids, 0)], -1)
        me = first[q][:, None]
        keep = (sims >= threshold) & (nb >= 0) & (nb != me)
        a = np.broadcast_to(me, nb.shape)[keep]
        b = nb[keep]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
        best.append(sims[keep])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    sim = np.concatenate(best) if best else np.zeros(0, np.float32)
    if not key.size:  # no pair above the threshold
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    order = np.lexsort((-sim, key))  # each pair once, with its higher similarity
    key, sim = key[order], sim[order]
    once = np.r_[True, key[1:] != key[:-1]]
    key, sim = key[once], sim[once]
    return key // n, key % n, sim.astype(np.float32)


def group_labels(n: int, first: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each item's group label (the smallest item of its group): near pairs plus exact copies."""
    copies = np.flatnonzero(first != np.arange(n))
    return components(n, np.concatenate([a, copies]), np.concatenate([b, first[copies]]))


def make_groups(store: IndexStore, labels: np.ndarray, first: np.ndarray,
                thumbs: np.ndarray | None = None) -> list[Group]:
    """The groups of two or more items, largest first (then by first member); with ``thumbs``,
    each member's pixel score with the first."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, len(labels)])
    items = store.items
    groups = []
    for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        ids = order[s : s + size]  # ascending: the first member is the one indexed first
        v = np.asarray(store.vectors[ids], dtype=np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sims = v @ v[0]
        sims[0] = 1.0
        rank = np.lexsort((ids, -sims))
        rank = np.r_[0, rank[rank != 0]]
        kind = EXACT if np.all(first[ids] == first[ids[0]]) else NEAR
        pixels = None if thumbs is None else pair_scores(thumbs, np.full(len(ids), ids[0]), ids)
        members = []
        for r in rank:
            i = int(ids[r])
            f = int(first[i])
            members.append(Member(i, items.refs[i], items.labels[i], float(sims[r]), None if f == i else f,
                                  None if pixels is None else (1.0 if r == 0 else float(pixels[r]))))
        groups.append(Group(kind, members))
    groups.sort(key=lambda g: (-g.size, g.members[0].id))
    return groups


def scan_search(store: IndexStore, nprobe: int | None = None,
                flat_limit: int = FLAT_SCAN_LIMIT) -> tuple[Search, str]:
    """How to find every item's neighbours: the index's own search, or, for a Flat index of more
    than ``flat_limit`` items, a temporary IVF index over its vectors; with that in words.
    (Whether the similarities need recomputing: :func:`approximate_similarities`.)"""
    import faiss

    from index import ann

    n = store.manifest.count
    factory = store.manifest.factory
    nprobe = nprobe or SCAN_NPROBE
    if ann.is_exhaustive(store.index) and n > flat_limit:
        factory = f"IVF{ann.ivf_lists(n)},Flat"
        start = time.perf_counter()
        index, _ = ann.build(store.vectors, factory)
        log.info("built a temporary %s over %d vectors in %.1fs", factory, n, time.perf_counter() - start)
        index = ann.to_gpu(index)
        ann.set_search_params(index, nprobe)
        probe = min(nprobe, ann.ivf_lists(n))
        return (lambda x, k: ann.search(index, x, k)), (
            f"searched through a temporary {factory} (nprobe {probe}) built from the vectors of the "
            f"{store.manifest.factory} index")

    def search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return store.search(x, k, nprobe)

    ivf = faiss.try_extract_index_ivf(store.index)
    probe = f" (nprobe {min(nprobe, ivf.nlist)})" if ivf is not None else ""
    return search, f"searched through the index ({factory}{probe})"


def approximate_similarities(store: IndexStore) -> bool:
    """Whether the index's similarities are approximate (quantised codes): then the pairs'
    similarities are recomputed from the stored vectors before the threshold applies."""
    factory = store.manifest.factory
    return any(code in factory for code in ("PQ", "SQ4", "SQ6", "SQ8", "SQbf16", "LSH"))


def scan(store: IndexStore, threshold: float, k: int = DEFAULT_K, nprobe: int | None = None,
         flat_limit: int = FLAT_SCAN_LIMIT, batch: int = BATCH,
         pixel_threshold: float | None = None) -> tuple[list[Group], str]:
    """The duplicate groups of ``store`` at ``threshold`` (and, when given, ``pixel_threshold``
    on the pairs' aligned pixels), and how the index was searched."""
    n = store.manifest.count
    first = content_firsts(store.items.hashes)
    search, how = scan_search(store, nprobe, flat_limit)
    rerank = approximate_similarities(store)
    rows = np.flatnonzero(first == np.arange(n))
    a, b, _ = near_pairs(search, store.vectors, rows, first, threshold, k, batch, rerank)
    thumbs = None if pixel_threshold is None else stored_thumbnails(store)
    if pixel_threshold is not None:
        if thumbs is None:
            raise ValueError("a pixel threshold needs the index's thumbnails")
        proposed = len(a)
        keep = pairs_reaching(thumbs, a, b, pixel_threshold)
        a, b = a[keep], b[keep]
        how += f", {len(a)} of {proposed} proposed pairs kept by their pixels"
    labels = group_labels(n, first, a, b)
    how += ", similarities recomputed from the stored vectors" if rerank else ""
    return make_groups(store, labels, first, thumbs), f"{how}, k={k}"


def report(store: IndexStore, threshold: DuplicateThreshold, k: int = DEFAULT_K,
           nprobe: int | None = None) -> DuplicateReport:
    """Scan a loaded index at ``threshold``."""
    start = time.perf_counter()
    groups, how = scan(store, threshold.similarity, k, nprobe, pixel_threshold=threshold.pixels)
    return DuplicateReport(str(store.path), store.manifest.count, threshold.similarity, threshold.source,
                           threshold.pixels, how, time.perf_counter() - start, groups)


def find_duplicates(index_dir: str | Path, cfg: DuplicateConfig) -> DuplicateReport:
    """The duplicate groups of an index folder at ``cfg.threshold``, or at the index's calibrated
    threshold (measured now, with the index's encoder, when the index has none)."""
    from index import IndexStore
    from retrieval.duplicate_threshold import resolve_threshold

    cfg.check()
    start = time.perf_counter()
    store = IndexStore.load(index_dir)
    threshold = resolve_threshold(store, cfg.threshold, cfg.pixel_threshold, cfg.pixels, cfg.device)
    out = report(store, threshold, cfg.k, cfg.nprobe)
    out.seconds = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------- query answers
FOLD_DEPTH = 4  # `query --exclude-duplicates` looks this many times k deep for hits to keep


def fold_hits(hits: list[Hit], vectors: np.ndarray, hashes: list[str], threshold: float,
              thumbs: np.ndarray | None = None, pixel_threshold: float | None = None) -> list[Hit]:
    """``hits`` (best first) with every hit that duplicates a better one folded into it.

    A hit is kept unless it has the same content as a kept hit, or a similarity of at least
    ``threshold`` to one (and, with ``thumbs``, an aligned pixel score of at least
    ``pixel_threshold``); then its id goes to the ``folded`` list of the kept hit it is most
    similar to among those. Kept hits are ranked 1, 2, ... again.
    """
    if not hits:
        return []
    ids = np.array([h.id for h in hits], dtype=np.int64)
    order = np.argsort(ids)
    v = np.empty((len(ids), vectors.shape[1]), np.float32)
    v[order] = np.asarray(vectors[ids[order]], dtype=np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    if thumbs is not None and pixel_threshold is not None:
        i, j = np.triu_indices(len(ids), 1)
        alike = np.ones(sims.shape, bool)
        alike[i, j] = alike[j, i] = pairs_reaching(thumbs, ids[i], ids[j], pixel_threshold)
        sims[~alike] = -np.inf  # the pixels say these are different pictures
    codes: dict[str, int] = {}
    content = np.array([codes.setdefault(hashes[i] or f"item {i}", len(codes)) for i in ids])
    sims[content[:, None] == content[None, :]] = np.inf  # same content: always a duplicate, and the closest one
    kept: list[int] = []
    out: list[Hit] = []
    for i, hit in enumerate(hits):
        if kept:
            near = sims[i, kept]
            j = int(np.argmax(near))
            if near[j] >= threshold:
                into = out[j]
                into.folded = [*(into.folded or []), hit.id]
                continue
        kept.append(i)
        out.append(replace(hit, rank=len(out) + 1, folded=[]))
    return out
