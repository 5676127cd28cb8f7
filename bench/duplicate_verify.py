"""Can pixels verify what the embedding proposes? Aligned pixel correlation on kNN candidate pairs.

    python bench/duplicate_verify.py --index bench/out/duplicates/photos/idx --json bench/out/duplicates/verify-photos.json
    python bench/duplicate_verify.py --index bench/out/duplicates/fm/idx --json bench/out/duplicates/verify-fm.json

Runs on an index that ``bench/duplicates.py constructed`` built (its files are named by their
base image: ``000847.png`` and its copies ``000847_copy0.png`` ...). The candidate pairs are
every item's 10 nearest neighbours in the index; each pair is scored by

- the embedding's cosine similarity (what ``retrieval duplicates`` thresholds today);
- the normalised cross-correlation of the two images as 16 x 16 grayscale thumbnails;
- the same, the best over 49 crops of one image (up to 10% off each axis, at either end or
  split) against the other whole, both ways: a crop or a shift of a copy is aligned away.

For each score: the best pair recall at pair precision >= 0.95 over all thresholds (recall
counts every true pair of the set, so pairs the kNN graph never proposes count as missed), the
best F1, and where true and false pairs' scores lie. Pairs are scored one by one: no grouping.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from harness import write_report
from PIL import Image

from index import IndexStore

SIZE = 16
CROPS = [(0.0, 0.0)] + [(c, o) for c in (0.05, 0.10) for o in (0.0, 0.5, 1.0)]  # (share cut, share of it at the start)


def signatures(path: str) -> np.ndarray:
    """(49, SIZE * SIZE) zero-mean unit vectors: the image's thumbnails under every crop."""
    im = Image.open(path).convert("L")
    w, h = im.size
    out = []
    for cx, ox in CROPS:
        for cy, oy in CROPS:
            box = (cx * ox * w, cy * oy * h, w - cx * (1 - ox) * w, h - cy * (1 - oy) * h)
            v = np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box), np.float32).ravel()
            v -= v.mean()
            out.append(v / max(float(np.linalg.norm(v)), 1e-6))
    return np.stack(out)


def summary(score: np.ndarray, true: np.ndarray, all_true: int) -> dict:
    order = np.argsort(-score, kind="stable")
    tp = np.cumsum(true[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / all_true
    ok = precision >= 0.95
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"best_recall_at_precision_0.95": round(float(recall[ok].max()) if ok.any() else 0.0, 3),
            "threshold_there": round(float(score[order][np.flatnonzero(ok)[np.argmax(recall[ok])]]), 4) if ok.any() else None,
            "best_f1": round(float(f1[best]), 3), "precision_recall_at_best_f1": [round(float(precision[best]), 3), round(float(recall[best]), 3)],
            "true_pairs_p5_median": [round(float(np.percentile(score[true], 5)), 3), round(float(np.median(score[true])), 3)],
            "false_pairs_p99_max": [round(float(np.percentile(score[~true], 99)), 3), round(float(score[~true].max()), 3)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    start = time.perf_counter()
    store = IndexStore.load(args.index)
    refs = store.items.refs
    n = len(refs)
    group = np.array([int(re.match(r"(\d+)", Path(r).name).group(1)) for r in refs])
    _, counts = np.unique(group, return_counts=True)
    all_true = int((counts * (counts - 1) // 2).sum())
    vec = np.asarray(store.vectors, np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    sims, ids = store.search(vec, args.k + 1)
    a = np.repeat(np.arange(n), ids.shape[1])
    b, s = ids.ravel(), sims.ravel()
    keep = (b >= 0) & (b != a)
    lo, hi, s = np.minimum(a, b)[keep], np.maximum(a, b)[keep], s[keep]
    _, first = np.unique(lo * n + hi, return_index=True)
    a, b, s = lo[first], hi[first], s[first]
    true = group[a] == group[b]
    sig = np.stack([signatures(r) for r in refs])
    signed = time.perf_counter() - start
    aligned = np.empty(len(a), np.float32)
    for i in range(0, len(a), 20_000):
        A, B = sig[a[i : i + 20_000]], sig[b[i : i + 20_000]]
        aligned[i : i + 20_000] = np.maximum(np.einsum("pvd,pd->pv", A, B[:, 0]).max(1),
                                             np.einsum("pd,pvd->pv", A[:, 0], B).max(1))
    whole = np.einsum("pd,pd->p", sig[a, 0], sig[b, 0])
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "index": args.index, "items": n,
        "true_pairs": all_true, "candidate_pairs": len(a), "true_pairs_among_candidates": int(true.sum()),
        "signature_seconds": round(signed, 1), "total_seconds": round(time.perf_counter() - start, 1),
        "embedding": summary(s, true, all_true),
        "pixels_16px": summary(whole, true, all_true),
        "pixels_16px_aligned": summary(aligned, true, all_true),
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
