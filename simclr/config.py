"""The training configuration: one typed dataclass, stored whole in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from simclr.augment import AugmentConfig
from simclr.data import parse_source
from simclr.errors import SimCLRError
from simclr.knn_defaults import KNN_K, KNN_TEMPERATURE
from simclr.models import BACKBONES, HEADS, STEMS
from simclr.optim import OPTIMIZERS
from simclr.pooling import check_pooling
from simclr.training_data import LOADERS
from simclr.whitening import DEFAULT_SHRINKAGE

# Fields that may change when a run is resumed: where and how it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"out", "device", "compile", "log_every", "knn_every", "knn_k", "knn_temperature", "knn_max_gallery",
     "knn_max_queries", "progress", "whiten", "whiten_shrinkage", "pooling", "flip_average", "loader",
     "memory_budget_gb", "loader_workers", "decoded_cache_gb", "save_minutes"}
)
# Crops from this share of the image up keep a centred subject whole: what photos of one thing
# held steady need to leave chance level (BENCHMARKS.md, "One kind of thing held steady").
WHOLE_SUBJECT_CROP = 0.9
# Resumable fields that change what the encoder file holds: a resumed run keeps its own unless it
# is given again (a profile's default may have changed since), and a checkpoint written before
# the option existed gets the value it was written with.
EMBEDDING_OPTIONS = {"pooling": "global", "flip_average": False}
# Options that older versions wrote into checkpoints and no longer exist; loading such a
# configuration drops them. (``workers``: the trainer never used it; streaming has ``loader_workers``.)
OBSOLETE_OPTIONS = frozenset({"workers"})

# Training resolution: data sets of small images (Fashion-MNIST, CIFAR-10) train at their own
# scale; folders of photos at a photo resolution that suits the device (BENCHMARKS.md,
# "Photo collections").
SMALL_IMAGE_SIZE = 32
PHOTO_IMAGE_SIZE = {"cpu": 96, "cuda": 224}  # also what ImageNet weights are fed at (retrieval encoder)
# Training from random weights on a CPU buys a few thousand steps at most: the CPU photo profile
# is a narrow network at 64 px (0.5 s a step on 2 cores, 6 times the steps of width 64 at 96 px)
# embedding with the spatial pyramid of its stages, which keeps where an object's parts are
# (BENCHMARKS.md, "The spatial pyramid": on the photo-like set, kNN top-1 27.3% after 10 minutes
# where the former profile, width 64 at 96 px, got 14.8%; 31.9% with mirror-averaging, below).
# Its embedding averages each image's features with its mirror image's (the views were flipped
# half the time in training): a pyramid's cells keep left and right apart, so a mirrored object
# otherwise lands elsewhere (BENCHMARKS.md, "Mirror-averaged embeddings").
CPU_PHOTO_NETWORK = {"width": 32, "image_size": 64, "pooling": "pyramid", "flip_average": True}
# Colour jitter and blur: the grayscale demo's searched values for small images; SimCLR's
# ImageNet values for photos, whose colour is otherwise the easiest thing to tell views apart by
# (BENCHMARKS.md, "Photo collections").
SMALL_IMAGE_AUGMENT = {"jitter_strength": 0.5, "blur_p": 0.0}
PHOTO_AUGMENT = {"jitter_strength": 1.0, "blur_p": 0.5}
# Defaults by device and kind of data, for the options left at None. On a CPU a run is a time
# budget (the README demo's recipe was searched for about 10 minutes on 2 cores, BENCHMARKS.md);
# on a GPU, the full recipe. Small images use a stem without down-sampling on the GPU; photos
# keep ResNet's standard stem (7x7/2 + max-pool), made for them.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"stem": "standard", "width": 64, "minutes": 10.0, "batch_size": 256, "knn_every": 5,
            "image_size": SMALL_IMAGE_SIZE, "pooling": "global", "flip_average": False, **SMALL_IMAGE_AUGMENT},
    "cpu-photos": {"stem": "standard", "minutes": 10.0, "batch_size": 128, "knn_every": 0,
                   **CPU_PHOTO_NETWORK, **PHOTO_AUGMENT},
    "cuda": {"stem": "small", "width": 64, "epochs": 200, "batch_size": 512, "knn_every": 10,
             "image_size": SMALL_IMAGE_SIZE, "pooling": "global", "flip_average": False, **SMALL_IMAGE_AUGMENT},
    "cuda-photos": {"stem": "standard", "width": 64, "epochs": 100, "batch_size": 512, "knn_every": 10,
                    "image_size": PHOTO_IMAGE_SIZE["cuda"], "pooling": "global", "flip_average": False, **PHOTO_AUGMENT},
}


def photo_image_size(device: torch.device | str) -> int:
    """The default resolution for folders of photos on ``device``."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return PHOTO_IMAGE_SIZE["cuda" if kind == "cuda" else "cpu"]


