"""The SimCLR training loop (arXiv 2002.05709): one process, or many under ``torchrun``.

The data set lives as one uint8 tensor (on the GPU when it fits); each step indexes a batch,
augments it twice on the device, and takes one optimiser step on the NT-Xent loss. Every
epoch ends with an atomic checkpoint and an encoder file; ``resume=True`` continues from the
checkpoint exactly (the augmentation generator is seeded per step, the data order per epoch).
"""

from __future__ import annotations

import dataclasses
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
from simclr.config import EMBEDDING_OPTIONS, RESUMABLE_CHANGES, WHOLE_SUBJECT_CROP, TrainConfig
from simclr.data import default_eval_split, load_images
from simclr.device import pick_device
from simclr.encoder import ENCODER_FILE, Encoder, EncoderSpec, channel_stats
from simclr.errors import SimCLRError
from simclr.knn import knn_evaluate
from simclr.loss import AT_CHANCE_SHARE, NTXentLoss, chance_loss
from simclr.metrics import MetricsLog
from simclr.models import SimCLRModel, build_backbone, build_head
from simclr.optim import WarmupCosine, build_optimizer, scaled_lr
from simclr.pooling import pooled_dim
from simclr.pretrained import load_initial_weights
from simclr.training_data import (
    STATS_IMAGES,
    InMemoryImages,
    Loading,
    StreamedImages,
    TrainingImages,
    open_training_images,
)

log = logging.getLogger(__name__)
TURNS = 4  # rotation negatives: 0, 90, 180 and 270 degrees

CHECKPOINT = "checkpoint.pt"
DECODED_FILE = "decoded-images.bin"  # a streamed folder's decoded images, during the run
METRICS = "metrics.jsonl"
CURVES = "curves.png"
UNPLANNED = 2**62  # the step count of a time-budgeted run until its first steps are timed
PROBE_SKIP = 2  # steps not timed for the plan (allocation, thread start-up)
CHANCE_GRACE_STEPS = 100  # a loss still at chance level this many steps in (and past warm-up) is reported


def _probe_done(steps: int, seconds: float, minutes: float | None) -> bool:
    """Whether ``steps`` steps timed over ``seconds`` measure the step time well enough to plan
    a budget of ``minutes``: at least 5 steps and 3% of the budget (at most 30 s), or 50 steps."""
    return steps >= 50 or (steps >= 5 and seconds >= min(30.0, 0.03 * (minutes or 0) * 60))


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
    train_seconds: float = 0.0  # the steps, and the saves inside the run
    end_seconds: float = 0.0  # the last save: whitening fit, kNN monitor, files
    skipped: int = 0  # unreadable files
    chance_loss: float = float("nan")  # the loss of a run that tells no image from another
    at_chance: bool = False  # the last epoch's loss was at chance level (the run learned nothing)
    narrowed: CropsNarrowed | None = None  # the crops were narrowed at chance level, at this step
    crop_min: float = 0.08  # the full views' smallest crop at the end (narrowed or as given)

    def chance_line(self) -> str | None:
        """A warning when the run ended at chance level, else None."""
        if not self.at_chance:
            return None
        return at_chance_message(self.final_loss, self.chance_loss, self.steps, self.crop_min)

    def narrowed_line(self) -> str | None:
        """What the trainer changed when the loss sat at chance level, else None."""
        return None if self.narrowed is None else self.narrowed.message()


@dataclass(frozen=True)
class CropsNarrowed:
    """The full views' crops were narrowed at ``step``, their loss ``loss`` at chance level."""

    step: int
    loss: float
    chance: float
    crop_from: float  # the smallest crop area before, and after (fractions of the image)
    crop_to: float

    def message(self) -> str:
        return (
            f"the NT-Xent loss was at chance level at step {self.step} ({self.loss:.3f}, chance {self.chance:.3f}): "
            f"crops of {self.crop_from:.0%} of the image and up left two views of an image no more alike than two "
            f"images, so from there the crops keep at least {self.crop_to:.0%} of it (as photos of one thing held "
            "steady need; BENCHMARKS.md). --chance-crop-min 0 keeps the crops as given."
        )


