"""Near-duplicate finding: pair precision and recall on a constructed set, and a 1M-vector scan.

    python bench/duplicates.py constructed --encoder bench/out/anomaly/shared/encoder.pt --out bench/out/duplicates/fm
    python bench/duplicates.py constructed --source bench/out/photos/test --encoder ENC --out bench/out/duplicates/photos
    python bench/duplicates.py scale --real bench/out/demo-index/idx --copies bench/out/duplicates/fm --out bench/out/duplicates/1m
    python bench/duplicates.py flat --index bench/out/demo-index/idx --threshold 0.9

``constructed``: ``--bases`` images of the source (Fashion-MNIST test by default) each get 0-3
altered copies (:func:`retrieval.alterations.alter`: 1-2 of low-quality JPEG, resize, crop up
to 10%, brightness, contrast, rotation; ``--alterations compound``: up to all six), mixed with the source's other images as unrelated ones, all
written as files into class folders and indexed by ``retrieval index`` (which calibrates the
threshold). A pair is true when both items are the same picture (a base and its copies, or
identical files); pair precision and recall of the groups at the calibrated thresholds, with
the pixel check (the command's default) and without it (``--no-pixels``, the embedding alone),
at other calibration percentiles (five calibration seeds each), and over sweeps of both
thresholds (the precision-recall curves, ``pr_curve.png``).

``scale``: ``--n`` synthetic vectors derived from real embeddings (each a real vector plus
noise scaled so that distinct items' nearest neighbours are as similar as the real ones';
copies planted at the similarities the constructed set's copies had), an IVF index, a sweep of
nprobe on a sample of queries, then the whole scan through ``retrieval duplicates`` in a
child process, with its wall time and peak resident memory.

``flat``: a Flat index scanned exactly, and through the temporary IVF index that the scan
builds above ``FLAT_SCAN_LIMIT`` items: seconds, and how many groups come out the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from harness import machine, write_report


# ---------------------------------------------------------------------------- pair counting
def pairs(labels: np.ndarray) -> int:
    counts = np.unique(labels, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pair_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pair precision and recall of a grouping against the true one (labels per item)."""
    n = len(pred)
    tp = pairs(pred.astype(np.int64) * n + truth)
    found, true = pairs(pred), pairs(truth)
    return {"precision": tp / found if found else 1.0, "recall": tp / true if true else 1.0,
            "pairs_found": found, "pairs_true": true, "true_positives": tp}


# ---------------------------------------------------------------------------- the constructed set
def source_images(source: str) -> tuple[list, list[str]]:
    """(image loaders, class names) of a data set or folder: each loader returns a PIL image."""
    from simclr.data import load_images, parse_source, scan_folder
    from simclr.images import open_image

    spec = parse_source(source)
    if spec.kind == "folder":
        listing = scan_folder(spec.path)
        labels = [listing.classes[i] if i >= 0 else "none" for i in listing.labels]
        return [lambda p=p: open_image(p) for p in listing.paths], labels
    data = load_images(spec)
    arr = data.images.permute(0, 2, 3, 1).numpy()
    labels = [data.classes[i] for i in data.labels.tolist()]
    return [lambda a=a: Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr], labels


def make_set(source: str, folder: Path, bases: int, unrelated: int | None, seed: int, ranges) -> dict[str, int]:  # noqa: ANN001
    """Write the constructed set; the true group of each file (by path relative to ``folder``)."""
    from retrieval.alterations import alter

    loaders, labels = source_images(source)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(loaders))
    chosen, others = order[:bases], order[bases:]
    if unrelated is not None:
        others = others[:unrelated]
    shutil.rmtree(folder, ignore_errors=True)
    truth: dict[str, int] = {}
    for group, i in enumerate(np.r_[chosen, others]):
        cls = labels[i].replace("/", "-")
        (folder / cls).mkdir(parents=True, exist_ok=True)
        im = loaders[i]()
        name = f"{cls}/{i:06d}.png"
        im.save(folder / name)
        truth[name] = group
        if group < bases:
            for c in range(int(rng.integers(0, 4))):
                copy, _ = alter(im, rng, ranges)
                name = f"{cls}/{i:06d}_copy{c}.png"
                copy.save(folder / name)
                truth[name] = group
    return truth


