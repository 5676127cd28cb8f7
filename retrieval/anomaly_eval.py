"""The one-class anomaly protocols of ``retrieval anomaly-eval``.

For each class c of a labelled source: the gallery is the training images of c, the queries
are all test images, the anomalies are the test images of the other classes (and of classes the
training source lacks, as an MVTec-style test folder's kinds of defect); the score is the
index's (:class:`retrieval.anomaly.AnomalySpace`, mean Euclidean distance to the k nearest
gallery items); the figure is the AUROC per class and its mean. The protocols differ in what
saw the anomalies before the test:

- ``strict`` (the literature's one-class protocol): for each class an encoder is trained by
  the project's own trainer on that class's training images only (by default for as long as
  ``retrieval train`` trains by default on the device), and the anomaly space is fit on them.
  Nothing has seen another class.
- ``shared-encoder``: one encoder trained on the whole collection (given with ``--encoder``),
  but everything fit for the index sees the class's training images only: the anomaly space,
  and for the old cosine score the whitening too (refit on the gallery), as an index of that
  class would have it.
- ``transductive``: the same encoder with its own whitening, fit on all training images,
  anomalies included: what an index of one kind of a broader collection gets from an encoder
  trained on all of it (a product range, one product's photos as the gallery). There the
  index's space (``--anomaly-space auto``, the default, or ``joined``) joins the search
  embedding, whose whitening knows the other kinds, to the raw features
  (:func:`retrieval.anomaly.fit_space`); with ``--score cosine`` it is the former headline.

Everything here runs on torch and numpy alone (no FAISS).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.anomaly import (
    DEFAULT_K,
    DEFAULT_SHRINKAGE,
    DEFAULT_SPACE_MODE,
    EncoderWhitening,
    auroc,
    check_space_mode,
    fit_space,
    knn_distance,
    mean_distance,
)
from retrieval.errors import RetrievalError
from simclr.data import ImageData, load_images
from simclr.device import pick_device
from simclr.encoder import ENCODER_FILE, Encoder, embed_images
from simclr.images import match_channels
from simclr.knn import topk_neighbours
from simclr.whitening import can_whiten, fit_whitening, min_images

if TYPE_CHECKING:
    from simclr.config import TrainConfig
    from simclr.train import TrainResult

log = logging.getLogger(__name__)

PROTOCOLS = ("strict", "shared-encoder", "transductive")
SCORES = ("index", "cosine")  # cosine: the score of indexes built before anomaly spaces (the old method)


@dataclass
class ProtocolResult:
    """Per-class AUROC (0..1) and seconds (training included) of one protocol."""

    protocol: str
    k: int
    shrinkage: float
    score: str = "index"
    per_class: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    spaces: dict[str, str] = field(default_factory=dict)  # the anomaly space of each class, in words
    at_chance: list[str] = field(default_factory=list)  # strict: classes whose training ended at chance level
    narrowed: dict[str, int] = field(default_factory=dict)  # strict: the step each class's crops narrowed at chance

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_class.values())))

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "score": self.score, "k": self.k, "shrinkage": self.shrinkage, "mean_auroc": self.mean,
                "per_class": self.per_class, "seconds": self.seconds, "total_seconds": self.total_seconds,
                "spaces": self.spaces, "at_chance": self.at_chance, "crops_narrowed_at": self.narrowed}

    def lines(self) -> list[str]:
        how = "anomaly space as an index fits it" if self.score == "index" else "cosine on the encoder's embedding: the old score"
        out = [f"one-class kNN-distance AUROC, protocol {self.protocol} (k={self.k}, {how})"]
        for name, value in self.per_class.items():
            out.append(f"  {name:<20} {100 * value:6.2f}%   {self.seconds[name]:7.1f} s")
        out.append(f"mean {100 * self.mean:.2f}%   ({self.total_seconds:.0f} s in all)")
        if self.narrowed:
            steps = ", ".join(f"{name} (step {step})" for name, step in self.narrowed.items())
            out.append(f"crops narrowed when the loss sat at chance level, for: {steps}; see retrieval train's note")
        if self.at_chance:
            out.append(f"training ended at chance level (learned nothing from its views) for: {', '.join(self.at_chance)}; "
                       "see retrieval train's warning")
        return out


def knn_l2(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances (q, k) from each query to its k nearest gallery rows, ascending."""
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
    k = min(k, g.shape[0])
    out = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32))
        out.append(torch.cdist(q, g).topk(k, dim=1, largest=False).values)
    return torch.cat(out).numpy()


