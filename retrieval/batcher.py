"""Dynamic batching: queries that arrive together are embedded and searched in one pass.

Callers (the HTTP API's requests, the app's searches) hand in queries from their own threads
or event loops; one worker thread takes whatever has queued up, up to ``max_batch``, embeds all
its images in one backbone pass and answers each group of queries that share options with one
index search. A query waits for no one when it is alone: when nothing is queued or running, the
caller's own thread answers it at once (no hand-over to the worker and back), while under load
the requests that queue up during one pass make the next batch. When the last batch held
several queries, the worker waits up to ``max_wait`` seconds for more before it starts, which
gathers requests that arrive in bursts.

Decoding (and resizing) an uploaded image happens in the caller's thread
(:meth:`retrieval.service.Service.prepare`), so that many requests decode in parallel while
the worker runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.answers import Answer
from retrieval.options import Options
from retrieval.queries import Unreadable
from retrieval.service import Prepared, Service

log = logging.getLogger(__name__)

MAX_BATCH = 32
MAX_WAIT = 0.002  # seconds


@dataclass
class Reply:
    """One query's answer and its vector in the search space (zeros when it had an error)."""

    answer: Answer
    vector: np.ndarray


@dataclass
class _Request:
    name: str
    prepared: Prepared
    opts: Options
    future: Future


class Batcher:
    """Answers queries from many threads in shared passes over one :class:`Service`."""

    def __init__(self, service: Service, max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.service = service
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._pass = threading.Lock()  # one pass at a time: the worker's, or a lone caller's
        self._last = 1  # queries in the last pass
        self._closed = False
        self.batches = 0  # passes made, and queries answered in them (for tests and benchmarks)
        self.answered = 0
        self._worker = threading.Thread(target=self._run, name="retrieval-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ asking
    def submit(self, query: str | Path | bytes | Image.Image | Unreadable, opts: Options,
               name: str | None = None) -> Future[Reply]:
        """Queue one query (decoded here, in the caller's thread); its reply comes in the future.

        Options are checked here, so a bad one raises at once (``RetrievalError``).
        """
        opts.check()
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future[Reply] = Future()
        label = name if name is not None else query if isinstance(query, str) else str(query) if isinstance(query, (Path, Unreadable)) else "image"
        request = _Request(label, self.service.prepare(query), opts, future)
        # Alone (nothing queued, nothing running, and the last pass was a lone query too):
        # answered here and now, without handing it to the worker thread and back. Under load
        # it goes to the worker, to be batched.
        if self._last == 1 and self._queue.empty() and self._pass.acquire(blocking=False):
            try:
                self._answer([request])
            finally:
                self._pass.release()
            return future
        self._queue.put(request)
        return future

    def ask(self, queries: list[Any], opts: Options) -> list[Reply]:
        """Answer queries from this thread, sharing passes with everyone else's."""
        futures = [self.submit(q, opts) for q in queries]
        return [f.result() for f in futures]

    async def ask_async(self, query: Any, opts: Options, name: str | None = None) -> Reply:
        """:meth:`submit` for an event loop: decodes in a worker thread, then awaits the reply."""
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(None, lambda: self.submit(query, opts, name))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the worker after the queries already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout=10)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = self._drain(batch, wait=self.max_wait if self._last > 1 else 0.0)
            with self._pass:
                self._answer(batch)
            if stop:
                return

    def _drain(self, batch: list[_Request], wait: float) -> bool:
        """Add queued requests to ``batch`` (waiting up to ``wait`` seconds for more); True when
        the batcher was closed meanwhile."""
        deadline = time.perf_counter() + wait
        while len(batch) < self.max_batch:
            try:
                left = deadline - time.perf_counter()
                req = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if req is None:
                return True
            batch.append(req)
        return False

    def _answer(self, batch: list[_Request]) -> None:
        try:
            embedded = self.service.embed_prepared([r.prepared for r in batch])
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(batch):
                groups.setdefault(astuple(r.opts), []).append(i)
            for rows in groups.values():
                part = embedded.take(rows)
                answers = self.service.answer_vectors([batch[i].name for i in rows], part, batch[rows[0]].opts)
                for i, answer, vector in zip(rows, answers, part.vectors):
                    batch[i].future.set_result(Reply(answer, vector))
            self.batches += 1
            self.answered += len(batch)
            self._last = len(batch)
        except Exception as exc:  # noqa: BLE001  (every waiting caller hears of it; the worker goes on)
            log.exception("a batch of %d queries failed", len(batch))
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
