"""What the benchmark scripts share: printing and saving a JSON report, the machine in words,
client threads in a closed loop, latencies, a process's resident memory."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def write_report(report: dict[str, Any], path: str | None, show: bool = True) -> None:
    """Print the report (unless ``show`` is False) and write it to ``path`` when given."""
    text = json.dumps(report, indent=2)
    if show:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def run_threads(loop: Callable[[int], None], count: int) -> float:
    """Run ``loop(i)`` for i in 0..count-1, each in its own thread; the wall-clock seconds they took."""
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def latency_percentiles(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds (``None`` when nothing succeeded)."""
    ms = np.array(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 90, 99)}


def machine() -> str:
    """The machine in words: architecture, cores, FAISS's threads, GPUs, Python."""
    import faiss

    gpus = faiss.get_num_gpus()
    return (f"{platform.machine()}, {os.cpu_count()} cores, {faiss.omp_get_max_threads()} FAISS threads, "
            f"{gpus or 'no'} GPU{'s' if gpus != 1 else ''}, Python {platform.python_version()}")


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MiB, read from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def closed_loop(make_client: Callable[[int], Any], call: Callable[[Any, int, int], None], clients: int, total: int,
                after: Callable[[int], None] | None = None) -> tuple[list[float], list[str], float]:
    """``clients`` threads, each with its own ``make_client(cid)``, make ``total`` requests
    between them, each thread its next as soon as its last is answered: ``call(client, cid, n)``
    makes the n-th (from 1) and raises when it fails. ``after(n)`` runs once the n-th is done.

    Returns the successes' latencies in seconds, the failures' messages, and the wall-clock seconds.
    """
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = [0]

    def loop(cid: int) -> None:
        client = make_client(cid)
        while True:
            with lock:
                if counter[0] >= total:
                    return
                counter[0] += 1
                n = counter[0]
            start = time.perf_counter()
            try:
                call(client, cid, n)
                ok = True
            except Exception as exc:  # noqa: BLE001 - counted, reported
                ok = False
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                if after is not None:
                    after(n)

    return latencies, errors, run_threads(loop, clients)
