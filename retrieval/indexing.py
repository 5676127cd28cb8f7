"""Building and appending index folders: embed a collection, index it, calibrate, save.

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
from index.ann import DEFAULT_MEMORY_BUDGET
from retrieval.anomaly import CALIBRATION_SAMPLE, DEFAULT_K, DEFAULT_PERCENTILE, Calibration, leave_one_out
from retrieval.embed import Embedded, embed_collection, merge, open_collection
from retrieval.errors import RetrievalError
from retrieval.service import ENCODER_FILE, check_encoder, pick_device
from simclr import dist
from simclr.encoder import Encoder

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """Options of ``retrieval index``."""

    source: str
    out: str
    encoder: str | None = None
    index_type: str = "auto"
    append: bool = False
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET / 2**30
    anomaly_k: int = DEFAULT_K
    percentile: float = DEFAULT_PERCENTILE
    force: bool = False
    progress: bool = True


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


def calibrate(store: IndexStore, k: int, percentile: float = DEFAULT_PERCENTILE, sample: int = CALIBRATION_SAMPLE, seed: int = 0) -> Calibration:
    """Leave-one-out anomaly scores of (a sample of) the gallery's own items."""
    n = store.manifest.count
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    if n < 2:
        return Calibration(k, np.zeros(0, np.float32), percentile)
    vectors = np.asarray(store.vectors[rows], dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = []
    for start in range(0, len(rows), 4096):
        sims, ids = store.search(vectors[start : start + 4096], k + 1)
        scores.append(leave_one_out(sims, ids, rows[start : start + 4096], min(k, n - 1)))
    return Calibration(k, np.concatenate(scores), percentile)


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
    if cfg.memory_budget_gb <= 0:
        raise RetrievalError(f"memory budget must be positive, got {cfg.memory_budget_gb} GB")
    encoder_path = Path(cfg.encoder or out / ENCODER_FILE).expanduser()
    if not cfg.encoder and not cfg.append:
        raise RetrievalError("--encoder is needed to build a new index")
    encoder = Encoder.load(encoder_path, device)
    store = None
    if cfg.append:
        store = IndexStore.load(out)
        check_encoder(store, encoder, force=False)
    elif cfg.index_type != "auto":
        from index.ann import new_index

        new_index(encoder.dim, cfg.index_type)  # refuse a bad factory string before embedding
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
                cfg.index_type, [coll.source], int(cfg.memory_budget_gb * 2**30),
            )
        else:
            store.append(embedded.vectors, embedded.items, [coll.source])
        cal = calibrate(store, cfg.anomaly_k, cfg.percentile)
        store.arrays["calibration"] = cal.scores
        for name in ("map_points", "map_basis"):  # the app's 2-D map is stale once items change
            store.arrays.pop(name, None)
        store.manifest.extra["calibration"] = {
            "k": cal.k, "percentile": cal.percentile, "count": int(cal.scores.size),
            "method": "leave-one-out", "threshold": cal.threshold,
        }
        store.manifest.extra["encoder_file"] = ENCODER_FILE
        if added or not cfg.append:
            # The encoder travels with the index, so that the folder is self-contained.
            store.save(out, files={ENCODER_FILE: encoder_path})
        seconds = time.perf_counter() - start
        return BuildReport(
            out=out, added=added, total=store.manifest.count, factory=store.manifest.factory, seconds=seconds,
            images_per_second=(added + len(embedded.failures)) / max(seconds, 1e-9),
            failures=embedded.failures, duplicates=embedded.duplicates,
        )
    finally:
        dist.barrier()


def _encoder_summary(encoder: Encoder) -> dict:
    spec = encoder.spec
    return {
        "arch": spec.arch, "stem": spec.stem, "width": spec.width, "in_channels": spec.in_channels,
        "image_size": spec.image_size, "feature_dim": spec.feature_dim, "trained_on": spec.trained_on,
        "source_path": str(encoder.path.resolve()) if encoder.path else None,
    }


def _gather(part: Embedded, out: Path) -> Embedded:
    """Write this rank's shard beside ``out``; rank 0 reads and merges all of them."""
    run = dist_run_id()
    shard_dir = out.parent / f".{out.name}.shards-{run}"
    shard_dir.mkdir(parents=True, exist_ok=True)
    r = dist.rank()
    np.savez(shard_dir / f"rank-{r}.npz", vectors=part.vectors, positions=part.positions)
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
            arrays["vectors"], Items.read(shard_dir / f"rank-{r}.items.jsonl"), arrays["positions"],
            [tuple(f) for f in meta["failures"]], meta["duplicates"],
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
