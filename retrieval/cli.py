"""The ``retrieval`` command line: each command parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

app = typer.Typer(
    help="Image retrieval with a self-supervised (SimCLR) encoder: train, index, query, classify, score anomalies, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_INDEX = Path("runs/fashion-mnist/index")


def handles_errors(fn: Callable) -> Callable:
    """Turn the library's user errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from index.errors import IndexStoreError
        from retrieval.errors import RetrievalError
        from simclr.errors import SimCLRError

        try:
            return fn(*args, **kwargs)
        except (SimCLRError, IndexStoreError, RetrievalError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


# --------------------------------------------------------------------------- training

@app.command()
@handles_errors
def train(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist:train, cifar10:PATH:train, or a folder of images.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output folder (checkpoint.pt, encoder.pt, metrics.jsonl, curves.png).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run saved in --out.")] = False,
    arch: Annotated[Optional[str], typer.Option(help="Backbone: resnet18, resnet34, resnet50.")] = None,
    stem: Annotated[Optional[str], typer.Option(help="standard (7x7/2 + max-pool) or small (3x3/1, no pool). Default: standard on CPU, small on GPU.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Channels of the first ResNet stage (64 is torchvision's).")] = None,
    in_channels: Annotated[Optional[int], typer.Option(help="Input channels (default: the data's).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training resolution in pixels.")] = None,
    head: Annotated[Optional[str], typer.Option(help="Projection head: mlp, linear, none.")] = None,
    head_hidden: Annotated[Optional[int], typer.Option(help="Hidden width of the MLP head.")] = None,
    head_out: Annotated[Optional[int], typer.Option(help="Output dimension of the head.")] = None,
    head_depth: Annotated[Optional[int], typer.Option(help="Linear layers in the MLP head.")] = None,
    init: Annotated[Optional[str], typer.Option(help="random, imagenet (download), or a path to torchvision weights.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: a ~10 minute budget on CPU, the full recipe on GPU).")] = None,
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
    jitter_strength: Annotated[Optional[float], typer.Option(help="Colour-jitter strength s.")] = None,
    jitter_p: Annotated[Optional[float], typer.Option(help="Colour-jitter probability.")] = None,
    grayscale_p: Annotated[Optional[float], typer.Option(help="Random-grayscale probability (colour data).")] = None,
    blur_p: Annotated[Optional[float], typer.Option(help="Gaussian-blur probability.")] = None,
    whiten: Annotated[Optional[bool], typer.Option("--whiten/--no-whiten", help="PCA-whiten the encoder's features (fit on training images).")] = None,
    whiten_shrinkage: Annotated[Optional[float], typer.Option(help="Whitening shrinkage, a fraction of the largest eigenvalue.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on GPU), fp32, bf16, fp16.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    knn_every: Annotated[Optional[int], typer.Option(help="kNN monitor every N epochs (0: never).")] = None,
    knn_k: Annotated[Optional[int], typer.Option(help="Neighbours of the kNN monitor.")] = None,
    knn_temperature: Annotated[Optional[float], typer.Option(help="Temperature of the kNN monitor.")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log loss, learning rate and throughput every N steps.")] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Show a progress bar.")] = None,
) -> None:
    """Train a SimCLR encoder without labels (also under torchrun for several GPUs)."""
    from simclr import dist
    from simclr.config import TrainConfig
    from simclr.train import train as run

    overrides = {k: v for k, v in ctx.params.items() if k != "resume" and v is not None}
    cfg = TrainConfig.from_dict(overrides)
    try:
        result = run(cfg, resume=resume, explicit=set(overrides))
    finally:
        dist.shutdown()
    if dist.is_main():
        knn = f", kNN top-1 {100 * result.knn_top1:.2f}%" if result.knn_top1 is not None else ""
        typer.echo(f"trained {result.epochs} epochs ({result.steps} steps), loss {result.final_loss:.4f}{knn}")
        typer.echo(f"encoder: {result.encoder}")


@app.command("knn-eval")
@handles_errors
def knn_eval(
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder file (encoder.pt).")] = None,
    train: Annotated[str, typer.Option(help="Labelled gallery source.")] = "fashion-mnist:train",
    test: Annotated[str, typer.Option(help="Labelled query source.")] = "fashion-mnist:test",
    gallery_index: Annotated[Optional[Path], typer.Option(help="Use a labelled index folder as the gallery (instead of --encoder/--train).")] = None,
    query_index: Annotated[Optional[Path], typer.Option(help="Use a labelled index folder as the queries.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours.")] = 200,
    temperature: Annotated[float, typer.Option("-t", "--temperature", help="Vote temperature.")] = 0.07,
    linear_probe: Annotated[bool, typer.Option(help="Also train a linear classifier on the frozen features.")] = False,
    confusion: Annotated[Optional[Path], typer.Option(help="Write a confusion-matrix PNG here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Weighted-kNN top-1/top-5 (Wu et al. 2018) of a labelled test split against a labelled train split."""
    from retrieval import evaluate
    from retrieval.errors import RetrievalError
    from retrieval.service import pick_device
    from simclr.encoder import Encoder

    if (gallery_index is None) != (query_index is None):
        raise RetrievalError("--gallery-index and --query-index go together")
    if gallery_index is not None:
        from index import IndexStore

        store = IndexStore.load(gallery_index)
        gallery, queries = evaluate.features_from_store(store), evaluate.features_from_index(query_index)
        result = evaluate.knn_eval_index(queries, store, gallery, k, temperature)
    else:
        if encoder is None:
            raise RetrievalError("give --encoder (or --gallery-index and --query-index)")
        enc = Encoder.load(encoder, pick_device(device))
        gallery = evaluate.embed_labelled(enc, train, progress=not as_json)
        queries = evaluate.embed_labelled(enc, test, classes=gallery.classes, progress=not as_json)
        result = evaluate.knn_eval(queries, gallery, k, temperature)
    report: dict[str, Any] = {
        "k": k, "temperature": temperature, "top1": result.top1, "top5": result.top5,
        "per_class": dict(zip(gallery.classes, result.per_class)), "queries": int(result.predictions.numel()),
    }
    if linear_probe:
        report["linear_probe_top1"] = evaluate.linear_probe(gallery, queries)
    if confusion is not None:
        evaluate.save_confusion_png(result.confusion, gallery.classes, confusion, f"kNN top-1 {100 * result.top1:.2f}%")
        report["confusion_png"] = str(confusion)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"weighted kNN (k={k}, T={temperature}) on {report['queries']} queries")
    typer.echo(f"top-1 {100 * result.top1:.2f}%   top-5 {100 * result.top5:.2f}%")
    for name, acc in report["per_class"].items():
        typer.echo(f"  {name:<20} {100 * acc:6.2f}%")
    if linear_probe:
        typer.echo(f"linear probe top-1 {100 * report['linear_probe_top1']:.2f}%")
    if confusion is not None:
        typer.echo(f"confusion matrix: {confusion}")


@app.command("anomaly-eval")
@handles_errors
def anomaly_eval(
    encoder: Annotated[Path, typer.Option(help="Encoder file (encoder.pt).")],
    train: Annotated[str, typer.Option(help="Labelled source whose classes are the normal sets.")] = "fashion-mnist:train",
    test: Annotated[str, typer.Option(help="Labelled query source.")] = "fashion-mnist:test",
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours of the kNN distance.")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One-class anomaly AUROC: each class in turn is normal, all other test images anomalies."""
    from retrieval import evaluate
    from retrieval.service import pick_device
    from simclr.encoder import Encoder

    enc = Encoder.load(encoder, pick_device(device))
    gallery = evaluate.embed_labelled(enc, train, progress=not as_json)
    queries = evaluate.embed_labelled(enc, test, classes=gallery.classes, progress=not as_json)
    result = evaluate.one_class_eval(gallery, queries, k)
    if as_json:
        typer.echo(json.dumps({"k": k, "mean_auroc": result.mean, "per_class": result.per_class}, indent=2))
        return
    typer.echo(f"one-class kNN-distance AUROC (k={k})")
    for name, value in result.per_class.items():
        typer.echo(f"  {name:<20} {100 * value:6.2f}%")
    typer.echo(f"mean {100 * result.mean:.2f}%")


@app.command()
@handles_errors
def whiten(
    encoder: Annotated[Path, typer.Argument(help="Encoder file (encoder.pt).")],
    data: Annotated[str, typer.Option(help="Training images to fit the whitening on (fashion-mnist:train, a folder ...).")] = "fashion-mnist:train",
    out: Annotated[Optional[Path], typer.Option(help="New encoder file (default: ENCODER-whitened.pt beside it).")] = None,
    shrinkage: Annotated[float, typer.Option(help="Added to each eigenvalue, as a fraction of the largest.")] = 1e-4,
    max_images: Annotated[Optional[int], typer.Option(help="Images sampled from --data to fit it (default 10,000, or 10 per feature dimension if more).")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Write the encoder without any whitening instead.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
) -> None:
    """Write a copy of an encoder whose embeddings are PCA-whitened (what training does by default);
    for encoders trained with --no-whiten or before whitening existed. Indexes built with the old file
    must be rebuilt."""
    from retrieval.errors import RetrievalError
    from retrieval.service import pick_device
    from simclr.data import load_images
    from simclr.encoder import Encoder
    from simclr.train import match_channels

    enc = Encoder.load(encoder, pick_device(device))
    target = out or encoder.with_name(f"{encoder.stem}-{'plain' if remove else 'whitened'}.pt")
    if target.exists():
        raise RetrievalError(f"{target} exists; choose another --out (nothing was written)")
    if max_images is not None and max_images < 1:
        raise RetrievalError(f"--max-images must be >= 1, got {max_images}")
    if remove:
        enc.set_whitening(None, None)
    else:
        images = load_images(data, size=enc.spec.image_size, channels=enc.spec.in_channels)
        images = match_channels(images.images, enc.spec.in_channels)
        enc.fit_whitening(images, max_images=max_images, shrinkage=shrinkage)
    enc.save(target)
    typer.echo(f"{'unwhitened' if remove else 'whitened'} encoder: {target}")


# --------------------------------------------------------------------------- indexing

@app.command("index")
@handles_errors
def index_cmd(
    source: Annotated[str, typer.Option(help="fashion-mnist:train, cifar10:PATH:train, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Index folder to write (replaced atomically).")],
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder file (needed unless --append).")] = None,
    index_type: Annotated[str, typer.Option(help="auto, or a FAISS factory string (Flat, HNSW32, IVF4096,PQ32 ...).")] = "auto",
    append: Annotated[bool, typer.Option(help="Add new images to the existing index (already indexed content is skipped).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per embedding batch.")] = 256,
    workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    memory_budget_gb: Annotated[float, typer.Option(help="Memory for an approximate index's vectors (auto type above 1M items).")] = 8.0,
    anomaly_k: Annotated[int, typer.Option(help="Neighbours of the anomaly score's calibration.")] = 5,
    percentile: Annotated[float, typer.Option(help="Anomaly threshold percentile among normal items.")] = 99.0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Embed a collection and write a FAISS index folder (also under torchrun, one shard per rank)."""
    from retrieval.indexing import IndexConfig, build_index

    cfg = IndexConfig(
        source=source, out=str(out), encoder=str(encoder) if encoder else None, index_type=index_type, append=append,
        batch_size=batch_size, workers=workers, device=device, memory_budget_gb=memory_budget_gb,
        anomaly_k=anomaly_k, percentile=percentile, progress=progress,
    )
    from simclr import dist

    try:
        report = build_index(cfg)
    finally:
        dist.shutdown()
    if report is None:
        return
    for ref, reason in report.failures[:20]:
        typer.echo(f"skipped: {reason}", err=True)
    if len(report.failures) > 20:
        typer.echo(f"skipped: ... and {len(report.failures) - 20} more", err=True)
    parts = [f"indexed {report.added} images into {report.out} ({report.total} in all, {report.factory})"]
    if report.failures:
        parts.append(f"{len(report.failures)} unreadable file(s) skipped")
    if report.duplicates:
        parts.append(f"{report.duplicates} already indexed")
    typer.echo("; ".join(parts) + f"; {report.seconds:.1f}s, {report.images_per_second:.0f} images/s")


@app.command()
@handles_errors
def info(index_dir: Annotated[Path, typer.Argument(help="Index folder.")] = DEFAULT_INDEX) -> None:
    """Facts about an index folder."""
    from index import IndexStore

    store = IndexStore.load(index_dir)
    m = store.manifest
    cal = m.extra.get("calibration") or {}
    typer.echo(f"index      {index_dir}")
    typer.echo(f"items      {m.count} ({len(m.classes)} classes)")
    typer.echo(f"type       {m.factory}, {m.dim}-d, {m.metric}")
    typer.echo(f"encoder    {m.encoder.get('arch')} {m.encoder.get('stem')} stem, sha256 {m.encoder_sha256[:16]}…")
    typer.echo(f"sources    {', '.join(m.sources)}")
    if cal:
        typer.echo(f"anomaly    k={cal['k']}, threshold {cal['threshold']:.4f} at the {cal['percentile']:g}th percentile of {cal['count']} items")
    typer.echo(f"created    {m.created_at}, updated {m.updated_at}")


# --------------------------------------------------------------------------- answering

def _queries(images: list[str], from_file: Optional[Path]) -> list[str] | Any:
    """Query arguments, folders expanded to their images, plus lines of --from-file (or stdin)."""
    from retrieval.errors import RetrievalError
    from simclr.data import scan_folder

    def expand():  # noqa: ANN202
        for q in images:
            p = Path(q)
            if p.is_dir():
                yield from (str(f) for f in scan_folder(p).paths)
            else:
                yield q
        if from_file is not None:
            try:
                handle = sys.stdin if str(from_file) == "-" else open(from_file, encoding="utf-8")
            except OSError as exc:
                raise RetrievalError(f"--from-file {from_file}: {exc.strerror}") from None
            with handle:
                for line in handle:
                    if line.strip():
                        yield line.strip()

    if not images and from_file is None:
        raise RetrievalError("give at least one image, item id (id:N), folder, or --from-file")
    return expand()


def _answer(index_dir: Path, images: list[str], from_file: Optional[Path], encoder: Optional[Path], force: bool, device: str, as_json: bool, opts: Any, show: Callable[[Any], None]) -> None:
    from retrieval.service import Service

    service = Service.open(index_dir, encoder, force=force, device=device)
    failed = 0
    for answer in service.ask_stream(_queries(images, from_file), opts):
        if answer.error:
            failed += 1
            if not as_json:
                typer.echo(f"error: {answer.error}", err=True)
        if as_json:
            typer.echo(json.dumps(answer.to_dict()))
        elif not answer.error:
            show(answer)
    if failed:
        raise typer.Exit(code=1)


IndexArg = Annotated[Path, typer.Argument(help="Index folder.")]
ImagesArg = Annotated[Optional[list[str]], typer.Argument(help="Image files, folders, or item ids (id:N).")]
FromFile = Annotated[Optional[Path], typer.Option(help="Read queries, one per line, from this file ('-': stdin).")]
EncoderOpt = Annotated[Optional[Path], typer.Option(help="Encoder file (default: the index's own).")]
ForceOpt = Annotated[bool, typer.Option(help="Use an encoder other than the index's.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per query.")]


@app.command()
@handles_errors
def query(
    index_dir: IndexArg,
    images: ImagesArg = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists to visit (approximate indexes).")] = None,
    ef_search: Annotated[Optional[int], typer.Option(help="HNSW search breadth (approximate indexes).")] = None,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The k most similar indexed images of each query image."""
    from retrieval.service import Options

    def show(a: Any) -> None:
        typer.echo(f"{a.query}")
        if a.note:
            typer.echo(f"  note: {a.note}")
        for h in a.hits:
            typer.echo(f"  {h.rank:>3}  {h.similarity:.4f}  {(h.label or '-'):<16} {h.ref}")

    _answer(index_dir, images or [], from_file, encoder, force, device, as_json, Options(k=k, nprobe=nprobe, ef_search=ef_search), show)


@app.command()
@handles_errors
def classify(
    index_dir: IndexArg,
    images: ImagesArg = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours that vote.")] = 200,
    temperature: Annotated[float, typer.Option("-t", "--temperature", help="Vote temperature.")] = 0.07,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Label images by weighted kNN over the index's labelled items (Wu et al. 2018)."""
    from retrieval.service import Options

    def show(a: Any) -> None:
        p = a.prediction
        if p is None or p.label is None:
            typer.echo(f"{a.query}  (no prediction: {a.note})")
            return
        top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:3]
        alternatives = ", ".join(f"{c} {v:.2f}" for c, v in top[1:] if v > 0)
        typer.echo(f"{a.query}  {p.label} ({top[0][1]:.2f})" + (f"   [{alternatives}]" if alternatives else ""))

    _answer(index_dir, images or [], from_file, encoder, force, device, as_json,
            Options(k=1, classify=True, knn_k=k, temperature=temperature), show)


@app.command()
@handles_errors
def anomaly(
    index_dir: IndexArg,
    images: ImagesArg = None,
    k: Annotated[Optional[int], typer.Option("-k", "--k", help="Neighbours of the kNN distance (default: the index's calibration).")] = None,
    percentile: Annotated[Optional[float], typer.Option(help="Threshold percentile among normal items (default: the index's, 99).")] = None,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Anomaly scores: mean cosine distance to the k nearest indexed images, with a percentile and a verdict."""
    from retrieval.service import Options

    def show(a: Any) -> None:
        s = a.anomaly
        typer.echo(f"{a.query}  score {s.score:.4f}  percentile {s.percentile:5.1f}  {s.verdict.upper() if s.unusual else s.verdict}"
                   f"  (threshold {s.threshold:.4f})")

    _answer(index_dir, images or [], from_file, encoder, force, device, as_json,
            Options(k=1, anomaly=True, anomaly_k=k, percentile=percentile), show)


@app.command()
@handles_errors
def serve(
    index_dir: Annotated[Optional[Path], typer.Argument(help="Index folder (default: the README demo's).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    auth: Annotated[Optional[str], typer.Option(help="user:password required to use the app.")] = None,
    share: Annotated[bool, typer.Option(help="Ask Gradio for a public share link.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Serve the web app (image search, kNN labels, anomaly verdicts) on an index."""
    from retrieval.webapp import launch

    launch(index_dir, host=host, port=port, auth=auth, share=share, device=device)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
