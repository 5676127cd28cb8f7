"""Training throughput on a folder of photos, three ways, same model, batch and resolution,
measured side by side in one run (rounds interleaved):

(a) model only: forward + backward + optimiser step on views already made (the ceiling);
(b) the trainer's streaming path: DataLoader workers decode and resize the JPEGs into uint8
    batches, the two-view augmentation runs batched on the device, then the step. Measured
    twice: in the first epoch (the workers decode each photo and keep it in the run's file of
    decoded images) and in the epochs after it (the workers read the kept images back); and,
    as its control, the same step on the same uint8 images held in memory (no loading at all);
(c) the common approach: per-sample torchvision transforms on the decoded PIL image
    (RandomResizedCrop, flip, colour jitter, grayscale) in DataLoader workers.

    python bench/make_photos.py bench/out/photos
    python bench/photo_training.py --data bench/out/photos/train --json bench/out/photo_training.json

Prints views/s (two views an image) and the ratios b/a and b/c, for (b) after the first epoch
and in it, from the medians over rounds and as the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from harness import write_report
from simclr.config import TrainConfig
from simclr.images import open_image
from simclr.train import Trainer


class TwoViews(Dataset):
    """Files decoded by PIL, two torchvision-augmented views each (SimCLR's recipe)."""

    def __init__(self, paths: list[str], size: int, load: int, mean: list[float], std: list[float], s: float = 0.5):
        self.paths, self.load = paths, load
        self.t = T.Compose([
            T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        im = open_image(self.paths[i], size=self.load)  # decoded as (b) decodes: no smaller than its load size
        return self.t(im), self.t(im)


def timed(step, n: int, warmup: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bench/out/photos/train")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=None, help="default: the photo profile's (96 on a CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the photo profile's")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of (b) and (c); default: the trainer's")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cfg = TrainConfig(data=args.data, out=f"bench/out/photo_training/run-{int(time.time())}", arch=args.arch,
                      image_size=args.image_size, batch_size=args.batch_size, loader="stream",
                      loader_workers=args.workers, epochs=1, progress=False, knn_every=0)
    trainer = Trainer(cfg)
    cfg, source = trainer.cfg, trainer.source
    device, b, size = trainer.device, cfg.batch_size, cfg.image_size
    g = torch.Generator(device=device).manual_seed(0)
    views = torch.randn(2 * b, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    order = trainer._batch_order(0)
    n = args.steps + args.warmup
    # Later epochs: the same rows each round, their images kept by one pass beforehand. First
    # epoch: rows from the other end of the order, never read before, new ones each round.
    later, first = order[:n], order[n:]
    if len(first) < n * args.rounds:
        raise SystemExit(f"{len(source)} photos are too few for {args.rounds} rounds of {n} first-epoch batches")
    held = torch.stack([x for _, x in source.batches(later, fill=True)])  # (kept in the file, too)
    paths = [p.decode() for p in source.files]
    loader = DataLoader(TwoViews(paths, size, source.size, trainer.mean, trainer.std), batch_size=b, shuffle=True,
                        num_workers=source.workers, drop_last=True, prefetch_factor=4 if source.workers else None)
    live: dict[str, object] = {}

    def model_step() -> None:
        trainer.step_on_views(views)

    def streaming_step() -> None:
        _, x = next(live["stream"])
        trainer.train_step(x.to(device, non_blocking=True), g)

    def memory_step() -> None:
        trainer.train_step(next(live["stream"]).to(device, non_blocking=True), g)

    def torchvision_step() -> None:
        v1, v2 = next(live["loader"])
        trainer.step_on_views(torch.cat([v1, v2]).to(device, non_blocking=True))

    steps = {"a_model_only": model_step, "b_streaming": streaming_step, "b_streaming_first_epoch": streaming_step,
             "b_held_in_memory": memory_step, "c_torchvision_dataloader": torchvision_step}
    rates: dict[str, list[float]] = {k: [] for k in steps}
    offset = 0
    for _ in range(args.rounds):
        for name, fn in steps.items():
            # Workers start for their own measurement and stop after it: idle workers would
            # still be prefetching into the others.
            if name == "b_streaming":
                live["stream"] = source.batches(later, fill=True)
            if name == "b_streaming_first_epoch":
                live["stream"] = source.batches(first[offset : offset + n], fill=True)
                offset += n
            if name == "b_held_in_memory":
                live["stream"] = iter(held)
            if name == "c_torchvision_dataloader":
                live["loader"] = iter(loader)
            seconds = timed(fn, args.steps, args.warmup)
            live.clear()
            rates[name].append(2 * b * args.steps / seconds)

    kept = source.cache.capacity if source.cache is not None else 0
    source.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads" if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "config": {"data": args.data, "images": len(source), "arch": cfg.arch, "stem": cfg.stem, "image_size": size,
                   "load_size": source.size, "batch_size": b, "workers": source.workers, "device": str(device),
                   "decoded_images_kept": kept},
        "views_per_s": {k: round(v, 1) for k, v in med.items()},
        "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "b_over_a": round(med["b_streaming"] / med["a_model_only"], 3),
        "b_over_c": round(med["b_streaming"] / med["c_torchvision_dataloader"], 3),
        "b_first_epoch_over_a": round(med["b_streaming_first_epoch"] / med["a_model_only"], 3),
        "b_first_epoch_over_c": round(med["b_streaming_first_epoch"] / med["c_torchvision_dataloader"], 3),
        "held_in_memory_over_a": round(med["b_held_in_memory"] / med["a_model_only"], 3),
        # Each round's ratio to the model measured beside it, the median over rounds: a round
        # shares the machine's state of the moment, which drifts between rounds.
        "paired_over_a": {k: round(statistics.median(x / m for x, m in zip(v, rates["a_model_only"])), 3)
                          for k, v in rates.items() if k != "a_model_only"},
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
