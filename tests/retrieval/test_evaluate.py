"""kNN evaluation: the index path (FAISS search) and the torch path pick the same neighbours."""

from pathlib import Path

import numpy as np
import torch

from index import IndexStore, Items
from retrieval.evaluate import LabelledFeatures, features_from_store, knn_eval, knn_eval_index
from simclr.knn import canonical_topk
from tests.helpers import unit


def _tied_gallery(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Groups of identical vectors whose members carry different labels: wherever the k-th
    place falls inside a group, which members are kept decides the vote."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(40, 12)))
    vectors = np.repeat(base, 6, axis=0)
    labels = [["a", "b", "c"][i % 3] for i in range(len(vectors))]
    order = rng.permutation(len(vectors))
    return vectors[order], [labels[i] for i in order]


def test_canonical_topk_matches_a_naive_sort() -> None:
    rng = np.random.default_rng(1)
    gallery, _ = _tied_gallery()
    queries = unit(rng.normal(size=(25, 12)))
    cand = torch.from_numpy(rng.permuted(np.tile(np.arange(len(gallery)), (25, 1)), axis=1)[:, :60])
    sims, idx = canonical_topk(torch.from_numpy(queries), torch.from_numpy(gallery), cand, 7)
    for q in range(25):
        naive = sorted(cand[q].tolist(), key=lambda j: (-float(np.dot(queries[q].astype(np.float64), gallery[j].astype(np.float64))), j))[:7]
        assert idx[q].tolist() == naive


def test_index_path_equals_torch_path_through_ties(tmp_path: Path) -> None:
    gallery, labels = _tied_gallery()
    store = IndexStore.build(gallery, Items([f"g/{i}.png" for i in range(len(gallery))], labels, [f"h{i}" for i in range(len(gallery))]), "enc",
                             factory="Flat")  # exact float32 copies
    store.save(tmp_path / "gallery")
    rng = np.random.default_rng(2)
    # Queries at the group vectors themselves, and near them: many ties straddle the k-th place.
    queries = np.vstack([gallery[:60], unit(gallery[60:120] + 0.01 * rng.normal(size=(60, 12)))])
    q_labels = torch.from_numpy(rng.integers(0, 3, len(queries)))
    q = LabelledFeatures(torch.from_numpy(queries), q_labels, ["a", "b", "c"], "queries")
    loaded = IndexStore.load(tmp_path / "gallery")
    g = features_from_store(loaded)
    assert torch.equal(g.vectors, torch.from_numpy(gallery))  # exact copies, not renormalised
    for k in (4, 9, 20):
        via_torch = knn_eval(q, g, k=k, temperature=0.1)
        via_index = knn_eval_index(q, loaded, g, k=k, temperature=0.1)
        assert torch.equal(via_torch.predictions, via_index.predictions), k
        assert via_torch.top1 == via_index.top1 and via_torch.top5 == via_index.top5