def truth_labels(store, truth: dict[str, int], folder: Path) -> np.ndarray:  # noqa: ANN001
    """Each item's true group: its file's, with identical files (same hash) joined."""
    from retrieval.duplicates import components, content_firsts

    root = folder.resolve()
    groups = np.array([truth[str(Path(ref).resolve().relative_to(root))] for ref in store.items.refs], np.int64)
    n = len(groups)
    first = content_firsts(store.items.hashes)
    order = np.argsort(groups, kind="stable")
    same = order[1:][groups[order[1:]] == groups[order[:-1]]]
    prev = order[:-1][groups[order[1:]] == groups[order[:-1]]]
    copies = np.flatnonzero(first != np.arange(n))
    return components(n, np.r_[same, copies], np.r_[prev, first[copies]])


def constructed(args: argparse.Namespace) -> None:
    from index import IndexStore
    from retrieval.build import IndexConfig, build_index
    from dataclasses import replace

    from retrieval.alterations import COMPOUND_RANGES, DEFAULT_RANGES, KINDS
    from retrieval.duplicate_threshold import calibrate_threshold
    from retrieval.duplicates import DEFAULT_K, content_firsts, find_duplicates, group_labels, near_pairs, scan_search
    from retrieval.options import DuplicateConfig
    from retrieval.pixel_match import pair_scores as pixel_scores
    from retrieval.pixel_match import stored_thumbnails
    from simclr.encoder import Encoder

    out = Path(args.out)
    folder, idx = out / "set", out / "idx"
    if args.encoder == "untrained":
        args.encoder = untrained_encoder(args.image_size, args.whiten_on, out / "encoder.pt")
    start = time.perf_counter()
    ranges = COMPOUND_RANGES if args.alterations == "compound" else DEFAULT_RANGES
    truth = make_set(args.source, folder, args.bases, args.unrelated, args.seed, ranges)
    make_s = time.perf_counter() - start
    print(f"constructed set: {len(truth)} files ({args.bases} bases) in {make_s:.1f}s", flush=True)
    start = time.perf_counter()
    build_index(IndexConfig(source=str(folder), out=str(idx), encoder=args.encoder, progress=False))
    build_s = time.perf_counter() - start
    store = IndexStore.load(idx)
    info = store.manifest.duplicates
    true = truth_labels(store, truth, folder)
    n = store.manifest.count
    encoder = Encoder.load(store.encoder_path)
    # The build calibrated on the default alterations; for others the thresholds are measured again on them.
    cal = None if ranges == DEFAULT_RANGES else calibrate_threshold(store, encoder, ranges=ranges)
    print(f"indexed {n} items in {build_s:.1f}s; calibration {(cal.info() if cal else info).__dict__}", flush=True)

    def whole_command(pixels: bool, given: dict | None = None) -> dict:
        """``retrieval duplicates`` as a user runs it, at the calibrated thresholds."""
        given = given if given is not None else {} if cal is None else (
            {"threshold": cal.candidate_threshold, "pixel_threshold": cal.pixel_threshold} if pixels
            else {"threshold": cal.threshold})
        start = time.perf_counter()
        report = find_duplicates(idx, DuplicateConfig(pixels=pixels, **given))
        scan_s = time.perf_counter() - start
        pred = np.arange(n)
        for g in report.groups:
            pred[[m.id for m in g.members]] = g.members[0].id
        return {"threshold": report.threshold, "pixel_threshold": report.pixel_threshold,
                **pair_scores(pred, true), "groups": len(report.groups), "scan_s": round(scan_s, 2), "search": report.search}

    at_calibrated = whole_command(pixels=True)
    print("calibrated, pixels checked:", at_calibrated, flush=True)
    embedding_alone = whole_command(pixels=False)
    print("calibrated, the embedding alone (--no-pixels):", embedding_alone, flush=True)
    with crops_alone():  # the control: the pixel score before it searched turns, calibrated the same way
        old = calibrate_threshold(store, encoder, ranges=ranges)
        crops_only = whole_command(True, {"threshold": old.candidate_threshold, "pixel_threshold": old.pixel_threshold})
        crops_only["calibration"] = old.info().__dict__
    print("calibrated, pixels checked by crops alone (the score before):", crops_only, flush=True)

    # One kNN graph at a low floor serves every threshold of the curves.
    first = content_firsts(store.items.hashes)
    search, _ = scan_search(store)
    a, b, sims = near_pairs(search, store.vectors, np.flatnonzero(first == np.arange(n)), first, args.floor, DEFAULT_K)
    start = time.perf_counter()
    px = pixel_scores(stored_thumbnails(store), a, b)
    pixel_s = time.perf_counter() - start
    candidate = at_calibrated["threshold"]

    def at(t: float, pixel: float | None = None, bar: float = candidate) -> dict[str, float]:
        keep = sims >= t if pixel is None else (sims >= bar) & (px >= pixel)
        return pair_scores(group_labels(n, first, a[keep], b[keep]), true)

    # Evenly spaced thresholds, and the edges' own score quantiles where they crowd (near 1).
    def grid(scores: np.ndarray, lo: float) -> np.ndarray:
        return np.unique(np.round(np.r_[np.linspace(lo, 1.0, 101), np.quantile(scores, np.linspace(0, 1, 300))
                                        if len(scores) else []], 4))

    curve = [{"threshold": float(t), **at(float(t))} for t in grid(sims, args.floor)]
    pixel_curve = [{"threshold": float(t), **at(candidate, float(t))} for t in grid(px[sims >= candidate], 0.5)]
    percentiles = (1.0, 2.0, 5.0, 10.0)
    sample_sims, by_percentile = [], {p: [] for p in percentiles}
    by_pixel_percentile: dict[float, list] = {p: [] for p in (1.0, 2.0, 5.0)}
    for seed in range(5):
        c = calibrate_threshold(store, encoder, sample=args.sample, seed=seed, ranges=ranges)
        sample_sims.append(c.similarities)
        for p in percentiles:
            t = float(np.percentile(c.similarities, p))
            by_percentile[p].append({"threshold": t, **at(t)})
        for p in by_pixel_percentile:
            c.pixel_percentile = p
            by_pixel_percentile[p].append({"threshold": c.pixel_threshold, "candidate": c.candidate_threshold,
                                           **at(c.candidate_threshold, c.pixel_threshold, c.candidate_threshold)})

    def spread(key: str, p: float, rows: list[dict]) -> dict:
        out = {key: p, "threshold_mean": float(np.mean([r["threshold"] for r in rows])),
               "threshold_min": float(np.min([r["threshold"] for r in rows])),
               "threshold_max": float(np.max([r["threshold"] for r in rows]))}
        for m in ("precision", "recall"):
            out |= {f"{m}_mean": float(np.mean([r[m] for r in rows])), f"{m}_min": float(np.min([r[m] for r in rows]))}
        if "candidate" in rows[0]:
            out |= {"candidate_min": float(np.min([r["candidate"] for r in rows])),
                    "candidate_max": float(np.max([r["candidate"] for r in rows]))}
        return out

    calibration = [spread("percentile", p, rows) for p, rows in by_percentile.items()]
    pixel_calibration = [spread("pixel_percentile", p, rows) for p, rows in by_pixel_percentile.items()]
    for row in calibration + pixel_calibration:
        print(row, flush=True)
    copy_sims = np.concatenate(sample_sims)
    np.save(out / "copy_similarities.npy", copy_sims)
    distinct = distinct_neighbour_similarities(store, true, first)
    kth = kth_neighbour_similarities(store, first, DEFAULT_K)
    per_alteration = {}
    for kind in KINDS:  # each alteration alone: which ones the encoder and the pixels see through
        one = calibrate_threshold(store, encoder, sample=args.sample, ranges=replace(ranges, kinds=(kind,), count=(1, 1)))
        p5 = float(np.percentile(one.similarities, 5))
        per_alteration[kind] = {"p5": p5, "median": float(np.median(one.similarities)),
                                "items_with_a_distinct_neighbour_above_p5": float(np.nanmean(distinct >= p5)),
                                "pixels_p1": float(np.percentile(one.pixel_similarities, 1)),
                                "pixels_p5": float(np.percentile(one.pixel_similarities, 5)),
                                "pixels_median": float(np.median(one.pixel_similarities))}
        print(kind, per_alteration[kind], flush=True)
    is_true = true[a] == true[b]
    best = max((r for r in curve if r["precision"] >= 0.95), key=lambda r: r["recall"], default=None)
    best_pixels = max((r for r in pixel_curve if r["precision"] >= 0.95), key=lambda r: r["recall"], default=None)
    plot(curve, pixel_curve, embedding_alone, at_calibrated, out / "pr_curve.png",
         f"{args.source}, {args.bases} bases, {n} items")
    report_json = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "source": args.source,
        "encoder": args.encoder, "bases": args.bases, "items": n, "true_pairs": pairs(true),
        "alterations": ranges.describe(),
        "make_s": round(make_s, 1), "build_s": round(build_s, 1), "stored_calibration": info.__dict__,
        "recalibrated": None if cal is None else cal.info().__dict__,
        "at_calibrated": at_calibrated, "embedding_alone_at_calibrated": embedding_alone,
        "crops_alone_at_calibrated": crops_only,
        "graph": {"pairs": int(len(a)), "true_pairs_in_graph": int(is_true.sum()),
                  "pairs_above_the_candidate_bar": int((sims >= candidate).sum()),
                  "pixel_scoring_s": round(pixel_s, 2), "pairs_per_s": round(len(a) / max(pixel_s, 1e-9))},
        "true_pairs_pixels_p1_p5_median": [float(np.percentile(px[is_true], q)) for q in (1, 5, 50)] if is_true.any() else None,
        "false_pairs_pixels_p99_p999_max": [float(np.percentile(px[~is_true], q)) for q in (99, 99.9, 100)],
        "calibration_percentiles": calibration, "pixel_calibration_percentiles": pixel_calibration,
        "best_at_precision_0.95": best, "best_pixels_at_precision_0.95": best_pixels, "per_alteration": per_alteration,
        "copy_similarity_percentiles": {p: float(np.percentile(copy_sims, p)) for p in (0, 1, 2, 5, 10, 25, 50)},
        "distinct_nn_similarity_percentiles": {p: float(np.nanpercentile(distinct, p)) for p in (50, 90, 99, 99.9, 100)},
        f"nn{DEFAULT_K}_similarity_percentiles": {p: float(np.nanpercentile(kth, p)) for p in (50, 90, 95, 99, 100)},
        "curve": curve, "pixel_curve": pixel_curve,
    }
    write_report(report_json, str(out / "report.json"), show=False)
    print(json.dumps({k: v for k, v in report_json.items() if k not in ("curve", "pixel_curve")}, indent=2))


