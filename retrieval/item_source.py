"""The original image of an indexed item, read only from the index's own sources.

An item's ref is a file path or ``dataset:split:n``. File refs are read only when they resolve
(symlinks followed) inside one of the folders the index was built from, so an items table
edited by hand cannot make the app or a calibration read anything else. The app's thumbnails
(:mod:`retrieval.web.thumbnails`) and the near-duplicate calibration
(:mod:`retrieval.duplicate_threshold`) both read items through :class:`ItemSource`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from retrieval.errors import RetrievalError
from simclr.data import load_images, parse_source
from simclr.images import open_image


class ItemSource:
    """Full-size images of indexed items.

    Args:
        refs: the items table's refs.
        sources: the manifest's source strings (folders and data sets).
    """

    def __init__(self, refs: list[str], sources: list[str]):
        self.refs = refs
        self.roots: list[Path] = []
        self.datasets: dict[str, str] = {}  # "fashion-mnist:train" / "cifar10:train" -> source string
        for source in sources:
            try:
                spec = parse_source(source)
            except UserError:
                continue  # a folder that has moved: its files are simply not read
            if spec.kind == "folder":
                self.roots.append(spec.path.resolve())
            else:
                self.datasets[f"{spec.kind}:{spec.split}"] = source
        self._data: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def allowed(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root) for root in self.roots)

    def in_dataset(self, item_id: int) -> bool:
        """Whether the item is a data set's (embedded from its pixels as they are, not from a file)."""
        head, _, n = self.refs[item_id].rpartition(":")
        return head in self.datasets and n.isdigit()

    def open(self, item_id: int, size: int | None = None) -> Image.Image:
        """The item's image at its own size: ``"RGB"`` for files, the data set's own mode
        (``"L"`` for Fashion-MNIST) for data-set items. With ``size``, a large JPEG may come
        decoded at a reduced scale that keeps both sides at ``size`` or more (see
        :func:`simclr.images.open_image`).

        Raises:
            RetrievalError: the id is not in the index, the file lies outside the index's
                folders, or it cannot be read.
        """
        path = self.file(item_id)
        if path is None:
            head, _, n = self.refs[item_id].rpartition(":")
            return self._dataset_image(head, int(n))
        try:
            return open_image(path, channels=3, size=size)
        except UserError as exc:
            raise RetrievalError(f"item {item_id}: {exc}") from None

    def file(self, item_id: int) -> Path | None:
        """The item's file, when it is one and lies inside the index's folders (``None`` for a
        data-set item).

        Raises:
            RetrievalError: the id is not in the index, or the file lies outside its folders.
        """
        if not 0 <= item_id < len(self.refs):
            raise RetrievalError(f"item id {item_id} is not in the index")
        if self.in_dataset(item_id):
            return None
        ref = self.refs[item_id]
        path = Path(ref)
        if not path.is_absolute() or not self.allowed(path):
            raise RetrievalError(f"item {item_id}: {ref} is outside the index's image folders; not served")
        return path

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
