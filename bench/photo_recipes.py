"""A quick recipe search on the photo-like set: each variant trains for a few minutes, then
weighted kNN (k=200, T=0.07) of 1,000 evenly spaced test images against 4,000 evenly spaced
training images, beside the same architecture untrained (its weights at step 0).

    python bench/photo_recipes.py --minutes 3 \\
        "base:" "strong-colour:jitter_strength=1.0,blur_p=0.5" "b64:jitter_strength=1.0,blur_p=0.5,batch_size=64"

A variant is NAME:OPTION=VALUE,... with TrainConfig's option names; the photo profile gives
the rest. The full evaluation (every image, through the CLI) is bench/photo_quality.py's.

``--snapshots 10,20`` also keeps the encoder file the run has written by those minutes after
it started (loading included; the file is written once a minute, whitening included) and evaluates each the same way: a
budget curve from one long run (mid-schedule weights, so each point is where the run stood,
not a shorter run's end)::

    python bench/photo_recipes.py --minutes 40 --snapshots 5,10,20,30 "w32-64px:image_size=64,width=32"
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import torch

from harness import write_report
from simclr.config import TrainConfig
from simclr.data import load_folder
from simclr.encoder import Encoder, embed_images
from simclr.knn import knn_evaluate
from simclr.train import Trainer

WORK = Path("bench/out/photo_recipes")


def parse(text: str) -> tuple[str, dict]:
    name, _, opts = text.partition(":")
    out = {}
    for pair in filter(None, opts.split(",")):
        key, _, value = pair.partition("=")
        out[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") or value[:1] == "-" else value
    return name, out


def knn(enc, gallery, queries) -> float:  # noqa: ANN001
    g = embed_images(enc, gallery.images, 256)
    q = embed_images(enc, queries.images, 256)
    return round(100 * knn_evaluate(q, queries.labels, g, gallery.labels, len(gallery.classes), 200, 0.07).top1, 2)


def keep_snapshots(out: Path, minutes: list[float], done: threading.Event) -> list[tuple[float, Path]]:
    """Copy ``out/encoder.pt`` when each of ``minutes`` has passed (in a thread); the list fills as it goes."""
    kept: list[tuple[float, Path]] = []

    def run() -> None:
        start = time.perf_counter()
        for m in minutes:
            if done.wait(max(0.0, 60 * m - (time.perf_counter() - start))):
                return
            src = out / "encoder.pt"
            if src.exists():
                dst = out / f"encoder-{m:g}min.pt"
                shutil.copyfile(src, dst)
                kept.append((m, dst))

    threading.Thread(target=run, daemon=True).start()
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--data", default="bench/out/photos", type=Path)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--snapshots", default="", help="comma-separated minutes at which to keep and evaluate the run's encoder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    marks = [float(m) for m in args.snapshots.split(",") if m]
    sets: dict[int, tuple] = {}
    rows = []
    for text in args.variants:
        name, opts = parse(text)
        cfg = TrainConfig(data=str(args.data / "train"), out=str(WORK / f"{name}-{int(time.time())}"),
                          minutes=args.minutes, progress=False, knn_every=0, **opts)
        trainer = Trainer(cfg)
        size = trainer.cfg.image_size
        if size not in sets:
            g, q = load_folder(args.data / "train", size), load_folder(args.data / "test", size)
            pick = lambda d, n: type(d)(d.images[:: len(d) // n][:n], d.labels[:: len(d) // n][:n], d.classes, [], "")  # noqa: E731
            sets[size] = (pick(g, 4000), pick(q, 1000))
        gallery, queries = sets[size]
        untrained = knn(trainer.encoder(), gallery, queries)
        done = threading.Event()
        kept = keep_snapshots(Path(cfg.out), marks, done)
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start
        done.set()
        trained = knn(trainer.encoder(), gallery, queries)
        rows.append({"variant": name, "options": opts, "steps": result.steps, "train_s": round(result.train_seconds),
                     "wall_s": round(seconds), "loss": round(result.final_loss, 3), "untrained_top1": untrained,
                     "trained_top1": trained, "gain": round(trained - untrained, 2),
                     "snapshots": [{"minutes": m, "trained_top1": knn(Encoder.load(path), gallery, queries)} for m, path in kept]})
        print(json.dumps(rows[-1]), flush=True)
        torch.manual_seed(0)
    write_report({"date": time.strftime("%Y-%m-%d"), "minutes": args.minutes, "data": str(args.data),
                  "evaluation": "weighted kNN k=200 T=0.07, 1,000 test vs 4,000 train images (evenly spaced)",
                  "rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
