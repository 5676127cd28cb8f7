"""Building and appending index folders: embed a collection, index it, calibrate, map, save.

Under ``torchrun`` every rank embeds its share of the collection and writes it as a shard
next to the output folder; rank 0 merges the shards in item order and writes the index.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from index import IndexStore, Items
from index.manifest import AnomalyInfo, CalibrationInfo, EncoderInfo, MapInfo
from retrieval.anomaly import (
    DEFAULT_SPACE_MODE,
    WHITENED,
    EncoderWhitening,
    append_drift_note,
    calibrate,
    check_space_mode,
    fit_space,
    stored_calibration,
    stored_space,
)
from retrieval.duplicate_threshold import calibrate_threshold
from retrieval.embed import Embedded, embed_collection, merge, open_collection, skipped_lines
from retrieval.embedding_map import EmbeddingMap
from retrieval.errors import RetrievalError
from retrieval.options import IndexConfig
from retrieval.pixel_match import THUMBNAILS
from retrieval.service import check_encoder
from simclr import dist
from simclr.device import pick_device
from simclr.encoder import ENCODER_FILE, Encoder

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    out: Path
    added: int
    total: int
    factory: str
    seconds: float
    images_per_second: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. that an append has drifted from the index's lists

    def skipped_lines(self, limit: int = 20) -> list[str]:
        """One line per unreadable file (the first ``limit``)."""
        return skipped_lines(self.failures, limit)

    def summary(self) -> str:
        parts = [f"indexed {self.added} images into {self.out} ({self.total} in all, {self.factory})"]
        if self.failures:
            parts.append(f"{len(self.failures)} unreadable file(s) skipped")
        if self.duplicates:
            parts.append(f"{self.duplicates} already indexed")
        return "; ".join(parts) + f"; {self.seconds:.1f}s, {self.images_per_second:.0f} images/s"


def build_index(cfg: IndexConfig) -> BuildReport | None:
    """Embed ``cfg.source`` with ``cfg.encoder`` and write (or extend) the index at ``cfg.out``.

    Returns the report on rank 0 and ``None`` on the other ranks.
    """
    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist.launched_by_torchrun():
        device = torch.device("cuda", dist.local_rank())
    dist.init_from_env(device)
    if cfg.anomaly_k < 1:
        raise RetrievalError(f"anomaly k must be >= 1, got {cfg.anomaly_k}")
    if not 0 < cfg.percentile < 100:
        raise RetrievalError(f"threshold percentile must lie in (0, 100), got {cfg.percentile}")
    if cfg.batch_size < 1:
        raise RetrievalError(f"batch size must be >= 1, got {cfg.batch_size}")
    if not cfg.anomaly_shrinkage > 0:
        raise RetrievalError(f"anomaly shrinkage must be positive, got {cfg.anomaly_shrinkage}")
    check_space_mode(cfg.anomaly_space)
    if cfg.memory_budget_gb <= 0:
        raise RetrievalError(f"memory budget must be positive, got {cfg.memory_budget_gb} GB")
    if not cfg.encoder and not cfg.append:
        raise RetrievalError("--encoder is needed to build a new index")
    store = IndexStore.load(out) if cfg.append else None
    encoder_path = Path(cfg.encoder).expanduser() if cfg.encoder else store.encoder_path
    encoder = Encoder.load(encoder_path, device)
    if store is not None:
        check_encoder(store, encoder, force=False)
    elif cfg.index_type != "auto":
        from index.ann import new_index

        new_index(encoder.dim, cfg.index_type)  # refuse a bad factory string before embedding
    if store is None:
        check_space_mode(cfg.anomaly_space, encoder.whitened)  # before embedding
    coll = open_collection(cfg.source)
    skip = set(store.items.hashes) if store is not None else set()
    part = embed_collection(
        encoder, coll, cfg.batch_size, cfg.workers, skip, dist.rank(), dist.world_size(), cfg.progress and dist.is_main()
    )
    embedded = _gather(part, out) if dist.is_dist() else part
    if not dist.is_main():
        dist.barrier()
        return None
    try:
        added = len(embedded.items)
        if added == 0 and store is None:
            reasons = "; ".join(r for _, r in embedded.failures[:3])
            raise RetrievalError(f"{cfg.source}: none of the {len(coll)} images could be read ({reasons})")
        if store is None:
            store = IndexStore.build(
                embedded.vectors, embedded.items, encoder.checksum, _encoder_summary(encoder),
                cfg.index_type, [coll.source], int(cfg.memory_budget_gb * 2**30), cfg.progress,
            )
            _fit_anomaly_space(store, embedded.features, embedded.vectors, EncoderWhitening.of(encoder), cfg.anomaly_shrinkage,
                               cfg.anomaly_space)
            store.arrays[THUMBNAILS] = embedded.thumbnails
            notes = []
        else:
            note = store.append(embedded.vectors, embedded.items, [coll.source], cfg.progress)
            notes = [note] if note else []
            drift = _append_anomaly_vectors(store, embedded.features, embedded.vectors)
            notes += [drift] if drift else []
            _append_thumbnails(store, embedded.thumbnails)
        if added or not cfg.append:
            _calibrate_and_map(store, encoder, cfg)
            # The encoder travels with the index, so that the folder is self-contained.
            store.save(out, encoder_file=encoder_path)
        seconds = time.perf_counter() - start
        return BuildReport(
            out=out, added=added, total=store.manifest.count, factory=store.manifest.factory, seconds=seconds,
            images_per_second=(added + len(embedded.failures)) / max(seconds, 1e-9),
            failures=embedded.failures, duplicates=embedded.duplicates, notes=notes,
        )
    finally:
        dist.barrier()


def _fit_anomaly_space(store: IndexStore, features: np.ndarray, vectors: np.ndarray,
                       whitening: EncoderWhitening | None, shrinkage: float, mode: str = DEFAULT_SPACE_MODE) -> None:
    """Fit the anomaly space on the new gallery (:func:`retrieval.anomaly.fit_space`: its raw
    features, joined by its search vectors as ``mode`` says) and store its items' vectors in it."""
    space = fit_space(features, vectors, whitening, shrinkage, mode)
    part, placed = space.embedding_part, space.placement
    info = AnomalyInfo(space=space.kind, fit_count=space.fit_count, shrinkage=space.shrinkage, input=space.input,
                       offset=placed.offset if placed else None, reach=placed.reach if placed else None, mode=space.mode,
                       embedding_space=part.kind if part is not None else None)
    store.arrays[info.vectors] = space.map(features, vectors).astype(np.float16)
    if space.kind == WHITENED:
        store.arrays[info.mean], store.arrays[info.matrix] = space.mean, space.matrix
    if part is not None and part.kind == WHITENED:
        store.arrays[info.embedding_mean], store.arrays[info.embedding_matrix] = part.mean, part.matrix
    store.manifest.anomaly = info
    log.info("anomaly space: %s", space.describe())