def class_auroc(gallery: np.ndarray, queries: np.ndarray, is_anomaly: np.ndarray, k: int,
                shrinkage: float, whitening: EncoderWhitening | None = None, mode: str = DEFAULT_SPACE_MODE) -> tuple[float, str]:
    """AUROC of the index's score for raw features: the anomaly space fit on the gallery as an
    index of an encoder with ``whitening`` fits it with ``--anomaly-space mode``
    (:func:`retrieval.anomaly.fit_space`)."""
    # (the search embeddings, as the encoder makes them, where a joined space may read them)
    joinable = whitening is not None and mode != "features"
    g_emb, q_emb = (whitening.embed(gallery), whitening.embed(queries)) if joinable else (None, None)
    space = fit_space(gallery, g_emb, whitening, shrinkage, mode)
    dists = knn_l2(space.map(queries, q_emb), space.map(gallery, g_emb), k)
    return auroc(mean_distance(dists, k), is_anomaly), space.describe()


def index_whitening(encoder: Encoder, gallery: np.ndarray, protocol: str) -> EncoderWhitening | None:
    """The encoder whitening an index of ``gallery`` would see under ``protocol``: the encoder's
    own (``strict``: fit on the class it trained on; ``transductive``: on the whole collection),
    or under ``shared-encoder``, where everything fit for the index sees the class alone, one
    refit on the gallery (``None`` where it is too small to fit one)."""
    if protocol != "shared-encoder":
        return EncoderWhitening.of(encoder)
    if not encoder.whitened or not can_whiten(len(gallery), gallery.shape[1]):
        return None
    mean, matrix = fit_whitening(torch.from_numpy(gallery))
    return EncoderWhitening(mean.double().numpy(), matrix.double().numpy(), len(gallery))


def cosine_auroc(encoder: Encoder, gallery: np.ndarray, queries: np.ndarray, is_anomaly: np.ndarray, k: int,
                 refit: bool = False) -> tuple[float, str]:
    """AUROC of the old score: mean cosine distance on the encoder's (whitened, normalised)
    embedding; with ``refit`` its whitening is refit on the gallery first, as training on the
    gallery alone would have fit it."""
    g, q = torch.from_numpy(gallery), torch.from_numpy(queries)
    if refit and can_whiten(len(gallery), gallery.shape[1]):
        mean, matrix = fit_whitening(g)
        g, q = F.normalize((g - mean) @ matrix, dim=1), F.normalize((q - mean) @ matrix, dim=1)
        where = "whitening refit on the gallery"
    else:
        g, q = encoder.from_features(g.to(encoder.device)).cpu(), encoder.from_features(q.to(encoder.device)).cpu()
        where = "the encoder's own whitening" if encoder.whitened else "unwhitened"
    sims, _ = topk_neighbours(q, g, k)
    return auroc(knn_distance(sims.numpy(), k), is_anomaly), f"mean cosine distance on the embedding ({where})"


UNSEEN = -2  # the label of a test image whose class the training source lacks: an anomaly for every class


def _features(encoder: Encoder, data: ImageData) -> np.ndarray:
    images = match_channels(data.images, encoder.spec.in_channels)
    return embed_images(encoder, images, batch_size=512, features=True).cpu().numpy()


def _load(source: str, size: int = 32) -> ImageData:
    data = load_images(source, size=size)
    if not data.classes or not (data.labels >= 0).any():
        raise RetrievalError(f"{source} has no labels (a folder needs one subfolder per class)")
    return data


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "class"