@dataclass
class TrainConfig:
    """Everything that defines a SimCLR training run.

    ``None`` means "the default for the device" (see :data:`PROFILES`); :meth:`resolve`
    fills those in before training, so a checkpoint always records concrete values.
    """

    data: str = "fashion-mnist:train"
    # Train on the images of these classes only (labelled sources); None: every image.
    classes: list[str] | None = None
    out: str = "runs/simclr"
    # Architecture.
    arch: str = "resnet18"
    stem: str | None = None
    width: int | None = None
    in_channels: int | None = None
    # Training resolution; None: 32 for data sets, a photo resolution for folders (PROFILES).
    image_size: int | None = None
    # How the encoder pools the backbone's maps into its embedding (simclr.pooling); None: by
    # device and kind of data (PROFILES).
    pooling: str | None = None
    # Embed each image as the mean of its own and its mirror image's pooled features (twice the
    # embedding work); None: by device and kind of data (PROFILES).
    flip_average: bool | None = None
    head: str = "mlp"
    head_hidden: int = 512
    head_out: int = 128
    head_depth: int = 2
    init: str = "random"
    # Optimisation: a number of epochs, or a time budget (steps fixed after measuring the first ones).
    epochs: int | None = None
    minutes: float | None = None
    batch_size: int | None = None
    optimizer: str = "lars"
    lr: float = 0.3
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 1e-3
    warmup_epochs: float = 0.5
    temperature: float = 0.2
    # Augmentation.
    crop_min: float = 0.08
    crop_max: float = 1.0
    # A run whose loss is still at chance level past the grace steps (simclr.train) narrows its
    # full views' crops to keep at least this share of the image, once, and trains on from there:
    # photos of one thing held steady leave chance that way (BENCHMARKS.md). 0: never.
    chance_crop_min: float = WHOLE_SUBJECT_CROP
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float | None = None  # None: by kind of data (PROFILES)
    grayscale_p: float = 0.2
    blur_p: float | None = None
    rotation: float = 0.0  # degrees either way (0: upright collections; 180: no upright at all)
    # Multi-crop (SwAV, arXiv 2006.09882): this many small crops of each image beside its two
    # full views, at small_crop_size pixels (None: half the training size) and covering
    # small_crop_min to small_crop_max of the image; each view's positives are the others.
    small_crops: int = 0
    small_crop_size: int | None = None
    small_crop_min: float = 0.05
    small_crop_max: float = 0.3
    # Shifted negatives (CSI, arXiv 2007.08176): each image also enters the batch turned by 90,
    # 180 and 270 degrees, each turn an image of its own, so the encoder learns what upright
    # looks like (for anomaly scores on one-kind collections). A step costs four times as much.
    rotation_negatives: bool = False
    # The encoder's PCA whitening, fit on training images at each save (simclr.whitening).
    whiten: bool = True
    whiten_shrinkage: float = DEFAULT_SHRINKAGE
    # Data loading: auto holds a folder in memory when it fits the budget and streams it otherwise.
    loader: str = "auto"
    memory_budget_gb: float | None = None  # None: a quarter of physical memory
    loader_workers: int | None = None  # streaming's DataLoader workers; None: by device
    # Streaming keeps the decoded images in a file in the run folder for the epochs after the
    # first, removed when the run ends: the disk it may take (None: a quarter of the free space; 0:
    # none; never more than half the free space).
    decoded_cache_gb: float | None = None
    # Hardware.
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    # Monitoring.
    knn_every: int | None = None
    knn_k: int = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    # The kNN monitor's gallery and queries, evenly spaced over the held-out split (the same items
    # every time) and no more than these many: a large folder's every tenth image would cost
    # each evaluation more than the training it monitors.
    knn_max_gallery: int = 60000
    knn_max_queries: int = 10000
    log_every: int = 20
    # An epoch's end writes the checkpoint and encoder file (and fits the whitening for it) when
    # this many minutes have passed since the last write; the run's end always writes. 0: every
    # epoch. (A small collection's epochs last seconds: writing each one took 15% of a 10-minute budget.)
    save_minutes: float = 1.0
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys (by name); :data:`OBSOLETE_OPTIONS`, which
        configurations saved by older versions hold, are dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - OBSOLETE_OPTIONS)
        if unknown:
            raise SimCLRError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def resolve(self, device: torch.device) -> "TrainConfig":
        """Fill the defaults for the device and the kind of data (:data:`PROFILES`) and check
        every option. A run given ``epochs`` takes no default time budget, and the reverse."""
        self.validate()
        profile = PROFILES[self.profile_name(device)]
        changes = {k: v for k, v in profile.items() if getattr(self, k) is None}
        if self.epochs is not None or self.minutes is not None:
            changes.pop("epochs", None)
            changes.pop("minutes", None)
        cfg = self.replace(**changes)
        cfg.validate()
        return cfg

    def profile_name(self, device: torch.device) -> str:
        """``cpu`` / ``cuda``, with ``-photos`` for folders of image files."""
        kind = "cuda" if device.type == "cuda" else "cpu"
        return f"{kind}-photos" if parse_source(self.data).kind == "folder" else kind

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SimCLRError(message)

        need(self.arch in BACKBONES, f"unknown architecture {self.arch!r}; known: {', '.join(BACKBONES)}")
        if self.pooling is not None:
            check_pooling(self.pooling)
        need(self.stem is None or self.stem in STEMS, f"unknown stem {self.stem!r}; known: {', '.join(STEMS)}")
        need(self.head in HEADS, f"unknown projection head {self.head!r}; known: {', '.join(HEADS)}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.minutes is None or self.minutes > 0, f"minutes must be positive, got {self.minutes}")
        need(self.epochs is None or self.minutes is None,
             f"--epochs {self.epochs} and --minutes {self.minutes} both set: give one (--minutes fixes the "
             "number of steps from the measured step time)")
        need(self.image_size is None or self.image_size >= 8, f"image size must be at least 8 pixels, got {self.image_size}")
        need(self.loader in LOADERS, f"unknown loader {self.loader!r}; known: {', '.join(LOADERS)}")
        need(self.memory_budget_gb is None or self.memory_budget_gb > 0,
             f"memory budget must be positive, got {self.memory_budget_gb} GB")
        need(self.loader_workers is None or self.loader_workers >= 0, f"loader workers must be >= 0, got {self.loader_workers}")
        need(self.decoded_cache_gb is None or self.decoded_cache_gb >= 0,
             f"decoded-image cache must be >= 0 GB, got {self.decoded_cache_gb}")
        need(self.batch_size is None or self.batch_size >= 2, f"batch size must be >= 2, got {self.batch_size}")
        need(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        need(self.lars_eta > 0, f"LARS trust coefficient must be positive, got {self.lars_eta}")
        need(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        need(self.warmup_epochs >= 0, f"warm-up must be >= 0 epochs, got {self.warmup_epochs}")
        need(self.precision in ("auto", "fp32", "bf16", "fp16"), f"unknown precision {self.precision!r}; known: auto, fp32, bf16, fp16")
        need(self.width is None or self.width >= 1, f"width must be >= 1, got {self.width}")
        need(self.whiten_shrinkage > 0, f"whitening shrinkage must be positive, got {self.whiten_shrinkage}")
        need(self.knn_k >= 1, f"knn k must be >= 1, got {self.knn_k}")
        need(self.knn_temperature > 0, f"knn temperature must be positive, got {self.knn_temperature}")
        need(self.knn_max_gallery >= 1 and self.knn_max_queries >= 1,
             f"the kNN monitor needs at least one gallery image and one query, got {self.knn_max_gallery} and "
             f"{self.knn_max_queries}")
        need(self.log_every >= 1, f"log-every must be >= 1, got {self.log_every}")
        need(self.save_minutes >= 0, f"save-minutes must be >= 0, got {self.save_minutes}")
        need(self.knn_every is None or self.knn_every >= 0, f"knn-every must be >= 0, got {self.knn_every}")
        need(self.in_channels in (None, 1, 3) or (self.in_channels or 0) > 0, f"in_channels must be positive, got {self.in_channels}")
        need(0 <= self.chance_crop_min <= 1,
             f"chance-crop-min must lie in [0, 1] (0: never narrow the crops), got {self.chance_crop_min:g}")
        need(self.small_crops >= 0, f"small crops must be >= 0, got {self.small_crops}")
        need(not (self.rotation_negatives and abs(self.rotation) >= 45),
             f"--rotation-negatives makes turned images negatives, --rotation {self.rotation:g} makes them positives: "
             "give one (or a rotation under 45 degrees)")
        need(self.small_crop_size is None or self.small_crop_size >= 8,
             f"small crop size must be at least 8 pixels, got {self.small_crop_size}")
        self.augment_config(1)  # checks the augmentation ranges
        try:
            self.augment_config(1, small=True)
        except SimCLRError as exc:
            raise SimCLRError(f"small crops: {exc}") from None

    def augment_config(self, channels: int, small: bool = False) -> AugmentConfig:
        """The full views' augmentation, or with ``small`` the small crops' (multi-crop)."""
        size = self.image_size or SMALL_IMAGE_SIZE
        return AugmentConfig(
            size=(self.small_crop_size or max(8, size // 2)) if small else size,
            crop_scale=(self.small_crop_min, self.small_crop_max) if small else (self.crop_min, self.crop_max),
            flip_p=self.flip_p,
            jitter_p=self.jitter_p,
            # (before resolve fills them in, the small-image values stand in for checking)
            jitter_strength=SMALL_IMAGE_AUGMENT["jitter_strength"] if self.jitter_strength is None else self.jitter_strength,
            grayscale_p=self.grayscale_p if channels > 1 else 0.0,
            blur_p=SMALL_IMAGE_AUGMENT["blur_p"] if self.blur_p is None else self.blur_p,
            rotation=self.rotation,
        )

    def conflicts(self, other: "TrainConfig", only: set[str] | None = None) -> list[str]:
        """Fields (other than :data:`RESUMABLE_CHANGES`) that ``other`` sets to another value,
        as ``name: ours != theirs``; ``None`` in ``other`` (a device default) matches anything."""
        out = []
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES or (only is not None and f.name not in only):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if b is not None and a != b:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out

    @property
    def out_dir(self) -> Path:
        return Path(self.out).expanduser()
