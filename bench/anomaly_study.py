"""Anomaly scores on one-kind collections: which scoring space survives every protocol?

An index of ONE kind of thing (one Fashion-MNIST class) scores each query by its distance
to the k nearest gallery items. The question is which embedding space and distance to use so
that the score works when the encoder and everything fit at index time saw only that one
kind. Three protocols (for each class c: gallery = the training images of c, queries = all
10k test images, anomalies = the test images of the other classes; AUROC per class, mean
over the 10 classes):

- ``transductive``: one encoder trained on all 60k training images, whitening fit on all 60k;
- ``shared-encoder``: the same backbone, anything fit at index time fit on the gallery only;
- ``strict``: for each class an encoder trained by ``simclr.train`` on that class alone.

Controls: raw pixels, and the same ResNet-18 untrained (random init, seed 0).

Run (from the repository root; everything is cached under bench/out/anomaly/)::

    .venv/bin/python bench/anomaly_study.py --stage train --strict-epochs 3 --snapshots 1 2  # ~25 min on 2 cores
    .venv/bin/python bench/anomaly_study.py --stage score --strict-epochs 3 --snapshots 2    # ~15 min

(the figures in BENCHMARKS.md, "Anomaly scores"; the library's own score is
``retrieval anomaly-eval``, which this script's variant ``d`` reproduces).

``--stage train`` trains the shared encoder (unless the demo encoder
runs/fashion-mnist/train/encoder.pt exists) and one encoder per class per budget in
``--strict-epochs``; each run's seconds go to timings.json. ``--stage score`` embeds (cached
as .pt files), scores every variant and writes results.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.anomaly import auroc  # noqa: E402
from simclr.config import TrainConfig  # noqa: E402
from simclr.data import load_images  # noqa: E402
from simclr.encoder import Encoder, EncoderSpec, channel_stats, embed_images  # noqa: E402
from simclr.knn import topk_neighbours  # noqa: E402
from simclr.models import build_backbone  # noqa: E402
from simclr.train import Trainer  # noqa: E402
from simclr.whitening import DEFAULT_SHRINKAGE, fit_whitening  # noqa: E402

OUT = ROOT / "bench" / "out" / "anomaly"
DEMO = ROOT / "runs" / "fashion-mnist" / "train" / "encoder.pt"
TIMINGS = OUT / "timings.json"
K = 5
SHRINKAGES = (1e-4, 1e-3, 1e-2, 1e-1)
KS = (1, 2, 5, 10, 20)
RERANK = (20, 50, 100)
RECOMPUTE = False  # --recompute: ignore the AUROCs cached per protocol and class

log = logging.getLogger("anomaly_study")


# ----------------------------------------------------------------------------- small helpers

def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def cached(path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, saved to ``path`` the first time and loaded afterwards."""
    if path.exists():
        return torch.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def shared_encoder_path() -> Path:
    return DEMO if DEMO.exists() else OUT / "shared" / "encoder.pt"


def strict_dir(epochs: int, c: int) -> Path:
    return OUT / f"strict-e{epochs}" / str(c)


# ----------------------------------------------------------------------------- training

class SnapshotTrainer(Trainer):
    """The project's trainer, also keeping the encoder file of some earlier epochs
    (encoder-epochN.pt: mid-schedule, the learning rate not yet annealed)."""

    def __init__(self, cfg: TrainConfig, snapshots: tuple[int, ...] = ()):
        self.snapshots = set(snapshots)
        super().__init__(cfg)

    def save(self, record: dict | None = None, encoder: Encoder | None = None) -> None:
        super().save(record, encoder)
        if self.epoch in self.snapshots and self.epoch < self.cfg.epochs:
            shutil.copyfile(self.cfg.out_dir / "encoder.pt", self.cfg.out_dir / f"encoder-epoch{self.epoch}.pt")