def evaluate_protocol(protocol: str, train: str = "fashion-mnist:train", test: str = "fashion-mnist:test",
                      encoder: str | Path | None = None, k: int = DEFAULT_K, shrinkage: float = DEFAULT_SHRINKAGE,
                      work: str | Path | None = None, epochs: int | None = None, train_options: dict | None = None,
                      device: str = "auto", progress: bool = True, score: str = "index",
                      only: list[str] | None = None, minutes: float | None = None,
                      anomaly_space: str = DEFAULT_SPACE_MODE) -> ProtocolResult:
    """Run one protocol (see the module docstring).

    Args:
        encoder: the shared encoder (``shared-encoder``, ``transductive``).
        work: where ``strict`` trains its per-class encoders (one folder per class; a class whose
            encoder is already there is not trained again, so an interrupted run continues).
        epochs: ``strict``'s training budget per class in epochs; with neither ``epochs`` nor
            ``minutes``, each class trains as ``retrieval train`` would by default on the device
            (10 minutes on a CPU, the full recipe on a GPU).
        minutes: ``strict``'s budget per class as a time instead (``retrieval train --minutes``).
        train_options: further :class:`simclr.config.TrainConfig` fields for ``strict`` (the
            recipe); a run already in ``work`` is reused when it matches these.
        score: ``index`` (the anomaly space) or ``cosine`` (the old score, for comparison).
        anomaly_space: the index's ``--anomaly-space`` (:data:`retrieval.anomaly.SPACE_MODES`).
        only: evaluate these classes alone (each still against all other test images).

    Raises:
        RetrievalError: an unknown protocol, a missing option, ``train_options`` for a protocol that
            trains nothing, a class with fewer than k + 1 images, or ``anomaly_space`` ``joined``
            where an encoder would have no whitening to join (all before any class trains).
        SimCLRError: a ``strict`` budget or recipe that training refuses (both ``epochs`` and
            ``minutes``, a value out of range, an unknown option), or a run in ``work`` trained
            with another value of an option given here.
    """
    if protocol not in PROTOCOLS:
        raise RetrievalError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if score not in SCORES:
        raise RetrievalError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
    check_space_mode(anomaly_space)
    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    if protocol == "strict":
        if work is None:
            raise RetrievalError("the strict protocol trains an encoder per class: give --work FOLDER for them")
        from simclr.config import TrainConfig

        # A wrong budget or recipe is told before any data loads.
        recipe = TrainConfig.from_dict({**(train_options or {}), "data": train, "epochs": epochs, "minutes": minutes})
        recipe.validate()
        if score == "index" and anomaly_space == "joined" and not recipe.whiten:
            raise RetrievalError("--anomaly-space joined needs per-class encoders with a whitening (their search "
                                 "embedding is what joins the space); the recipe asks for none (--no-whiten)")
    elif encoder is None:
        raise RetrievalError(f"the {protocol} protocol needs --encoder (one encoder trained on the whole collection)")
    elif train_options:
        names = ", ".join("--" + name.replace("_", "-") for name in train_options)
        raise RetrievalError(f"{names}: training options of the strict protocol; the {protocol} protocol trains nothing")
    budget = {"minutes": minutes} if minutes is not None else {"epochs": epochs} if epochs is not None else {}
    dev = pick_device(device)
    result = ProtocolResult(protocol, k, shrinkage, score)
    shared = Encoder.load(encoder, dev) if encoder is not None and protocol != "strict" else None
    loaded: dict[tuple[str, int], ImageData] = {}

    def at(source: str, size: int) -> ImageData:
        """``source`` decoded at ``size`` px (each encoder embeds at its own size)."""
        if (source, size) not in loaded:
            loaded[(source, size)] = _load(source, size)
        return loaded[(source, size)]

    size = shared.spec.image_size if shared is not None else 32
    train_data, test_data = at(train, size), at(test, size)
    classes = train_data.classes
    unseen = sorted(set(test_data.classes) - set(classes))
    if unseen:  # (an MVTec-style test folder: good parts, and kinds of defect never trained on)
        log.info("test classes not in the training source, anomalies for every class: %s", ", ".join(unseen))
    test_labels = np.array([-1 if i < 0 else classes.index(test_data.classes[i]) if test_data.classes[i] in classes
                            else UNSEEN for i in test_data.labels.tolist()])
    unknown = sorted(set(only or []) - set(classes))
    if unknown:
        raise RetrievalError(f"no class {', '.join(map(repr, unknown))} in {train}; known: {', '.join(classes)}")
    chosen = [c for c, name in enumerate(classes) if not only or name in only]
    # The whitening a joined space needs, fit per class: the per-class encoder's own (strict), or
    # the shared encoder's refit on the class (shared-encoder, as its index would have it).
    whiten_dim, whitening_of = None, ""
    if score == "index" and anomaly_space == "joined":
        if protocol == "strict":
            whiten_dim, whitening_of = _strict_dim(recipe, dev), "fit the whitening of its encoder"
        elif protocol == "shared-encoder" and shared.whitened:
            whiten_dim = shared.dim
            whitening_of = "refit the encoder's whitening on as the shared-encoder protocol's index does"
    for c in chosen:
        name = classes[c]
        count = int((train_data.labels == c).sum())
        if count < k + 1:
            raise RetrievalError(f"class {name!r} has {count} training image(s), fewer than k + 1 = {k + 1}")
        if whiten_dim is not None and not can_whiten(count, whiten_dim):
            raise RetrievalError(
                f"class {name!r}: its {count} training images are too few to {whitening_of} "
                f"(at least {min_images(whiten_dim)}), which --anomaly-space joined needs "
                "(auto or features score without it)")
    if shared is not None:
        if score == "index":
            check_space_mode(anomaly_space, shared.whitened)  # (joined without a whitening: before embedding)
        train_feats, test_feats = _features(shared, train_data), _features(shared, test_data)
    for c in chosen:
        name = classes[c]
        start = time.perf_counter()
        in_class = (train_data.labels == c).numpy()
        if protocol == "strict":
            enc, run = _train_one_class(train, name, int(in_class.sum()), Path(work) / _slug(name), budget,
                                        train_options or {}, device, progress)
            if run.narrowed is not None:
                result.narrowed[name] = run.narrowed.step
            if run.at_chance:
                result.at_chance.append(name)
            own = enc.spec.image_size
            gallery, queries = _features(enc, _subset(at(train, own), in_class)), _features(enc, at(test, own))
        else:
            enc, gallery, queries = shared, train_feats[in_class], test_feats
        labelled = test_labels != -1
        is_anomaly = test_labels[labelled] != c
        if score == "index":
            value, space = class_auroc(gallery, queries[labelled], is_anomaly, k, shrinkage,
                                       index_whitening(enc, gallery, protocol), anomaly_space)
        else:
            value, space = cosine_auroc(enc, gallery, queries[labelled], is_anomaly, k, refit=protocol == "shared-encoder")
        result.per_class[name], result.spaces[name] = value, space
        result.seconds[name] = time.perf_counter() - start
        log.info("%s: AUROC %.4f (%.0f s)", name, value, result.seconds[name])
    return result


