"""The manifest of an index folder: a typed, versioned description of everything in it.

``manifest.json`` is written by :meth:`IndexStore.save <index.store.IndexStore.save>` alone and
read by everything else. Format 1 kept the calibration and the encoder's file name in an
untyped ``extra`` bag; it is read and converted, and written back as format 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from index.errors import IndexStoreError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


@dataclass
class EncoderInfo:
    """The encoder the vectors were made with (its file travels in the folder)."""

    arch: str = ""
    stem: str = ""
    width: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    feature_dim: int | None = None
    pooling: str = ""  # how the backbone's maps were pooled (simclr.pooling; "" before it was recorded: global)
    flip_average: bool = False  # features averaged with the mirror image's (simclr.encoder)
    trained_on: str = ""
    source_path: str | None = None  # where the encoder was copied from
    file: str = ""  # its copy in the folder (the writer chooses the name)


@dataclass
class CalibrationInfo:
    """The anomaly calibration: leave-one-out scores of gallery items, in ``calibration.npy``."""

    k: int
    percentile: float
    count: int
    threshold: float | None  # None: no gallery scores (fewer than 2 items; manifests before 2026-12-07 wrote Infinity)
    method: str = "leave-one-out"
    array: str = "calibration"
    metric: str = "cosine"  # "cosine" on the search vectors (format 1), or "euclidean" in the anomaly space


@dataclass
class AnomalyInfo:
    """The space anomaly scores are measured in, fit on the gallery at build time: its kind
    (``gallery-whitened`` or ``plain``), the items it was fit on, what it maps (raw features, or
    those beside the search embedding, and the placement that chose it), and the arrays holding the
    items' vectors in it and (when whitened) its mean and matrix."""

    space: str
    fit_count: int
    shrinkage: float | None = None
    input: str = "features"  # what the space maps: "features" (raw), or "features+embedding" (and the search vectors)
    offset: float | None = None  # the gallery's offset from the encoder whitening's centre (retrieval.anomaly)
    reach: float | None = None  # how far the gallery reaches from that centre along its offset (retrieval.anomaly)
    mode: str | None = None  # the --anomaly-space it was fit with: auto, features or joined
    embedding_space: str | None = None  # features+embedding: the kind of the search vectors' part
    vectors: str = "anomaly_vectors"
    mean: str = "anomaly_mean"
    matrix: str = "anomaly_matrix"
    embedding_mean: str = "anomaly_embedding_mean"
    embedding_matrix: str = "anomaly_embedding_matrix"


@dataclass
class DuplicatesInfo:
    """The near-duplicate threshold, calibrated at build time: the ``percentile``th percentile of
    the similarity of ``count`` sampled items to an altered copy of themselves (re-encoded,
    resized, cropped ...: ``alterations`` says how far), ``copies_bound``, raised to
    ``neighbours_bound``, the ``neighbour_percentile``th percentile of items' similarity to
    their ``neighbour_k``-th nearest neighbour, where that is higher."""

    threshold: float
    percentile: float
    count: int
    alterations: str = ""
    method: str = "altered-copies"
    copies_bound: float | None = None
    neighbours_bound: float | None = None
    neighbour_k: int | None = None
    neighbour_percentile: float | None = None
    # Where the index stores thumbnails, pairs need both: an embedding similarity of at least
    # ``candidate_threshold`` (the ``candidate_percentile``th percentile of the copies'), and an
    # aligned pixel score of at least ``pixel_threshold``: the ``pixel_percentile``th percentile
    # of the copies' pixel scores (``pixel_copies_bound``), raised to the ``neighbour_percentile``th
    # of items' pixel score with their ``neighbour_k``-th neighbour (``pixel_neighbours_bound``).
    candidate_threshold: float | None = None
    candidate_percentile: float | None = None
    pixel_threshold: float | None = None
    pixel_percentile: float | None = None
    pixel_copies_bound: float | None = None
    pixel_neighbours_bound: float | None = None
    # Which aligned pixel score the pixel threshold was calibrated on (``None``: the first, crops
    # alone); a threshold of another score is measured again rather than applied to this one.
    pixel_score: str | None = None

    def describe(self, when: str | None = "at build time") -> str:
        """How the embedding-alone ``threshold`` was calibrated, in words."""
        text = (f"{'calibrated ' + when + ': ' if when else ''}the {self.percentile:g}th percentile of the similarity "
                f"of {self.count} items to an altered copy of themselves")
        if self.neighbours_bound is not None and self.copies_bound is not None and self.neighbours_bound > self.copies_bound:
            text += (f" ({self.copies_bound:.4f}), raised to the {self.neighbour_percentile:g}th percentile of items' "
                     f"similarity to their {self.neighbour_k}th nearest neighbour: this encoder puts distinct images "
                     f"closer together than altered copies, so some copies will be missed")
        return text

    def describe_pixels(self, when: str | None = "at build time") -> str:
        """How the thresholds of the pixel check were calibrated, in words."""
        text = (f"{'calibrated ' + when + ': ' if when else ''}pairs proposed by the embedding at the "
                f"{ordinal(self.candidate_percentile)} percentile of {self.count} altered copies' similarity, kept "
                f"when their aligned pixels ({self.pixel_score or 'crops'}) score at least the "
                f"{ordinal(self.pixel_percentile)} percentile of the copies' pixel score")
        raised = self.pixel_neighbours_bound is not None and self.pixel_copies_bound is not None and \
            self.pixel_neighbours_bound > self.pixel_copies_bound
        if raised:
            text += (f" ({self.pixel_copies_bound:.4f}), raised to the {ordinal(self.neighbour_percentile)} percentile of "
                     f"items' pixel score with their {self.neighbour_k}th nearest neighbour: distinct images here are "
                     f"as alike in their pixels as altered copies, so some copies will be missed")
        return text


