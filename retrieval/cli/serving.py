"""``retrieval serve``: the web app and the JSON API. ``python app.py`` takes the same options (this is their one parser)."""

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
    auth: Annotated[Optional[str], typer.Option(help="user:password required to use the app and the API (HTTP basic).")] = None,
    token: Annotated[Optional[str], typer.Option(
        help="Bearer token that lets clients into the API (default: $RETRIEVAL_TOKEN).", show_default=False)] = None,
    api_only: Annotated[bool, typer.Option(help="Serve the JSON API alone, without the app's pages.")] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest API request body, in MiB (larger ones get 413).")] = 32.0,
    max_batch: Annotated[int, typer.Option(help="Queries embedded and searched in one pass at most (1: no batching).")] = 32,
    share: Annotated[bool, typer.Option(help="Ask Gradio for a public share link (the app alone).")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Serve the web app (image search, kNN labels, anomaly verdicts, duplicates) and the JSON API
    (/api/v1, documented at /api/v1/docs) on one port."""
    from retrieval.errors import RetrievalError
    from retrieval.web.server import serve as run

    if max_upload_mb <= 0:
        raise RetrievalError(f"--max-upload-mb must be positive, got {max_upload_mb:g}")
    if max_batch < 1:
        raise RetrievalError(f"--max-batch must be >= 1, got {max_batch}")
    run(index_dir, host=host, port=port, auth=auth, token=token, api_only=api_only, share=share, device=device,
        max_body=int(max_upload_mb * (1 << 20)), max_batch=max_batch)
