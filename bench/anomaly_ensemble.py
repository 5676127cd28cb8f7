"""Strict anomaly scores from two encoders at once: the broader encoder a class started from, and
the encoder adapted to that class.

``retrieval train --init ENCODER`` adapts an encoder trained on broader data to one class; the
adapted weights re-fit much of what the start held (BENCHMARKS.md, "Tried: each class starting
from an encoder trained on generated photos"). This study asks whether the two together score
better than either: each image's features from both, concatenated (every block scaled to one
variance on the gallery, as ``bench/anomaly_layers.py`` does) and whitened on the gallery, or the
two kNN scores each standardised by the gallery's leave-one-out scores and summed.

It reads the features ``bench/anomaly_layers.py`` cached (run that first)::

    .venv/bin/python bench/anomaly_layers.py --encoders photo:shared=ENC adapted=DIR
    .venv/bin/python bench/anomaly_ensemble.py --base photo --adapted adapted [--adapted other ...]

``--base``: a ``NAME:shared`` set of anomaly_layers (one encoder for every class); ``--adapted``: a
``NAME=DIR`` set (one encoder per class). Classes without an adapted encoder are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from anomaly_layers import K, OUT, SHRINKAGE, d_score, feature_files, space  # noqa: E402
from anomaly_scores import leave_one_out, standardised  # noqa: E402
from anomaly_study import l2_knn, whiten  # noqa: E402
from retrieval.anomaly import auroc  # noqa: E402
from simclr.data import load_images  # noqa: E402

# (the pyramid, 3,584-d at width 64, makes a 7,168-d joined space: minutes of whitening a class)
MIDDLE = ["l3s", "l4"]
LAST = ["l4"]


def knn_scores(g: torch.Tensor, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The index's score (variant d) of the queries, and each gallery row's leave-one-out score,
    in one whitening fit on the gallery."""
    gw, qw = whiten(g, g, q, shrinkage=SHRINKAGE)
    return l2_knn(qw, gw)[K], leave_one_out(gw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="anomaly_layers' NAME:shared set the classes started from")
    p.add_argument("--adapted", nargs="+", required=True, help="anomaly_layers' NAME=DIR sets, one encoder per class")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    tr_lab, te_lab = train.labels.numpy(), test.labels.numpy()
    base_train, base_test = (torch.load(f) for f in feature_files(f"{args.base}:shared"))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.adapted:
        per_class: dict[str, dict[str, float]] = {}
        for c, cls in enumerate(train.classes):
            gallery_file, test_file = feature_files(name, c)
            if not gallery_file.exists():
                continue
            ag, aq = torch.load(gallery_file), torch.load(test_file)
            bg = {k: v[tr_lab == c] for k, v in base_train.items()}
            anomalous = te_lab != c
            row: dict[str, float] = {}
            for label, blocks in (("last stage", LAST), ("l3 2x2 + l4", MIDDLE)):
                a = space(ag, aq, blocks, False)
                b = space(bg, base_test, blocks, False)
                (da, ra), (db, rb) = knn_scores(*a), knn_scores(*b)
                joined = (torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
                row[f"adapted, {label}"] = 100 * auroc(da, anomalous)
                row[f"base, {label}"] = 100 * auroc(db, anomalous)
                row[f"both concatenated, {label}"] = 100 * auroc(d_score(*joined), anomalous)
                row[f"both scores summed, {label}"] = 100 * auroc(standardised(da, ra) + standardised(db, rb), anomalous)
            per_class[cls] = row
            print(name, cls, {k: round(v, 2) for k, v in row.items()}, flush=True)
        results[name] = per_class
    lines = []
    for name, per_class in results.items():
        variants = list(next(iter(per_class.values())))
        lines += [f"{name} ({len(per_class)} classes; base: {args.base}):", "",
                  "| variant | " + " | ".join(c[:7] for c in per_class) + " | mean |",
                  "|---|" + "---:|" * (len(per_class) + 1)]
        lines += [f"| {v} | " + " | ".join(f"{per_class[c][v]:.2f}" for c in per_class)
                  + f" | {np.mean([per_class[c][v] for c in per_class]):.2f} |" for v in variants]
        lines.append("")
    text = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ensemble.md").write_text(text)
    (OUT / "ensemble.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
