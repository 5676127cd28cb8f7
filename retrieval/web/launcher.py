"""Start the app as a real server process on a free localhost port, for the HTTP and browser
tests, the app benchmark and the README screenshot; and the headless Chromium they drive."""

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
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own download needs the internet
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


@dataclass
class AppServer:
    url: str  # http://127.0.0.1:PORT/
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(index: str | Path, log: Path, *args: str, device: str = "cpu", timeout: float = 120) -> Iterator[AppServer]:
    """Run ``retrieval serve INDEX`` until the block ends, its output going to ``log``."""
    port = free_port()
    with run_server(["-m", "retrieval", "serve", str(index), "--port", str(port), "--device", device, *args],
                    port, log, timeout) as server:
        yield server


@contextlib.contextmanager
def run_server(argv: list[str], port: int, log: Path, timeout: float = 120) -> Iterator[AppServer]:
    """Run ``python ARGV`` (a web server on ``port``) until the block ends, once it answers HTTP."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:  # up, and answering (e.g. 401 behind --auth)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"server did not start in {timeout:.0f} s: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield AppServer(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