def at_chance_message(loss: float, chance: float, step: int, crop_min: float) -> str:
    """What a loss at chance level means, and what to do about it, for views whose crops take
    ``crop_min`` of the image and up."""
    way_out = (
        f"Crops of at least {crop_min:.0%} of the image, which keep the whole subject, did not help: try "
        "pretrained weights to start from (--init)"
        if crop_min >= WHOLE_SUBJECT_CROP else
        "Photos of one kind of thing held steady (an inspection line) need crops that keep the whole subject "
        f"(--crop-min {WHOLE_SUBJECT_CROP:g}; BENCHMARKS.md), or pretrained weights to start from (--init)"
    )
    return (
        f"the NT-Xent loss is at chance level at step {step} ({loss:.3f}, chance {chance:.3f}): under these "
        "augmentations the two views of an image are no more alike than two images, so the encoder learns "
        f"nothing from them. {way_out}."
    )


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
            changes = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}
            for name, before in EMBEDDING_OPTIONS.items():
                if name not in (explicit or ()):
                    kept = getattr(saved, name)
                    changes[name] = before if kept is None else kept
            cfg = saved.replace(**changes)
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
        # Each process keeps its own decoded images, in its share of the disk budget.
        world_tag = f".rank{dist.rank()}" if world > 1 else ""
        how = Loading(cfg.loader, cfg.image_size, cfg.in_channels, cfg.memory_budget_gb, cfg.loader_workers,
                      tuple(cfg.classes or ()), decoded_file=cfg.out_dir / f"{DECODED_FILE}{world_tag}",
                      decoded_gb=cfg.decoded_cache_gb, decoded_share=world)
        source = open_training_images(cfg.data, how, device)
        channels = source.channels
        if cfg.in_channels is None:
            self.cfg = cfg = cfg.replace(in_channels=channels)
        if cfg.batch_size > len(source):
            raise SimCLRError(f"batch size {cfg.batch_size} is larger than the data set ({len(source)} images in {cfg.data})")
        self.source = source
        self.steps_per_epoch = len(source) // cfg.batch_size
        if self.state is not None:
            mean, std = self.state["stats"]["mean"], self.state["stats"]["std"]
        elif cfg.init != "random":
            mean = std = None  # pretrained weights expect their inputs normalised as in their own training: below
        else:
            stats_from = source.images if isinstance(source, InMemoryImages) else source.sample(STATS_IMAGES)
            mean, std = channel_stats(stats_from)
        self.mean, self.std = mean, std
        if isinstance(source, InMemoryImages):
            source.place(device)

        torch.manual_seed(cfg.seed)  # the initial weights
        backbone = build_backbone(cfg.arch, channels, cfg.stem, cfg.width)
        # Whitening is fit at each save when the data set can estimate it (decided once).
        self.embed_dim = pooled_dim(backbone, cfg.pooling)
        self.whiten = cfg.whiten and whitening.can_whiten(len(source), self.embed_dim)
        if cfg.whiten and not self.whiten and dist.is_main():
            log.warning("%d training images are too few to fit a whitening of %d-d features (%d needed); "
                        "the encoder will use its features unwhitened", len(source), self.embed_dim,
                        whitening.min_images(self.embed_dim))
        if cfg.init != "random" and self.state is None:
            mean, std = self.mean, self.std = load_initial_weights(backbone, cfg.arch, cfg.stem, cfg.width, cfg.init)
        head = build_head(cfg.head, backbone.feature_dim, cfg.head_hidden, cfg.head_out, cfg.head_depth)
        model = SimCLRModel(backbone, head)
        if cfg.sync_bn and dist.is_dist():
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log.warning("SyncBatchNorm needs CUDA; each process normalises its own batch")
        self.model = model.to(device, memory_format=torch.channels_last)
        # Copies of each image in the loss's batch (rotation negatives: one a turn); the learning
        # rate scales with that batch.
        self.turns = TURNS if cfg.rotation_negatives else 1
        lr = scaled_lr(cfg.lr, cfg.batch_size * self.turns, cfg.lr_scaling)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, lr, cfg.weight_decay, cfg.momentum, cfg.lars_eta)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        # What the loss is when it tells no image from another (simclr.loss.chance_loss), and
        # from which step a loss still there is reported.
        self.chance = chance_loss(cfg.batch_size * self.turns, 2 + cfg.small_crops)
        self.chance_from = max(warmup, CHANCE_GRACE_STEPS)
        self._chance_reported = False
        self.narrowed: CropsNarrowed | None = None
        # A time budget fixes the step count once the first steps are timed (plan_budget);
        # until then the schedule runs as if it had no end.
        total = self.steps_per_epoch * cfg.epochs if cfg.minutes is None else UNPLANNED
        self.schedule = WarmupCosine(total, warmup)
        self.step_seconds = float("nan")  # measured by plan_budget
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = NTXentLoss(cfg.temperature)
        self.augment = BatchAugment(cfg.augment_config(channels), torch.tensor(mean), torch.tensor(std))
        self.small_augment = (BatchAugment(cfg.augment_config(channels, small=True), torch.tensor(mean), torch.tensor(std))
                              if cfg.small_crops else None)
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
        self._eval_sets: tuple[EvalSet, EvalSet] | None = None

    @property
    def total_steps(self) -> int:
        """The run's length in steps (with a time budget: :data:`UNPLANNED` until it is fixed)."""
        return self.schedule.total_steps

    @property
    def planned(self) -> bool:
        return self.total_steps != UNPLANNED

    @property
    def images(self) -> torch.Tensor:
        """The training images, when they are held in memory."""
        if not isinstance(self.source, InMemoryImages):
            raise SimCLRError(f"{self.cfg.data} is streamed from disk, not held in memory")
        return self.source.images

    def plan_budget(self, steps_done: int, seconds: float, elapsed: float) -> int:
        """Fix the run's length from ``steps_done`` steps timed at ``seconds`` in all: as many
        steps as fit in what remains of ``cfg.minutes`` (``elapsed`` seconds are spent), with
        the warm-up capped at a tenth of the run. Returns the step count."""
        per_step = self.step_seconds = seconds / max(1, steps_done)
        remaining = self.cfg.minutes * 60 - elapsed
        # Every process must take the same number of steps: rank 0's plan.
        total = dist.broadcast_int(max(self.step + 1, self.step + int(remaining / per_step)), self.device)
        self.schedule.total_steps = total
        self.schedule.warmup_steps = min(self.schedule.warmup_steps, max(1, total // 10))
        if dist.is_main():
            log.info("time budget %.1f min: %.3f s a step over the first %d steps, so %d steps (%.2f epochs)",
                     self.cfg.minutes, per_step, steps_done, total, total / self.steps_per_epoch)
        return total

    def shorten_budget(self, seconds: float) -> None:
        """Take the steps that ``seconds`` of work inside a time-budgeted run (an epoch's save:
        checkpoint, whitening fit) would have taken off the planned count, so the run still ends
        on time; the cosine schedule ends with it."""
        if self.cfg.minutes is None or not self.planned or not math.isfinite(self.step_seconds):
            return  # (a resumed run has not timed its steps: it keeps its plan)
        cut = dist.broadcast_int(round(seconds / self.step_seconds), self.device)
        self.schedule.total_steps = max(self.step + 1, self.total_steps - cut)

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
        if state.get("crops_narrowed") is not None:
            self._narrow_crops(CropsNarrowed(**state["crops_narrowed"]))
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
        perm = torch.randperm(len(self.source), generator=g)[: self.steps_per_epoch * cfg.batch_size]
        world = dist.world_size()
        return perm.view(self.steps_per_epoch, world, cfg.batch_size // world)[:, dist.rank()]

    def train_step(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One optimiser step on uint8 images (B, C, H, W); returns the loss (a 0-d tensor)."""
        if self.cfg.rotation_negatives:
            x = with_turns(x)
        views = torch.cat([self.augment(x, g), self.augment(x, g)])
        if self.small_augment is None:
            return self.step_on_views(views)
        return self.step_on_views(views, torch.cat([self.small_augment(x, g) for _ in range(self.cfg.small_crops)]))

    def step_on_views(self, views: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        """One optimiser step on augmented views (2B, C, S, S): view 1 of B images, then view 2;
        with multi-crop, ``small`` holds the small crops (kB, C, s, s), crop 1 of the B images first."""
        batches = [views] if small is None else [views, small]
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            z = self.forward(*batches)
        loss = self.loss_fn(*z.float().split(views.shape[0] // 2))  # one (B, D) block a view
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def fit(self, until_epoch: int | None = None) -> TrainResult:
        """Train to the configured length (epochs, or the time budget), or stop early at the
        end of epoch ``until_epoch``. The run is a sequence of steps; epoch ``e`` is steps
        ``e * steps_per_epoch`` onwards, in that epoch's data order, so a run resumed from any
        checkpoint continues exactly."""
        cfg, device = self.cfg, self.device
        main = dist.is_main()
        spe = self.steps_per_epoch
        if main:
            log.info("%s (width %s, %s stem, %d px) on %s, %s, %d images %s, %d steps an epoch, %d processes",
                     cfg.arch, cfg.width or "standard", cfg.stem, cfg.image_size, device,
                     f"{self.amp_dtype} autocast".replace("torch.", "") if self.amp_dtype else "fp32",
                     len(self.source), "streamed from disk" if isinstance(self.source, StreamedImages) else "in memory",
                     spe, dist.world_size())
        g = torch.Generator(device=device)
        progress = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps if self.planned else None, initial=self.step, unit="step",
                            dynamic_ncols=True, desc="train")
        views_per_step = 2 * cfg.batch_size * self.turns  # (full views)
        last = (self.state or {}).get("record", {})
        last_loss = last.get("loss", float("nan"))
        knn_top1 = last.get("knn_top1")
        rate = 0.0
        # The time budget counts from the first step; the first two steps (allocation, thread
        # start-up) are not timed for the plan.
        budget_start = time.perf_counter()
        timed_from, timed_step = None, 0
        start_step = self.step
        replan_at: list[int] = []
        train_seconds = 0.0
        last_save = time.perf_counter()

        def stop_step() -> int:
            return min(self.total_steps, until_epoch * spe) if until_epoch else self.total_steps

        while self.step < stop_step():
            epoch = self.step // spe
            first = self.step - epoch * spe
            loss_sum = torch.zeros((), device=device)
            window_loss = torch.zeros((), device=device)
            window_start, window_steps, epoch_steps = time.perf_counter(), 0, 0
            epoch_start = time.perf_counter()
            for _, x in self.source.batches(self._batch_order(epoch)[first:], fill=True):
                g.manual_seed(cfg.seed * 1_000_003 + self.step * 7919 + dist.rank())
                loss = self.train_step(x.to(device, non_blocking=True), g)
                loss_sum += loss
                window_loss += loss
                window_steps += 1
                epoch_steps += 1
                self.step += 1
                if cfg.minutes is not None and (not self.planned or replan_at):
                    now = time.perf_counter()
                    if timed_from is None and self.step - start_step >= PROBE_SKIP:
                        timed_from, timed_step = now, self.step
                    elif timed_from is not None and (
                        self.step == replan_at[0] if replan_at
                        # (rank 0 decides, so that every process plans at the same step)
                        else dist.broadcast_int(int(_probe_done(self.step - timed_step, now - timed_from, cfg.minutes)), device)
                    ):
                        first_plan = not self.planned
                        self.plan_budget(self.step - timed_step, now - timed_from, now - budget_start)
                        # Checked again at a quarter, half and three quarters of the steps left,
                        # from the time per step so far, saves included: a machine that slows
                        # down or speeds up mid-run still ends on time.
                        replan_at = ([self.step + round(f * (self.total_steps - self.step)) for f in (0.25, 0.5, 0.75)]
                                     if first_plan else replan_at[1:])
                        if progress is not None:
                            progress.total = self.total_steps
                ends_epoch = self.step % spe == 0 or self.step >= stop_step()
                if window_steps == cfg.log_every or ends_epoch:
                    mean_loss = dist.all_reduce_mean(window_loss / window_steps).item()
                    self._check_finite(mean_loss, epoch)
                    self._watch_chance(mean_loss)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * views_per_step / max(elapsed, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if self.metrics is not None:
                        self.metrics.write(kind="step", epoch=epoch, step=self.step, loss=mean_loss, lr=lr, views_per_s=rate)
                    if progress is not None:
                        progress.update(window_steps)
                        progress.set_postfix(epoch=f"{epoch + 1}", loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", views_s=f"{rate:.0f}")
                    window_loss.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                if ends_epoch:
                    break
            if epoch_steps == 0:
                raise SimCLRError(f"{cfg.data}: epoch {epoch + 1} yielded no batches")
            epoch_loss = dist.all_reduce_mean(loss_sum / epoch_steps).item()
            self._check_finite(epoch_loss, epoch)
            epoch_time = time.perf_counter() - epoch_start
            train_seconds += epoch_time
            last_loss = epoch_loss
            self.epoch = self.step // spe
            finished = self.step >= self.total_steps
            save_start = time.perf_counter()
            knn_due = bool(cfg.knn_every) and (finished or (self.step % spe == 0 and self.epoch % cfg.knn_every == 0))
            # (rank 0's clock decides, so that every process writes, or skips, together)
            save_due = finished or self.step >= stop_step() or bool(dist.broadcast_int(
                int(save_start - last_save >= 60 * cfg.save_minutes), device))
            # A time budget may end inside an epoch: its record says how far (e.g. 2.6).
            done = self.epoch if self.step % spe == 0 else round(self.step / spe, 3)
            record = {"kind": "epoch", "epoch": done, "step": self.step, "loss": epoch_loss,
                      "epoch_seconds": epoch_time, "views_per_s": epoch_steps * views_per_step / epoch_time}
            if self.source.skipped:
                record["skipped_files"] = self.source.skipped
            # With its whitening, fit once for the save and the monitor: on the training images
            # inside the run (cheap: held or cached), on the files read as an index reads them
            # at its end (the encoder file the run leaves, and its last kNN figure).
            last = finished or self.step >= stop_step()
            encoder = self.encoder(indexed=last) if dist.is_main() and (save_due or knn_due) else None
            if knn_due:
                knn = self.knn_monitor(encoder, indexed=last)
                if knn is not None:
                    knn_top1 = knn[0]
                    record.update(knn_top1=knn[0], knn_top5=knn[1])
                    if progress is not None:
                        progress.write(f"epoch {self.epoch}: loss {epoch_loss:.4f}, kNN top-1 {100 * knn[0]:.2f}%")
            if save_due:
                self.save(record, encoder)
                last_save = time.perf_counter()
            if self.metrics is not None:
                self.metrics.write(**record)
                if save_due:
                    self.metrics.plot(cfg.out_dir / CURVES, chance=self.chance)
            if not finished:  # saves inside the run count against a time budget; the last one does not
                train_seconds += time.perf_counter() - save_start
                self.shorten_budget(time.perf_counter() - save_start)
                if progress is not None and self.planned:
                    progress.total = self.total_steps
        if self.step >= self.total_steps:
            self.source.close()  # a run stopped early keeps its decoded images for --resume
        end_seconds = time.perf_counter() - budget_start - train_seconds
        if progress is not None:
            progress.close()
        if self.source.skipped and main:
            log.warning("%s: %d unreadable file(s) skipped", cfg.data, self.source.skipped)
        return TrainResult(
            out=cfg.out_dir, encoder=cfg.out_dir / ENCODER_FILE, checkpoint=self.ckpt_path,
            epochs=math.ceil(self.step / spe), steps=self.step, final_loss=last_loss, knn_top1=knn_top1,
            views_per_second=rate, train_seconds=train_seconds, end_seconds=end_seconds,
            skipped=self.source.skipped, chance_loss=self.chance,
            at_chance=self._at_chance(last_loss),  # (the last epoch's loss, or a reused run's)
            narrowed=self.narrowed, crop_min=self.augment.cfg.crop_scale[0],
        )

    def _at_chance(self, loss: float) -> bool:
        """Whether ``loss`` is at chance level, past the grace steps (a run too short to have left
        chance is not judged)."""
        return self.step >= self.chance_from and loss >= AT_CHANCE_SHARE * self.chance

    def _watch_chance(self, loss: float) -> None:
        """When the loss of the window just logged is at chance level: narrow the crops if they
        can be (once; see ``cfg.chance_crop_min``), else say so once. Every process sees the same
        all-reduced loss, so all of them narrow at the same step; the main one speaks."""
        if not self._at_chance(loss):
            return
        cfg = self.cfg
        if self.narrowed is None and cfg.chance_crop_min > cfg.crop_min:
            self._narrow_crops(CropsNarrowed(self.step, loss, self.chance, cfg.crop_min, cfg.chance_crop_min))
            if dist.is_main():
                log.warning(self.narrowed.message())
            if self.metrics is not None:
                self.metrics.write(kind="crops", step=self.step, crop_min=cfg.chance_crop_min, loss=loss)
        elif not self._chance_reported:
            self._chance_reported = True
            if dist.is_main():
                log.warning(at_chance_message(loss, self.chance, self.step, self.augment.cfg.crop_scale[0]))

    def _narrow_crops(self, narrowed: CropsNarrowed) -> None:
        """Train on with crops of at least ``narrowed.crop_to`` of the image; chance level is
        judged again after another grace period."""
        self.narrowed = narrowed
        aug = self.augment.cfg
        self.augment = BatchAugment(
            dataclasses.replace(aug, crop_scale=(narrowed.crop_to, max(narrowed.crop_to, aug.crop_scale[1]))),
            self.augment.mean, self.augment.std)
        self.chance_from = max(self.chance_from, narrowed.step + CHANCE_GRACE_STEPS)

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
    def encoder(self, indexed: bool = True) -> Encoder:
        """The encoder as it stands (sharing the model's backbone), with its whitening fit on
        evenly spaced training images unless ``--no-whiten``: read as an index reads them
        (``indexed``; a folder's files decoded again, at the encoder's size), or as training
        holds them (at the load size, resized by the encoder: the saves inside a run, which
        would otherwise decode thousands of files each time)."""
        spec = EncoderSpec(
            arch=self.cfg.arch, stem=self.cfg.stem, width=self.cfg.width, in_channels=self.cfg.in_channels,
            image_size=self.cfg.image_size, feature_dim=self.embed_dim,
            mean=list(self.mean), std=list(self.std), trained_on=self.cfg.data,
            # (the options as given, and what the trainer changed on its own)
            train_config={**self.cfg.to_dict(),
                          **({"crops_narrowed": dataclasses.asdict(self.narrowed)} if self.narrowed else {})},
            pooling=self.cfg.pooling, flip_average=self.cfg.flip_average,
        )
        enc = Encoder(spec, self.model.backbone).to(self.device)
        if self.whiten:
            sample = whitening.evenly_spaced_positions(len(self.source), whitening.fit_sample_size(enc.dim))
            feats, _ = _features(enc, EvalSet(self.source, sample), indexed=indexed)
            enc.set_whitening(*whitening.fit_whitening(feats, self.cfg.whiten_shrinkage), count=feats.shape[0])
            self.model.train()
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
                "crops_narrowed": None if self.narrowed is None else dataclasses.asdict(self.narrowed),
            }, self.ckpt_path)
            (self.encoder() if encoder is None else encoder).save(self.cfg.out_dir / ENCODER_FILE)
        dist.barrier()

    def knn_monitor(self, encoder: Encoder | None = None, indexed: bool = True) -> tuple[float, float] | None:
        """Weighted kNN top-1/top-5 on the labelled evaluation split (main process only), its
        images read as ``encoder``'s whitening was fit (:meth:`encoder`)."""
        result = None
        if dist.is_main():
            sets = self._eval_data()
            if sets is not None:
                enc = self.encoder(indexed) if encoder is None else encoder
                (g_feats, g_labels), (q_feats, q_labels) = (_features(enc, s, embed=True, indexed=indexed) for s in sets)
                r = knn_evaluate(q_feats, q_labels, g_feats, g_labels, len(sets[0].images.classes),
                                 self.cfg.knn_k, self.cfg.knn_temperature)
                result = (r.top1, r.top5)
                self.model.train()
        dist.barrier()
        return result

    def _eval_data(self) -> tuple[EvalSet, EvalSet] | None:
        if self._eval_sets is not None:
            return self._eval_sets
        cfg, source = self.cfg, self.source
        ch = cfg.in_channels
        pair = default_eval_split(cfg.data)
        if pair is not None:
            if pair[0] == source.source and not cfg.classes:
                gallery = source
            else:
                gallery = InMemoryImages(load_images(pair[0]), ch)
            queries = InMemoryImages(load_images(pair[1]), ch)
            g_pos, q_pos = torch.arange(len(gallery)), torch.arange(len(queries))
        elif source.labelled and len(source) >= 20:
            # A folder with class subfolders: every tenth image is a query, the rest the gallery.
            gallery = queries = source
            is_query = torch.arange(len(source)) % 10 == 0
            g_pos, q_pos = (~is_query).nonzero().squeeze(1), is_query.nonzero().squeeze(1)
        else:
            return None
        self._eval_sets = (EvalSet(gallery, whitening.evenly_spaced(g_pos, cfg.knn_max_gallery)),
                           EvalSet(queries, whitening.evenly_spaced(q_pos, cfg.knn_max_queries)))
        return self._eval_sets


@dataclass
class EvalSet:
    """Some positions of a collection of training-like images."""

    images: TrainingImages
    positions: torch.Tensor


@torch.no_grad()
def _features(enc: Encoder, s: EvalSet, embed: bool = False, batch_size: int = 512,
              indexed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (or, with ``embed``, embeddings) of the images at ``s.positions``, with
    their labels: read as an index reads them (``indexed``: :meth:`TrainingImages.as_indexed`),
    or as training holds them; unreadable files are left out."""
    feats, labels = [], []
    order = s.positions.split(batch_size)
    batches = s.images.as_indexed(order, enc.spec.image_size) if indexed else s.images.batches(order)
    for positions, x in batches:
        f = enc.features(x)
        feats.append(enc.from_features(f) if embed else f)
        labels.append(s.images.labels[positions])
    if not feats:
        raise SimCLRError(f"{s.images.source}: none of the sampled images could be read")
    return torch.cat(feats), torch.cat(labels)


def with_turns(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, S, S) followed by the same images turned by 90, 180 and 270 degrees: (4B, C, S, S)."""
    if x.shape[-1] != x.shape[-2]:
        raise SimCLRError(f"rotation negatives need square images, got {x.shape[-2]} x {x.shape[-1]}")
    return torch.cat([x.rot90(k, (2, 3)) for k in range(TURNS)])


def train(cfg: TrainConfig, resume: bool = False, explicit: set[str] | None = None) -> TrainResult:
    """Train SimCLR as configured; see :class:`Trainer`."""
    return Trainer(cfg, resume=resume, explicit=explicit).fit()