@dataclass
class MapInfo:
    """The gallery's 2-D map, computed at build time: ``points`` (m, 3) rows of item id, x, y;
    ``basis`` (d + 1, 2) with ``[vector, 1] @ basis = (x, y)``."""

    points: str = "map_points"
    basis: str = "map_basis"


@dataclass
class SearchInfo:
    """How an approximate index searches by default, chosen at build time: each query visits
    ``nprobe`` inverted lists and, for a compressed index, takes ``k * k_factor`` candidates
    that are re-ranked exactly from the stored vectors (``vectors.npy``, memory-mapped), so that
    the codes in memory can be small (:mod:`index.rerank`); ``k_factor`` 0: no re-ranking.
    ``memory_budget`` is the budget in bytes the index was sized for."""

    k_factor: int = 0
    nprobe: int | None = None
    memory_budget: int | None = None


@dataclass
class CentroidInfo:
    """The inverted file's fit at build time: the mean cosine distance of ``count`` indexed
    vectors (not used in training where there were enough) to their nearest of ``nlist``
    centroids, trained on ``train_count`` vectors. Appended vectors are measured the same way
    to tell when the data has drifted from the centroids (:mod:`index.ivf`)."""

    nlist: int
    train_count: int
    distance: float
    count: int


def _typed(cls: type, data: Any, where: Path, name: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise IndexStoreError(f"{where} is corrupt ({name} is not an object)")
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise IndexStoreError(f"{where} is corrupt ({name}: {exc})") from None


@dataclass
class Manifest:
    """What an index folder holds and how it was made.

    ``arrays`` names every ``<name>.npy`` beside the fixed files; the typed fields say what the
    arrays mean.
    """

    dim: int
    factory: str
    count: int
    encoder_sha256: str
    encoder: EncoderInfo = field(default_factory=EncoderInfo)
    metric: str = "inner_product"
    sources: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)
    calibration: CalibrationInfo | None = None
    anomaly: AnomalyInfo | None = None
    map: MapInfo | None = None
    duplicates: DuplicatesInfo | None = None
    search: SearchInfo | None = None
    centroids: CentroidInfo | None = None
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
        if version not in READABLE_VERSIONS:
            raise IndexStoreError(
                f"{where}: index format version {version!r} is not supported (this version reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        if version == 1:
            data = _from_version_1(data)
        data["encoder"] = _typed(EncoderInfo, data.get("encoder") or {}, where, "encoder")
        data["calibration"] = _typed(CalibrationInfo, data.get("calibration"), where, "calibration")
        data["map"] = _typed(MapInfo, data.get("map"), where, "map")
        data["anomaly"] = _typed(AnomalyInfo, data.get("anomaly"), where, "anomaly")
        data["duplicates"] = _typed(DuplicatesInfo, data.get("duplicates"), where, "duplicates")
        data["search"] = _typed(SearchInfo, data.get("search"), where, "search")
        data["centroids"] = _typed(CentroidInfo, data.get("centroids"), where, "centroids")
        data["format_version"] = FORMAT_VERSION
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise IndexStoreError(f"{where} is corrupt ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: ``extra.calibration`` and ``extra.encoder_file`` become typed fields; a map
    cached by the app (written after the folder, so not always listed) is not carried over."""
    data = dict(data)
    extra = data.pop("extra", None) or {}
    cal = extra.get("calibration")
    if isinstance(cal, dict):
        data["calibration"] = {**cal, "array": "calibration"}
    encoder = dict(data.get("encoder") or {})
    encoder["file"] = extra.get("encoder_file", "encoder.pt")  # the one name format 1 used
    data["encoder"] = encoder
    data["arrays"] = [a for a in data.get("arrays", []) if a not in ("map_points", "map_basis")]
    return data


def ordinal(x: float) -> str:
    """1st, 2nd, 3rd, 5th, 11th, 99th, 2.5th."""
    if x != int(x):
        return f"{x:g}th"
    n = int(x)
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
