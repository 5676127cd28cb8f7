"""Search speed and recall: Flat against approximate FAISS indexes, side by side in one run.

    python bench/search.py --n 1000000 --dim 128            # synthetic clustered unit vectors
    python bench/search.py --index runs/fashion-mnist/index # real embeddings: test items query the rest

Recall@10 is measured against exact (Flat) search; queries/s with the queries in batches of
``--batch`` on all threads. Each approximate index is swept over its search breadth and the
JSON report lists every point, so the fastest setting that reaches the target recall can be read off.
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss
import numpy as np

from harness import write_report
from index import ann


def clustered(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres (the cluster structure of real embeddings), in chunks."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = c[rng.integers(0, centres, m)] + 0.35 * rng.normal(size=(m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a[:k], b)) for a, b in zip(ids, truth))
    return hits / truth.size


def qps(index: faiss.Index, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:
    ids = []
    start = time.perf_counter()
    for s in range(0, len(queries), batch):
        ids.append(ann.search(index, queries[s : s + batch], k)[1])
    return len(queries) / (time.perf_counter() - start), np.concatenate(ids)


def sweep(factory: str) -> list[dict[str, int]]:
    """Search settings to try: HNSW's breadth, IVF's lists visited, a refine stage's depth."""
    if "HNSW" in factory:
        return [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512)]
    if "RFlat" in factory or "Refine" in factory:
        return [{"nprobe": p, "k_factor": f} for p, f in ((8, 4), (8, 16), (32, 4), (32, 16), (32, 64), (128, 64))]
    return [{"nprobe": p} for p in (8, 16, 32, 64, 128)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--centres", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--index", default=None, help="an index folder: its vectors instead of synthetic ones")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--factories", default="HNSW32,IVF4096_PQ32,IVF4096_PQ32_RFlat,IVF4096_Flat")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.index:
        from index import IndexStore

        store = IndexStore.load(args.index)
        vectors = np.asarray(store.vectors, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rng = np.random.default_rng(0)
        q_rows = rng.choice(len(vectors), min(args.queries, len(vectors) // 10), replace=False)
        mask = np.ones(len(vectors), bool)
        mask[q_rows] = False
        base, queries = vectors[mask], vectors[q_rows]
        data = f"{args.index} ({len(base)} x {base.shape[1]})"
    else:
        allv = clustered(args.n + args.queries, args.dim, args.centres, 0)
        base, queries = allv[: args.n], allv[args.n :]
        data = f"synthetic clustered, {args.n} x {args.dim}, {args.centres} centres"
    print(f"data: {data}, {len(queries)} queries, {faiss.omp_get_max_threads()} threads", flush=True)

    rows = []
    start = time.perf_counter()
    flat, _ = ann.build(base, "Flat")
    build_s = time.perf_counter() - start
    flat_qps, truth = qps(flat, queries, args.k, args.batch)
    rows.append({"factory": "Flat", "param": None, "build_s": round(build_s, 1), "qps": round(flat_qps, 1), "recall@10": 1.0,
                 "speedup": 1.0})
    print(rows[-1], flush=True)
    del flat
    for name in filter(None, args.factories.split(",")):
        factory = name.replace("_", ",")
        if factory.startswith("IVF"):
            nlist = int(factory.split(",")[0][3:])
            if nlist * 39 > len(base):
                continue
        start = time.perf_counter()
        index, _ = ann.build(base, factory)
        build_s = time.perf_counter() - start
        for params in sweep(factory):
            ann.set_search_params(index, **params)
            speed, ids = qps(index, queries, args.k, args.batch)
            rows.append({"factory": factory, "param": ", ".join(f"{k}={v}" for k, v in params.items()),
                         "build_s": round(build_s, 1), "qps": round(speed, 1), "recall@10": round(recall(ids, truth), 4),
                         "speedup": round(speed / flat_qps, 1)})
            print(rows[-1], flush=True)
        del index
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads",
              "data": data, "queries": len(queries), "batch": args.batch, "rows": rows}
    write_report(report, args.json, show=False)


if __name__ == "__main__":
    main()
