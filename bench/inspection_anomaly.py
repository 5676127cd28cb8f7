"""Anomaly scores on the inspection-line set (``make_inspection.py``), defect by defect.

The gallery is the good parts of ``train/``; the queries are ``test/`` (good parts and parts with
one defect each). Each encoder's features are scored as the index scores them: its anomaly
space fit on the gallery (``retrieval.anomaly.AnomalySpace``), the mean Euclidean distance to
the k = 5 nearest gallery items; AUROC of good against every defect and against each kind. Raw
pixels at the encoder's size (L2) are the control, and the floored whitening of small galleries
(the N / 2 leading directions, ``simclr.whitening.fit_whitening``) is scored beside the index's
space::

    .venv/bin/python bench/inspection_anomaly.py --data bench/out/inspection \\
        --encoder strict=bench/out/inspection-strict/good/encoder.pt \\
        --encoder untrained=bench/out/photo_quality/untrained-64.pt --json bench/out/inspection_anomaly.json

``NAME:untrained=PATH`` scores PATH's architecture at its run's initial weights (the control of
that run, as in ``anomaly_layers.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_layers import one_encoder  # noqa: E402
from anomaly_small_gallery import knn_score  # noqa: E402
from harness import write_report  # noqa: E402
from small_gallery import features  # noqa: E402

from retrieval.anomaly import DEFAULT_SHRINKAGE, AnomalySpace, auroc  # noqa: E402
from simclr.data import load_folder  # noqa: E402
from simclr.whitening import evenly_spaced_positions  # noqa: E402
from simclr.whitening import fit_whitening  # noqa: E402


def aurocs(scores: np.ndarray, kinds: np.ndarray, names: list[str]) -> dict[str, float]:
    good = names.index("good")
    out = {"all defects": auroc(scores, kinds != good)}
    for k, name in enumerate(names):
        if k != good:
            keep = (kinds == good) | (kinds == k)
            out[name] = auroc(scores[keep], kinds[keep] == k)
    return {k: round(100 * v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="bench/out/inspection", type=Path)
    ap.add_argument("--encoder", action="append", default=[],
                    help="NAME=PATH (repeat); NAME:untrained=PATH: PATH's architecture at its run's initial weights")
    ap.add_argument("--gallery-sizes", default="", help="also score galleries of these many good parts (evenly spaced), comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(n) for n in args.gallery_sizes.split(",") if n]
    rows = []
    for name, path in (e.split("=", 1) for e in args.encoder):
        enc = one_encoder(Path(path), untrained=name.endswith(":untrained"))
        spec = enc.spec
        gallery = load_folder(args.data / "train", spec.image_size, spec.in_channels)
        queries = load_folder(args.data / "test", spec.image_size, spec.in_channels)
        start = time.perf_counter()
        g, q = features(enc, gallery.images).numpy(), features(enc, queries.images).numpy()
        space = AnomalySpace.fit(g)
        scored = {f"{name}: the index's space ({space.kind})":
                  knn_score(torch.from_numpy(space.transform(g)), torch.from_numpy(space.transform(q)))}
        mean, matrix = fit_whitening(torch.from_numpy(g), DEFAULT_SHRINKAGE, images_per_direction=2)
        gt, qt = (torch.from_numpy(g) - mean) @ matrix, (torch.from_numpy(q) - mean) @ matrix
        scored[f"{name}: whitened, N/2 directions"] = knn_score(gt, qt)
        if not any(r["features"].startswith(f"raw pixels at {spec.image_size} px") for r in rows):
            px = lambda d: d.images.flatten(1).float() / 255  # noqa: E731
            scored[f"raw pixels at {spec.image_size} px, L2"] = knn_score(px(gallery), px(queries))
        for n in sizes:
            pick = evenly_spaced_positions(len(g), n).numpy()
            small = AnomalySpace.fit(g[pick])
            scored[f"{name}, {n} good parts: the index's space ({small.kind})"] = knn_score(
                torch.from_numpy(small.transform(g[pick])), torch.from_numpy(small.transform(q)))
            scored[f"{name}, {n} good parts: raw features"] = knn_score(torch.from_numpy(g[pick]), torch.from_numpy(q))
            mean, matrix = fit_whitening(torch.from_numpy(g[pick]), DEFAULT_SHRINKAGE, images_per_direction=2)
            scored[f"{name}, {n} good parts: whitened, N/2 directions"] = knn_score(
                (torch.from_numpy(g[pick]) - mean) @ matrix, (torch.from_numpy(q) - mean) @ matrix)
        seconds = round(time.perf_counter() - start, 1)
        for label, s in scored.items():
            row = {"features": label, "dim": int(g.shape[1]), "seconds": seconds,
                   "auroc": aurocs(s, queries.labels.numpy(), queries.classes)}
            print(row, flush=True)
            rows.append(row)
    write_report({"date": time.strftime("%Y-%m-%d %H:%M"), "data": str(args.data), "rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
