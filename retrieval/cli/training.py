"""Commands that make and judge encoders: ``train``, ``whiten``, ``knn-eval``, ``anomaly-eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.anomaly import DEFAULT_K as ANOMALY_K
from retrieval.anomaly import DEFAULT_SHRINKAGE as ANOMALY_SHRINKAGE
from retrieval.anomaly import DEFAULT_SPACE_MODE as ANOMALY_SPACE
from retrieval.cli.app import DeviceOpt, JsonOpt, app, echo_lines, handles_errors
from simclr.knn_defaults import KNN_K, KNN_TEMPERATURE


@app.command()
@handles_errors
def train(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist:train, cifar10:PATH:train, or a folder of images.")] = None,
    classes: Annotated[Optional[list[str]], typer.Option("--class", help="Train on this class only (repeat for several; labelled sources).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (checkpoint.pt, encoder.pt, metrics.jsonl, curves.png).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run saved in --out.")] = False,
    arch: Annotated[Optional[str], typer.Option(help="Backbone: resnet18, resnet34, resnet50.")] = None,
    stem: Annotated[Optional[str], typer.Option(help="standard (7x7/2 + max-pool), small (3x3/1, no pool) or stride2 (3x3/2, no pool). Default: standard on CPU, small on GPU.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Channels of the first ResNet stage (64 is torchvision's; folders on a CPU default to 32).")] = None,
    in_channels: Annotated[Optional[int], typer.Option(help="Input channels (default: the data's).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training resolution in pixels (default: 32 for data sets; for folders of photos 64 on a CPU, 224 on a GPU). The encoder records it; indexing embeds at it.")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Embedding: global (the last stage, averaged), multiscale (stages 2 and 3 on a 2x2 grid beside it) or pyramid (stage 2 on 4x4, stage 3 on 2x2, beside it). Default: pyramid for folders on a CPU, global otherwise (BENCHMARKS.md). A resumed run keeps its own unless given.")] = None,
    flip_average: Annotated[Optional[bool], typer.Option("--flip-average/--no-flip-average", help="Embed each image as the mean of its own and its mirror image's features (twice the embedding time; mirror images get one embedding). Default: on for folders on a CPU (BENCHMARKS.md). A resumed run keeps its own unless given.")] = None,
    head: Annotated[Optional[str], typer.Option(help="Projection head: mlp, linear, none.")] = None,
    head_hidden: Annotated[Optional[int], typer.Option(help="Hidden width of the MLP head.")] = None,
    head_out: Annotated[Optional[int], typer.Option(help="Output dimension of the head.")] = None,
    head_depth: Annotated[Optional[int], typer.Option(help="Linear layers in the MLP head.")] = None,
    init: Annotated[Optional[str], typer.Option(help="random, imagenet (download), a path to torchvision weights, or an encoder file of this tool trained on a broader collection (of the same --arch, --stem and --width).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: --minutes 10 on a CPU, the full recipe on a GPU).")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Time budget: the step count is fixed from the first steps' time so that warm-up and the cosine schedule end on time (not with --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (images; each gives two views).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="lars, sgd or adamw.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate, scaled with the batch size.")] = None,
    lr_scaling: Annotated[Optional[str], typer.Option(help="linear (lr*B/256), sqrt (lr*sqrt(B)) or none.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (not on biases and norms).")] = None,
    lars_eta: Annotated[Optional[float], typer.Option(help="LARS trust coefficient.")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Linear warm-up length in epochs.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="NT-Xent temperature.")] = None,
    crop_min: Annotated[Optional[float], typer.Option(help="Smallest random-crop area (fraction).")] = None,
    crop_max: Annotated[Optional[float], typer.Option(help="Largest random-crop area (fraction).")] = None,
    chance_crop_min: Annotated[Optional[float], typer.Option(help="When the loss is still at chance level 100 steps in (two views no more alike than two images, as with photos of one thing held steady), train on with crops of at least this share of the image, once (0: never; BENCHMARKS.md).")] = None,
    jitter_strength: Annotated[Optional[float], typer.Option(help="Colour-jitter strength s.")] = None,
    jitter_p: Annotated[Optional[float], typer.Option(help="Colour-jitter probability.")] = None,
    grayscale_p: Annotated[Optional[float], typer.Option(help="Random-grayscale probability (colour data).")] = None,
    blur_p: Annotated[Optional[float], typer.Option(help="Gaussian-blur probability.")] = None,
    rotation: Annotated[Optional[float], typer.Option(help="Turn each view by up to this many degrees either way (0 to 180; for subjects with no upright, such as parts on a belt).")] = None,
    small_crops: Annotated[Optional[int], typer.Option(help="Multi-crop: this many small crops of each image beside its two full views (0: none).")] = None,
    small_crop_size: Annotated[Optional[int], typer.Option(help="Side of the small crops in pixels (default: half the training size).")] = None,
    small_crop_min: Annotated[Optional[float], typer.Option(help="Smallest small-crop area (fraction).")] = None,
    small_crop_max: Annotated[Optional[float], typer.Option(help="Largest small-crop area (fraction).")] = None,
    rotation_negatives: Annotated[Optional[bool], typer.Option("--rotation-negatives/--no-rotation-negatives", help="Shifted negatives for anomaly scores on one-kind collections: each image also enters the batch turned by 90, 180 and 270 degrees as an image of its own (four times the work a step).")] = None,
    whiten: Annotated[Optional[bool], typer.Option("--whiten/--no-whiten", help="PCA-whiten the encoder's features (fit on training images).")] = None,
    whiten_shrinkage: Annotated[Optional[float], typer.Option(help="Whitening shrinkage, a fraction of the largest eigenvalue.")] = None,
    loader: Annotated[Optional[str], typer.Option(help="auto (folders in memory when they fit --memory-budget-gb, streamed from disk otherwise), memory or stream.")] = None,
    memory_budget_gb: Annotated[Optional[float], typer.Option(help="Memory a folder's decoded images may take before training streams them (default: a quarter of RAM).")] = None,
    loader_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers that decode a streamed folder (default: half the cores on a CPU, up to 8 on a GPU).")] = None,
    decoded_cache_gb: Annotated[Optional[float], typer.Option(help="Disk a streamed folder's decoded images may take in the run folder, so that epochs after the first read them instead of decoding again; removed when the run ends (default: a quarter of the free space, never more than half of it; 0: decode every epoch).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on GPU), fp32, bf16, fp16.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    knn_every: Annotated[Optional[int], typer.Option(help="kNN monitor every N epochs (0: never).")] = None,
    knn_k: Annotated[Optional[int], typer.Option(help="Neighbours of the kNN monitor.")] = None,
    knn_temperature: Annotated[Optional[float], typer.Option(help="Temperature of the kNN monitor.")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log loss, learning rate and throughput every N steps.")] = None,
    save_minutes: Annotated[Optional[float], typer.Option(help="Write the checkpoint and encoder at an epoch's end once this many minutes have passed since the last write (0: every epoch); the run's end always writes.")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Show a progress bar.")] = None,
) -> None:
    """Train a SimCLR encoder without labels (also under torchrun for several GPUs). Options left
    out take TrainConfig's defaults for the device."""
    from simclr import dist
    from simclr.config import TrainConfig
    from simclr.data import parse_source
    from simclr.encoder import ENCODER_FILE
    from simclr.train import CHECKPOINT
    from simclr.train import train as run

    overrides = {k: v for k, v in ctx.params.items() if k != "resume" and v is not None}
    cfg = TrainConfig.from_dict(overrides)
    try:
        result = run(cfg, resume=resume, explicit=set(overrides))
    except KeyboardInterrupt:
        if dist.is_main() and (cfg.out_dir / CHECKPOINT).is_file():
            held = (", its whitening fit on the images as training held them (a run's end fits it on the files read "
                    "as an index reads them)") if parse_source(cfg.data).kind == "folder" else ""
            typer.echo(f"stopped before the end: `retrieval train --out {cfg.out_dir} --resume` goes on from its last "
                       f"save; {cfg.out_dir / ENCODER_FILE} is that save's encoder{held}", err=True)
        raise
    finally:
        dist.shutdown()
    if dist.is_main():
        knn = f", kNN top-1 {100 * result.knn_top1:.2f}%" if result.knn_top1 is not None else ""
        skipped = f"; {result.skipped} unreadable file(s) skipped" if result.skipped else ""
        typer.echo(f"trained {result.epochs} epochs ({result.steps} steps), loss {result.final_loss:.4f}{knn}{skipped}")
        typer.echo(f"time: {result.train_seconds:.0f} s training, {result.end_seconds:.0f} s end-of-run work "
                   "(whitening, kNN monitor, files)")
        typer.echo(f"encoder: {result.encoder}")
        if (note := result.narrowed_line()) is not None:
            typer.echo(f"note: {note}")
        if (warning := result.chance_line()) is not None:
            typer.echo(f"warning: {warning}", err=True)


