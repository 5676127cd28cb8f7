"""Anomaly scores from more than the last stage: which of the backbone's features carry the signal?

The index scores an item by its mean Euclidean distance to the k nearest gallery items in the
gallery-whitened space of the backbone's pooled *last-stage* features (variant d of
``bench/anomaly_study.py``). At 32 px the standard stem leaves layer4 a 1 x 1 map and layer3 a
2 x 2 one: the last stage has pooled away where things are, and raw pixels, which keep it, are a
strong control (92.3% mean AUROC). This study scores the same encoders with features of earlier
stages (globally pooled, or pooled to 2 x 2 so that layout survives), concatenations of stages,
and test-time horizontal flips, each whitened on the gallery with the index's shrinkage, under
the protocols of ``retrieval anomaly-eval`` and on the untrained control.

Run from the repository root (features cached under bench/out/anomaly_layers/)::

    .venv/bin/python bench/anomaly_layers.py --encoders strict-m10 strict-e3 shared untrained

``strict-m10``: the per-class encoders of ``retrieval anomaly-eval --protocol strict --minutes 10
--work bench/out/strict-m10``; ``strict-e3``: those of ``bench/anomaly_study.py --stage train
--strict-epochs 3``; ``shared``: the demo-recipe encoder (shared-encoder protocol); ``untrained``:
the same ResNet-18 with random weights (seed 0), the control. Other networks::

    .venv/bin/python bench/anomaly_layers.py --encoders b16=bench/out/strict-b16 \
        b16:shared=bench/out/b16/shared/encoder.pt b16:untrained=bench/out/b16/shared/encoder.pt

``--turns`` also embeds every image turned by 90, 180 and 270 degrees and scores the
turn-ensembled variants (``TURN_VARIANTS``, and the four turns joined in one space).

``NAME=DIR``: per-class encoders in ``DIR/<class>/encoder.pt``, classes without one skipped;
``NAME:shared=ENC``: one encoder for every class; ``NAME:untrained=ENC``: ENC's architecture at
its run's initial weights, the control of both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_study import OUT as STUDY_OUT  # noqa: E402
from anomaly_study import l2_knn, shared_encoder_path, untrained_encoder, whiten  # noqa: E402
from retrieval.anomaly import auroc  # noqa: E402
from retrieval.anomaly_eval import _slug  # noqa: E402
from simclr.data import load_images  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.models import build_backbone  # noqa: E402
from simclr.pooling import stage_maps  # noqa: E402

OUT = ROOT / "bench" / "out" / "anomaly_layers"
FEATURES = OUT / "features"
STRICT_DIRS = {"strict-m10": ROOT / "bench" / "out" / "strict-m10"}
K = 5
SHRINKAGE = 1e-4
SIZE: int | None = None  # --size: embed at this many pixels instead of each encoder's own size

log = logging.getLogger("anomaly_layers")

# Blocks of features taken from one forward pass (name -> how it is made from the stage maps).
BLOCKS = ("l2", "l2s", "l2q", "l3", "l3s", "l3q", "l4", "l4s")


@torch.no_grad()
def stage_features(enc: Encoder, images: torch.Tensor, flip: bool = False, batch: int = 500,
                   turn: int = 0) -> dict[str, torch.Tensor]:
    """Pooled features of each stage: ``lN`` global average, ``lNs`` average-pooled to 2 x 2,
    ``lNq`` (stages 2 and 3) to 4 x 4; of the images turned ``turn`` quarter turns
    anticlockwise."""
    b = enc.backbone.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in BLOCKS}
    for s in range(0, images.shape[0], batch):
        x = enc.preprocess(images[s : s + batch])
        if flip:
            x = x.flip(3)
        if turn:
            x = torch.rot90(x, turn, (2, 3))
        maps = dict(zip((2, 3, 4), stage_maps(b, x.contiguous(memory_format=torch.channels_last))))
        for i in (2, 3, 4):
            out[f"l{i}"].append(maps[i].mean((2, 3)).float())
        for i in (2, 3, 4):
            out[f"l{i}s"].append(F.adaptive_avg_pool2d(maps[i], 2).flatten(1).float())
        for i in (2, 3):
            out[f"l{i}q"].append(F.adaptive_avg_pool2d(maps[i], 4).flatten(1).float())
    return {name: torch.cat(parts) for name, parts in out.items()}


def feature_files(name: str, c: int | None = None) -> tuple[Path, Path]:
    """Where a feature set is cached: (training images, test images) for one encoder of every
    class; with ``c``, (class c's training images, test images) for class c's own encoder."""
    if SIZE is not None:
        name = f"{name}@{SIZE}"
    prefix = f"{name}_" if c is None else f"{name}_{c}_"
    return FEATURES / f"{prefix}{'train' if c is None else 'gallery'}.pt", FEATURES / f"{prefix}test.pt"


def _cached(path: Path, enc_fn, compute, what: str) -> dict[str, torch.Tensor]:
    """``compute(encoder)``'s features, cached at ``path`` (the encoder is made only when they are not)."""
    if path.exists():
        return torch.load(path)
    enc = enc_fn()
    if SIZE is not None:
        enc.spec.image_size = SIZE  # what preprocess resizes to
    start = time.perf_counter()
    feats = compute(enc)
    log.info("%s: %s in %.0f s", path.stem, what, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


def cached_features(path: Path, enc_fn, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage features of ``images`` and of their mirror images (``*_flip``), cached at ``path``."""
    def compute(enc: Encoder) -> dict[str, torch.Tensor]:
        feats = stage_features(enc, images)
        feats.update({f"{k}_flip": v for k, v in stage_features(enc, images, flip=True).items()})
        return feats

    return _cached(path, enc_fn, compute, f"{images.shape[0]} images x 2")


TURNS = (1, 2, 3)  # the quarter turns of the turn-ensembled variants (CSI's shifted transformations)


def cached_turned_features(path: Path, enc_fn, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage features of ``images`` turned by each of ``TURNS`` (``*_rotT``), cached at ``path``."""
    return _cached(path, enc_fn,
                   lambda enc: {f"{k}_rot{t}": v for t in TURNS for k, v in stage_features(enc, images, turn=t).items()},
                   f"{images.shape[0]} images x {len(TURNS)} turns")


def turned_file(path: Path) -> Path:
    return path.with_name(path.stem + "_turns.pt")


def block_scaled(gallery: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Divide a block by the root of its mean per-dimension variance on the gallery, so that
    concatenated blocks enter the whitening (whose shrinkage is relative to the largest
    eigenvalue) on one scale."""
    scale = gallery.var(0).mean().sqrt().clamp(min=1e-12)
    return [x / scale for x in xs]


def space(gal: dict[str, torch.Tensor], qry: dict[str, torch.Tensor], blocks: list[str], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery and query vectors of ``blocks`` concatenated (each block scaled; with ``flip`` the
    mean of an image's features and its mirror image's)."""
    g_parts, q_parts = [], []
    for name in blocks:
        g, q = gal[name], qry[name]
        if flip:
            g, q = (g + gal[f"{name}_flip"]) / 2, (q + qry[f"{name}_flip"]) / 2
        g, q = block_scaled(g, g, q)
        g_parts.append(g)
        q_parts.append(q)
    return torch.cat(g_parts, 1), torch.cat(q_parts, 1)


def d_score(g: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """Variant d: mean L2 distance to the k nearest gallery rows after a whitening fit on the gallery."""
    gw, qw = whiten(g, g, q, shrinkage=SHRINKAGE)
    return l2_knn(qw, gw)[K]


VARIANTS: dict[str, tuple[list[str], bool]] = {
    "l4 (the index)": (["l4"], False),
    "l3": (["l3"], False),
    "l2": (["l2"], False),
    "l3 2x2": (["l3s"], False),
    "l2 2x2": (["l2s"], False),
    "l3 + l4": (["l3", "l4"], False),
    "l2 + l3 + l4": (["l2", "l3", "l4"], False),
    "l3 2x2 + l4": (["l3s", "l4"], False),
    "l2 2x2 + l3 2x2 + l4": (["l2s", "l3s", "l4"], False),
    # (the last stage on a grid: for networks whose last stage keeps a map larger than 1 x 1,
    # such as the small stem's 4 x 4 at 28 px)
    "l4 2x2": (["l4s"], False),
    "l3 2x2 + l4 2x2": (["l3s", "l4s"], False),
    "l2 2x2 + l3 2x2 + l4 2x2": (["l2s", "l3s", "l4s"], False),
    "l2 4x4 + l3 2x2 + l4 (pyramid)": (["l2q", "l3s", "l4"], False),
    "l2 4x4 + l3 2x2 + l4 2x2": (["l2q", "l3s", "l4s"], False),
    "l4, flip-averaged": (["l4"], True),
    "l3 + l4, flip-averaged": (["l3", "l4"], True),
    "l3 2x2 + l4, flip-averaged": (["l3s", "l4"], True),
}


# Scored in each quarter turn's own space and averaged over the four turns (CSI, arXiv
# 2007.08176: an encoder that learnt what upright looks like scores a turned normal image as
# turned normal, a turned anomaly as neither); needs --turns.
TURN_VARIANTS: dict[str, list[str]] = {
    "l4, 4 turns": ["l4"],
    "pyramid, 4 turns": ["l2q", "l3s", "l4"],
    "l2 2x2 + l3 2x2 + l4, 4 turns": ["l2s", "l3s", "l4"],
}


def turned(feats: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """The blocks of the images turned ``t`` quarter turns, under their plain names."""
    if t == 0:
        return feats
    suffix = f"_rot{t}"
    return {k[: -len(suffix)]: v for k, v in feats.items() if k.endswith(suffix)}


def turns_joined(feats: dict[str, torch.Tensor], blocks: list[str]) -> dict[str, torch.Tensor]:
    """``blocks`` of every turn under names of their own (``l4@2``: layer 4 of the half-turned
    images), to be concatenated into one vector an image."""
    return {f"{b}@{t}": turned(feats, t)[b] for t in (0, *TURNS) for b in blocks}


def score_class(gal: dict[str, torch.Tensor], qry: dict[str, torch.Tensor], anomalous: np.ndarray) -> dict[str, float]:
    upright = {tuple(blocks): d_score(*space(gal, qry, blocks, False)) for blocks, flip in VARIANTS.values() if not flip}
    out = {name: 100 * auroc(upright[tuple(blocks)] if not flip else d_score(*space(gal, qry, blocks, flip)), anomalous)
           for name, (blocks, flip) in VARIANTS.items()}
    if any(k.endswith("_rot1") for k in gal):
        for name, blocks in TURN_VARIANTS.items():
            scores = [upright[tuple(blocks)]] + [d_score(*space(turned(gal, t), turned(qry, t), blocks, False)) for t in TURNS]
            out[name] = 100 * auroc(np.mean(scores, 0), anomalous)
            out[name.replace("4 turns", "turned only")] = 100 * auroc(np.mean(scores[1:], 0), anomalous)
        # one vector an image, its four turns' features side by side, in one gallery-whitened
        # space (the form an index could store: one table, one search)
        joined = [f"l4@{t}" for t in (0, *TURNS)]
        out["l4, 4 turns joined"] = 100 * auroc(d_score(*space(turns_joined(gal, ["l4"]), turns_joined(qry, ["l4"]), joined, False)),
                                                anomalous)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", default=["strict-m10", "strict-e3", "shared", "untrained"],
                   help="shared, untrained, strict-m10, strict-e3; NAME=DIR: per-class encoders in "
                        "DIR/<class>/encoder.pt (the layout of anomaly-eval's --work); NAME:shared=ENC: one "
                        "encoder for every class (shared-encoder); NAME:untrained=ENC: ENC's architecture at "
                        "its run's initial weights (the control)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--turns", action="store_true",
                   help="also embed every image turned by 90, 180 and 270 degrees and score the turn-ensembled variants")
    p.add_argument("--size", type=int, default=None,
                   help="embed every image at SIZE x SIZE pixels instead of the size each encoder was trained at "
                        "(results under NAME@SIZE)")
    args = p.parse_args()
    global SIZE
    SIZE = args.size
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    tr_lab, te_lab = train.labels.numpy(), test.labels.numpy()
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for which in args.encoders:
        per_class: dict[str, dict[str, float]] = {}
        name, _, path = which.partition("=")
        if name in ("shared", "untrained") or name.endswith((":shared", ":untrained")):
            if name == "shared":
                make = lambda: Encoder.load(shared_encoder_path(), "cpu")  # noqa: E731
            elif name == "untrained":
                make = lambda: untrained_encoder(train.images)  # noqa: E731
            else:
                make = lambda enc=Path(path), untrained=name.endswith(":untrained"): one_encoder(enc, untrained)  # noqa: E731
            train_file, test_file = feature_files(name)
            ftr = cached_features(train_file, make, train.images)
            fte = cached_features(test_file, make, test.images)
            if args.turns:
                ftr = {**ftr, **cached_turned_features(turned_file(train_file), make, train.images)}
                fte = {**fte, **cached_turned_features(turned_file(test_file), make, test.images)}
            for c, cls in enumerate(train.classes):
                gal = {k: v[tr_lab == c] for k, v in ftr.items()}
                per_class[cls] = score_class(gal, fte, te_lab != c)
                log.info("%s %s: %s", name, cls, {k: round(v, 2) for k, v in per_class[cls].items()})
        else:
            root = STRICT_DIRS.get(name, Path(path))
            for c, cls in enumerate(train.classes):
                # (bench/anomaly_study.py names its class folders by index)
                enc = (STUDY_OUT / "strict-e3" / str(c) if name == "strict-e3" else root / _slug(cls)) / "encoder.pt"
                if not enc.exists():
                    log.info("%s %s: no encoder at %s", name, cls, enc)
                    continue
                make = lambda enc=enc: Encoder.load(enc, "cpu")  # noqa: E731
                gallery_file, test_file = feature_files(name, c)
                gal = cached_features(gallery_file, make, train.images[tr_lab == c])
                qry = cached_features(test_file, make, test.images)
                if args.turns:
                    gal = {**gal, **cached_turned_features(turned_file(gallery_file), make, train.images[tr_lab == c])}
                    qry = {**qry, **cached_turned_features(turned_file(test_file), make, test.images)}
                per_class[cls] = score_class(gal, qry, te_lab != c)
                log.info("%s %s: %s", name, cls, {k: round(v, 2) for k, v in per_class[cls].items()})
        results[name if SIZE is None else f"{name}@{SIZE}"] = per_class
        OUT.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
    report(results)


def run_seed(encoder: Path) -> int:
    """The seed of the run that wrote ``encoder`` (its checkpoint's config), 0 without a checkpoint."""
    ckpt = encoder.parent / "checkpoint.pt"
    if not ckpt.exists():
        return 0
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["config"].get("seed", 0))


def one_encoder(path: Path, untrained: bool) -> Encoder:
    """The encoder at ``path``, or (``untrained``) its architecture at its run's initial weights."""
    enc = Encoder.load(path, "cpu")
    if untrained:
        torch.manual_seed(run_seed(path))
        s = enc.spec
        enc.backbone = build_backbone(s.arch, s.in_channels, s.stem, s.width).to(memory_format=torch.channels_last)
    return enc.eval()


def report(results: dict) -> None:
    """Mean AUROC of every variant for every encoder set (over the classes each has), and per class."""
    sets = list(results)
    lines = ["| variant | " + " | ".join(f"{s} ({len(results[s])} classes)" for s in sets) + " |",
             "|---|" + "---:|" * len(sets)]
    variants = [*VARIANTS, *(v for s in sets for c in results[s] for v in results[s][c] if v not in VARIANTS)]
    variants = list(dict.fromkeys(variants))
    for v in variants:
        cells = [f"{np.mean([results[s][c][v] for c in results[s]]):.2f}"
                 if results[s] and all(v in results[s][c] for c in results[s]) else "" for s in sets]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    for s in sets:
        names = list(results[s])
        lines += ["", f"{s}:", "", "| variant | " + " | ".join(n[:7] for n in names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {v} | " + " | ".join(f"{results[s][n][v]:.1f}" if v in results[s][n] else "" for n in names) + " |"
                  for v in variants]
    text = "\n".join(lines)
    (OUT / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
