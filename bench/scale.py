"""Search beyond memory: 1M real embeddings under a 1 GiB budget, 10M derived ones under 8 GiB.

    python bench/scale.py embed --views 0-8      # real embeddings: augmented Fashion-MNIST views
    python bench/scale.py embed --views 9-17     #   (in steps: each view is 60,000 images)
    python bench/scale.py sweep --factories "IVF1024,PQ128x4fs" --nprobe 64,128 --k-factor 8,16
    python bench/scale.py budget --budget-gb 1 --settings=-,64:8 --json bench/out/scale/1m-budget.json
    python bench/scale.py budget --budget-gb 100 --json bench/out/scale/1m-auto.json    # no budget to speak of
    python bench/scale.py big --n 10000000 --budget-gb 8 --step derive    # then --step build, then:
    python bench/scale.py big --n 10000000 --budget-gb 8 --queries 500 --json bench/out/scale/10m.json
    python bench/scale.py quantizers --queries 1000    # flat scan against an HNSW graph over the centroids
    python bench/scale.py drift --folder bench/out/scale/idx-18v-1g      # what --append compares

BENCHMARKS.md ("Search beyond memory") lists the exact commands behind its tables.

``embed``: the demo encoder (``bench/out/demo-index/idx/encoder.pt``, 512-d, whitened) on
``--views`` augmented views of each of the 60,000 Fashion-MNIST training images (random
resized crops of 35-100% of the area, flips, brightness and contrast jitter; view ``v`` is
drawn with seed ``v``), written as ``bench/out/scale/real/view-VV.npy`` (float16); the 10,000
test images, unaugmented, are the queries (``queries.npy``).

``sweep``: factory strings on the 1M base, trained and filled as :func:`index.ann.build` does, searched with
re-ranking from the stored float16 vectors (memory-mapped) over nprobe and k_factor; recall@10
against exact search over the same float16 vectors.

``budget``: ``--index-type auto`` through :class:`index.IndexStore` (what ``retrieval index``
writes) under ``--budget-gb``: build time, then a child process that loads the folder and
searches, reporting queries/s, recall@10 and its resident memory (VmHWM, and the anonymous and
file-backed parts of VmRSS; the memory-mapped vectors are file-backed).

``big``: ``--n`` vectors derived from the real ones (each a real embedding plus Gaussian noise,
renormalised), written to a float16 file in chunks, indexed under ``--budget-gb`` and searched
in a child process as in ``budget``; exact search for the truth runs over the memory-mapped
file in chunks, on a sample of queries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import machine, write_report

OUT = Path("bench/out/scale")
REAL = OUT / "real"
ENCODER = Path("bench/out/demo-index/idx/encoder.pt")
TRAIN_IMAGES = 60_000


def views_arg(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


# ---------------------------------------------------------------------------- real embeddings
def embed(args: argparse.Namespace) -> None:
    import torch

    from simclr.data import load_fashion_mnist
    from simclr.encoder import Encoder

    torch.set_num_threads(os.cpu_count() or 1)
    encoder = Encoder.load(args.encoder, "cpu")
    REAL.mkdir(parents=True, exist_ok=True)
    if not (REAL / "queries.npy").exists():
        test = load_fashion_mnist("test").images
        q = torch.cat([encoder.embed(test[s : s + 1024]) for s in range(0, len(test), 1024)])
        np.save(REAL / "queries.npy", q.numpy().astype(np.float32))
    train = load_fashion_mnist("train").images
    aug = augmenter()
    for v in views_arg(args.views):
        path = REAL / f"view-{v:02d}.npy"
        if path.exists():
            continue
        start = time.perf_counter()
        g = torch.Generator().manual_seed(v)
        out = np.empty((len(train), encoder.dim), np.float16)
        for s in range(0, len(train), args.batch):
            x = aug(train[s : s + args.batch], g)  # floats in [0, 1]: mean 0, std 1
            out[s : s + args.batch] = encoder.embed(x).numpy()
        np.save(str(path) + ".tmp.npy", out)
        os.replace(str(path) + ".tmp.npy", path)
        print(f"view {v}: {len(train)} images in {time.perf_counter() - start:.0f}s", flush=True)


def augmenter():  # noqa: ANN201
    """The views' augmentation: floats in [0, 1] (mean 0, std 1), which the encoder takes as they are."""
    import torch

    from simclr.augment import AugmentConfig, BatchAugment

    cfg = AugmentConfig(size=28, crop_scale=(0.35, 1.0), jitter_p=0.8, jitter_strength=0.4, grayscale_p=0.0)
    return BatchAugment(cfg, torch.zeros(1), torch.ones(1))


