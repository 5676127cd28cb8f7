"""Start ``app.py`` as a real server process on a free localhost port, for HTTP and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(index: Path, log: Path, *args: str, timeout: float = 120) -> Iterator[str]:
    """Run the app on ``index`` until the block ends; yields its base URL (``http://127.0.0.1:PORT/``)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--index", str(index), "--port", str(port),
                                 "--device", "cpu", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:  # up, and answering (e.g. 401 behind --auth)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"app did not start in {timeout:.0f} s: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
