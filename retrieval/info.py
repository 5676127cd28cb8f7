"""Facts about an index folder, for ``retrieval info``, the app's header and the HTTP surface."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from index import IndexStore
    from index.manifest import CentroidInfo, DuplicatesInfo, SearchInfo
    from simclr.encoder import Encoder


@dataclass
class IndexFacts:
    path: str
    items: int
    classes: int
    index_type: str
    dimension: int
    metric: str
    sources: list[str]
    encoder: str  # e.g. "resnet18 (standard stem, 32px, 1ch, whitened)"
    encoder_sha256: str
    trained_on: str
    created: str
    updated: str
    anomaly: str | None  # the calibration in words, None without one
    duplicates: str | None = None  # the near-duplicate threshold in words, None without one
    search: str | None = None  # a compressed index's re-ranking in words, None without one
    lists: str | None = None  # an inverted file's lists and their fit at build time, None without one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The facts as ``retrieval info`` prints them."""
        out = [
            f"index      {self.path}",
            f"items      {self.items} ({self.classes} classes)",
            f"type       {self.index_type}, {self.dimension}-d, {self.metric}",
            *([f"search     {self.search}"] if self.search else []),
            *([f"lists      {self.lists}"] if self.lists else []),
            f"encoder    {self.encoder}, sha256 {self.encoder_sha256[:16]}…",
            f"trained on {self.trained_on or 'unknown'}",
            f"sources    {', '.join(self.sources)}",
        ]
        if self.anomaly:
            out.append(f"anomaly    {self.anomaly}")
        if self.duplicates:
            out.append(f"duplicates {self.duplicates}")
        out.append(f"created    {self.created}, updated {self.updated}")
        return out


def describe(store: IndexStore, encoder: Encoder | None = None) -> IndexFacts:
    """The facts of a loaded index; the encoder's whitening is named when ``encoder`` is given."""
    m = store.manifest
    e = m.encoder
    whitened = ", whitened" if encoder is not None and encoder.whitened else ""
    cal = m.calibration
    anomaly = None
    if cal is not None:
        from retrieval.anomaly import UNCALIBRATED, stored_space

        if cal.count and cal.threshold is not None and math.isfinite(cal.threshold):
            anomaly = f"k={cal.k}, threshold {cal.threshold:.4f} at the {cal.percentile:g}th percentile of {cal.count} items"
        else:  # (None; or Infinity, as manifests written before 2026-12-07 have it)
            anomaly = f"k={cal.k}, no threshold: {UNCALIBRATED.format(count=m.count)}"

        space = stored_space(store)
        anomaly += "; " + (space.describe() if space is not None else
                           "mean cosine distance on the search vectors (built before anomaly spaces: rebuild for "
                           "scores that hold on one-kind collections)")
    from retrieval.pixel_match import stored_thumbnails

    return IndexFacts(
        path=str(store.path), items=m.count, classes=len(m.classes), index_type=m.factory, dimension=m.dim,
        metric=m.metric, sources=list(m.sources),
        encoder=f"{e.arch or '?'} ({e.stem or '?'} stem, width {e.width or '?'}, {e.image_size or '?'}px, "
                f"{e.in_channels or '?'}ch, {e.pooling or 'global'} pooling{', mirror-averaged' if e.flip_average else ''}"
                f"{whitened})",
        encoder_sha256=m.encoder_sha256, trained_on=e.trained_on, created=m.created_at, updated=m.updated_at,
        anomaly=anomaly, duplicates=_duplicates(m.duplicates, stored_thumbnails(store) is not None), search=_search(m.search), lists=_lists(m.centroids),
    )


def _search(info: SearchInfo | None) -> str | None:
    if info is None:
        return None
    budget = f"; sized for a {info.memory_budget / 2**30:g} GiB memory budget" if info.memory_budget else ""
    rerank = (f"{info.k_factor} candidates per result re-ranked exactly from vectors.npy (memory-mapped), "
              if info.k_factor else "")
    return f"{rerank}nprobe {info.nprobe or 'default'}{budget}"


def _lists(info: CentroidInfo | None) -> str | None:
    if info is None:
        return None
    return (f"{info.nlist} trained on {info.train_count} vectors; mean cosine distance to the nearest centroid "
            f"{info.distance:.4f} at build time (appends are compared with it)")


def _duplicates(info: DuplicatesInfo | None, thumbnails: bool) -> str | None:
    if info is None:
        return None if thumbnails else "no thumbnails stored: the embedding alone decides (rebuild for a pixel check)"
    if thumbnails and info.pixel_threshold is not None:
        return (f"threshold {info.candidate_threshold:.4f}, pixels {info.pixel_threshold:.4f}, {info.describe_pixels()}; "
                f"without the pixel check (--no-pixels): threshold {info.threshold:.4f}")
    alone = "" if thumbnails else "; no thumbnails stored: the embedding alone decides (rebuild for a pixel check)"
    return f"threshold {info.threshold:.4f}, {info.describe()}{alone}"


def describe_folder(path: str | Path) -> IndexFacts:
    """The facts of an index folder (the encoder is not loaded)."""
    from index import IndexStore

    return describe(IndexStore.load(path))
