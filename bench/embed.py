"""Embedding throughput of ``retrieval index``'s path against the model alone, same model and batch.

    python bench/embed.py --encoder runs/fashion-mnist/train/encoder.pt [--source fashion-mnist:test]

(a) the backbone's forward pass on random, already normalised tensors (the ceiling);
(b) :func:`retrieval.embed.embed_collection`: hashing, preprocessing, forward, normalisation.
Both are timed in alternating rounds; medians are reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from harness import write_report
from retrieval.embed import embed_collection, open_collection
from simclr.device import pick_device
from simclr.encoder import Encoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--source", default="fashion-mnist:test")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    enc = Encoder.load(args.encoder, device)
    coll = open_collection(args.source)
    n = len(coll)
    s = enc.spec
    x = torch.randn(args.batch_size, s.in_channels, s.image_size, s.image_size, device=device).contiguous(memory_format=torch.channels_last)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def model_only() -> float:
        enc.backbone.eval()
        steps = max(1, n // args.batch_size)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    enc.backbone(x)
            else:
                enc.backbone(x)
        sync()
        return steps * args.batch_size / (time.perf_counter() - start)

    def pipeline() -> float:
        start = time.perf_counter()
        out = embed_collection(enc, coll, batch_size=args.batch_size, workers=args.workers, progress=False)
        sync()
        return len(out.items) / (time.perf_counter() - start)

    model_only()  # warm-up
    a, b = [], []
    for _ in range(args.rounds):
        a.append(model_only())
        b.append(pipeline())
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads",
        "encoder": f"{s.arch} {s.stem} stem {s.image_size}px", "source": args.source, "images": n, "batch": args.batch_size,
        "a_model_only_img_s": round(statistics.median(a), 1), "b_embed_img_s": round(statistics.median(b), 1),
        "b_over_a": round(statistics.median(b) / statistics.median(a), 3), "rounds": {"a": [round(v) for v in a], "b": [round(v) for v in b]},
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