def timed_train(key: str, cfg: TrainConfig, snapshots: tuple[int, ...] = ()) -> None:
    """Train ``cfg`` into a fresh folder unless timings.json says ``key`` is done."""
    timings = read_json(TIMINGS)
    if key in timings:
        log.info("%s: done before (%.0f s)", key, timings[key]["seconds"])
        return
    shutil.rmtree(cfg.out, ignore_errors=True)  # an interrupted run starts again
    log.info("%s: training", key)
    start = time.perf_counter()
    result = SnapshotTrainer(cfg, snapshots).fit()
    seconds = time.perf_counter() - start
    timings = read_json(TIMINGS)
    timings[key] = {"seconds": round(seconds, 1), "epochs": result.epochs, "steps": result.steps,
                    "final_loss": result.final_loss, "seconds_per_step": round(seconds / max(result.steps, 1), 3)}
    write_json(TIMINGS, timings)
    log.info("%s: %.0f s, %d steps, loss %.3f", key, seconds, result.steps, result.final_loss)


def stage_train(args: argparse.Namespace) -> None:
    if DEMO.exists():
        log.info("using the demo encoder %s as the shared encoder", DEMO)
    else:
        timed_train("shared", TrainConfig(data="fashion-mnist:train", out=str(OUT / "shared"), knn_every=0, progress=False))
    classes = load_images("fashion-mnist:train").classes
    for epochs in args.strict_epochs:
        for c in args.classes or range(len(classes)):
            timed_train(f"strict-e{epochs}/{c}", TrainConfig(
                data="fashion-mnist:train", classes=[classes[c]], out=str(strict_dir(epochs, c)),
                epochs=epochs, knn_every=0, progress=False), snapshots=tuple(args.snapshots))


# ----------------------------------------------------------------------------- scoring spaces

def whiten(fit_on: torch.Tensor, *xs: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE) -> list[torch.Tensor]:
    mean, matrix = fit_whitening(fit_on, shrinkage)
    return [(x - mean) @ matrix for x in xs]


def l2_knn(queries: torch.Tensor, gallery: torch.Tensor, ks: tuple[int, ...] = (K,), chunk: int = 2048) -> dict[int, np.ndarray]:
    """Mean Euclidean distance to the k nearest gallery rows, for each k in ``ks``."""
    kmax = max(ks)
    out = []
    for s in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[s:s + chunk].float(), gallery.float())
        out.append(d.topk(kmax, dim=1, largest=False).values)
    d = torch.cat(out)
    return {k: d[:, :k].mean(1).numpy() for k in ks}


def cos_knn(queries: torch.Tensor, gallery: torch.Tensor, ks: tuple[int, ...] = (K,)) -> dict[int, np.ndarray]:
    """Mean cosine distance (1 - cos) to the k nearest gallery rows (rows normalised here)."""
    sims, _ = topk_neighbours(F.normalize(queries, dim=1), F.normalize(gallery, dim=1), max(ks))
    return {k: (1 - sims[:, :k].double()).mean(1).numpy() for k in ks}


def rerank_l2(queries: torch.Tensor, gallery: torch.Tensor, candidates: int, k: int = K) -> np.ndarray:
    """Variant (h): the index holds unit vectors and norms; the top-``candidates`` by cosine are
    re-ranked by exact L2 from d^2 = |q|^2 + |x|^2 - 2 |q| |x| cos, and the k nearest averaged."""
    qn, gn = queries.norm(dim=1), gallery.norm(dim=1)
    sims, idx = topk_neighbours(F.normalize(queries, dim=1), F.normalize(gallery, dim=1), candidates)
    sims, g = sims.double(), gn.double()[idx]
    q = qn.double()[:, None]
    d = (q ** 2 + g ** 2 - 2 * q * g * sims).clamp(min=0).sqrt()
    return d.topk(min(k, candidates), dim=1, largest=False).values.mean(1).numpy()


