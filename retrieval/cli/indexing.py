"""Commands that write and describe index folders: ``index``, ``info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.options import DEFAULT_INDEX, IndexConfig
from retrieval.cli.app import DeviceOpt, app, echo_lines, handles_errors

D = IndexConfig  # its field defaults are the options' defaults


@app.command("index")
@handles_errors
def index_cmd(
    source: Annotated[str, typer.Option(help="fashion-mnist:train, cifar10:PATH:train, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Index folder to write (replaced atomically).")],
    encoder: Annotated[Optional[Path], typer.Option(help="Encoder file (needed unless --append).")] = None,
    index_type: Annotated[str, typer.Option(help="auto, or a FAISS factory string (Flat, HNSW32, IVF4096,PQ32 ...).")] = D.index_type,
    append: Annotated[bool, typer.Option(help="Add new images to the existing index (already indexed content is skipped).")] = D.append,
    batch_size: Annotated[int, typer.Option(help="Images per embedding batch.")] = D.batch_size,
    workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes.")] = D.workers,
    device: DeviceOpt = D.device,
    memory_budget_gb: Annotated[float, typer.Option(help="Memory for the index's vectors (auto type above 1M items): beyond it, compressed codes re-ranked from the stored vectors.")] = D.memory_budget_gb,
    anomaly_k: Annotated[int, typer.Option(help="Neighbours of the anomaly score's calibration.")] = D.anomaly_k,
    percentile: Annotated[float, typer.Option(help="Anomaly threshold percentile among normal items.")] = D.percentile,
    anomaly_shrinkage: Annotated[float, typer.Option(help="Shrinkage of the anomaly space's whitening (a fraction of the largest eigenvalue).")] = D.anomaly_shrinkage,
    anomaly_space: Annotated[str, typer.Option(help="auto (the search embedding joins the raw features whitened on the gallery where the gallery is one part of the collection the encoder's whitening was fit on: apart from its centre, within its reach; retrieval info says which), features (never), or joined (always).")] = D.anomaly_space,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = D.progress,
) -> None:
    """Embed a collection and write a FAISS index folder (also under torchrun, one shard per rank)."""
    from retrieval.build import build_index
    from simclr import dist

    cfg = IndexConfig(
        source=source, out=str(out), encoder=str(encoder) if encoder else None, index_type=index_type, append=append,
        batch_size=batch_size, workers=workers, device=device, memory_budget_gb=memory_budget_gb,
        anomaly_k=anomaly_k, percentile=percentile, anomaly_shrinkage=anomaly_shrinkage, anomaly_space=anomaly_space,
        progress=progress,
    )
    try:
        report = build_index(cfg)
    finally:
        dist.shutdown()
    if report is None:
        return
    for line in report.skipped_lines():
        typer.echo(line, err=True)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(report.summary())


@app.command()
@handles_errors
def info(index_dir: Annotated[Path, typer.Argument(help="Index folder.")] = DEFAULT_INDEX) -> None:
    """Facts about an index folder."""
    from retrieval.info import describe_folder

    echo_lines(describe_folder(index_dir).lines())
