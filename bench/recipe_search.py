"""Search SimCLR recipes at a fixed budget: train each variant, report its kNN accuracy.

    python bench/recipe_search.py --epochs 1 --out bench/out/search \
        --variant 'temperature=0.2' --variant 'temperature=0.2,crop_min=0.2'

Each variant is a comma-separated list of TrainConfig overrides applied to the base recipe
(ResNet-18, standard stem, 32 px, batch 256 on Fashion-MNIST). Results are appended as JSON
lines to OUT/results.jsonl: wall-clock training time and weighted-kNN top-1 at k=200 and
k=20 (T=0.07) on the test split against the train split, of the backbone's plain features
and, when training fitted one, of the whitened embedding the encoder file holds.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="bench/out/search")
    ap.add_argument("--variant", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    for i, text in enumerate(args.variant or [""]):
        overrides = parse_variant(text)
        run_dir = out / f"run-{int(time.time())}-{i}"
        cfg = TrainConfig(**{"out": str(run_dir), "epochs": args.epochs, "knn_every": 0, "progress": False, **overrides})
        from simclr.train import Trainer

        start = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.fit()
        seconds = time.perf_counter() - start
        enc = Encoder.load(result.encoder)
        ch = enc.spec.in_channels
        from simclr.images import match_channels

        g = embed_images(enc, match_channels(train_set.images, ch), features=True)
        q = embed_images(enc, match_channels(test_set.images, ch), features=True)
        row = {"variant": text, "epochs": args.epochs, "train_seconds": round(seconds, 1),
               "views_per_s": round(result.views_per_second), "loss": round(result.final_loss, 4)}
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
    torch.manual_seed(0)
    main()