@app.command()
@handles_errors
def whiten(
    encoder: Annotated[Path, typer.Argument(help="Encoder file (encoder.pt).")],
    data: Annotated[str, typer.Option(help="Training images to fit the whitening on (fashion-mnist:train, a folder ...).")] = "fashion-mnist:train",
    out: Annotated[Optional[Path], typer.Option(help="New encoder file (default: ENCODER-whitened.pt beside it).")] = None,
    shrinkage: Annotated[Optional[float], typer.Option(help="Added to each eigenvalue, as a fraction of the largest (default: training's).")] = None,
    max_images: Annotated[Optional[int], typer.Option(help="Images sampled from --data to fit it (default 10,000, or 10 per feature dimension if more).")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Write the encoder without any whitening instead.")] = False,
    pooling: Annotated[Optional[str], typer.Option(help="Also switch the copy's embedding: global (the last stage, averaged), multiscale (stages 2 and 3 on a 2x2 grid beside it) or pyramid (stage 2 on 4x4, stage 3 on 2x2).")] = None,
    flip_average: Annotated[Optional[bool], typer.Option("--flip-average/--no-flip-average", help="Also switch the copy's averaging of each image's features with its mirror image's.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Write a copy of an encoder whose embeddings are PCA-whitened (what training does by default);
    for encoders trained with --no-whiten or before whitening existed. Indexes built with the old file
    must be rebuilt."""
    from retrieval.embed import skipped_lines
    from retrieval.pretrained import rewhiten

    target, fit = rewhiten(encoder, data, out, shrinkage, max_images, remove, device, pooling=pooling,
                           flip_average=flip_average)
    for line in skipped_lines(fit.failures if fit else []):
        typer.echo(line, err=True)
    fitted = f" (fit on {fit.images} images)" if fit else ""
    typer.echo(f"{'unwhitened' if remove else 'whitened'} encoder: {target}{fitted}")


@app.command("knn-eval")
@handles_errors
def knn_eval(
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder file (encoder.pt).")] = None,
    train: Annotated[str, typer.Option(help="Labelled gallery source.")] = "fashion-mnist:train",
    test: Annotated[str, typer.Option(help="Labelled query source.")] = "fashion-mnist:test",
    gallery_index: Annotated[Optional[Path], typer.Option(help="Use a labelled index folder as the gallery (instead of --encoder/--train).")] = None,
    query_index: Annotated[Optional[Path], typer.Option(help="Use a labelled index folder as the queries.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours.")] = KNN_K,
    temperature: Annotated[float, typer.Option("-t", "--temperature", help="Vote temperature.")] = KNN_TEMPERATURE,
    linear_probe: Annotated[bool, typer.Option(help="Also train a linear classifier on the frozen features.")] = False,
    confusion: Annotated[Optional[Path], typer.Option(help="Write a confusion-matrix PNG here.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Weighted-kNN top-1/top-5 (Wu et al. 2018) of a labelled test split against a labelled train split."""
    from retrieval.evaluate import knn_report

    report = knn_report(encoder, train, test, gallery_index, query_index, k, temperature, linear_probe, confusion,
                        device, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        echo_lines(report.lines())


@app.command("anomaly-eval")
@handles_errors
def anomaly_eval(
    protocol: Annotated[str, typer.Option(help="strict (an encoder trained per class, the default), shared-encoder or transductive.")] = "strict",
    encoder: Annotated[Optional[Path], typer.Option(help="The encoder trained on the whole collection (shared-encoder, transductive).")] = None,
    train: Annotated[str, typer.Option(help="Labelled source whose classes are the normal sets.")] = "fashion-mnist:train",
    test: Annotated[str, typer.Option(help="Labelled query source.")] = "fashion-mnist:test",
    work: Annotated[Optional[Path], typer.Option(help="strict: folder for the per-class encoders (an interrupted run continues).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="strict: training epochs per class (default: what retrieval train does on the device, 10 minutes on a CPU).")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="strict: a time budget per class instead of --epochs, as retrieval train's --minutes.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours of the kNN distance.")] = ANOMALY_K,
    shrinkage: Annotated[float, typer.Option(help="Shrinkage of the anomaly space's whitening.")] = ANOMALY_SHRINKAGE,
    score: Annotated[str, typer.Option(help="index (the anomaly space) or cosine (the old score, for comparison).")] = "index",
    anomaly_space: Annotated[str, typer.Option(help="The anomaly space as retrieval index --anomaly-space makes it: auto, features or joined.")] = ANOMALY_SPACE,
    only: Annotated[Optional[list[str]], typer.Option("--class", help="Evaluate this class only (repeat for several).")] = None,
    stem: Annotated[Optional[str], typer.Option(help="strict: the recipe each class trains with, as retrieval train's options of these names (default: its defaults for the device). Also --width, --image-size, --batch-size, --pooling, --crop-min, --chance-crop-min, --rotation-negatives, --seed, --init.")] = None,
    width: Annotated[Optional[int], typer.Option(help="strict: channels of the first ResNet stage.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="strict: training resolution in pixels.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="strict: batch size (default: the device's, capped at the class's images).")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="strict: the encoders' embedding, global, multiscale or pyramid; the anomaly space is made from it.")] = None,
    crop_min: Annotated[Optional[float], typer.Option(help="strict: smallest random-crop area (the trainer narrows crops to --chance-crop-min when its loss sits at chance level).")] = None,
    chance_crop_min: Annotated[Optional[float], typer.Option(help="strict: the crops a run at chance level narrows to (0: never), as retrieval train's.")] = None,
    rotation_negatives: Annotated[Optional[bool], typer.Option("--rotation-negatives/--no-rotation-negatives", help="strict: shifted negatives (each image also turned by 90, 180 and 270 degrees).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="strict: random seed of each class's training.")] = None,
    init: Annotated[Optional[str], typer.Option(help="strict: the weights each class starts from, as retrieval train's --init (an encoder file trained on other data, or imagenet).")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """One-class anomaly AUROC: each class in turn is normal, all other test images anomalies;
    per-class and mean AUROC with the seconds each class took. Under strict, a class whose run is
    already in --work (from an earlier call, or from retrieval train --class C --out WORK/C) is
    reused when the recipe options given here match it."""
    from retrieval.anomaly_eval import evaluate_protocol

    recipe = {"stem": stem, "width": width, "image_size": image_size, "batch_size": batch_size, "pooling": pooling,
              "crop_min": crop_min, "chance_crop_min": chance_crop_min, "rotation_negatives": rotation_negatives, "seed": seed, "init": init}
    result = evaluate_protocol(protocol, train, test, encoder, k, shrinkage, work, epochs,
                               train_options={name: value for name, value in recipe.items() if value is not None}, minutes=minutes,
                               device=device, progress=not as_json, score=score, only=only, anomaly_space=anomaly_space)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        echo_lines(result.lines())