def augmented_test_views(seed: int = 100) -> np.ndarray:
    """One augmented view of each of the 10,000 test images, embedded (the indexed views' distribution)."""
    import torch

    from simclr.data import load_fashion_mnist
    from simclr.encoder import Encoder

    encoder, aug = Encoder.load(ENCODER, "cpu"), augmenter()
    test, g = load_fashion_mnist("test").images, torch.Generator().manual_seed(seed)
    return torch.cat([encoder.embed(aug(test[s : s + 1000], g)) for s in range(0, len(test), 1000)]).numpy()


def real_base(views: int) -> np.ndarray:
    """The real embeddings of the first ``views`` views, (views * 60000, 512) float16."""
    return np.concatenate([np.load(REAL / f"view-{v:02d}.npy") for v in range(views)])


def load_real(views: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1M base as a memory map (``base-1m.npy``, written once from the views) and the queries."""
    path = OUT / f"base-{views}v.npy"
    if not path.exists():
        np.save(str(path) + ".tmp.npy", real_base(views))
        os.replace(str(path) + ".tmp.npy", path)
    return np.load(path, mmap_mode="r"), np.load(REAL / "queries.npy")[:queries]


def exact_truth(base: np.ndarray, queries: np.ndarray, k: int, name: str, batch: int,
                chunk: int = 1_000_000) -> tuple[np.ndarray, float]:
    """Exact top-k ids over the stored float16 vectors (as float32) and exact search's queries/s,
    cached: a float32 ``IndexFlatIP`` searched in batches of ``batch``, whole when the vectors fit in
    ``chunk`` rows, else chunk by chunk from the file (only the searching is timed, as for an
    index held in memory; the chunks' top-k are merged)."""
    import faiss

    cache = OUT / f"truth-{name}-{len(queries)}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["ids"], float(z["qps"])
    n, d = base.shape
    chunk = n if n <= int(chunk * 1.2) else chunk
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    searching = 0.0
    for s in range(0, n, chunk):
        flat = faiss.IndexFlatIP(d)
        for c in range(s, min(n, s + chunk), 100_000):
            flat.add(np.ascontiguousarray(base[c : min(n, s + chunk, c + 100_000)], dtype=np.float32))
        start = time.perf_counter()
        for b in range(0, len(queries), batch):
            sims, ids = flat.search(queries[b : b + batch], k)
            allsims = np.concatenate([best_s[b : b + batch], sims], 1)
            allids = np.concatenate([best_i[b : b + batch], ids + s], 1)
            top = np.argsort(-allsims, axis=1, kind="stable")[:, :k]
            best_s[b : b + batch] = np.take_along_axis(allsims, top, 1)
            best_i[b : b + batch] = np.take_along_axis(allids, top, 1)
        searching += time.perf_counter() - start
        del flat
        print(f"exact search: {min(n, s + chunk)} of {n} rows", flush=True)
    qps = len(queries) / searching
    np.savez(cache, ids=best_i, qps=qps)
    return best_i, qps


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return sum(len(np.intersect1d(a[:k], b)) for a, b in zip(ids, truth)) / truth.size


def timed_search(search, queries: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:  # noqa: ANN001
    out = []
    start = time.perf_counter()
    for s in range(0, len(queries), batch):
        out.append(search(queries[s : s + batch], k)[1])
    return len(queries) / (time.perf_counter() - start), np.concatenate(out)


# ---------------------------------------------------------------------------- factories at 1M
def sweep(args: argparse.Namespace) -> None:
    from index import ann, ivf
    from index.rerank import rerank

    base, queries = load_real(args.views, args.queries)
    truth, exact_qps = exact_truth(base, queries, args.k, f"{args.views}v", args.batch)
    print(f"base {base.shape}, {len(queries)} queries, exact search {exact_qps:.1f} queries/s", flush=True)
    rows = []
    for name in filter(None, args.factories.split(" ")):
        factory = name
        index = ann.new_index(base.shape[1], factory)
        start = time.perf_counter()
        rows_t = ivf.sample_rows(len(base), ivf.train_size(index, len(base)), 0)
        index.train(ivf.as_f32(base[rows_t]))
        train_s = time.perf_counter() - start
        ivf.add_chunks(index, base)
        build_s = time.perf_counter() - start
        print(f"{factory}: trained on {len(rows_t)} in {train_s:.0f}s, built in {build_s:.0f}s", flush=True)
        for nprobe in map(int, args.nprobe.split(",")):
            for kf in map(int, args.k_factor.split(",")):
                ann.set_search_params(index, nprobe)

                def search(x, k):  # noqa: ANN001, ANN202
                    _, cand = ann.search(index, x, k * kf)
                    return rerank(base, x, cand, k)

                speed, ids = timed_search(search, queries, args.k, args.batch)
                rows.append({"factory": factory, "train_count": int(len(rows_t)), "train_s": round(train_s, 1),
                             "build_s": round(build_s, 1), "nprobe": nprobe, "k_factor": kf,
                             "qps": round(speed, 1), "recall@10": round(recall(ids, truth), 4),
                             "speedup": round(speed / exact_qps, 1), "bytes_per_vector": index.sa_code_size()})
                print(rows[-1], flush=True)
        del index
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "base": list(base.shape),
              "queries": len(queries), "batch": args.batch, "exact_qps": round(exact_qps, 1), "rows": rows}
    write_report(report, args.json, show=False)


# ---------------------------------------------------------------------------- index folders
def status() -> dict[str, int]:
    """This process's memory from /proc: VmRSS, its peak VmHWM, and VmRSS's anonymous (the
    process's own) and file-backed (memory-mapped files: page cache) parts, in bytes."""
    rows = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(rows[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def bench_items(n: int) -> "Items":  # noqa: F821
    """An items table like ``retrieval index`` writes (a reference, a label, a sha256-long hash)."""
    from index import Items
    from simclr.data import FASHION_MNIST_CLASSES

    return Items([f"fashion-mnist:train:{i % TRAIN_IMAGES}#view{i // TRAIN_IMAGES}" for i in range(n)],
                 [FASHION_MNIST_CLASSES[i % 10] for i in range(n)], [f"{i:064x}" for i in range(n)])


def build_folder(args: argparse.Namespace) -> None:
    """(child) Index ``--vectors`` (a float16 .npy, memory-mapped) into ``--folder`` under
    ``--budget-gb``, as ``retrieval index`` does; prints seconds and memory as JSON."""
    from index import IndexStore

    base = np.load(args.vectors, mmap_mode="r")
    items = bench_items(len(base))
    start = time.perf_counter()
    store = IndexStore.build(base, items, "bench", factory=args.index_type, sources=[str(args.vectors)],
                             memory_budget=int(args.budget_gb * 2**30), progress=True)
    built = time.perf_counter() - start
    store.save(args.folder)
    print(json.dumps({"factory": store.manifest.factory, "build_s": round(built, 1),
                      "save_s": round(time.perf_counter() - start - built, 1), "memory": status(),
                      "search": store.manifest.search and vars(store.manifest.search),
                      "centroids": store.manifest.centroids and vars(store.manifest.centroids)}))


def serve(args: argparse.Namespace) -> None:
    """(child) Load ``--folder`` as the service does and search ``--query-file`` in batches over
    the settings of ``--settings`` (``nprobe:k_factor`` pairs, ``-`` for the manifest's);
    prints queries/s, the ids found and memory as JSON."""
    from index import IndexStore

    before = status()
    start = time.perf_counter()
    store = IndexStore.load(args.folder)
    load_s = time.perf_counter() - start
    loaded = status()
    queries = np.load(args.query_file)
    rows = []
    for setting in args.settings.split(","):
        nprobe, k_factor = (None, None) if setting == "-" else map(int, setting.split(":"))
        store.search(queries[: args.batch], args.k, nprobe, k_factor=k_factor)  # warm-up
        speed, ids = timed_search(lambda x, k: store.search(x, k, nprobe, k_factor=k_factor), queries, args.k, args.batch)
        rows.append({"setting": setting, "qps": speed, "ids": ids.tolist()})
    print(json.dumps({"load_s": round(load_s, 1), "before": before, "loaded": loaded, "after": status(),
                      "factory": store.manifest.factory, "search": store.manifest.search and vars(store.manifest.search),
                      "rows": rows}))


def child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_folder(args: argparse.Namespace, folder: Path, vectors: Path, truth: np.ndarray, exact_qps: float,
                   queries: np.ndarray, name: str) -> dict:
    if not (folder / "manifest.json").exists() or args.rebuild:
        built = child("build-folder", "--vectors", str(vectors), "--folder", str(folder), "--budget-gb", str(args.budget_gb),
                      "--index-type", args.index_type)
        (OUT / f"{name}-build.json").write_text(json.dumps(built))
    built = json.loads((OUT / f"{name}-build.json").read_text())
    print(f"built {built['factory']} in {built['build_s']}s (+{built['save_s']}s writing), "
          f"peak {built['memory']['VmHWM'] / 2**30:.2f} GiB", flush=True)
    qfile = OUT / f"queries-{len(queries)}.npy"
    np.save(qfile, queries)
    served = child("serve", "--folder", str(folder), "--query-file", str(qfile), f"--settings={args.settings}",
                   "--k", str(args.k), "--batch", str(args.batch))
    gib = 2**30
    rows = [{"setting": r["setting"], "qps": round(r["qps"], 1), "recall@10": round(recall(np.array(r["ids"]), truth), 4),
             "speedup": round(r["qps"] / exact_qps, 1)} for r in served["rows"]]
    for r in rows:
        print(r, flush=True)
    mem = served["after"]
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "factory": built["factory"], "budget_gib": args.budget_gb, "search": served["search"],
            "centroids": built["centroids"], "build_s": built["build_s"], "save_s": built["save_s"],
            "build_peak_gib": round(built["memory"]["VmHWM"] / gib, 2), "load_s": served["load_s"],
            "exact_qps": round(exact_qps, 2), "queries": len(queries), "batch": args.batch,
            "server_peak_gib": round(mem["VmHWM"] / gib, 2), "server_rss_anon_gib": round(mem["RssAnon"] / gib, 2),
            "server_rss_file_gib": round(mem["RssFile"] / gib, 2),
            "server_after_load_gib": round(served["loaded"]["VmRSS"] / gib, 2),
            "server_before_load_gib": round(served["before"]["VmRSS"] / gib, 2), "rows": rows}


def budget(args: argparse.Namespace) -> None:
    """1M real embeddings indexed under ``--budget-gb``."""
    base, queries = load_real(args.views, args.queries)
    truth, exact_qps = exact_truth(base, queries, args.k, f"{args.views}v", args.batch)
    name = f"{args.views}v-{args.budget_gb:g}g"
    report = measure_folder(args, OUT / f"idx-{name}", OUT / f"base-{args.views}v.npy", truth, exact_qps, queries, name)
    report["base"] = list(base.shape)
    write_report(report, args.json, show=False)


def derive(n: int, noise: float, path: Path, views: int, chunk: int = 500_000) -> None:
    """``n`` vectors: row i is real embedding i mod 1.08M plus Gaussian noise of norm about
    ``noise`` (each direction noise / sqrt(d)), renormalised; float16, written a chunk at a time."""
    from numpy.lib.format import open_memmap

    real = load_real(views, 1)[0]
    out = open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.float16, shape=(n, real.shape[1]))
    rng = np.random.default_rng(0)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(n, s + chunk))
        x = np.asarray(real[rows % len(real)], dtype=np.float32)
        copy = rows >= len(real)  # the first len(real) rows are the real embeddings themselves
        x[copy] += rng.normal(scale=noise / np.sqrt(x.shape[1]), size=(int(copy.sum()), x.shape[1])).astype(np.float32)
        x[copy] /= np.linalg.norm(x[copy], axis=1, keepdims=True)
        out[s : s + len(rows)] = x
        print(f"derived {s + len(rows)} of {n}", flush=True)
    out.flush()
    del out
    os.replace(str(path) + ".tmp.npy", path)


def big(args: argparse.Namespace) -> None:
    """``--n`` derived vectors indexed under ``--budget-gb``; exact search over the folder's
    memory-mapped vectors in chunks for the truth."""
    name = f"{args.n // 1_000_000}m-{args.budget_gb:g}g"
    folder = OUT / f"idx-{name}"
    source = OUT / f"derived-{args.n}.npy"
    if not (folder / "manifest.json").exists() and not source.exists():
        derive(args.n, args.noise, source, args.views)
    if args.step == "derive":
        return
    queries = np.load(REAL / "queries.npy")[: args.queries]
    if not (folder / "manifest.json").exists() or args.rebuild:
        built = child("build-folder", "--vectors", str(source), "--folder", str(folder), "--budget-gb",
                      str(args.budget_gb), "--index-type", args.index_type)
        (OUT / f"{name}-build.json").write_text(json.dumps(built))
        print(built, flush=True)
    if args.step == "build":
        return
    stored = np.load(folder / "vectors.npy", mmap_mode="r")
    if source.exists() and not args.keep_source:
        source.unlink()  # the folder holds its own copy
    truth, exact_qps = exact_truth(stored, queries, args.k, name, args.batch)
    if args.step == "truth":
        return
    report = measure_folder(args, folder, source, truth, exact_qps, queries, name)
    report["base"] = list(stored.shape)
    report["noise"] = args.noise
    write_report(report, args.json, show=False)


def drift(args: argparse.Namespace) -> None:
    """The centroid distance (what ``--append`` compares with the build's) of vectors of the same
    distribution and of vectors pushed away from it, against the figure stored at build time."""
    from index import IndexStore, ivf

    store = IndexStore.load(args.folder)
    cents, built = ivf.centroids(store.index), store.manifest.centroids.distance
    rng = np.random.default_rng(1)
    real = np.asarray(store.vectors[ivf.sample_rows(store.manifest.count, 20_000, 2)], dtype=np.float32)
    sets = {"augmented views of the test images": augmented_test_views(),
            "test images (unaugmented)": np.load(REAL / "queries.npy")}
    for noise in (0.25, 0.5, 1.0):
        x = real + rng.normal(scale=noise / np.sqrt(real.shape[1]), size=real.shape).astype(np.float32)
        sets[f"indexed vectors + noise {noise:g}"] = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = [{"set": name, "distance": round(d, 4), "ratio": round(d / built, 3)}
            for name, d in ((name, ivf.centroid_distance(cents, x)) for name, x in sets.items())]
    for r in rows:
        print(r, flush=True)
    write_report({"folder": args.folder, "built": built, "factor": ivf.DRIFT_FACTOR, "rows": rows}, args.json, show=False)


def quantizers(args: argparse.Namespace) -> None:
    """Which lists a query visits: a flat scan of the centroids against an HNSW graph over them
    (at FAISS's default breadth, efSearch 16, and at 256), on the first ``--n`` base vectors with
    the same centroids' count (``--lists``) and SQ8 codes (near-exact: what is missed is missed
    by the lists)."""
    import faiss

    from index import ann

    base = load_real(args.views, 1)[0][: args.n]
    queries = np.load(REAL / "queries.npy")[: args.queries]
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.asarray(base, dtype=np.float32))
    truth = flat.search(queries, args.k)[1]
    del flat
    rows = []
    for factory in (f"IVF{args.lists},SQ8", f"IVF{args.lists}_HNSW32,SQ8"):
        index, _ = ann.build(base, factory)
        for ef in ((16, 256) if "HNSW" in factory else (None,)):
            for nprobe in (8, 16, 64):
                ann.set_search_params(index, nprobe)
                if ef is not None:
                    faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch = ef
                rows.append({"factory": factory, "efSearch": ef, "nprobe": nprobe,
                             "recall@10": round(recall(index.search(queries, args.k)[1], truth), 4)})
                print(rows[-1], flush=True)
    write_report({"base": [args.n, base.shape[1]], "queries": len(queries), "rows": rows}, args.json, show=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("embed")
    p.add_argument("--views", default="0-17")
    p.add_argument("--encoder", default=str(ENCODER))
    p.add_argument("--batch", type=int, default=1000)
    p = sub.add_parser("build-folder")
    p.add_argument("--vectors", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--budget-gb", type=float, required=True)
    p.add_argument("--index-type", default="auto")
    p = sub.add_parser("serve")
    p.add_argument("--folder", required=True)
    p.add_argument("--query-file", required=True)
    p.add_argument("--settings", default="-")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=100)
    for name in ("budget", "big"):
        p = sub.add_parser(name)
        p.add_argument("--budget-gb", type=float, default=1.0 if name == "budget" else 8.0)
        p.add_argument("--index-type", default="auto")
        p.add_argument("--settings", default="-", help="nprobe:k_factor pairs, '-' for the manifest's (comma-separated)")
        p.add_argument("--rebuild", action="store_true")
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--step", choices=["derive", "build", "truth", "all"], default="all")
    p.add_argument("--keep-source", action="store_true")
    p = sub.add_parser("quantizers")
    p.add_argument("--n", type=int, default=300_000)
    p.add_argument("--lists", type=int, default=1024)
    p = sub.add_parser("drift")
    p.add_argument("--folder", required=True)
    p = sub.add_parser("sweep")
    p.add_argument("--factories", default="IVF4096_HNSW32,PQ64x4fs")
    p.add_argument("--nprobe", default="16,32,64")
    p.add_argument("--k-factor", default="1,4,16")
    for name, p in sub.choices.items():
        if name in ("embed", "build-folder", "serve", "drift"):
            continue
        p.add_argument("--views", type=int, default=18, help="views of the real embeddings in the base (60,000 each)")
        p.add_argument("--queries", type=int, default=2000)
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--batch", type=int, default=100)
        p.add_argument("--json", default=None)
    sub.choices["drift"].add_argument("--json", default=None)
    args = ap.parse_args()
    {"embed": embed, "sweep": sweep, "build-folder": build_folder, "serve": serve, "budget": budget,
     "big": big, "drift": drift, "quantizers": quantizers}[args.cmd](args)


if __name__ == "__main__":
    main()