def score_variants(gal: torch.Tensor, qry: torch.Tensor, whiten_all: tuple[torch.Tensor, torch.Tensor] | None,
                   full: bool) -> dict[str, np.ndarray]:
    """Anomaly scores of the queries for every variant, from raw features of gallery and queries.

    ``whiten_all``: (mean, matrix) fit on all training images (variant a), or None.
    ``full``: also the k sweep and the cosine-candidate re-rank (the costlier extras).
    """
    s: dict[str, np.ndarray] = {}
    if whiten_all is not None:
        m, w = whiten_all
        s["a cos(norm(whiten_all))"] = cos_knn((qry - m) @ w, (gal - m) @ w)[K]
    s["b cos(norm(feats))"] = cos_knn(qry, gal)[K]
    gw, qw = whiten(gal, gal, qry)
    s["c cos(norm(whiten_gal))"] = cos_knn(qw, gw)[K]
    for shrink in SHRINKAGES:
        g2, q2 = (gw, qw) if shrink == DEFAULT_SHRINKAGE else whiten(gal, gal, qry, shrinkage=shrink)
        ks = KS if full else (K,)
        for k, v in l2_knn(q2, g2, ks).items():
            s[f"d L2(whiten_gal s={shrink:g})" + ("" if k == K else f" k={k}")] = v
    s["e L2(feats)"] = l2_knn(qry, gal)[K]
    gn, qn = F.normalize(gal, dim=1), F.normalize(qry, dim=1)
    for shrink in (1e-4, 1e-2):
        g3, q3 = whiten(gn, gn, qn, shrinkage=shrink)
        s[f"f L2(whiten_gal(norm(feats)) s={shrink:g})"] = l2_knn(q3, g3)[K]
    # (i) Mahalanobis kNN on top of today's unit embedding: whiten (on the gallery) the unit
    # vectors normalise(whiten_gal(feats)) once more, then L2 kNN.
    un_g, un_q = F.normalize(gw, dim=1), F.normalize(qw, dim=1)
    g4, q4 = whiten(un_g, un_g, un_q)
    s["i L2(whiten_gal(norm(whiten_gal)))"] = l2_knn(q4, g4)[K]
    if full:
        for k, v in cos_knn(qw, gw, KS).items():
            if k != K:
                s[f"c cos(norm(whiten_gal)) k={k}"] = v
    return s


def add_rerank(s: dict[str, np.ndarray], gal: torch.Tensor, qry: torch.Tensor, shrinkages: tuple[float, ...]) -> None:
    for shrink in shrinkages:
        gw, qw = whiten(gal, gal, qry, shrinkage=shrink)
        for cand in RERANK:
            s[f"h rerank{cand}(whiten_gal s={shrink:g})"] = rerank_l2(qw, gw, cand)
        # The reverse: plain cosine search on unit vectors of [x, c], x with one constant coordinate
        # c appended (c: a multiple of the gallery's median norm), which keeps the distance from the
        # gallery mean and tends to L2 kNN as c grows.
        median = float(gw.norm(dim=1).median())
        for factor in (1, 3, 10):
            pad = lambda x: torch.cat([x, torch.full((x.shape[0], 1), factor * median)], 1)  # noqa: E731
            s[f"h cos(norm([whiten_gal, {factor}*median|x|]) s={shrink:g})"] = cos_knn(pad(qw), pad(gw))[K]


# ----------------------------------------------------------------------------- features

def features_of(enc: Encoder, images: torch.Tensor) -> torch.Tensor:
    return embed_images(enc, images, batch_size=512, features=True).cpu()