@contextmanager
def crops_alone():
    """The aligned pixel score without its turns (:data:`retrieval.pixel_match.TURNS`): crops alone."""
    from retrieval import pixel_match

    saved, pixel_match.TURNS = pixel_match.TURNS, ()
    try:
        yield
    finally:
        pixel_match.TURNS = saved


def untrained_encoder(image_size: int, whiten_on: str, path: Path) -> str:
    """A random-init ResNet-18 (seed 0, standard stem) whitened on ``whiten_on``: the control
    encoder for a collection no encoder has been trained on yet."""
    import torch

    from retrieval.embed import open_collection
    from retrieval.pretrained import whiten_on as fit_whitening_on
    from simclr.encoder import Encoder, EncoderSpec
    from simclr.models import build_backbone
    from simclr.pretrained import imagenet_stats

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 3, "standard", 64)
    mean, std = imagenet_stats(3)
    encoder = Encoder(EncoderSpec("resnet18", "standard", 64, 3, image_size, backbone.feature_dim, mean, std,
                                  trained_on="untrained"), backbone)
    fit = fit_whitening_on(encoder, open_collection(whiten_on))
    print(f"untrained encoder whitened on {fit.images} images of {whiten_on}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.save(path)
    return str(path)


def distinct_neighbour_similarities(store, true: np.ndarray, first: np.ndarray, count: int = 2000) -> np.ndarray:  # noqa: ANN001
    """Each of ``count`` items' similarity to its nearest item that is a different picture."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(true), min(count, len(true)), replace=False))
    x = np.asarray(store.vectors[rows], np.float32)
    sims, ids = store.search(x / np.linalg.norm(x, axis=1, keepdims=True), 20)
    other = true[np.maximum(ids, 0)] != true[rows][:, None]
    return np.array([s[o][0] if o.any() else np.nan for s, o in zip(sims, other)])


def kth_neighbour_similarities(store, first: np.ndarray, k: int, count: int = 2000) -> np.ndarray:  # noqa: ANN001
    """Each of ``count`` items' similarity to its k-th nearest other content (known without truth)."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(first), min(count, len(first)), replace=False))
    x = np.asarray(store.vectors[rows], np.float32)
    sims, ids = store.search(x / np.linalg.norm(x, axis=1, keepdims=True), 4 * k)
    other = first[np.maximum(ids, 0)] != first[rows][:, None]
    return np.array([s[o][k - 1] if o.sum() >= k else np.nan for s, o in zip(sims, other)])


def plot(curve: list[dict], pixel_curve: list[dict], alone: dict, checked: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot([r["recall"] for r in curve], [r["precision"] for r in curve], "-", color="#1f77b4",
              label="embedding alone, over its threshold")
    left.plot([r["recall"] for r in pixel_curve], [r["precision"] for r in pixel_curve], "-", color="#2ca02c",
              label=f"pixels checked (embedding >= {checked['threshold']:.3f}), over the pixel threshold")
    left.plot([alone["recall"]], [alone["precision"]], "o", color="#1f77b4", mec="k", label="calibrated, embedding alone")
    left.plot([checked["recall"]], [checked["precision"]], "o", color="#2ca02c", mec="k", label="calibrated, pixels checked")
    left.axhline(0.95, color="grey", lw=0.6, ls=":")
    left.axvline(0.95, color="grey", lw=0.6, ls=":")
    left.set_xlabel("pair recall")
    left.set_ylabel("pair precision")
    left.set_xlim(0, 1.01)
    left.set_ylim(0, 1.01)
    left.legend(loc="lower left", fontsize=8)
    left.set_title("precision-recall")
    t = [r["threshold"] for r in pixel_curve]
    right.plot(t, [r["precision"] for r in pixel_curve], label="precision")
    right.plot(t, [r["recall"] for r in pixel_curve], label="recall")
    right.axvline(checked["pixel_threshold"], color="#d62728", lw=1, label="calibrated")
    right.set_xlim(0.5, 1.0)
    right.set_xlabel("pixel threshold (aligned 16-px correlation)")
    right.set_ylim(0, 1.01)
    right.legend(loc="lower left")
    right.set_title("pixels checked, against the pixel threshold")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- 1M vectors
def synthetic(real: np.ndarray, n: int, copy_sims: np.ndarray, copy_share: float, seed: int):  # noqa: ANN201
    """``n`` unit vectors: distinct items (real vectors plus noise) and planted copies of some
    (1-3 each, at similarities drawn from ``copy_sims``); with each item's true group."""
    rng = np.random.default_rng(seed)
    r, d = real.shape
    sample = real[rng.choice(r, min(r, 5000), replace=False)]
    nn = np.sort(sample @ real.T, axis=1)[:, -2]  # nearest other real item
    target = float(np.median(nn))
    # Two items made from one real vector v: (v + s g1).(v + s g2) / (1 + s^2) = 1 / (1 + s^2).
    sigma = float(np.sqrt(max(1 / target - 1, 1e-3)))
    copies_per_base = rng.integers(1, 4, size=int(n * copy_share / 2))
    copies_per_base = copies_per_base[np.cumsum(copies_per_base) <= n * copy_share]
    n_copies = int(copies_per_base.sum())
    n_distinct = n - n_copies
    out = np.empty((n, d), np.float16)
    for s in range(0, n_distinct, 100_000):
        m = min(100_000, n_distinct - s)
        x = real[rng.integers(0, r, m)] + sigma * rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.arange(n, dtype=np.int64)
    bases = rng.choice(n_distinct, len(copies_per_base), replace=False)
    base_of = np.repeat(bases, copies_per_base)
    for s in range(0, n_copies, 100_000):
        b = base_of[s : s + 100_000]
        x = out[b].astype(np.float32)
        u = rng.normal(size=x.shape).astype(np.float32)
        u -= (u * x).sum(1, keepdims=True) * x
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        c = rng.choice(copy_sims, len(b))[:, None].astype(np.float32)
        out[n_distinct + s : n_distinct + s + len(b)] = c * x + np.sqrt(np.maximum(1 - c * c, 0)) * u
        truth[n_distinct + s : n_distinct + s + len(b)] = b
    return out, truth, {"sigma": sigma, "real_nn_median": target, "distinct": n_distinct, "copies": n_copies,
                        "bases_with_copies": len(bases)}


def synthetic_thumbnails(truth: np.ndarray, seed: int) -> np.ndarray:
    """A thumbnail per item: noise for each distinct item, and its base's with a little noise
    for a copy. Scoring pairs costs the same whatever the pixels, so this times the pixel check."""
    from retrieval.pixel_match import THUMB

    rng = np.random.default_rng(seed + 1)
    n = len(truth)
    thumbs = np.empty((n, THUMB * THUMB), np.uint8)
    for s in range(0, n, 100_000):
        thumbs[s : s + 100_000] = rng.integers(0, 256, (min(100_000, n - s), THUMB * THUMB), dtype=np.uint8)
    copies = np.flatnonzero(truth != np.arange(n))
    noise = rng.integers(-6, 7, (len(copies), THUMB * THUMB), dtype=np.int16)
    thumbs[copies] = np.clip(thumbs[truth[copies]].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return thumbs


def true_pairs(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (a < b) of items in one true group."""
    order = np.argsort(truth, kind="stable")
    t = truth[order]
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    sizes = np.diff(np.r_[starts, len(t)])
    a, b = [], []
    for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = np.sort(order[s : s + size])
        i, j = np.triu_indices(size, 1)
        a.append(members[i])
        b.append(members[j])
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a), np.concatenate(b)


def scale(args: argparse.Namespace) -> None:
    from index import IndexStore, Items, ann
    from retrieval.duplicates import content_firsts, near_pairs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = np.asarray(IndexStore.load(args.real).vectors, np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    copy_sims = np.load(Path(args.copies) / "copy_similarities.npy")
    start = time.perf_counter()
    vectors, truth, made = synthetic(real, args.n, copy_sims, args.copy_share, args.seed)
    make_s = time.perf_counter() - start
    print(f"{args.n} synthetic vectors in {make_s:.1f}s: {made}", flush=True)
    factory = f"IVF{ann.ivf_lists(args.n)},Flat"
    items = Items([f"synthetic:{i}" for i in range(args.n)], [None] * args.n, [f"{i:016x}" for i in range(args.n)])
    start = time.perf_counter()
    store = IndexStore.build(vectors, items, "synthetic", factory=factory)
    build_s = time.perf_counter() - start
    print(f"built {factory} in {build_s:.1f}s", flush=True)
    calibrated = json.loads((Path(args.copies) / "report.json").read_text())["at_calibrated"]
    threshold = args.threshold if args.threshold is not None else float(calibrated["threshold"])
    pixel_threshold = None
    if not args.no_pixels:  # thumbnails, so that the scan checks its pairs' pixels as it would on real images
        store.arrays["thumbnails"] = synthetic_thumbnails(truth, args.seed)
        pixel_threshold = float(calibrated["pixel_threshold"])
    idx = out / "idx"
    store.save(idx)
    del store, vectors

    # nprobe against edge recall and speed, on a sample of queries: of the true pairs with an
    # end asked about and a similarity at or above the threshold, how many the search finds.
    store = IndexStore.load(idx)
    n = args.n
    first = content_firsts(store.items.hashes)
    rows = np.sort(np.random.default_rng(1).choice(n, args.sweep_queries, replace=False))
    asked = np.zeros(n, bool)
    asked[rows] = True
    ta, tb = true_pairs(truth)
    va = np.asarray(store.vectors[ta], np.float32)
    vb = np.asarray(store.vectors[tb], np.float32)
    above = (va * vb).sum(1) >= threshold
    wanted = set((ta[above & (asked[ta] | asked[tb])] * n + tb[above & (asked[ta] | asked[tb])]).tolist())
    sweep = []
    for nprobe in args.nprobes:
        t0 = time.perf_counter()
        a, b, _ = near_pairs(lambda x, k, p=nprobe: store.search(x, k, p), store.vectors, rows, first, threshold, 10)
        sec = time.perf_counter() - t0
        found = set((a * n + b).tolist())
        sweep.append({"nprobe": nprobe, "queries": len(rows), "queries_per_s": round(len(rows) / sec, 1),
                      "edge_recall": round(len(found & wanted) / max(len(wanted), 1), 4),
                      "false_edges": int((truth[a] != truth[b]).sum())})
        print(sweep[-1], flush=True)
    ceiling = {"true_pairs": len(ta), "at_or_above_threshold": round(float(above.mean()), 4)}
    del store, va, vb

    # The whole scan, as a user runs it, in a child process (its peak memory alone).
    cmd = [sys.executable, "-m", "retrieval", "duplicates", str(idx), "--threshold", str(threshold), "--json"]
    cmd += ["--no-pixels"] if pixel_threshold is None else ["--pixel-threshold", str(pixel_threshold)]
    if args.nprobe is not None:
        cmd += ["--nprobe", str(args.nprobe)]
    start = time.perf_counter()
    stdout, peak_kib = run_measured(cmd)
    scan_s = time.perf_counter() - start
    result = json.loads(stdout)
    pred = np.arange(n)
    for g in result["groups"]:
        pred[[m["id"] for m in g["members"]]] = g["members"][0]["id"]
    scores = pair_scores(pred, truth)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "n": n,
        "dim": int(real.shape[1]), "factory": factory, "made": made, "make_s": round(make_s, 1),
        "build_s": round(build_s, 1), "threshold": threshold, "pixel_threshold": pixel_threshold,
        "planted_pairs": ceiling, "sweep": sweep,
        "scan": {"command": " ".join(cmd[1:]), "wall_s": round(scan_s, 1), "reported_s": result["seconds"],
                 "peak_rss_gib": round(peak_kib / 2**20, 2), "search": result["search"],
                 "groups": len(result["groups"]), **scores},
        "index_bytes": {p.name: p.stat().st_size for p in idx.iterdir()},
    }
    write_report(report, str(out / "report.json"), show=True)
    if not args.keep:
        shutil.rmtree(idx, ignore_errors=True)


def flat(args: argparse.Namespace) -> None:
    """A Flat index scanned exactly against through a temporary IVF index: time and agreement."""
    from index import IndexStore
    from retrieval.duplicates import scan

    store = IndexStore.load(args.index)
    rows = []
    results = {}
    for name, limit in (("exact", 10**12), ("temporary IVF", 0)):
        start = time.perf_counter()
        groups, how = scan(store, args.threshold, flat_limit=limit)
        sec = time.perf_counter() - start
        results[name] = {frozenset(m.id for m in g.members) for g in groups}
        rows.append({"scan": name, "search": how, "seconds": round(sec, 1), "groups": len(groups),
                     "grouped_items": sum(len(g) for g in results[name])})
        print(rows[-1], flush=True)
    same = len(results["exact"] & results["temporary IVF"])
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "index": args.index,
              "items": store.manifest.count, "dim": store.manifest.dim, "threshold": args.threshold, "rows": rows,
              "identical_groups": same}
    write_report(report, args.json, show=True)


def run_measured(cmd: list[str]) -> tuple[str, int]:
    """Run ``cmd``; its stdout and its peak resident memory in KiB (VmHWM, read from /proc while
    it runs: the high-water mark of the command's own image, after exec)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(err.read())
        return out.read(), peak


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("constructed")
    c.add_argument("--source", default="fashion-mnist:test")
    c.add_argument("--encoder", default="bench/out/anomaly/shared/encoder.pt",
                   help="an encoder file, or 'untrained' (a random-init ResNet-18 whitened on --whiten-on)")
    c.add_argument("--whiten-on", default=None, help="images to whiten the untrained encoder on")
    c.add_argument("--image-size", type=int, default=64, help="input size of the untrained encoder")
    c.add_argument("--bases", type=int, default=3000)
    c.add_argument("--unrelated", type=int, default=None, help="at most this many unrelated images (default: all others)")
    c.add_argument("--alterations", choices=["default", "compound"], default="default",
                   help="default: 1-2 alterations per copy (as the calibration); compound: 1-6")
    c.add_argument("--sample", type=int, default=500, help="calibration sample per seed (the build's)")
    c.add_argument("--floor", type=float, default=0.0, help="lowest threshold of the curve")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="bench/out/duplicates/fm")
    s = sub.add_parser("scale")
    s.add_argument("--real", default="bench/out/demo-index/idx", help="an index whose vectors the synthetic ones derive from")
    s.add_argument("--copies", default="bench/out/duplicates/fm", help="a constructed run: its copies' similarities and threshold")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--copy-share", type=float, default=0.1)
    s.add_argument("--threshold", type=float, default=None, help="default: the constructed run's calibrated threshold")
    s.add_argument("--no-pixels", action="store_true", help="no thumbnails: the embedding alone decides")
    s.add_argument("--nprobes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    s.add_argument("--nprobe", type=int, default=None, help="nprobe of the whole scan (default: the command's)")
    s.add_argument("--sweep-queries", type=int, default=20_000)
    s.add_argument("--keep", action="store_true", help="keep the index folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="bench/out/duplicates/1m")
    f = sub.add_parser("flat")
    f.add_argument("--index", default="bench/out/demo-index/idx")
    f.add_argument("--threshold", type=float, default=0.9)
    f.add_argument("--json", default="bench/out/duplicates/flat.json")
    args = ap.parse_args()
    {"constructed": constructed, "scale": scale, "flat": flat}[args.cmd](args)


if __name__ == "__main__":
    main()
