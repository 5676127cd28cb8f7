"""Search SimCLR recipes at a fixed budget: train each variant, report its kNN accuracy.

    python bench/recipe_search.py --epochs 1 --out bench/out/search \
        --variant 'temperature=0.2' --variant 'temperature=0.2,crop_min=0.2'

Each variant is a comma-separated list of TrainConfig overrides applied to the base recipe
(ResNet-18, standard stem, 32 px, batch 256 on Fashion-MNIST). Results are appended as JSON
lines to OUT/results.jsonl: wall-clock training time and weighted-kNN top-1 at k=200 and
k=20 (T=0.07) on the test split against the train split, of the backbone's plain features
and, when training fitted one, of the whitened embedding the encoder file holds.

``--minutes M`` trains each variant to a time budget instead of a number of epochs (as
``retrieval train`` does on a CPU: the step count is fixed from the first steps' time).
``--untrained`` trains nothing: it evaluates each variant's network as training would start it
(seed, random init), with the whitening fit exactly as training fits it at a save
(:meth:`simclr.train.Trainer.encoder`), the control that tells what training adds:

    python bench/recipe_search.py --minutes 10 --out bench/out/budget --variant ''
    python bench/recipe_search.py --untrained --out bench/out/budget --variant ''
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

from simclr.config import TrainConfig
from simclr.data import load_images
from simclr.encoder import Encoder, embed_images
from simclr.knn import knn_evaluate


def parse_variant(text: str) -> dict:
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        kind = str(types[key])
        if "int" in kind and "float" not in kind:
            out[key] = int(value)
        elif "float" in kind:
            out[key] = float(value)
        elif "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=None, help="epochs of training (default 1 unless --minutes)")
    ap.add_argument("--minutes", type=float, default=None, help="a time budget instead of --epochs")
    ap.add_argument("--untrained", action="store_true", help="evaluate each variant's untrained network instead")
    ap.add_argument("--out", default="bench/out/search")
    ap.add_argument("--variant", action="append", default=[])
    args = ap.parse_args()
    if args.epochs is not None and args.minutes is not None:
        ap.error("give --epochs or --minutes, not both")
    length = {"minutes": args.minutes} if args.minutes is not None else {"epochs": args.epochs or 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    for i, text in enumerate(args.variant or [""]):
        overrides = parse_variant(text)
        run_dir = out / f"run-{int(time.time())}-{i}"
        cfg = TrainConfig(**{"out": str(run_dir), **length, "knn_every": 0, "progress": False, **overrides})
        from simclr.train import Trainer

        start = time.perf_counter()
        trainer = Trainer(cfg)
        c = trainer.cfg  # resolved: the device's defaults filled in
        row = {"variant": text, **length, "stem": c.stem, "width": c.width, "image_size": c.image_size,
               "batch_size": c.batch_size, "seed": c.seed}
        if args.untrained:
            # The weights training starts from, whitened as a save of training whitens them.
            encoder_path = run_dir / "encoder.pt"
            trainer.encoder().save(encoder_path)
            row.update(untrained=True, steps=0)
        else:
            result = trainer.fit()
            encoder_path = result.encoder
            row.update(steps=result.steps, epochs_done=round(result.steps / trainer.steps_per_epoch, 3),
                       fit_seconds=round(result.train_seconds, 1), end_seconds=round(result.end_seconds, 1),
                       views_per_s=round(result.views_per_second), loss=round(result.final_loss, 4))
        row["train_seconds"] = round(time.perf_counter() - start, 1)
        enc = Encoder.load(encoder_path)
        ch = enc.spec.in_channels
        from simclr.images import match_channels

        g = embed_images(enc, match_channels(train_set.images, ch), features=True)
        q = embed_images(enc, match_channels(test_set.images, ch), features=True)
        # Plain: the backbone's features as training left them (what the recipe learned);
        # whitened: what the saved encoder embeds with, when training fitted a whitening.
        kinds = {"": (F.normalize(q, dim=1), F.normalize(g, dim=1))}
        if enc.white_matrix is not None:
            kinds["_whitened"] = (enc.from_features(q), enc.from_features(g))
        for suffix, (qe, ge) in kinds.items():
            for k in (200, 20):
                r = knn_evaluate(qe, test_set.labels, ge, train_set.labels, 10, k, 0.07)
                row[f"knn{k}_top1{suffix}"] = round(100 * r.top1, 2)
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the trainer's plan
    torch.manual_seed(0)
    main()