def untrained_encoder(train_images: torch.Tensor) -> Encoder:
    """The CPU profile's ResNet-18 (standard stem, width 64, 32 px), random init with seed 0."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 1, "standard", 64)
    mean, std = channel_stats(train_images)
    spec = EncoderSpec(arch="resnet18", stem="standard", width=64, in_channels=1, image_size=32,
                       feature_dim=backbone.feature_dim, mean=mean, std=std, trained_on="untrained")
    enc = Encoder(spec, backbone)
    enc.backbone.to(memory_format=torch.channels_last)
    return enc.eval()


def evaluate(name: str, per_class: Callable[[int], dict[str, np.ndarray]], test_labels: np.ndarray,
             classes: list[int]) -> dict[str, list[float]]:
    """AUROC per class of every variant: {variant: [auroc of class c for c in classes]}."""
    table: dict[str, list[float]] = {}
    for c in classes:
        cache = OUT / "aurocs" / f"{name}_{c}.json"
        if cache.exists() and not RECOMPUTE:
            aurocs = read_json(cache)
        else:
            start = time.perf_counter()
            aurocs = {variant: 100 * auroc(scores, test_labels != c) for variant, scores in per_class(c).items()}
            write_json(cache, aurocs)
            log.info("%s class %d scored in %.0f s", name, c, time.perf_counter() - start)
        for variant, a in aurocs.items():
            table.setdefault(variant, []).append(a)
    return table


def stage_score(args: argparse.Namespace) -> None:
    train_data, test_data = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    tr_lab, te_lab = train_data.labels.numpy(), test_data.labels.numpy()
    classes = args.classes or list(range(len(train_data.classes)))
    results: dict = {}
    feat_dir = OUT / "features"

    def save(protocol: str, table: dict[str, list[float]], done: list[int] = classes) -> None:
        results.update(read_json(OUT / "results.json"))  # (another score run may have added some)
        results[protocol] = {"classes": done, "per_class": table,
                             "mean": {v: float(np.mean(a)) for v, a in table.items()}}
        write_json(OUT / "results.json", results)

    # Raw pixels: L2 kNN (the colleague's control), and whitened on the gallery.
    if "pixels" in args.protocols:
        ptr = train_data.images.flatten(1).float() / 255
        pte = test_data.images.flatten(1).float() / 255

        def pixels(c: int) -> dict[str, np.ndarray]:
            gal = ptr[tr_lab == c]
            s = {"e L2(feats)": l2_knn(pte, gal)[K], "b cos(norm(feats))": cos_knn(pte, gal)[K]}
            for shrink in SHRINKAGES:
                gw, qw = whiten(gal, gal, pte, shrinkage=shrink)
                s[f"d L2(whiten_gal s={shrink:g})"] = l2_knn(qw, gw)[K]
            return s
        save("pixels", evaluate("pixels", pixels, te_lab, classes))

    # The shared encoder (transductive, shared-encoder) and the untrained control (fit on gallery).
    runs = [(p, "untrained" if p == "untrained" else "shared") for p in ("transductive", "shared-encoder", "untrained")
            if p in args.protocols]
    for protocol, enc_name in runs:
        enc = Encoder.load(shared_encoder_path(), "cpu") if enc_name == "shared" else untrained_encoder(train_data.images)
        ftr = cached(feat_dir / f"{enc_name}_train.pt", lambda: features_of(enc, train_data.images))
        fte = cached(feat_dir / f"{enc_name}_test.pt", lambda: features_of(enc, test_data.images))
        if protocol == "transductive":
            # Today's setup: the encoder file's own whitening (fit on the training images).
            m, w = (enc.white_mean.cpu(), enc.white_matrix.cpu()) if enc.whitened else fit_whitening(ftr)
            wtr, wte = (ftr - m) @ w, (fte - m) @ w

            def per_class(c: int) -> dict[str, np.ndarray]:
                gal, gw = ftr[tr_lab == c], wtr[tr_lab == c]
                un_g, un_q = F.normalize(gw, dim=1), F.normalize(wte, dim=1)
                g4, q4 = whiten(un_g, un_g, un_q)
                return {"a cos(norm(whiten_all))": cos_knn(wte, gw)[K], "a' L2(whiten_all)": l2_knn(wte, gw)[K],
                        "b cos(norm(feats))": cos_knn(fte, gal)[K], "e L2(feats)": l2_knn(fte, gal)[K],
                        "i L2(whiten_gal(norm(whiten_all)))": l2_knn(q4, g4)[K]}
        else:
            full = protocol == "shared-encoder"

            def per_class(c: int) -> dict[str, np.ndarray]:
                gal = ftr[tr_lab == c]
                s = score_variants(gal, fte, None, full)
                if full:
                    add_rerank(s, gal, fte, (1e-4, 1e-2))
                return s
        save(protocol, evaluate(protocol, per_class, te_lab, classes))

    # Strict: one encoder per class, per training budget (and its mid-schedule snapshots).
    for epochs in args.strict_epochs if "strict" in args.protocols else ():
        timings = read_json(TIMINGS)
        done = [c for c in classes if f"strict-e{epochs}/{c}" in timings]
        if done != classes:
            log.warning("strict-e%d: encoders trained for classes %s only", epochs, done)
        for snap in [None, *args.snapshots]:
            name = f"strict-e{epochs}" + ("" if snap is None else f"@epoch{snap}")
            file = "encoder.pt" if snap is None else f"encoder-epoch{snap}.pt"
            have = [c for c in done if (strict_dir(epochs, c) / file).exists()]
            if not have:
                continue

            def strict(c: int, file: str = file, name: str = name, full: bool = snap is None) -> dict[str, np.ndarray]:
                enc = Encoder.load(strict_dir(epochs, c) / file, "cpu")
                gal = cached(feat_dir / f"{name}_{c}_gallery.pt", lambda: features_of(enc, train_data.images[tr_lab == c]))
                qry = cached(feat_dir / f"{name}_{c}_test.pt", lambda: features_of(enc, test_data.images))
                s = score_variants(gal, qry, None, full)
                if enc.whitened:  # the encoder file's own whitening (fit on this class): today's embedding
                    m, w = enc.white_mean.cpu(), enc.white_matrix.cpu()
                    s["a cos(norm(whiten_file))"] = cos_knn((qry - m) @ w, (gal - m) @ w)[K]
                if full:
                    add_rerank(s, gal, qry, (1e-4, 1e-2))
                return s
            save(name, evaluate(name, strict, te_lab, have), have)
    write_report(read_json(OUT / "results.json"), train_data.classes)


def write_report(results: dict, names: list[str]) -> None:
    """report.md: protocol x variant means, and per-class AUROC of every variant."""
    lines = ["# Anomaly AUROC (%), Fashion-MNIST one class normal, gallery = its training images", ""]
    timings = read_json(TIMINGS)
    if timings:
        lines += ["## Training seconds", "", "| run | seconds | steps | s/step | final loss |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.0f} | {v['steps']} | {v['seconds_per_step']:.2f} | {v['final_loss']:.3f} |"
                  for k, v in timings.items()]
        lines.append("")
    protocols = list(results)
    variants = sorted({v for r in results.values() for v in r["mean"]})
    lines += ["## Mean AUROC, variant x protocol", "", "| variant | " + " | ".join(protocols) + " |",
              "|---|" + "---|" * len(protocols)]
    for v in variants:
        cells = [f"{results[p]['mean'][v]:.2f}" if v in results[p]["mean"] else "" for p in protocols]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    for protocol, r in results.items():
        lines += [f"## {protocol} (classes {r['classes']})", "",
                  "| variant | mean | " + " | ".join(names[c][:7] for c in r["classes"]) + " |",
                  "|---|---|" + "---|" * len(r["classes"])]
        for variant, per in sorted(r["per_class"].items()):
            lines.append(f"| {variant} | {np.mean(per):.2f} | " + " | ".join(f"{a:.1f}" for a in per) + " |")
        lines.append("")
    (OUT / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("train", "score"), required=True)
    p.add_argument("--strict-epochs", type=int, nargs="+", default=[6],
                   help="per-class training budgets (epochs of 23 steps); one set of encoders each")
    p.add_argument("--snapshots", type=int, nargs="*", default=[2, 4],
                   help="also keep (train) and score (score) the strict encoders of these earlier epochs")
    p.add_argument("--classes", type=int, nargs="+", help="only these class indices (default: all 10)")
    p.add_argument("--protocols", nargs="+",
                   default=["pixels", "transductive", "shared-encoder", "untrained", "strict"],
                   choices=["pixels", "transductive", "shared-encoder", "untrained", "strict"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recompute", action="store_true", help="score again instead of using cached AUROCs")
    args = p.parse_args()
    global RECOMPUTE
    RECOMPUTE = args.recompute
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    (stage_train if args.stage == "train" else stage_score)(args)


if __name__ == "__main__":
    main()
