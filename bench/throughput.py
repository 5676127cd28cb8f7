"""Training throughput, three ways, same model and batch, measured side by side in one run:

(a) model only: forward + backward + optimiser step on random tensors (the ceiling);
(b) the trainer's full step: batch indexing, two-view augmentation on the device, the step;
(c) the common approach: per-sample torchvision transforms in a DataLoader (2 workers).

    python bench/throughput.py                          # CPU: ResNet-18, standard stem, 32 px, batch 256
    python bench/throughput.py --device cuda --stem small --steps 100
    python bench/throughput.py --precision bf16,fp32     # both, rounds interleaved, with the speed-up

Prints views/s for each (views = 2 per image) and the ratios b/a and b/c; --json writes them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harness import write_report
from simclr.config import TrainConfig
from simclr.train import Trainer


class TwoViews(Dataset):
    """Fashion-MNIST as PIL images, two torchvision-augmented views per item (SimCLR's recipe)."""

    def __init__(self, images: torch.Tensor, size: int, mean: list[float], std: list[float], s: float = 0.5, rgb: bool = False):
        self.images = images[:, 0].numpy()
        self.rgb = rgb
        self.t = T.Compose([
            T.RandomResizedCrop(size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # noqa: ANN204
        im = Image.fromarray(self.images[i], mode="L")
        if self.rgb:  # as libraries built for photos do: every image becomes RGB
            im = im.convert("RGB")
        return self.t(im), self.t(im)


def timed(step, n: int, warmup: int, sync) -> float:  # noqa: ANN001
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--stem", default="standard")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1, choices=(1, 3), help="3: Fashion-MNIST as RGB, as photo libraries load it")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="repeat (a, b, c) this many times; medians are reported")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16; several, comma-separated, are measured side by side (the last is the base of the speed-ups)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    out = Path("bench/out/throughput")
    precisions = args.precision.split(",")
    trainers = {}
    for p in precisions:
        cfg = TrainConfig(out=str(out / f"run-{int(time.time())}-{p}"), arch=args.arch, stem=args.stem, width=args.width, in_channels=args.channels,
                          image_size=args.image_size, batch_size=args.batch_size, epochs=1, device=args.device, compile=args.compile,
                          precision=p, progress=False, knn_every=0)
        trainers[p] = Trainer(cfg)
    first = trainers[precisions[0]]
    device = first.device
    b = args.batch_size
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    c = first.cfg.in_channels
    g = torch.Generator(device=device).manual_seed(0)
    # (a) the model alone on views that are already made.
    views = torch.randn(2 * b, c, args.image_size, args.image_size, device=device).contiguous(memory_format=torch.channels_last)
    # (b) the trainer's step: index a batch of uint8 images, augment twice on the device, step.
    order = torch.randperm(len(first.source), generator=torch.Generator().manual_seed(0))
    cursor = [0]
    # (c) per-sample torchvision transforms in DataLoader workers.
    loader = DataLoader(TwoViews(first.source.images, args.image_size, first.mean, first.std, rgb=args.channels == 3), batch_size=b, shuffle=True,
                        num_workers=args.workers, drop_last=True, prefetch_factor=4,
                        pin_memory=device.type == "cuda")
    batches = [None]  # (a box: loader_step restarts the epoch when it ends)

    def steps(trainer: Trainer) -> dict:
        def model_step() -> None:
            trainer.step_on_views(views)

        def full_step() -> None:
            i = cursor[0] % (len(order) // b)
            cursor[0] += 1
            idx = order[i * b : (i + 1) * b].to(trainer.images.device)
            trainer.train_step(trainer.images[idx].to(device, non_blocking=True), g)

        def loader_step() -> None:
            try:
                v1, v2 = next(batches[0])
            except StopIteration:
                batches[0] = iter(loader)
                v1, v2 = next(batches[0])
            trainer.step_on_views(torch.cat([v1, v2]).to(device, non_blocking=True))

        return {"a_model_only": model_step, "b_full_step": full_step, "c_dataloader": loader_step}

    # Rounds interleave the precisions, so that a slow spell of a shared machine hits them alike.
    rates = {p: {"a_model_only": [], "b_full_step": [], "c_dataloader": []} for p in precisions}
    for _ in range(args.rounds):
        for p, trainer in trainers.items():
            for name, fn in steps(trainer).items():
                if name == "c_dataloader":  # workers start here and stop after: idle workers
                    batches[0] = iter(loader)  # would still be prefetching into (a) and (b)
                seconds = timed(fn, args.steps, args.warmup, sync)
                batches[0] = None
                rates[p][name].append(2 * b * args.steps / seconds)

    def summary(p: str) -> dict:
        med = {k: statistics.median(v) for k, v in rates[p].items()}
        return {
            "precision": str(trainers[p].amp_dtype or "fp32").replace("torch.", ""),
            "views_per_s": {k: round(v, 1) for k, v in med.items()},
            "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates[p].items()},
            "b_over_a": round(med["b_full_step"] / med["a_model_only"], 3),
            "b_over_c": round(med["b_full_step"] / med["c_dataloader"], 3),
        }

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "config": {"arch": args.arch, "width": args.width, "channels": args.channels, "stem": args.stem, "image_size": args.image_size, "batch_size": b,
                   "device": str(device), "compile": args.compile, "workers": args.workers},
    }
    if len(precisions) == 1:
        report.update(summary(precisions[0]))
    else:
        report["by_precision"] = {p: summary(p) for p in precisions}
        base = report["by_precision"][precisions[-1]]["views_per_s"]
        report[f"speed-up over {precisions[-1]}"] = {
            p: {k: round(v / base[k], 3) for k, v in report["by_precision"][p]["views_per_s"].items()} for p in precisions[:-1]
        }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
