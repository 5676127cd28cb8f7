"""What training buys on a folder of photos, through the CLI a user runs:
`retrieval train --minutes M` -> `retrieval index` (train and test folders) -> `retrieval knn-eval`,
against the controls under the same evaluation:

- the same architecture untrained (its random weights, whitened on the training images, as
  training would whiten them), at the same resolution;
- raw pixels at the same resolution (weighted cosine kNN on the centred pixels, plain and
  PCA-whitened to 512 dimensions, and that again on each image averaged with its mirror image,
  as encoders with ``flip_average`` embed).

    python bench/make_photos.py bench/out/photos
    python bench/photo_quality.py --data bench/out/photos --minutes 10,30 --json bench/out/photo_quality.json

Stages already done (an encoder, an index) are reused, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import write_report

WORK = Path("bench/out/photo_quality")


def cli(*args: str) -> str:
    """Run ``retrieval ARGS`` and return its output (stop the benchmark on a failure)."""
    cmd = [sys.executable, "-m", "retrieval", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def evaluate(encoder: Path, name: str, data: Path) -> dict:
    """Index the train and test folders with ``encoder``; weighted kNN of test against train."""
    timings = {}
    for split in ("train", "test"):
        out = WORK / f"index-{name}-{split}"
        if not (out / "manifest.json").exists():
            start = time.perf_counter()
            cli("index", "--encoder", encoder, "--source", data / split, "--out", out, "--no-progress")
            timings[f"index_{split}_s"] = round(time.perf_counter() - start, 1)
    report = json.loads(cli("knn-eval", "--gallery-index", WORK / f"index-{name}-train",
                            "--query-index", WORK / f"index-{name}-test", "--json"))
    return {"knn_top1": round(100 * report["top1"], 2), "knn_top5": round(100 * report["top5"], 2), **timings}


def trained(minutes: float, data: Path) -> dict:
    run = WORK / f"train-{minutes:g}min"
    result: dict = {"minutes": minutes}
    if not (run / "encoder.pt").exists() or (run / "checkpoint.pt").exists() and not (run / "done.json").exists():
        start = time.perf_counter()
        out = cli("train", "--data", data / "train", "--out", run, "--minutes", minutes, "--no-progress",
                  *(("--resume",) if (run / "checkpoint.pt").exists() else ()))
        wall = time.perf_counter() - start
        times = re.search(r"time: (\d+) s training, (\d+) s end-of-run work", out)
        steps = re.search(r"trained (\d+) epochs \((\d+) steps\)", out)
        done = {"wall_s": round(wall, 1), "train_s": int(times.group(1)), "end_s": int(times.group(2)),
                "epochs": int(steps.group(1)), "steps": int(steps.group(2)), "output": out.strip().splitlines()}
        (run / "done.json").write_text(json.dumps(done))
    result.update(json.loads((run / "done.json").read_text()))
    result.update(evaluate(run / "encoder.pt", f"{minutes:g}min", data))
    return result


def untrained(data: Path, image_size: int | None) -> dict:
    """The photo profile's architecture with its initial weights, whitened on the training images."""
    from simclr.config import TrainConfig
    from simclr.train import Trainer

    tag = f"untrained-{image_size or 'default'}"
    enc_path = WORK / f"{tag}.pt"
    if not enc_path.exists():
        trainer = Trainer(TrainConfig(data=str(data / "train"), out=str(WORK / f"run-{tag}"), epochs=1,
                                      image_size=image_size, knn_every=0, progress=False))
        trainer.encoder().save(enc_path)
    size = torch.load(enc_path, weights_only=True)["spec"]["image_size"]
    return {"image_size": size, **evaluate(enc_path, tag, data)}


def pixels(data: Path, size: int) -> dict:
    """Weighted cosine kNN (k=200, T=0.07) on centred raw pixels at ``size``: plain, and
    projected on the 512 leading principal axes and whitened as the encoders' features are.
    Worked in chunks: 20,000 photos at 96 px are 2.2 GB of float pixels."""
    from simclr.data import load_folder
    from simclr.knn import score_predictions, topk_neighbours, weighted_vote
    from simclr.whitening import fit_whitening

    def knn_evaluate(q, q_labels, g, g_labels, classes, k, t):  # noqa: ANN001, ANN202
        # Without the exact tie-breaking re-rank of simclr.knn (it gathers k gallery rows per
        # query: 100 GB of 27,648-d pixels).
        sims, idx = topk_neighbours(q, g, k)
        return score_predictions(weighted_vote(sims, g_labels[idx], classes, t), q_labels, classes)

    train, test = load_folder(data / "train", size), load_folder(data / "test", size)
    out = {"image_size": size, "dims": train.images[0].numel()}
    for name, mirror in (("", False), ("_flip_averaged", True)):
        # Pixels are their own features: averaging an image's and its mirror's is averaging the
        # image with its mirror image.
        g_images, q_images = (((x.float() + x.flip(-1).float()) / 2) if mirror else x for x in (train.images, test.images))
        mean = g_images[::10].flatten(1).float().mean(0) / 255

        def rows(images: torch.Tensor, fn, mean: torch.Tensor = mean) -> torch.Tensor:  # noqa: ANN001
            return torch.cat([fn(images[i : i + 1000].flatten(1).float() / 255 - mean) for i in range(0, len(images), 1000)])

        unit = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
        if not mirror:
            plain = knn_evaluate(rows(q_images, unit), test.labels, rows(g_images, unit), train.labels,
                                 len(train.classes), 200, 0.07)
            out["plain_top1"] = round(100 * plain.top1, 2)
        # The principal axes of 4,000 evenly spaced training images.
        sample = g_images[:: max(1, len(train) // 4000)].flatten(1).float() / 255 - mean
        _, _, vh = torch.linalg.svd(sample, full_matrices=False)
        axes = vh[:512].T.contiguous()
        gp, qp = rows(g_images, lambda x: x @ axes), rows(q_images, lambda x: x @ axes)
        w_mean, w = fit_whitening(gp[:: max(1, len(gp) // 10000)])
        white = knn_evaluate(unit((qp - w_mean) @ w), test.labels, unit((gp - w_mean) @ w), train.labels,
                             len(train.classes), 200, 0.07)
        out[f"pca512_whitened{name}_top1"] = round(100 * white.top1, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bench/out/photos", type=Path, help="a folder with train/ and test/ class subfolders")
    ap.add_argument("--minutes", default="10,30", help="training budgets, comma-separated")
    ap.add_argument("--control-sizes", default="96", help="resolutions of the untrained and pixel controls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        "data": str(args.data), "evaluation": "weighted kNN (k=200, T=0.07) of the test folder against the train folder",
    }
    sizes = [int(s) for s in args.control_sizes.split(",")]
    report["untrained"] = [untrained(args.data, s) for s in sizes]
    budgets = [float(m) for m in args.minutes.split(",")]
    report["trained"] = [trained(budgets[0], args.data)]  # the first budget before the slower controls
    write_report(report, args.json, show=False)
    report["pixels"] = [pixels(args.data, s) for s in sizes]
    write_report(report, args.json, show=False)
    report["trained"] += [trained(m, args.data) for m in budgets[1:]]
    write_report(report, args.json)


if __name__ == "__main__":
    main()
