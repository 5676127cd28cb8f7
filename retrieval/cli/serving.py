"""``retrieval serve``: the web app. ``python app.py`` takes the same options (this is their one parser)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.cli.app import DeviceOpt, app, handles_errors


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
    from retrieval.web import launch

    launch(index_dir, host=host, port=port, auth=auth, share=share, device=device)