def _append_anomaly_vectors(store: IndexStore, features: np.ndarray, vectors: np.ndarray) -> str | None:
    """New items go into the space fit at build time (as new vectors go into trained IVF lists);
    a note when they are unlike the gallery they join (:func:`retrieval.anomaly.append_drift_note`)."""
    space = stored_space(store)
    if space is None:
        log.warning("%s was built before anomaly spaces existed: its anomaly scores stay cosine distances on the "
                    "search vectors; rebuild it (without --append) for scores that hold on one-kind collections",
                    store.path)
        return None
    name = store.manifest.anomaly.vectors
    gallery = np.asarray(store.arrays[name])
    appended = space.map(features, vectors).astype(np.float16)
    cal = stored_calibration(store)
    euclidean = store.manifest.calibration is not None and store.manifest.calibration.metric == "euclidean"
    note = append_drift_note(gallery, appended, cal) if cal is not None and euclidean else None
    if note:
        log.warning("%s", note)
    store.arrays[name] = np.concatenate([gallery, appended])
    return note


def _append_thumbnails(store: IndexStore, thumbnails: np.ndarray) -> None:
    """New items' thumbnails join the stored ones; an index built before thumbnails existed
    keeps none (its near-duplicate scan goes on the embedding alone, and says so)."""
    if THUMBNAILS in store.arrays:
        store.arrays[THUMBNAILS] = np.concatenate([np.asarray(store.arrays[THUMBNAILS]), thumbnails])


