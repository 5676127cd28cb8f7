"""Product-quantiser indexes: trained as the project builds them, against FAISS's factory default
(the control, which also orders each codebook for polysemous search), side by side in one run.

    python bench/pq_training.py --n 200000 --dim 128 --factories IVF1024,PQ32 IVF1024,PQ32,RFlat OPQ32,IVF1024,PQ32
    python bench/pq_training.py --index bench/out/demo-index --factories IVF256,PQ64

Both indexes are trained on the same sample (the rows ``index.ann.build`` would train on), hold
the same vectors and answer the same queries; the report gives both training times and whether
the answers (ids and similarities) are equal.
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss
import numpy as np

from harness import write_report
from index import ann, ivf
from search import clustered


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--centres", type=int, default=2_000)
    ap.add_argument("--index", default=None, help="an index folder: its vectors instead of synthetic ones")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--factories", nargs="+", default=["IVF1024,PQ32", "IVF1024,PQ32,RFlat"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.index:
        from index import IndexStore

        vectors = np.asarray(IndexStore.load(args.index).vectors, dtype=np.float32)
        data = f"{args.index} ({vectors.shape[0]} x {vectors.shape[1]})"
    else:
        vectors = clustered(args.n, args.dim, args.centres, 0)
        data = f"synthetic clustered, {args.n} x {args.dim}, {args.centres} centres"
    queries = vectors[np.random.default_rng(1).choice(len(vectors), args.queries, replace=False)]
    print(f"data: {data}, {faiss.omp_get_max_threads()} threads", flush=True)

    rows = []
    for factory in args.factories:
        ours = ann.new_index(vectors.shape[1], factory)
        control = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        sample = np.ascontiguousarray(vectors[ivf.train_rows(ours, len(vectors), 0)])
        seconds = {}
        for name, index in (("control", control), ("ours", ours)):
            start = time.perf_counter()
            index.train(sample)
            seconds[name] = time.perf_counter() - start
            index.add(vectors)
            ann.set_search_params(index)
        a, b = ours.search(queries, 10), control.search(queries, 10)
        same = bool(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]))
        rows.append({"factory": factory, "train_rows": len(sample), "control_s": round(seconds["control"], 2),
                     "ours_s": round(seconds["ours"], 2), "x": round(seconds["control"] / seconds["ours"], 1),
                     "same_answers": same})
        print(rows[-1], flush=True)
    write_report({"data": data, "machine": platform.node(), "threads": faiss.omp_get_max_threads(), "rows": rows},
                 args.json, show=False)


if __name__ == "__main__":
    main()
