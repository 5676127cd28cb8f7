"""Commands that ask an index things: ``query``, ``classify``, ``anomaly``.

Each streams its queries through :meth:`retrieval.service.Service.ask_stream` and prints one
answer at a time (text, or one JSON object per line with ``--json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from retrieval.cli.app import DeviceOpt, IndexArg, app, handles_errors
from retrieval.options import Options

ImagesArg = Annotated[Optional[list[str]], typer.Argument(help="Image files, folders, or item ids (id:N).")]
FromFile = Annotated[Optional[Path], typer.Option(help="Read queries, one per line, from this file ('-': stdin).")]
EncoderOpt = Annotated[Optional[Path], typer.Option(help="Encoder file (default: the index's own).")]
ForceOpt = Annotated[bool, typer.Option(help="Use an encoder other than the index's.")]
JsonLines = Annotated[bool, typer.Option("--json", help="One JSON object per query.")]


def _answer(index_dir: Path, images: list[str], from_file: Optional[Path], encoder: Optional[Path], force: bool,
            device: str, as_json: bool, opts: Options, show: Callable[[Any], None]) -> None:
    from retrieval.queries import expand_queries
    from retrieval.service import Service

    queries = expand_queries(images, from_file)
    service = Service.open(index_dir, encoder, force=force, device=device)
    failed = 0
    for answer in service.ask_stream(queries, opts):
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


@app.command()
@handles_errors
def query(
    index_dir: IndexArg,
    images: ImagesArg = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = Options.k,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists to visit (approximate indexes).")] = None,
    ef_search: Annotated[Optional[int], typer.Option(help="HNSW search breadth (approximate indexes).")] = None,
    exclude_duplicates: Annotated[bool, typer.Option(
        help="Fold hits that duplicate a better hit into it (listed under it; see `retrieval duplicates`).")] = False,
    duplicate_threshold: Annotated[Optional[float], typer.Option(
        help="Similarity above which a hit duplicates a better one (default: the index's calibrated threshold).")] = None,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonLines = False,
) -> None:
    """The k most similar indexed images of each query image."""

    def show(a: Any) -> None:
        typer.echo(f"{a.query}")
        if a.note:
            typer.echo(f"  note: {a.note}")
        for h in a.hits:
            folded = (f"  (+{len(h.folded)} duplicate{'s' if len(h.folded) > 1 else ''}: "
                      f"{' '.join(f'id:{i}' for i in h.folded)})" if h.folded else "")
            typer.echo(f"  {h.rank:>3}  {h.similarity:.4f}  {(h.label or '-'):<16} {h.ref}{folded}")

    opts = Options(k=k, nprobe=nprobe, ef_search=ef_search, exclude_duplicates=exclude_duplicates,
                   duplicate_threshold=duplicate_threshold)
    _answer(index_dir, images or [], from_file, encoder, force, device, as_json, opts, show)


@app.command()
@handles_errors
def classify(
    index_dir: IndexArg,
    images: ImagesArg = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours that vote.")] = Options.knn_k,
    temperature: Annotated[float, typer.Option("-t", "--temperature", help="Vote temperature.")] = Options.temperature,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonLines = False,
) -> None:
    """Label images by weighted kNN over the index's labelled items (Wu et al. 2018)."""

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
    percentile: Annotated[Optional[float], typer.Option(help="Threshold percentile among normal items (default: the index's).")] = None,
    from_file: FromFile = None,
    encoder: EncoderOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    as_json: JsonLines = False,
) -> None:
    """Anomaly scores: distance to the k nearest indexed images, with a percentile and a verdict."""

    def show(a: Any) -> None:
        s = a.anomaly
        if s.unusual is None:  # (a gallery too small to calibrate: the note says why)
            typer.echo(f"{a.query}  score {s.score:.4f}  percentile     -  {s.verdict}  ({a.note})")
            return
        typer.echo(f"{a.query}  score {s.score:.4f}  percentile {s.percentile:5.1f}  {s.verdict.upper() if s.unusual else s.verdict}"
                   f"  (threshold {s.threshold:.4f})")

    _answer(index_dir, images or [], from_file, encoder, force, device, as_json,
            Options(k=1, anomaly=True, anomaly_k=k, percentile=percentile), show)