def _calibrate_and_map(store: IndexStore, encoder: Encoder, cfg: IndexConfig) -> None:
    """What is fit on the whole gallery: the anomaly calibration, the app's 2-D map and the
    near-duplicate threshold."""
    if store.manifest.anomaly is not None:
        from index.ann import L2Table

        vectors = store.arrays[store.manifest.anomaly.vectors]
        cal = calibrate(store, cfg.anomaly_k, cfg.percentile, L2Table(vectors), vectors)
        metric = "euclidean"
    else:
        cal, metric = calibrate(store, cfg.anomaly_k, cfg.percentile), "cosine"
    info = CalibrationInfo(k=cal.k, percentile=cal.percentile, count=int(cal.scores.size),
                           threshold=cal.threshold if cal.calibrated else None, metric=metric)
    store.arrays[info.array] = cal.scores
    store.manifest.calibration = info
    unwhiten = encoder.unwhitening()
    emap = EmbeddingMap.fit(store.vectors, None if unwhiten is None else unwhiten.numpy())
    m = MapInfo()
    store.arrays[m.points], store.arrays[m.basis] = emap.points, emap.basis
    store.manifest.map = m
    try:
        store.manifest.duplicates = calibrate_threshold(store, encoder).info()
    except RetrievalError as exc:  # the index is still useful: `retrieval duplicates --threshold` works
        log.warning("no near-duplicate threshold stored: %s", exc)
        store.manifest.duplicates = None


def _encoder_summary(encoder: Encoder) -> EncoderInfo:
    spec = encoder.spec
    return EncoderInfo(
        arch=spec.arch, stem=spec.stem, width=spec.width, in_channels=spec.in_channels,
        image_size=spec.image_size, feature_dim=spec.feature_dim, pooling=spec.pooling, flip_average=spec.flip_average,
        trained_on=spec.trained_on,
        source_path=str(encoder.path.resolve()) if encoder.path else None, file=ENCODER_FILE,
    )


def _gather(part: Embedded, out: Path) -> Embedded:
    """Write this rank's shard beside ``out``; rank 0 reads and merges all of them."""
    run = dist_run_id()
    shard_dir = out.parent / f".{out.name}.shards-{run}"
    shard_dir.mkdir(parents=True, exist_ok=True)
    r = dist.rank()
    np.savez(shard_dir / f"rank-{r}.npz", vectors=part.vectors, positions=part.positions, features=part.features,
             thumbnails=part.thumbnails)
    part.items.write(shard_dir / f"rank-{r}.items.jsonl")
    (shard_dir / f"rank-{r}.json").write_text(json.dumps({"failures": part.failures, "duplicates": part.duplicates}))
    dist.barrier()
    if not dist.is_main():
        return part
    parts = []
    for r in range(dist.world_size()):
        arrays = np.load(shard_dir / f"rank-{r}.npz")
        meta = json.loads((shard_dir / f"rank-{r}.json").read_text())
        parts.append(Embedded(
            arrays["vectors"], Items.read(shard_dir / f"rank-{r}.items.jsonl"), arrays["positions"], arrays["features"],
            arrays["thumbnails"], [tuple(f) for f in meta["failures"]], meta["duplicates"],
        ))
    shutil.rmtree(shard_dir, ignore_errors=True)
    return merge(parts)


def dist_run_id() -> str:
    """A name all ranks agree on (rank 0's, broadcast)."""
    import os
    import uuid

    import torch.distributed as tdist

    obj = [os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex[:12]]
    tdist.broadcast_object_list(obj, src=0)
    return str(obj[0])
