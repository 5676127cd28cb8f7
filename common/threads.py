"""Thread pools that share a small machine.

A process that answers queries runs torch (OpenMP), FAISS (its own OpenMP and OpenBLAS) and
NumPy (its own OpenBLAS, with pthreads) one after another on every request. NumPy's matrices
there are small (a batch of queries times a 512 x 512 whitening), but its BLAS threads wake up
to compete with the OpenMP threads that torch and FAISS leave spinning, and a 0.1 ms product
took 13-20 ms on a 2-core machine (BENCHMARKS.md, "The JSON API"). One thread for NumPy's BLAS
removes that; torch's and FAISS's pools are left as they are.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or ``taskset``'s share,
    where ``os.cpu_count`` counts the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def single_thread_numpy_blas() -> bool:
    """Limit NumPy's own BLAS to one thread in this process (no other library's); True when
    one was found. Does nothing where threadpoolctl is missing."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; a missing one only costs speed
        return False
    controller = ThreadpoolController()
    paths = [i["filepath"] for i in controller.info()
             if i["user_api"] == "blas" and f"{os.sep}numpy" in i["filepath"]]
    if not paths:
        return False
    controller.select(filepath=paths).limit(limits=1)
    log.debug("NumPy's BLAS limited to one thread: %s", paths)
    return True
