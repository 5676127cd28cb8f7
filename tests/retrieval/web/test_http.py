"""The app's HTTP surface, over a real server: files outside the thumbnails are refused through
Gradio's file routes, and with ``--auth`` nothing is answered without logging in."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from retrieval.web.launcher import serve
from retrieval.web.server import SHUTDOWN_SECONDS

USER, PASSWORD = "alice", "correct-horse"


@pytest.fixture(scope="module")
def secured(tiny_index: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    secret = image_folder.parent / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    with serve(tiny_index, tmp_path_factory.mktemp("server") / "app.log", "--auth", f"{USER}:{PASSWORD}") as app:
        yield app.url, secret


@contextlib.contextmanager
def _login(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 200, r.text
        yield client


def _thumbnail(url: str, image: Path) -> str:
    """Search through the API as a logged-in user; the first result's served file path."""
    from gradio_client import Client, handle_file

    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    gallery, *_ = client.predict(handle_file(str(image)), 3, api_name="/search")
    assert len(gallery) == 3
    return gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict) else gallery[0]["image"]


def test_unauthenticated_requests_get_nothing(secured, image_folder: Path) -> None:
    url, secret = secured
    anon = httpx.Client(base_url=url, timeout=30)
    config = anon.get("config")
    assert config.status_code == 401 and "search" not in config.text
    assert anon.get("gradio_api/info").status_code == 401
    call = anon.post("gradio_api/call/search", json={"data": [None, 3]})
    assert call.status_code == 401
    assert anon.post("gradio_api/upload", files={"files": ("q.png", b"\x89PNG", "image/png")}).status_code == 401
    assert anon.get(f"gradio_api/file={secret}").status_code in (401, 403)
    # A wrong password is refused; the right one opens the same routes (the checks above can fail).
    assert anon.post("login", data={"username": USER, "password": "wrong"}).status_code == 400
    with _login(url) as client:
        assert client.get("config").status_code == 200
        assert client.get("gradio_api/info").status_code == 200


def test_gradio_client_needs_the_password(secured, image_folder: Path) -> None:
    from gradio_client import Client

    url, _ = secured
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own types for 401
        Client(url, verbose=False).predict(None, 3, api_name="/search")
    assert _thumbnail(url, image_folder / "bars" / "bars_003.png")


def test_path_traversal_through_file_routes_is_refused(secured, image_folder: Path, tiny_index: Path) -> None:
    url, secret = secured
    thumb = _thumbnail(url, image_folder / "checks" / "checks_001.png")
    with _login(url) as client:
        ok = client.get(f"gradio_api/file={thumb}")
        assert ok.status_code == 200 and ok.content[:4] == b"\x89PNG"  # a result thumbnail is served
        thumbs = Path(thumb).parent
        attempts = [
            f"gradio_api/file={secret}",
            f"gradio_api/file={thumbs}/../../{secret.relative_to('/')}",
            f"gradio_api/file={thumbs}/%2e%2e/%2e%2e{secret}",
            f"gradio_api/file={thumbs}/..%2f..%2f{secret.name}",
            f"gradio_api/file={image_folder}/../{secret.name}",
            "gradio_api/file=/etc/passwd",
            f"gradio_api/file={tiny_index}/manifest.json",
            f"gradio_api/file={tiny_index}/items.jsonl",
            f"gradio_api/file/{secret}",
            f"file={secret}",
        ]
        for path in attempts:
            r = client.get(path)
            assert r.status_code in (403, 404, 405), (path, r.status_code)
            assert b"TOP-SECRET" not in r.content and b"root:" not in r.content, path


def test_the_server_stops_promptly_while_a_page_is_open(tiny_index: Path, tmp_path: Path) -> None:
    """An open page holds an event stream (Gradio's heartbeat) that never ends by itself; a stopped
    server (SIGTERM, as a service manager sends) must not wait for every tab to close."""
    with serve(tiny_index, tmp_path / "app.log") as app, httpx.Client(base_url=app.url, timeout=30) as client:
        assert client.get("config").status_code == 200
        with client.stream("GET", "gradio_api/heartbeat/an-open-page") as page:
            assert page.status_code == 200 and "text/event-stream" in page.headers["content-type"]
            start = time.monotonic()
            app.process.send_signal(signal.SIGTERM)
            try:
                app.process.wait(SHUTDOWN_SECONDS + 10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the server was still running {SHUTDOWN_SECONDS + 10} s after SIGTERM with a page open")
        assert time.monotonic() - start < SHUTDOWN_SECONDS + 10
