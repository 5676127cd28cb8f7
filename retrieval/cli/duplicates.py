"""``retrieval duplicates``: the groups of near-duplicate and exactly copied items of an index."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.cli.app import DeviceOpt, IndexArg, app, echo_lines, handles_errors
from retrieval.duplicates import SCAN_NPROBE
from retrieval.options import DuplicateConfig
from retrieval.errors import RetrievalError

D = DuplicateConfig  # its field defaults are the options' defaults


@app.command()
@handles_errors
def duplicates(
    index_dir: IndexArg,
    threshold: Annotated[Optional[float], typer.Option(
        help="Least cosine similarity of near duplicates (default: the index's calibrated threshold).")] = D.threshold,
    pixel_threshold: Annotated[Optional[float], typer.Option(
        help="Least aligned pixel correlation of near duplicates (default: the index's calibrated one).")] = D.pixel_threshold,
    pixels: Annotated[bool, typer.Option(
        "--pixels/--no-pixels", help="Check each proposed pair's aligned pixels (indexes with thumbnails).")] = D.pixels,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours of each item searched for duplicates.")] = D.k,
    nprobe: Annotated[Optional[int], typer.Option(help=f"IVF lists to visit per item (approximate indexes; default {SCAN_NPROBE}).")] = D.nprobe,
    as_json: Annotated[bool, typer.Option("--json", help="Print the groups as one JSON object.")] = False,
    csv_file: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per group member to this CSV file ('-': stdout).")] = None,
    device: DeviceOpt = D.device,
) -> None:
    """Groups of items that are the same picture: exact copies and near duplicates.

    Near duplicates are re-encoded, resized, cropped, turned or brightened copies: items among
    each other's k nearest neighbours at a similarity of at least the threshold whose small
    grayscale thumbnails, aligned for crops, shifts and turns, correlate at least at the pixel
    threshold (every such pair joins one group). Groups come largest first, each member with
    its similarity (and pixel score) to the group's first member."""
    from retrieval.duplicates import find_duplicates

    if as_json and csv_file is not None:
        raise RetrievalError("--json and --csv cannot be combined; pick one")
    report = find_duplicates(index_dir, DuplicateConfig(threshold=threshold, pixel_threshold=pixel_threshold, pixels=pixels,
                                                           k=k, nprobe=nprobe, device=device))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    elif csv_file is not None:
        _write_csv(csv_file, report.CSV_HEADER, report.csv_rows())
        if str(csv_file) != "-":
            typer.echo(report.summary())
            typer.echo(f"wrote {len(report.csv_rows())} rows to {csv_file}")
    else:
        echo_lines(report.lines())


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    if str(path) == "-":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(rows)
        return
    try:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as exc:
        raise RetrievalError(f"cannot write {path}: {exc.strerror or exc}") from None
