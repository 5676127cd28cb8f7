"""What the benchmark scripts share: printing and saving a JSON report, client threads, latencies."""

from __future__ import annotations

import json
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
