"""The SimCLR training loop (arXiv 2002.05709): one process, or many under ``torchrun``.

The data set lives as one uint8 tensor (on the GPU when it fits); each step indexes a batch,
augments it twice on the device, and takes one optimiser step on the NT-Xent loss. Every
epoch ends with an atomic checkpoint and an encoder file; ``resume=True`` continues from the
checkpoint exactly (the augmentation generator is seeded per step, the data order per epoch).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import first_line
from simclr import dist, whitening
from simclr.augment import BatchAugment
from simclr.checkpoint import atomic_save, safe_load
from simclr.config import RESUMABLE_CHANGES, TrainConfig
from simclr.data import ImageData, default_eval_split, load_images
from simclr.device import pick_device
from simclr.encoder import ENCODER_FILE, Encoder, EncoderSpec, channel_stats, embed_images
from simclr.errors import SimCLRError
from simclr.images import match_channels
from simclr.knn import knn_evaluate
from simclr.loss import NTXentLoss
from simclr.metrics import MetricsLog
from simclr.models import SimCLRModel, build_backbone, build_head, load_imagenet_weights
from simclr.optim import build_optimizer, scaled_lr, warmup_cosine

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


class TrainingDiverged(SimCLRError):
    """The loss stopped being finite."""


@dataclass
class TrainResult:
    out: Path
    encoder: Path
    checkpoint: Path
    epochs: int
    steps: int
    final_loss: float
    knn_top1: float | None
    views_per_second: float


class Trainer:
    """Holds the state of one run; :meth:`fit` trains it to the configured number of epochs."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, explicit: set[str] | None = None):
        self.device = pick_device(cfg.device)
        dist.init_from_env(self.device)
        cfg = cfg.resolve(self.device)
        self.ckpt_path = cfg.out_dir / CHECKPOINT
        state = None
        if resume:
            state = safe_load(self.ckpt_path, what="checkpoint")
            if state.get("format") != "simclr-checkpoint":
                raise SimCLRError(f"{self.ckpt_path} is not a SimCLR training checkpoint")
            saved = TrainConfig.from_dict(state["config"])
            conflicts = saved.conflicts(cfg, only=explicit)
            if conflicts:
                raise SimCLRError(
                    f"{self.ckpt_path} belongs to another configuration ({'; '.join(conflicts)}); "
                    "drop those options to resume it, or train into another --out folder"
                )
            cfg = saved.replace(**{k: getattr(cfg, k) for k in RESUMABLE_CHANGES})
        elif self.ckpt_path.exists():
            raise SimCLRError(
                f"{self.ckpt_path} already exists; pass --resume to continue that run, "
                "or choose another --out folder"
            )
        self.cfg = cfg
        self.state = state
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, device = self.cfg, self.device
        world = dist.world_size()
        if cfg.batch_size % world:
            raise SimCLRError(f"batch size {cfg.batch_size} does not divide over {world} processes")
        data = load_images(cfg.data, size=cfg.image_size, channels=cfg.in_channels)
        if cfg.classes:
            data = only_classes(data, cfg.classes)
        channels = cfg.in_channels or data.images.shape[1]
        if cfg.in_channels is None:
            self.cfg = cfg = cfg.replace(in_channels=channels)
        images = match_channels(data.images, channels)
        if cfg.batch_size > len(data):
            raise SimCLRError(f"batch size {cfg.batch_size} is larger than the data set ({len(data)} images in {cfg.data})")
        self.data = data
        self.steps_per_epoch = len(data) // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if self.state is not None:
            mean, std = self.state["stats"]["mean"], self.state["stats"]["std"]
        else:
            mean, std = channel_stats(images)
        self.mean, self.std = mean, std
        self.images = self._place(images)

        torch.manual_seed(cfg.seed)  # the initial weights
        backbone = build_backbone(cfg.arch, channels, cfg.stem, cfg.width)
        # Whitening is fit at each save when the data set can estimate it (decided once).
        self.whiten = cfg.whiten and whitening.can_whiten(len(data), backbone.feature_dim)
        if cfg.whiten and not self.whiten and dist.is_main():
            log.warning("%d training images are too few to fit a whitening of %d-d features (%d needed); "
                        "the encoder will use its features unwhitened", len(data), backbone.feature_dim,
                        whitening.MIN_IMAGES_PER_DIM * backbone.feature_dim)
        if cfg.init != "random" and self.state is None:
            load_imagenet_weights(backbone, cfg.arch, cfg.init)
        head = build_head(cfg.head, backbone.feature_dim, cfg.head_hidden, cfg.head_out, cfg.head_depth)
        model = SimCLRModel(backbone, head)
        if cfg.sync_bn and dist.is_dist():
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("SyncBatchNorm needs CUDA; each process normalises its own batch")
        self.model = model.to(device, memory_format=torch.channels_last)
        lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, lr, cfg.weight_decay, cfg.momentum, cfg.lars_eta)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, warmup))
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = NTXentLoss(cfg.temperature)
        self.augment = BatchAugment(cfg.augment_config(channels), torch.tensor(mean), torch.tensor(std))
        self.epoch = 0
        self.step = 0
        if self.state is not None:
            self._restore(self.state)
        forward: nn.Module = self.model
        if dist.is_dist():
            forward = nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:
            forward = torch.compile(forward)
        self.forward = forward
        self.metrics = MetricsLog(cfg.out_dir / METRICS, resume_step=self.step if self.state else None) if dist.is_main() else None
        self._eval_sets: tuple[ImageData, ImageData] | None = None

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """Keep the data set on the GPU when it takes less than a quarter of free memory."""
        if self.device.type != "cuda":
            return images
        free, _ = torch.cuda.mem_get_info(self.device)
        if images.numel() < free // 4:
            return images.to(self.device)
        return images.pin_memory()

    def _amp_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "auto":  # bf16 on the CPU measured no faster than fp32 (BENCHMARKS.md)
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise SimCLRError(f"{self.ckpt_path} does not fit this model ({first_line(exc, type(exc).__name__)})") from None
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ------------------------------------------------------------------ training
    def _batch_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for each step of ``epoch``: (steps, batch / world)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.data), generator=g)[: self.steps_per_epoch * cfg.batch_size]
        world = dist.world_size()
        return perm.view(self.steps_per_epoch, world, cfg.batch_size // world)[:, dist.rank()]

    def train_step(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One optimiser step on uint8 images (B, C, H, W); returns the loss (a 0-d tensor)."""
        return self.step_on_views(torch.cat([self.augment(x, g), self.augment(x, g)]))

    def step_on_views(self, views: torch.Tensor) -> torch.Tensor:
        """One optimiser step on augmented views (2B, C, S, S): view 1 of B images, then view 2."""
        views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            z = self.forward(views)
        z1, z2 = z.float().chunk(2)
        loss = self.loss_fn(z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def fit(self, until_epoch: int | None = None) -> TrainResult:
        """Train to the configured number of epochs, or stop early after ``until_epoch``."""
        cfg, device = self.cfg, self.device
        stop = min(cfg.epochs, until_epoch or cfg.epochs)
        main = dist.is_main()
        if main:
            log.info("%s (width %s, %s stem) on %s, %s, %d images, %d steps an epoch, %d processes",
                     cfg.arch, cfg.width or "standard", cfg.stem, device,
                     f"{self.amp_dtype} autocast".replace("torch.", "") if self.amp_dtype else "fp32",
                     len(self.data), self.steps_per_epoch, dist.world_size())
        g = torch.Generator(device=device)
        progress = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="train")
        views_per_step = 2 * cfg.batch_size
        last = (self.state or {}).get("record", {})
        last_loss = last.get("loss", float("nan"))
        knn_top1 = last.get("knn_top1")
        rate = 0.0
        while self.epoch < stop:
            epoch = self.epoch
            order = self._batch_order(epoch)
            loss_sum = torch.zeros((), device=device)
            window_loss = torch.zeros((), device=device)
            window_start, window_steps = time.perf_counter(), 0
            epoch_start = time.perf_counter()
            for i in range(self.steps_per_epoch):
                g.manual_seed(cfg.seed * 1_000_003 + self.step * 7919 + dist.rank())
                idx = order[i].to(self.images.device, non_blocking=True)
                x = self.images[idx].to(device, non_blocking=True)
                loss = self.train_step(x, g)
                loss_sum += loss
                window_loss += loss
                window_steps += 1
                self.step += 1
                if window_steps == cfg.log_every or i == self.steps_per_epoch - 1:
                    mean_loss = dist.all_reduce_mean(window_loss / window_steps).item()
                    self._check_finite(mean_loss, epoch)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * views_per_step / max(elapsed, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if self.metrics is not None:
                        self.metrics.write(kind="step", epoch=epoch, step=self.step, loss=mean_loss, lr=lr, views_per_s=rate)
                    if progress is not None:
                        progress.update(window_steps)
                        progress.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", views_s=f"{rate:.0f}")
                    window_loss.zero_()
                    window_start, window_steps = time.perf_counter(), 0
            epoch_loss = dist.all_reduce_mean(loss_sum / self.steps_per_epoch).item()
            self._check_finite(epoch_loss, epoch)
            epoch_time = time.perf_counter() - epoch_start
            last_loss = epoch_loss
            self.epoch = epoch + 1
            record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "loss": epoch_loss,
                      "epoch_seconds": epoch_time, "views_per_s": self.steps_per_epoch * views_per_step / epoch_time}
            encoder = self.encoder() if dist.is_main() else None  # with its whitening, fit once an epoch
            if cfg.knn_every and (self.epoch % cfg.knn_every == 0 or self.epoch == cfg.epochs):
                knn = self.knn_monitor(encoder)
                if knn is not None:
                    knn_top1 = knn[0]
                    record.update(knn_top1=knn[0], knn_top5=knn[1])
                    if progress is not None:
                        progress.write(f"epoch {self.epoch}: loss {epoch_loss:.4f}, kNN top-1 {100 * knn[0]:.2f}%")
            self.save(record, encoder)
            if self.metrics is not None:
                self.metrics.write(**record)
                self.metrics.plot(cfg.out_dir / CURVES)
        if progress is not None:
            progress.close()
        return TrainResult(
            out=cfg.out_dir, encoder=cfg.out_dir / ENCODER_FILE, checkpoint=self.ckpt_path, epochs=self.epoch,
            steps=self.step, final_loss=last_loss, knn_top1=knn_top1, views_per_second=rate,
        )

    def _check_finite(self, loss: float, epoch: int) -> None:
        if math.isfinite(loss):
            return
        kept = (
            f"the last good checkpoint ({self.ckpt_path}, epoch {self.epoch}) is kept"
            if self.ckpt_path.exists() else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"training diverged: the loss became {loss} in epoch {epoch + 1} (step {self.step}); {kept}. "
            "Try a lower --lr or a higher --temperature."
        )

    # ------------------------------------------------------------------ outputs
    def encoder(self) -> Encoder:
        """The encoder as it stands (sharing the model's backbone), with its whitening fit on
        the training images unless ``--no-whiten``."""
        spec = EncoderSpec(
            arch=self.cfg.arch, stem=self.cfg.stem, width=self.cfg.width, in_channels=self.cfg.in_channels,
            image_size=self.cfg.image_size, feature_dim=self.model.backbone.feature_dim,
            mean=list(self.mean), std=list(self.std), trained_on=self.cfg.data, train_config=self.cfg.to_dict(),
        )
        enc = Encoder(spec, self.model.backbone).to(self.device)
        if self.whiten:
            enc.fit_whitening(self.images, shrinkage=self.cfg.whiten_shrinkage)
        return enc

    def save(self, record: dict | None = None, encoder: Encoder | None = None) -> None:
        """Checkpoint (everything needed to resume) and encoder file, on the main process only."""
        if dist.is_main():
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            atomic_save({
                "format": "simclr-checkpoint", "version": 1, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "rng": rng,
                "stats": {"mean": list(self.mean), "std": list(self.std)}, "record": dict(record or {}),
            }, self.ckpt_path)
            (self.encoder() if encoder is None else encoder).save(self.cfg.out_dir / ENCODER_FILE)
        dist.barrier()

    def knn_monitor(self, encoder: Encoder | None = None) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 on the labelled evaluation split (main process only)."""
        result = None
        if dist.is_main():
            sets = self._eval_data()
            if sets is not None:
                gallery, queries = sets
                enc = self.encoder() if encoder is None else encoder
                g_feats = embed_images(enc, gallery.images)
                q_feats = embed_images(enc, queries.images)
                r = knn_evaluate(q_feats, queries.labels, g_feats, gallery.labels, len(gallery.classes),
                                 self.cfg.knn_k, self.cfg.knn_temperature)
                result = (r.top1, r.top5)
                self.model.train()
        dist.barrier()
        return result

    def _eval_data(self) -> tuple[ImageData, ImageData] | None:
        if self._eval_sets is not None:
            return self._eval_sets
        cfg = self.cfg
        pair = default_eval_split(cfg.data)
        if pair is not None:
            gallery = self.data if pair[0] == self.data.source and not cfg.classes else load_images(pair[0])
            queries = load_images(pair[1])
        elif self.data.labelled and len(self.data) >= 20:
            # A folder with class subfolders: every tenth image is a query, the rest the gallery.
            is_query = torch.arange(len(self.data)) % 10 == 0
            gallery, queries = _subset(self.data, ~is_query), _subset(self.data, is_query)
        else:
            return None
        ch = cfg.in_channels
        gallery = _subset(gallery, torch.arange(len(gallery)) < cfg.knn_max_gallery)
        gallery.images, queries.images = match_channels(gallery.images, ch), match_channels(queries.images, ch)
        self._eval_sets = (gallery, queries)
        return self._eval_sets


def only_classes(data: ImageData, names: list[str]) -> ImageData:
    """The images of ``data`` labelled with one of ``names``.

    Raises:
        SimCLRError: the data has no labels, or a name is not one of its classes (known ones listed).
    """
    if not data.classes:
        raise SimCLRError(f"{data.source} has no labels, so it cannot be narrowed to classes {', '.join(names)}")
    unknown = [n for n in names if n not in data.classes]
    if unknown:
        raise SimCLRError(f"{data.source} has no class {', '.join(map(repr, unknown))}; known: {', '.join(data.classes)}")
    wanted = torch.tensor([data.classes.index(n) for n in names])
    return _subset(data, torch.isin(data.labels, wanted))


def _subset(data: ImageData, mask: torch.Tensor) -> ImageData:
    keep = mask.nonzero().squeeze(1)
    return ImageData(
        images=data.images[keep], labels=data.labels[keep], classes=data.classes,
        refs=[data.refs[i] for i in keep.tolist()], source=data.source,
    )


def train(cfg: TrainConfig, resume: bool = False, explicit: set[str] | None = None) -> TrainResult:
    """Train SimCLR as configured; see :class:`Trainer`."""
    return Trainer(cfg, resume=resume, explicit=explicit).fit()