def _strict_dim(recipe: "TrainConfig", device: torch.device) -> int:
    """The length of the features the strict protocol's per-class encoders embed to under
    ``recipe`` on ``device`` (what their whitening is fit on), known before any trains."""
    from simclr.models import build_backbone
    from simclr.pooling import pooled_dim

    cfg = recipe.resolve(device)
    return pooled_dim(build_backbone(cfg.arch, 1, cfg.stem, cfg.width), cfg.pooling)


def _subset(data: ImageData, mask: np.ndarray) -> ImageData:
    keep = torch.from_numpy(np.flatnonzero(mask))
    return ImageData(data.images[keep], data.labels[keep], data.classes, [data.refs[i] for i in keep.tolist()], data.source)


def _train_one_class(source: str, name: str, count: int, out: Path, budget: dict, options: dict, device: str,
                     progress: bool) -> tuple[Encoder, TrainResult]:
    """The encoder trained on one class of ``count`` images for ``budget`` (``{"epochs": E}``,
    ``{"minutes": M}``, or ``{}``: the device's default), reused when a run is already in
    ``out``; the batch is capped at the class's size. Also the run's result (chance level,
    narrowed crops)."""
    from simclr.config import PROFILES, TrainConfig
    from simclr.train import CHECKPOINT, train

    done = (out / ENCODER_FILE).is_file() and (out / CHECKPOINT).is_file()
    profile = PROFILES[TrainConfig(data=source).profile_name(pick_device(device))]
    batch = options.get("batch_size") or min(profile["batch_size"], max(2, count))
    cfg = TrainConfig.from_dict({"knn_every": 0, "progress": progress, **options, "batch_size": batch, "data": source,
                                 "classes": [name], "out": str(out), **budget, "device": device})
    # A finished run is reused when what was asked for matches it; the batch this function would
    # pick is not asked for, so a run trained at another batch (retrieval train --batch-size) is kept.
    result = train(cfg, resume=done, explicit=set(options) | {"data", "classes", *budget} if done else None)
    return Encoder.load(result.encoder, pick_device(device)), result
