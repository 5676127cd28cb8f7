"""The server: the JSON API (:mod:`.api`) and the app (:mod:`.app`) on one port, one process.

Both share one :class:`retrieval.service.Service` (the encoder and the index, loaded once) and
one :class:`retrieval.batcher.Batcher`. The API's routes come first; the Gradio app is mounted
at ``/`` behind them. ``--auth`` guards both (the app with its login page, the API with HTTP
basic), ``--token`` lets API clients in with a bearer token. ``--api-only`` serves the API
without importing Gradio at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from retrieval.batcher import MAX_BATCH, Batcher
from retrieval.errors import RetrievalError
from retrieval.service import Service, open_index
from retrieval.web.api import MAX_BODY, Access, api_app

log = logging.getLogger(__name__)

TOKEN_ENV = "RETRIEVAL_TOKEN"
# Seconds a stopping server (Ctrl-C, SIGTERM) lets requests in flight finish. An open page keeps an
# event stream (Gradio's heartbeat) that never ends by itself: without a bound, the server would
# wait for every tab to close before it stopped.
SHUTDOWN_SECONDS = 5


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise RetrievalError("--auth must look like user:password")
    return user, password


def check_port(host: str, port: int) -> None:
    """Raise a one-line error when ``host:port`` cannot be listened on (in use, no such address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RetrievalError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise RetrievalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(index_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          token: str | None = None, api_only: bool = False, share: bool = False, device: str = "auto",
          max_body: int = MAX_BODY, max_batch: int = MAX_BATCH) -> None:
    """Serve the API and the app on ``host:port`` until interrupted; localhost unless told otherwise.

    Raises:
        RetrievalError: a malformed ``--auth``, a token that would leave the app open, ``--share``
            with ``--api-only``, or an index that cannot be opened.
    """
    credentials = parse_auth(auth)
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and credentials is None and not api_only:
        raise RetrievalError("--token lets clients into the JSON API only: add --auth user:password to protect "
                             "the app as well, or serve --api-only")
    if share and api_only:
        raise RetrievalError("--share shares the app's page; it cannot be used with --api-only")
    check_port(host, port)  # before the index loads: a port in use is told at once
    path, service, why = open_index(index_dir, device)
    if service is None:
        if api_only:
            raise RetrievalError(why)
        _serve_how_to(path, why, host, port, credentials, share)
        return
    if share:  # Gradio's share link tunnels its own server: the app alone
        log.warning("--share: serving the app through Gradio's share link; the JSON API is not served")
        _serve_app_alone(service, host, port, credentials)
        return
    import uvicorn

    service.warm_up()
    batcher = Batcher(service, max_batch=max_batch)
    app = api_app(batcher, Access(credentials, token), max_body)
    if not api_only:
        import gradio as gr

        from retrieval.web.app import WebApp

        web = WebApp(service, batcher=batcher)
        demo = web.build()
        demo.queue(default_concurrency_limit=1)
        # The thumbnail folder is the only place the app serves files from, besides Gradio's own cache.
        gr.mount_gradio_app(app, demo, path="/", auth=credentials, allowed_paths=[str(web.thumbnails)],
                            show_error=False, server_name=host, server_port=port)
    what = "the JSON API" if api_only else "the app and the JSON API"
    print(f"serving {what} on http://{host}:{port}/ (API: /api/v1, documentation: /api/v1/docs)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=SHUTDOWN_SECONDS)
    finally:
        batcher.close()


def _serve_app_alone(service: Service, host: str, port: int, credentials: tuple[str, str] | None) -> None:
    from retrieval.web.app import WebApp

    web = WebApp(service)
    demo = web.build()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, auth=credentials, share=True, show_error=False,
                allowed_paths=[str(web.thumbnails)])


def _serve_how_to(path: Path, reason: str, host: str, port: int, credentials: tuple[str, str] | None, share: bool) -> None:
    from retrieval.web.app import no_index_app

    no_index_app(path, reason).launch(server_name=host, server_port=port, auth=credentials, share=share, show_error=False)
