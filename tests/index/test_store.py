import json
import os
from pathlib import Path

import numpy as np
import pytest

from index import IndexStore, IndexStoreError, Items
from index.folder import replace_folder
from index.manifest import EncoderInfo
from tests.helpers import clustered


def _items(n: int, start: int = 0) -> Items:
    return Items([f"img/{i}.png" for i in range(start, start + n)], [["a", "b", None][i % 3] for i in range(start, start + n)],
                 [f"h{i}" for i in range(start, start + n)])


def _store(n: int = 300, seed: int = 0) -> tuple[IndexStore, np.ndarray]:
    vecs = clustered(n, 16, seed)
    return IndexStore.build(vecs, _items(n), "abc123", EncoderInfo(arch="resnet18"), sources=["folder"]), vecs


def test_round_trip(tmp_path: Path) -> None:
    store, vecs = _store()
    store.arrays["calibration"] = np.arange(5, dtype=np.float32)
    store.save(tmp_path / "idx")
    loaded = IndexStore.load(tmp_path / "idx")
    assert loaded.manifest == store.manifest
    assert loaded.manifest.classes == ["a", "b"]
    assert loaded.items.refs == store.items.refs and loaded.items.labels == store.items.labels
    np.testing.assert_array_equal(loaded.arrays["calibration"], np.arange(5))
    a = store.search(vecs[:5], 7)
    b = loaded.search(vecs[:5], 7)
    np.testing.assert_array_equal(a[1], b[1])
    assert list(loaded.label_ids()[:3]) == [0, 1, -1]


def test_append_equals_building_from_scratch(tmp_path: Path) -> None:
    vecs = clustered(400, 16, 1)
    whole = IndexStore.build(vecs, _items(400), "abc")
    part = IndexStore.build(vecs[:250], _items(250), "abc")
    part.save(tmp_path / "idx")
    part = IndexStore.load(tmp_path / "idx")
    part.append(vecs[250:], _items(150, 250))
    part.save(tmp_path / "idx")
    again = IndexStore.load(tmp_path / "idx")
    queries = clustered(20, 16, 9)
    s1, i1 = whole.search(queries, 10)
    s2, i2 = again.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert again.items.refs == whole.items.refs and again.manifest.count == 400


@pytest.mark.parametrize("victim,damage,message", [
    ("manifest.json", "{not json", "manifest.json is corrupt"),
    ("manifest.json", None, "manifest.json not found"),
    ("index.faiss", "garbage", "index.faiss is corrupt"),
    ("items.jsonl", '{"id": 0}\n', "items.jsonl is corrupt at line 1"),
    ("items.jsonl", None, "items.jsonl not found"),
    ("vectors.npy", "garbage", "vectors.npy is corrupt"),
])
def test_damaged_files_are_named(tmp_path: Path, victim: str, damage: str | None, message: str) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    target = tmp_path / "idx" / victim
    if damage is None:
        target.unlink()
    else:
        target.write_text(damage)
    with pytest.raises(IndexStoreError, match=message):
        IndexStore.load(tmp_path / "idx")


def test_inconsistent_counts_are_refused(tmp_path: Path) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    lines = (tmp_path / "idx" / "items.jsonl").read_text().splitlines()
    (tmp_path / "idx" / "items.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(IndexStoreError, match="item counts differ"):
        IndexStore.load(tmp_path / "idx")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(IndexStoreError, match="not found"):
        IndexStore.load(tmp_path / "nope")


def test_failed_write_leaves_the_previous_folder(tmp_path: Path) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    before = (tmp_path / "idx" / "manifest.json").read_text()

    def fill(tmp: Path) -> None:
        (tmp / "manifest.json").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(IndexStoreError, match="No space left on device.*previous index is intact"):
        replace_folder(tmp_path / "idx", fill)
    assert (tmp_path / "idx" / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_interrupted_swap_is_read_without_writing_and_recovered_by_the_next_write(tmp_path: Path) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    # A build killed between moving the old folder aside and moving the new one in.
    os.rename(tmp_path / "idx", tmp_path / ".idx.old-1234abcd")
    (tmp_path / ".idx.tmp-999999999-deadbeef").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    loaded = IndexStore.load(tmp_path / "idx")
    assert loaded.manifest.count == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # reading changed nothing
    loaded.save(tmp_path / "idx")  # a writer repairs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert IndexStore.load(tmp_path / "idx").manifest.count == 300


def test_a_format_1_manifest_is_read_into_typed_fields(tmp_path: Path) -> None:
    store, _ = _store()
    store.arrays["calibration"] = np.arange(5, dtype=np.float32)
    store.save(tmp_path / "idx")
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    m["format_version"] = 1
    m["extra"] = {"calibration": {"k": 7, "percentile": 95.0, "count": 5, "method": "leave-one-out", "threshold": 3.8},
                  "encoder_file": "encoder.pt"}
    m["encoder"] = {"arch": "resnet18", "stem": "small"}
    for key in ("calibration", "map"):
        m.pop(key)
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(m))
    loaded = IndexStore.load(tmp_path / "idx")
    cal = loaded.manifest.calibration
    assert (cal.k, cal.percentile, cal.threshold, cal.array) == (7, 95.0, 3.8, "calibration")
    assert loaded.manifest.encoder.file == "encoder.pt" and loaded.manifest.encoder.stem == "small"
    assert loaded.manifest.format_version == 2


def test_a_manifest_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    m["format_version"] = 3
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexStoreError, match="format version 3 is not supported"):
        IndexStore.load(tmp_path / "idx")


def test_read_only_folder_gives_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    store, _ = _store()
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    with pytest.raises(IndexStoreError, match="cannot write index"):
        store.save(tmp_path / "ro" / "idx")


def test_manifest_is_readable_json(tmp_path: Path) -> None:
    store, _ = _store()
    store.save(tmp_path / "idx")
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    for key in ("format_version", "encoder_sha256", "encoder", "dim", "metric", "factory", "count", "sources", "created_at"):
        assert key in m
    assert m["factory"] == "SQfp16" and m["count"] == 300 and m["metric"] == "inner_product"
