"""kNN accuracy and anomaly AUROC of encoders with and without their PCA whitening.

    python bench/whitening.py --encoder runs/fashion-mnist/train/encoder.pt --anomaly \\
        --random runs/fashion-mnist/train/encoder.pt --json bench/out/whitening.json

For each encoder the Fashion-MNIST images are embedded once; the plain embedding is the
L2-normalised backbone feature, the whitened one applies the whitening that training writes
(:meth:`simclr.encoder.Encoder.fit_whitening`: 10,000 evenly spaced training images, shrinkage
1e-4) first. ``--random ENC`` adds an untrained network of ENC's architecture (seed 0), the
control that tells what training adds. Weighted kNN as ``retrieval knn-eval`` (T = 0.07);
anomaly AUROC as ``retrieval anomaly-eval`` (one class normal, k = 5). ``--sizes 32,36,40``
embeds each encoder at each of those input sizes instead of its own (the whitening refit at
each), to tell what the input size does:

    python bench/whitening.py --encoder E.pt --random E.pt --sizes 32,36,40,48
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from harness import write_report

from retrieval.evaluate import LabelledFeatures, one_class_eval
from simclr.data import load_images
from simclr.encoder import Encoder, embed_images
from simclr.knn import knn_evaluate
from simclr.models import build_backbone
from simclr.images import match_channels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", action="append", default=[])
    ap.add_argument("--random", action="append", default=[], help="an untrained network shaped like this encoder")
    ap.add_argument("--anomaly", action="store_true", help="also the one-class anomaly AUROC")
    ap.add_argument("--sizes", default="", help="comma-separated input sizes to embed at (default: each encoder's own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    names = [str(i) for i in range(len(train.classes))]
    rows = []
    sizes = [int(s) for s in args.sizes.split(",") if s] or [None]
    runs = [(p, False, s) for p in args.encoder for s in sizes] + [(p, True, s) for p in args.random for s in sizes]
    for path, random, size in runs:
        enc = Encoder.load(path)
        if random:
            torch.manual_seed(0)
            enc.backbone = build_backbone(enc.spec.arch, enc.spec.in_channels, enc.spec.stem, enc.spec.width)
        if size is not None:
            enc.spec.image_size = size
        ch = enc.spec.in_channels
        g_img, q_img = match_channels(train.images, ch), match_channels(test.images, ch)
        g, q = embed_images(enc, g_img, features=True), embed_images(enc, q_img, features=True)
        enc.fit_whitening(g_img)
        row = {"encoder": path, "untrained": random, "size": enc.spec.image_size}
        for kind in ("plain", "whitened"):
            if kind == "plain":
                gv, qv = F.normalize(g, dim=1), F.normalize(q, dim=1)
            else:
                gv, qv = enc.from_features(g), enc.from_features(q)
            for k in (200, 20):
                r = knn_evaluate(qv, test.labels, gv, train.labels, len(names), k, 0.07)
                row[f"{kind}_knn{k}_top1"] = round(100 * r.top1, 2)
            if args.anomaly:
                a = one_class_eval(LabelledFeatures(gv, train.labels, names, "train"), LabelledFeatures(qv, test.labels, names, "test"), 5)
                row[f"{kind}_anomaly_auroc"] = round(100 * a.mean, 2)
        print(row, flush=True)
        rows.append(row)
    write_report({"date": time.strftime("%Y-%m-%d"), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
