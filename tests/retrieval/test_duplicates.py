"""Near-duplicate groups: union-find against a naive search, the kNN graph through an index
against all pairs, exact copies as their own kind, calibration, folding of query hits, and the
command line and app end to end on generated images with planted copies."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from index import IndexStore, Items
from retrieval.answers import Hit
from retrieval.duplicates import EXACT, NEAR, components, fold_hits, scan
from retrieval.errors import RetrievalError
from tests.helpers import unit

runner = CliRunner()


def naive_components(n: int, a, b) -> np.ndarray:  # noqa: ANN001
    """Breadth-first search from each unlabelled node in increasing order: the smallest node labels its component."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for x, y in zip(a, b):
        adj[x].append(y)
        adj[y].append(x)
    label = [-1] * n
    for s in range(n):
        if label[s] < 0:
            label[s], todo = s, [s]
            while todo:
                for v in adj[todo.pop()]:
                    if label[v] < 0:
                        label[v] = s
                        todo.append(v)
    return np.array(label)


def test_union_find_matches_a_naive_search_on_random_graphs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        m = int(rng.integers(0, 2 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        np.testing.assert_array_equal(components(n, a, b), naive_components(n, a, b))
    # A long path given in the worst order for hooking, and a star: one component each.
    n = 5000
    path = rng.permutation(n)
    assert (components(n, path[:-1], path[1:]) == 0).all()
    assert (components(n, np.full(n - 1, n - 1), np.arange(n - 1)) == 0).all()


# ---------------------------------------------------------------------------- constructed vectors
def planted(seed: int = 0, dim: int = 32) -> tuple[np.ndarray, list[str], set[frozenset[int]]]:
    """Vectors of 600 distinct items in 12 tight classes (same-class neighbours at similarity
    ~0.85, like different photos of one kind of thing); near copies (similarity ~0.99) of
    40 of them; exact copies (same vector, same hash) of items 300 and 301; and item 302
    turned into a near copy of item 0, with an exact copy of its own. Returns the vectors,
    hashes and the planted groups."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    vecs = list(unit(centres[rng.integers(0, 12, 600)] + 0.5 * rng.normal(size=(600, dim))))
    hashes = [f"h{i}" for i in range(600)]
    groups: dict[int, set[int]] = {}

    def add(vec: np.ndarray, digest: str, group: int) -> None:
        vecs.append(vec)
        hashes.append(digest)
        groups.setdefault(group, {group}).add(len(vecs) - 1)

    def near(i: int) -> np.ndarray:
        return unit((vecs[i] + 0.02 * rng.normal(size=dim))[None])[0]

    for i in range(0, 120, 3):
        for _ in range(1 + i % 3):
            add(near(i), f"near{len(vecs)}", i)
    for i, copies in ((300, 2), (301, 1)):
        for _ in range(copies):
            add(vecs[i], hashes[i], i)
    vecs[302] = near(0)
    groups[0].add(302)
    add(vecs[302], hashes[302], 0)
    return np.array(vecs, dtype=np.float32), hashes, {frozenset(g) for g in groups.values()}


def store_of(vecs: np.ndarray, hashes: list[str], factory: str = "Flat") -> IndexStore:
    items = Items([f"img/{i}.png" for i in range(len(vecs))], [None] * len(vecs), hashes)
    return IndexStore.build(vecs, items, "sha", factory=factory)


def naive_groups(vecs: np.ndarray, hashes: list[str], threshold: float) -> set[frozenset[int]]:
    """All pairs at or above the threshold, plus same-hash pairs; their connected components."""
    sims = vecs @ vecs.T
    a, b = np.nonzero(np.triu(sims >= threshold, 1))
    same = [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if hashes[i] == hashes[j]]
    a = np.r_[a, [p[0] for p in same]].astype(int)
    b = np.r_[b, [p[1] for p in same]].astype(int)
    labels = naive_components(len(vecs), a, b)
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_groups_through_an_ivf_index_equal_all_pairs_and_keep_neighbours_apart() -> None:
    vecs, hashes, expected = planted()
    store = store_of(vecs, hashes, "IVF16,Flat")
    asked = []
    search = store.search

    def spy(q: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None):  # noqa: ANN202
        asked.append((len(q), k))
        return search(q, k, nprobe, ef_search)

    store.search = spy
    groups, how = scan(store, threshold=0.95, k=10, nprobe=16, batch=100)
    assert "IVF16,Flat" in how and "nprobe 16" in how
    # Through the index, a batch of queries at a time, one query per content, a few neighbours each.
    assert sum(q for q, _ in asked) == len(set(hashes)) and max(q for q, _ in asked) == 100
    assert all(k <= 21 for _, k in asked)
    got = {frozenset(m.id for m in g.members) for g in groups}
    assert got == naive_groups(vecs, hashes, 0.95)
    # The planted copies are found, and distinct same-class items are not grouped, though
    # they are each other's nearest neighbours at a similarity not far below the threshold.
    assert got == expected
    distinct = np.delete(vecs[:600], [302], axis=0)
    sims = distinct @ distinct.T
    np.fill_diagonal(sims, -1)
    assert 0.8 < np.median(sims.max(1)) and sims.max() > 0.9


def test_no_pair_above_the_threshold_gives_no_near_groups() -> None:
    vecs, hashes, _ = planted()
    store = store_of(vecs, hashes)
    groups, _ = scan(store, threshold=1.0001, k=10)
    assert all(g.kind == "exact" for g in groups)


def test_exact_copies_are_their_own_kind_and_named_in_near_groups() -> None:
    vecs, hashes, _ = planted()
    groups, _ = scan(store_of(vecs, hashes), threshold=0.95)
    by_first = {g.members[0].id: g for g in groups}
    exact = by_first[300]
    assert exact.kind == EXACT and exact.size == 3
    assert [m.exact_of for m in exact.members] == [None, 300, 300]
    assert all(m.similarity == pytest.approx(1.0, abs=1e-3) for m in exact.members)
    assert by_first[301].kind == EXACT and by_first[301].size == 2
    mixed = by_first[0]  # 0, its near copy, 302 (moved next to 0) and 302's exact copy
    assert mixed.kind == NEAR
    copy_of_302 = [m for m in mixed.members if m.exact_of == 302]
    assert len(copy_of_302) == 1 and {m.id for m in mixed.members} >= {0, 302, copy_of_302[0].id}
    # Largest first; within a group the first member is the lowest id, then by similarity to it.
    assert [g.size for g in groups] == sorted((g.size for g in groups), reverse=True)
    for g in groups:
        assert g.members[0].id == min(m.id for m in g.members) and g.members[0].similarity == 1.0
        rest = [m.similarity for m in g.members[1:]]
        assert rest == sorted(rest, reverse=True)


def test_a_large_flat_index_is_scanned_through_a_temporary_ivf() -> None:
    vecs, hashes, _ = planted(seed=1)
    store = store_of(vecs, hashes)
    exact, _ = scan(store, 0.95)
    approx, how = scan(store, 0.95, nprobe=8, flat_limit=100)
    assert "temporary IVF" in how and "Flat index" in how
    assert {frozenset(m.id for m in g.members) for g in approx} == {frozenset(m.id for m in g.members) for g in exact}


def test_a_quantised_index_thresholds_exact_similarities() -> None:
    vecs, hashes, expected = planted()
    store = store_of(vecs, hashes, "IVF16,PQ8")  # 4-byte codes: similarities off by far more than 0.05
    sims, ids = store.search(vecs[:50], 2, k_factor=0)  # the codes' own similarities, not re-ranked
    assert np.abs(sims[:, 1] - np.sum(vecs[:50] * vecs[ids[:, 1]], axis=1)).max() > 0.02
    groups, how = scan(store, 0.95, nprobe=16)
    assert "recomputed" in how
    assert {frozenset(m.id for m in g.members) for g in groups} == expected


def naive_fold(hits: list[Hit], vecs: np.ndarray, hashes: list[str], threshold: float,
               allowed: np.ndarray | None = None) -> list[tuple[int, list[int]]]:
    """Greedy, hit by hit; pairs not ``allowed`` (by their pixels) never fold, unless they are exact copies."""
    kept: list[tuple[int, list[int]]] = []
    for h in hits:
        best, best_sim = None, -np.inf
        for n, (kid, _) in enumerate(kept):
            if hashes[kid] == hashes[h.id]:
                s = np.inf
            elif allowed is not None and not allowed[kid, h.id]:
                s = -np.inf
            else:
                s = float(vecs[kid] @ vecs[h.id])
            if s > best_sim:
                best, best_sim = n, s
        if best is not None and best_sim >= threshold:
            kept[best][1].append(h.id)
        else:
            kept.append((h.id, []))
    return kept


def test_folding_hits_matches_a_naive_greedy_pass() -> None:
    vecs, hashes, _ = planted()
    store = store_of(vecs, hashes)
    for q in (0, 3, 300, 302, 450):
        sims, ids = store.search(vecs[q : q + 1], 40)
        hits = [Hit(r + 1, int(j), float(s), store.items.refs[j], None) for r, (s, j) in enumerate(zip(sims[0], ids[0]))]
        folded = fold_hits(hits, store.vectors, hashes, 0.95)
        assert [(h.id, h.folded) for h in folded] == naive_fold(hits, vecs, hashes, 0.95)
        assert [h.rank for h in folded] == list(range(1, len(folded) + 1))
    # Above a similarity of 1 only exact copies fold.
    contents = [hashes[h.id] for h in hits]
    assert len(fold_hits(hits, store.vectors, hashes, 1.1)) == len(set(contents)) < len(contents)


def test_the_threshold_is_raised_where_distinct_neighbours_are_closer_than_copies() -> None:
    from retrieval.duplicate_threshold import ThresholdCalibration, neighbour_similarities

    vecs, hashes, _ = planted()
    n = len(vecs)
    got, rows, kth = neighbour_similarities(store_of(vecs, hashes), k=3, sample=n)
    sims = vecs @ vecs.T
    same = np.array(hashes)[:, None] == np.array(hashes)[None, :]
    sims[same] = -np.inf  # itself and its exact copies are not its neighbours
    np.testing.assert_array_equal(rows, np.arange(n))
    np.testing.assert_allclose(got, np.sort(sims, axis=1)[:, -3], atol=1e-3)  # (float16 queries)
    np.testing.assert_allclose(sims[rows, kth], got, atol=1e-3)  # the neighbour named is the one measured
    copies = np.linspace(0.5, 1.0, 101, dtype=np.float32)
    low = ThresholdCalibration(copies, np.arange(101), 5.0, neighbours=np.full(50, 0.3, np.float32))
    assert low.threshold == pytest.approx(0.525) and "raised" not in low.info().describe()
    high = ThresholdCalibration(copies, np.arange(101), 5.0, neighbours=np.linspace(0, 0.9, 100, dtype=np.float32))
    assert high.threshold == pytest.approx(np.percentile(np.linspace(0, 0.9, 100), 99), abs=1e-6)
    assert high.info().threshold == high.threshold and "raised to the 99th percentile" in high.info().describe()


def look_alike_thumbnails(hashes: list[str], groups: set[frozenset[int]], seed: int = 3) -> np.ndarray:
    """Thumbnails for :func:`planted`'s items: a distinct smooth picture per content, and for
    each planted group's later members an altered copy (brightened, cropped, re-encoded ...)
    of its first member's picture."""
    from retrieval.alterations import alter
    from retrieval.pixel_match import thumbnail

    rng = np.random.default_rng(seed)
    pictures: dict[str, Image.Image] = {}
    thumbs = []
    first_of = {i: min(g) for g in groups for i in g}
    for i, h in enumerate(hashes):
        if h not in pictures:
            if i in first_of and first_of[i] != i:
                pictures[h], _ = alter(pictures[hashes[first_of[i]]], rng)
            else:
                pictures[h] = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize(
                    (96, 96), Image.Resampling.BICUBIC)
        thumbs.append(thumbnail(pictures[h]))
    return np.stack(thumbs)


def test_pixels_keep_apart_what_the_embedding_cannot() -> None:
    """Items of one kind whose embeddings all lie within the threshold (the case of a collection
    of one kind of thing, or a weak encoder): the embedding alone chains the whole kind into one
    group; the pixel check keeps exactly the planted copies together."""
    vecs, hashes, expected = planted()
    store = store_of(vecs, hashes)
    store.arrays["thumbnails"] = look_alike_thumbnails(hashes, expected)
    alone, _ = scan(store, threshold=0.6)
    assert max(g.size for g in alone) > 40  # same-kind items chained together
    groups, how = scan(store, threshold=0.6, pixel_threshold=0.9)
    assert {frozenset(m.id for m in g.members) for g in groups} == expected
    assert "proposed pairs kept by their pixels" in how
    for g in groups:
        assert g.members[0].pixels == 1.0 and all(m.pixels >= 0.9 for m in g.members if m.exact_of is None)


def test_folding_with_pixels_matches_a_naive_pass_on_the_pixel_checked_pairs() -> None:
    from retrieval.pixel_match import pair_scores

    vecs, hashes, expected = planted()
    store = store_of(vecs, hashes)
    thumbs = look_alike_thumbnails(hashes, expected)
    folded_any = changed = False
    for q in (0, 3, 6, 300, 450):
        sims, ids = store.search(vecs[q : q + 1], 40)
        hits = [Hit(r + 1, int(j), float(s), store.items.refs[j], None) for r, (s, j) in enumerate(zip(sims[0], ids[0]))]
        ids = [h.id for h in hits]
        a, b = np.meshgrid(ids, ids, indexing="ij")
        allowed = np.zeros((len(vecs), len(vecs)), bool)
        allowed[a, b] = pair_scores(thumbs, a.ravel(), b.ravel()).reshape(a.shape) >= 0.9
        folded = [(h.id, h.folded) for h in fold_hits(hits, store.vectors, hashes, 0.6, thumbs, 0.9)]
        assert folded == naive_fold(hits, vecs, hashes, 0.6, allowed)
        folded_any |= any(f for _, f in folded)
        changed |= folded != [(h.id, h.folded) for h in fold_hits(hits, store.vectors, hashes, 0.6)]
    assert folded_any and changed  # the pixels both let planted copies fold and keep look-alikes apart


# ---------------------------------------------------------------------------- images, end to end
def blob(rng: np.random.Generator, side: int = 48) -> Image.Image:
    """A smooth picture: a 3x3 grid of random colours, enlarged (distinct ones differ in layout)."""
    return Image.fromarray(rng.integers(0, 256, (3, 3, 3)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def plain_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained narrow ResNet-18 at 16 px, whitened on generated pictures: its random features
    keep an altered copy closer to its original than distinct pictures are to each other, and
    without training this module runs in seconds."""
    import torch

    from simclr.encoder import Encoder, EncoderSpec
    from simclr.images import image_to_tensor
    from simclr.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 3, "small", 8)
    spec = EncoderSpec("resnet18", "small", 8, 3, 16, backbone.feature_dim, [0.5] * 3, [0.25] * 3)
    encoder = Encoder(spec, backbone)
    rng = np.random.default_rng(1)
    encoder.fit_whitening(torch.stack([image_to_tensor(blob(rng), 16) for _ in range(700)]), shrinkage=1e-2)
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    encoder.save(path)
    return path


@pytest.fixture(scope="module")
def dup_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[set[str]]]:
    """90 distinct pictures, an altered copy of each of 12 of them, and a byte-for-byte copy of
    one more; with the planted groups by file name."""
    from retrieval.alterations import alter

    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(5)
    names = [f"pic_{i:03d}.png" for i in range(90)]
    for name in names:
        blob(rng).save(root / name)
    groups = []
    for i in range(0, 36, 3):
        copy, _ = alter(Image.open(root / names[i]), rng)
        copy.save(root / f"copy_of_{i:03d}.png")
        groups.append({names[i], f"copy_of_{i:03d}.png"})
    shutil.copyfile(root / names[50], root / "exact_50.png")
    groups.append({names[50], "exact_50.png"})
    return root, groups


@pytest.fixture(scope="module")
def dup_index(plain_encoder: Path, dup_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    from retrieval.build import IndexConfig, build_index

    out = tmp_path_factory.mktemp("dup-index") / "idx"
    build_index(IndexConfig(source=str(dup_folder[0]), out=str(out), encoder=str(plain_encoder), workers=0, progress=False))
    return out


def run(*args: object):  # noqa: ANN201
    from retrieval.cli import app

    return runner.invoke(app, [str(a) for a in args])


def test_the_build_calibrates_a_threshold_from_altered_copies(dup_index: Path) -> None:
    from retrieval.duplicate_threshold import calibrate_threshold
    from simclr.encoder import Encoder

    from retrieval.pixel_match import THUMBNAILS, pair_scores, thumbnail

    store = IndexStore.load(dup_index)
    info = store.manifest.duplicates
    assert info is not None and info.count == store.manifest.count and 0 < info.threshold < 1
    assert 0 < info.candidate_threshold < info.threshold and 0 < info.pixel_threshold < 1
    described = run("info", dup_index).output
    assert (f"duplicates threshold {info.candidate_threshold:.4f}, pixels {info.pixel_threshold:.4f}, calibrated at "
            f"build time: pairs proposed by the embedding at the 1st percentile") in described
    assert f"without the pixel check (--no-pixels): threshold {info.threshold:.4f}" in described
    # Every item's thumbnail is stored: that of its whole image, as read from its file.
    thumbs = store.arrays[THUMBNAILS]
    assert thumbs.shape == (store.manifest.count, 24 * 24) and thumbs.dtype == np.uint8
    for i in (0, 17, store.manifest.count - 1):
        np.testing.assert_array_equal(thumbs[i], thumbnail(Image.open(store.items.refs[i])))
    encoder = Encoder.load(store.encoder_path)
    cal = calibrate_threshold(store, encoder)
    assert cal.threshold == pytest.approx(info.threshold, abs=1e-4)  # seeded: the same sample and alterations
    assert cal.pixel_threshold == pytest.approx(info.pixel_threshold, abs=1e-5)
    assert cal.copies_bound == pytest.approx(np.percentile(cal.similarities, info.percentile))
    assert cal.threshold == max(cal.copies_bound, cal.neighbours_bound)
    assert cal.pixel_copies_bound == pytest.approx(np.percentile(cal.pixel_similarities, 1.0))
    assert cal.pixel_threshold == max(cal.pixel_copies_bound, cal.pixel_neighbours_bound)
    # The copies' pixel scores are those of the copies with their own originals.
    assert np.median(cal.pixel_similarities) > 0.97 > np.nanmedian(cal.pixel_neighbours) + 0.2
    shuffled = pair_scores(thumbs, cal.ids, np.roll(cal.ids, 1))
    assert np.median(shuffled) < np.median(cal.pixel_similarities) - 0.3
    # Each altered copy is compared with its own original: closer to it than distinct items are
    # to each other (a copy compared with the wrong item would not be).
    own = np.asarray(store.vectors, dtype=np.float32)[cal.ids]
    distinct = np.sum(own * np.roll(own, 1, axis=0), axis=1)
    assert np.median(cal.similarities) > np.median(distinct) + 0.3


def test_planted_copies_are_grouped_at_the_calibrated_threshold(dup_index: Path, dup_folder) -> None:  # noqa: ANN001
    _, planted_groups = dup_folder
    r = run("duplicates", dup_index, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert "calibrated at build time" in report["threshold_source"]
    found = [{Path(m["ref"]).name for m in g["members"]} for g in report["groups"]]
    hit = sum(any(p <= f for f in found) for p in planted_groups)
    assert hit >= len(planted_groups) - 1, (found, report["threshold"])
    # Distinct images (same texture, different colours and periods) are not grouped with them.
    stray = [f for f in found if not any(f <= p for p in planted_groups)]
    assert len(stray) <= 1, stray
    exact = [g for g in report["groups"] if g["kind"] == "exact"]
    assert [{Path(m["ref"]).name for m in g["members"]} for g in exact] == [{"pic_050.png", "exact_50.png"}]


def test_json_csv_and_text_outputs_agree(dup_index: Path, tmp_path: Path) -> None:
    as_json = json.loads(run("duplicates", dup_index, "--json", "--threshold", 0.6, "--pixel-threshold", 0.5).output)
    members = [(g["group"], g["kind"], m) for g in as_json["groups"] for m in g["members"]]
    assert as_json["threshold"] == 0.6 and as_json["pixel_threshold"] == 0.5 and as_json["threshold_source"] == "given"
    assert len(members) > 4 and all(m["pixels"] >= 0.5 for _, kind, m in members if kind == NEAR and m["exact_of"] is None)
    out = tmp_path / "groups.csv"
    r = run("duplicates", dup_index, "--csv", out, "--threshold", 0.6, "--pixel-threshold", 0.5)
    assert r.exit_code == 0, r.output
    assert "threshold 0.6000, pixels 0.5000 (given)" in r.output and f"wrote {len(members)} rows" in r.output
    rows = list(csv.DictReader(out.open()))
    assert [(int(row["group"]), row["kind"], int(row["id"]), row["ref"]) for row in rows] == [
        (n, kind, m["id"], m["ref"]) for n, kind, m in members]
    assert [float(row["similarity"]) for row in rows] == pytest.approx([m["similarity"] for _, _, m in members], abs=1e-6)
    assert [float(row["pixels"]) for row in rows] == pytest.approx([m["pixels"] for _, _, m in members], abs=1e-6)
    assert [row["exact_of"] for row in rows] == ["" if m["exact_of"] is None else str(m["exact_of"]) for _, _, m in members]
    stdout = run("duplicates", dup_index, "--csv", "-", "--threshold", 0.6, "--pixel-threshold", 0.5).output
    assert list(csv.DictReader(io.StringIO(stdout))) == rows
    text = run("duplicates", dup_index, "--threshold", 0.6, "--pixel-threshold", 0.5).output.splitlines()
    assert text[0].startswith(f"{sum(g['kind'] == NEAR for g in as_json['groups'])} near-duplicate and ")
    assert sum(line.startswith("group ") for line in text) == len(as_json["groups"])
    assert len(text) == 1 + len(as_json["groups"]) + len(members)
    bad = run("duplicates", dup_index, "--json", "--csv", out)
    assert bad.exit_code == 1 and bad.output.strip() == "error: --json and --csv cannot be combined; pick one"
    bad = run("duplicates", dup_index, "--threshold", 1.5)
    assert bad.exit_code == 1 and bad.output.strip() == "error: threshold must be a cosine similarity in [-1, 1], got 1.5"
    bad = run("duplicates", dup_index, "--pixel-threshold", 0.9, "--no-pixels")
    assert bad.exit_code == 1 and bad.output.strip() == (
        "error: --pixel-threshold and --no-pixels contradict each other: leave out one")


def test_query_folds_hits_that_duplicate_a_better_hit(dup_index: Path, dup_folder) -> None:  # noqa: ANN001
    root, _ = dup_folder
    plain = [json.loads(line) for line in run("query", dup_index, root / "pic_050.png", "-k", 5, "--json").output.splitlines()]
    names = [Path(h["ref"]).name for h in plain[0]["hits"]]
    assert set(names[:2]) == {"pic_050.png", "exact_50.png"} and "folded" not in plain[0]["hits"][0]
    r = run("query", dup_index, root / "pic_050.png", "-k", 5, "--json", "--exclude-duplicates", "--duplicate-threshold", 0.99)
    [answer] = [json.loads(line) for line in r.output.splitlines()]
    hits = answer["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert Path(hits[0]["ref"]).name in {"pic_050.png", "exact_50.png"}
    assert {Path(h["ref"]).name for h in hits}.isdisjoint({"pic_050.png", "exact_50.png"} - {Path(hits[0]["ref"]).name})
    other = next(h for h in plain[0]["hits"][:2] if h["id"] != hits[0]["id"])
    assert other["id"] in hits[0]["folded"]
    text = run("query", dup_index, root / "pic_050.png", "-k", 3, "--exclude-duplicates", "--duplicate-threshold", 0.99).output
    assert f"id:{other['id']}" in text.splitlines()[1]


def test_an_index_without_a_stored_threshold_is_calibrated_on_demand(dup_index: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(dup_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    stored = manifest.pop("duplicates")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    r = run("duplicates", copy, "--json", "--device", "cpu")
    report = json.loads(r.output)
    assert "calibrated now" in report["threshold_source"]
    assert report["threshold"] == pytest.approx(stored["candidate_threshold"], abs=1e-4)
    assert report["pixel_threshold"] == pytest.approx(stored["pixel_threshold"], abs=1e-5)
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before  # nothing cached in the folder
    # A serving process measures it once, whatever thresholds its requests give.
    from retrieval import duplicate_threshold
    from retrieval.service import Service

    measured = []
    real = duplicate_threshold.calibrate_threshold
    monkeypatch.setattr(duplicate_threshold, "calibrate_threshold", lambda *a, **kw: measured.append(1) or real(*a, **kw))
    service = Service.open(copy, device="cpu")
    first, given = service.duplicate_threshold(), service.duplicate_threshold(0.5)
    assert service.duplicate_threshold(0.5, 0.9).source == "given" and service.duplicate_threshold() == first
    assert (given.similarity, given.pixels) == (0.5, first.pixels) and len(measured) == 1


def test_a_pixel_threshold_calibrated_on_an_earlier_score_is_measured_again(dup_index: Path, tmp_path: Path) -> None:
    from retrieval.pixel_match import PIXEL_SCORE

    stored = json.loads((dup_index / "manifest.json").read_text())["duplicates"]
    assert stored["pixel_score"] == PIXEL_SCORE
    assert f"aligned pixels ({PIXEL_SCORE}) score at least" in run("info", dup_index).output
    copy = tmp_path / "idx"
    shutil.copytree(dup_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["duplicates"]["pixel_score"]  # as an index built when the score aligned crops alone,
    manifest["duplicates"]["pixel_threshold"] = 0.5  # whose threshold would let through what turns lift
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = json.loads(run("duplicates", copy, "--json", "--device", "cpu").output)
    assert "calibrated now (the index's stored pixel threshold is of an earlier pixel score)" in report["threshold_source"]
    assert report["pixel_threshold"] == pytest.approx(stored["pixel_threshold"], abs=1e-5)
    assert report["threshold"] == pytest.approx(stored["candidate_threshold"], abs=1e-4)
    # A pixel threshold given needs nothing measured: the stored embedding bar still holds.
    given = json.loads(run("duplicates", copy, "--json", "--pixel-threshold", 0.9).output)
    assert given["threshold_source"].startswith("pixels given; the other calibrated at build time")
    assert given["threshold"] == stored["candidate_threshold"] and given["pixel_threshold"] == 0.9


def test_an_index_without_thumbnails_falls_back_to_the_embedding_and_says_so(dup_index: Path, dup_folder,  # noqa: ANN001
                                                                            tmp_path: Path) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(dup_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"].remove("thumbnails")
    for key in ("candidate_threshold", "candidate_percentile", "pixel_threshold", "pixel_percentile",
                "pixel_copies_bound", "pixel_neighbours_bound"):
        manifest["duplicates"].pop(key)  # as an index built before thumbnails were stored
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "thumbnails.npy").unlink()
    report = json.loads(run("duplicates", copy, "--json").output)
    assert report["pixel_threshold"] is None and report["threshold"] == pytest.approx(manifest["duplicates"]["threshold"])
    assert "the embedding alone decides: the index stores no thumbnails" in report["threshold_source"]
    assert "no thumbnails stored: the embedding alone decides" in run("info", copy).output
    bad = run("duplicates", copy, "--pixel-threshold", 0.9)
    assert bad.exit_code == 1 and bad.output.startswith(f"error: {copy} stores no thumbnails")
    # With them, --no-pixels gives the embedding-alone threshold of the same calibration.
    alone = json.loads(run("duplicates", dup_index, "--json", "--no-pixels").output)
    assert alone["pixel_threshold"] is None and alone["threshold"] == pytest.approx(manifest["duplicates"]["threshold"])
    # Appending new pictures appends their thumbnails.
    from retrieval.build import IndexConfig, build_index
    from retrieval.pixel_match import thumbnail

    extra = tmp_path / "more"
    extra.mkdir()
    blob(np.random.default_rng(9)).save(extra / "new.png")
    grown = tmp_path / "grown"
    shutil.copytree(dup_index, grown)
    build_index(IndexConfig(source=str(extra), out=str(grown), append=True, workers=0, progress=False))
    store = IndexStore.load(grown)
    assert store.arrays["thumbnails"].shape[0] == store.manifest.count == IndexStore.load(dup_index).manifest.count + 1
    np.testing.assert_array_equal(store.arrays["thumbnails"][-1], thumbnail(Image.open(extra / "new.png")))


def test_the_app_lists_the_groups_with_thumbnails(dup_index: Path) -> None:
    from retrieval.service import Service
    from retrieval.web import WebApp

    web = WebApp(Service.open(dup_index, device="cpu"), map_points=30)
    view = web.duplicates(None)
    assert "calibrated at build time" in view.summary and "exact-copy" in view.summary
    sheet, caption = next((s, c) for s, c in view.gallery if "exact" in c)
    im = Image.open(sheet)
    assert Path(sheet).parent == web.thumbnails and im.size == (2 * 96 + 4, 96)  # two thumbnails side by side
    assert caption.startswith("group ") and "2 items" in caption
    ids = {row[2] for row in view.rows if row[1] == EXACT}
    assert len(ids) == 2
    # The view's text box: empty is the calibrated threshold, anything else a number in [-1, 1].
    assert web.duplicates("").summary == view.summary
    assert "(similarity given; the other calibrated at build time" in web.duplicates(" 0.99 ").summary
    for bad, message in (("abc", "must be a number"), ("2", "must be a cosine similarity")):
        with pytest.raises(RetrievalError, match=message):
            web.duplicates(bad)
    demo = web.build()
    assert {"search", "duplicates"} <= {d.api_name for d in demo.fns.values() if d.api_name}

