"""Commands that make an encoder without training: ``encoder``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.cli.app import DeviceOpt, app, echo_lines, handles_errors


@app.command()
@handles_errors
def encoder(
    init: Annotated[str, typer.Option(help="imagenet (download, or torchvision's cache), or a local torchvision weights file.")],
    arch: Annotated[str, typer.Option(help="Backbone the weights are of: resnet18, resnet34, resnet50.")] = "resnet50",
    data: Annotated[Optional[str], typer.Option(help="Your images (a folder, fashion-mnist:train ...) to fit the whitening on.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input resolution in pixels (default: 96 on CPU, 224 on GPU).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Encoder file to write; must not exist (default: encoder-ARCH-imagenet.pt here).")] = None,
    device: DeviceOpt = "auto",
    whiten: Annotated[bool, typer.Option("--whiten/--no-whiten", help="PCA-whiten the features, fit on --data.")] = True,
    max_images: Annotated[Optional[int], typer.Option(help="Images sampled from --data to fit it (default 10,000, or 10 per feature dimension if more).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Write an encoder from pretrained weights, to index at once without training
    (`retrieval index --encoder FILE`); `retrieval train --init` adapts the same weights with SimCLR."""
    from retrieval.embed import skipped_lines
    from retrieval.pretrained import encoder_from_weights

    result = encoder_from_weights(init, arch, data, image_size, out, device, whiten, max_images,
                                  workers=workers, progress=progress)
    for line in skipped_lines(result.whitening.failures):
        typer.echo(line, err=True)
    echo_lines(result.lines())
