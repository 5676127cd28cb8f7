"""The CLI answers a batch of 10,000 query images in one call as a stream, with flat memory."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N = 10_000
BLOCK = 1_000
LAG = 2 * 64  # two of the service's streaming batches
STALL_S = 120


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def queries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10,000 distinct small PNGs and a file that lists them."""
    root = tmp_path_factory.mktemp("queries")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        sub = root / f"{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"q{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(path, compress_level=1)
        paths.append(str(path))
    listing = root / "queries.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_ten_thousand_queries_stream_with_flat_memory(queries: Path, tiny_index: Path, tmp_path: Path) -> None:
    """Queries go in through stdin a thousand at a time, and the next thousand is sent only once
    the answers to the last have come out: a CLI that collected its answers would stall here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    paths = queries.read_text().splitlines()
    errors = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "retrieval", "query", str(tiny_index), "--from-file", "-",
                             "--json", "-k", "5", "--device", "cpu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errors, text=True, cwd=ROOT, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()

    def receive(upto: int) -> None:
        nonlocal seen
        while seen < upto:
            try:
                line = lines.get(timeout=STALL_S)
            except queue.Empty:
                proc.kill()
                pytest.fail(f"no answer in {STALL_S} s after {seen} answers to {sent} queries: the CLI does not stream")
            assert line is not None, (tmp_path / "stderr.txt").read_text()[-2000:]
            answer = json.loads(line)
            assert answer.get("error") is None and len(answer["hits"]) == 5, answer
            assert answer["query"] == paths[seen]
            seen += 1

    seen = sent = 0
    rss = {}
    for block in range(0, N, BLOCK):
        proc.stdin.write("\n".join(paths[block : block + BLOCK]) + "\n")
        proc.stdin.flush()
        sent += BLOCK
        receive(sent - LAG)  # the batch being embedded and the one being read may wait for more input
        rss[seen] = _rss_kib(proc.pid)
    proc.stdin.close()
    receive(N)
    assert lines.get(timeout=STALL_S) is None and proc.wait(60) == 0
    first, last = min(rss), max(rss)
    growth = rss[last] / rss[first] - 1
    print(f"RSS {rss[first] / 1024:.1f} MiB after {first:,} answers, {rss[last] / 1024:.1f} MiB after {last:,} ({growth:+.1%})")
    assert growth < 0.10, f"resident memory grew {growth:.1%} from the {first:,}th to the {last:,}th answer"
