"""FAISS indexes of embeddings, saved on disk with a manifest and an items table.

``IndexStore`` and ``Manifest`` import FAISS; they load on first use, so that code needing
only the items table (embedding, evaluation) runs where FAISS is not installed.
"""

from index.errors import IndexStoreError
from index.items import Items

__all__ = ["IndexStore", "IndexStoreError", "Items", "Manifest"]


def __getattr__(name: str):  # noqa: ANN202
    if name == "IndexStore":
        from index import store

        return store.IndexStore
    if name == "Manifest":
        from index import manifest

        return manifest.Manifest
    raise AttributeError(f"module 'index' has no attribute {name!r}")
