"""A quick recipe search on the photo-like set: each variant trains for a few minutes, then
weighted kNN (k=200, T=0.07) of 1,000 evenly spaced test images against 4,000 evenly spaced
training images, beside the same architecture untrained (its weights at step 0).

    python bench/photo_recipes.py --minutes 3 \\
        "base:" "strong-colour:jitter_strength=1.0,blur_p=0.5" "b64:jitter_strength=1.0,blur_p=0.5,batch_size=64"

A variant is NAME:OPTION=VALUE,... with TrainConfig's option names; the photo profile gives
the rest. The full evaluation (every image, through the CLI) is bench/photo_quality.py's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from harness import write_report
from simclr.config import TrainConfig
from simclr.data import load_folder
from simclr.encoder import embed_images
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--data", default="bench/out/photos", type=Path)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
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
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start
        trained = knn(trainer.encoder(), gallery, queries)
        rows.append({"variant": name, "options": opts, "steps": result.steps, "train_s": round(result.train_seconds),
                     "wall_s": round(seconds), "loss": round(result.final_loss, 3), "untrained_top1": untrained,
                     "trained_top1": trained, "gain": round(trained - untrained, 2)})
        print(json.dumps(rows[-1]), flush=True)
        torch.manual_seed(0)
    write_report({"date": time.strftime("%Y-%m-%d"), "minutes": args.minutes, "data": str(args.data),
                  "evaluation": "weighted kNN k=200 T=0.07, 1,000 test vs 4,000 train images (evenly spaced)",
                  "rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
