"""What indexed items look like: thumbnails for the app, read only from the index's own sources
(through :class:`retrieval.item_source.ItemSource`, which refuses files outside them)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from common.errors import UserError
from retrieval.errors import RetrievalError
from retrieval.item_source import ItemSource

THUMBNAIL = 192


class ItemImages:
    """Thumbnails of indexed items, with a small LRU cache.

    Args:
        refs: the items table's refs.
        sources: the manifest's source strings (folders and data sets).
    """

    def __init__(self, refs: list[str], sources: list[str], cache_size: int = 2048, folder: Path | None = None):
        self.refs = refs
        self.source = ItemSource(refs, sources)
        # Thumbnails written once as PNG files, so that a page serves files instead of
        # encoding images on every request.
        self.folder = folder
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def image(self, item_id: int) -> Image.Image:
        """The item's image, shrunk to at most :data:`THUMBNAIL` pixels a side."""
        with self._lock:
            if item_id in self._cache:
                self._cache.move_to_end(item_id)
                return self._cache[item_id]
        im = self.source.open(item_id, THUMBNAIL)
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        with self._lock:
            self._cache[item_id] = im
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return im

    def file(self, item_id: int) -> str:
        """A PNG thumbnail of the item in :attr:`folder` (written on first use)."""
        if self.folder is None:
            raise RetrievalError("no thumbnail folder was set")
        path = self.folder / f"{item_id}.png"
        if not path.exists():
            tmp = self.folder / f".{item_id}.{threading.get_ident()}.png"
            self.image(item_id).save(tmp)
            os.replace(tmp, path)
        return str(path)

    def sheet(self, item_ids: list[int], tile: int = 96, columns: int = 4, gap: int = 4) -> Image.Image:
        """The items' thumbnails on a grid of ``columns``, each fitted into a ``tile`` square
        (unreadable ones grey), for the Duplicates view: one sheet per group."""
        cols = max(1, min(columns, len(item_ids)))
        rows = -(-len(item_ids) // cols)
        out = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * tile + (rows - 1) * gap), (255, 255, 255))
        for n, i in enumerate(item_ids):
            try:
                im = self.image(i).convert("RGB")
                scale = tile / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            except UserError:
                im = Image.new("RGB", (tile, tile), (220, 220, 220))
            x, y = (n % cols) * (tile + gap), (n // cols) * (tile + gap)
            out.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        return out
