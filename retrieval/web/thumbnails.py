"""What indexed items look like: thumbnails for the app, read only from the index's own sources.

An item's ref is a file path or ``dataset:split:n``. File refs are served only when they
resolve (symlinks followed) inside one of the folders the index was built from, so an items
table edited by hand cannot make the app read anything else.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from retrieval.errors import RetrievalError
from simclr.data import load_images, parse_source
from simclr.images import open_image

THUMBNAIL = 192


class ItemImages:
    """Thumbnails of indexed items, with a small LRU cache.

    Args:
        refs: the items table's refs.
        sources: the manifest's source strings (folders and data sets).
    """

    def __init__(self, refs: list[str], sources: list[str], cache_size: int = 2048, folder: Path | None = None):
        self.refs = refs
        # Thumbnails written once as PNG files, so that a page serves files instead of
        # encoding images on every request.
        self.folder = folder
        self.roots: list[Path] = []
        self.datasets: dict[str, str] = {}  # "fashion-mnist:train" / "cifar10:train" -> source string
        for source in sources:
            try:
                spec = parse_source(source)
            except UserError:
                continue  # a folder that has moved: its files are simply not shown
            if spec.kind == "folder":
                self.roots.append(spec.path.resolve())
            else:
                self.datasets[f"{spec.kind}:{spec.split}"] = source
        self._data: dict[str, np.ndarray] = {}
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def allowed(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root) for root in self.roots)

    def image(self, item_id: int) -> Image.Image:
        """The item's image, shrunk to at most :data:`THUMBNAIL` pixels a side."""
        with self._lock:
            if item_id in self._cache:
                self._cache.move_to_end(item_id)
                return self._cache[item_id]
        im = self._load(item_id)
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

    def _load(self, item_id: int) -> Image.Image:
        if not 0 <= item_id < len(self.refs):
            raise RetrievalError(f"item id {item_id} is not in the index")
        ref = self.refs[item_id]
        head, _, n = ref.rpartition(":")
        if head in self.datasets and n.isdigit():
            return self._dataset_image(head, int(n))
        path = Path(ref)
        if not path.is_absolute() or not self.allowed(path):
            raise RetrievalError(f"item {item_id}: {ref} is outside the index's image folders; not served")
        try:
            im = open_image(path, channels=3)
        except UserError as exc:
            raise RetrievalError(f"item {item_id}: {exc}") from None
        im.thumbnail((THUMBNAIL, THUMBNAIL))
        return im

    def _dataset_image(self, key: str, n: int) -> Image.Image:
        with self._lock:
            arr = self._data.get(key)
        if arr is None:
            data = load_images(self.datasets[key])
            arr = data.images.permute(0, 2, 3, 1).numpy()
            with self._lock:
                self._data[key] = arr
        if not 0 <= n < len(arr):
            raise RetrievalError(f"{key}:{n} is not in the data set")
        pixels = arr[n]
        return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
