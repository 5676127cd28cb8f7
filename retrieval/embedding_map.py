"""A 2-D map of the gallery: PCA of the embeddings, fit when the index is built.

The map is linear, so a query lands on it by the same projection as the gallery items. For a
whitened encoder the PCA is taken after undoing the whitening (``unwhiten``): whitened vectors
have about the same variance in every direction, so their top two components would show little
but a few outliers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from index import IndexStore

MAP_POINTS = 2000  # gallery items drawn on the map
FIT_SAMPLE = 20000  # gallery items the PCA is fit on


@dataclass
class EmbeddingMap:
    """``points`` (m, 3): item id, x, y of the items drawn; ``basis`` (d + 1, 2): ``[v, 1] @ basis``."""

    points: np.ndarray
    basis: np.ndarray

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(n, d) unit vectors -> (n, 2) map coordinates."""
        v = np.asarray(vectors, dtype=np.float64)
        return np.hstack([v, np.ones((len(v), 1))]) @ self.basis

    @classmethod
    def fit(cls, vectors: np.ndarray, unwhiten: np.ndarray | None = None, max_points: int = MAP_POINTS,
            fit_sample: int = FIT_SAMPLE, seed: int = 0) -> "EmbeddingMap":
        """The map of a gallery's vectors (n, d) (a memory-mapped array is read in samples).

        ``unwhiten`` (d, d), when given, maps the vectors back to the encoder's feature
        directions before the PCA (the inverse of its whitening matrix).
        """
        n, dim = vectors.shape
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(n, min(n, fit_sample), replace=False))
        to_map = np.eye(dim) if unwhiten is None else np.asarray(unwhiten, dtype=np.float64)
        x = np.asarray(vectors[fit_rows], dtype=np.float64) @ to_map
        mean = x.mean(0)
        # The top two principal directions of the (sampled) gallery.
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
        basis = np.vstack([to_map @ comps, -mean @ comps])
        shown = np.sort(rng.choice(n, min(n, max_points), replace=False))
        xy = np.hstack([np.asarray(vectors[shown], dtype=np.float64), np.ones((len(shown), 1))]) @ basis
        return cls(np.column_stack([shown, xy]), basis)

    @classmethod
    def of_store(cls, store: IndexStore, unwhiten: np.ndarray | None = None, max_points: int = MAP_POINTS) -> "EmbeddingMap":
        """The map saved in an index folder, or (for folders built before maps were saved, or
        of another dimension) one fit now and kept in memory: reading never writes."""
        info = store.manifest.map
        if info is not None and info.points in store.arrays and info.basis in store.arrays:
            basis = store.arrays[info.basis]
            if basis.shape == (store.manifest.dim + 1, 2):
                return cls(store.arrays[info.points], basis)
        return cls.fit(store.vectors, unwhiten, max_points)
