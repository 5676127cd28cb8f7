"""The web app's handlers, called directly."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.service import Options, Service
from retrieval.web import WebApp, build_app, no_index_app, parse_auth
from retrieval.errors import RetrievalError


@pytest.fixture(scope="module")
def web(tiny_index: Path) -> WebApp:
    return WebApp(Service.open(tiny_index, device="cpu"), map_points=30)


def test_search_shows_k_results_label_and_verdict(web: WebApp, image_folder: Path) -> None:
    [r] = web.search([str(image_folder / "checks" / "checks_002.png")], [4])
    assert len(r.gallery) == 4 and len(r.hit_ids) == 4
    thumb, caption = r.gallery[0]
    assert Path(thumb).parent == web.thumbnails and Image.open(thumb).size == (32, 32)
    assert "checks_002.png" in caption and caption.startswith("1.000")
    assert r.label is not None and abs(sum(r.label.values()) - 1) < 1e-4
    [answer] = web.service.ask([str(image_folder / "checks" / "checks_002.png")], Options(k=1, anomaly=True))
    verdict = "**UNUSUAL**" if answer.anomaly.unusual else "**normal**"
    assert "Anomaly" in r.anomaly and verdict in r.anomaly and f"{answer.anomaly.score:.4f}" in r.anomaly
    assert r.position is not None and all(np.isfinite(r.position))


def test_a_batch_of_queries_with_their_own_k(web: WebApp, image_folder: Path) -> None:
    a, b, c = web.search([str(image_folder / "bars" / "bars_001.png"), None, Image.new("L", (50, 10), 200)], [2, 5, 7])
    assert len(a.gallery) == 2 and len(c.gallery) == 7
    assert b.gallery == [] and "Upload an image" in b.anomaly


def test_bad_uploads_get_a_message_not_a_trace(web: WebApp, tmp_path: Path) -> None:
    text = tmp_path / "x.png"
    text.write_text("just text")
    [r] = web.search([str(text)], [5])
    assert r.gallery == [] and "not an image" in r.anomaly


def test_clicked_results_and_examples_are_images(web: WebApp) -> None:
    assert isinstance(web.item_image(3), Image.Image)
    examples = web.examples(3)
    assert len(examples) == 3 and {caption for _, caption in examples} == {"bars", "checks", "stripes"}


def test_map_places_the_query(web: WebApp) -> None:
    empty = np.asarray(web.map_image(None))
    shown = np.asarray(web.map_image((0.5, -0.5)))
    assert empty.shape == shown.shape and empty.shape[2] == 3
    # The star is the only black mark on the map.
    black = lambda im: int((im.max(axis=2) < 40).sum())  # noqa: E731
    assert black(shown) > black(empty) + 100


def test_serving_never_writes_into_the_index_folder(tiny_index: Path, image_folder: Path) -> None:
    def listing() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in tiny_index.iterdir()}

    before = listing()
    assert "map_points.npy" in before and "map_basis.npy" in before  # the map is made at build time
    web = WebApp(Service.open(tiny_index, device="cpu"), map_points=30)
    web.build()
    web.search([str(image_folder / "bars" / "bars_003.png")], [3])
    web.map_image((0.0, 0.0))
    assert listing() == before


def test_an_example_that_fails_to_load_takes_its_id_with_it(web: WebApp, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.web.thumbnails import ItemImages

    original = ItemImages.image
    first_ids = [i for i, _ in enumerate(web.service.store.items.labels)][:1]

    def flaky(self: ItemImages, item_id: int) -> Image.Image:
        if item_id in first_ids:
            raise RetrievalError(f"item {item_id}: cannot read")
        return original(self, item_id)

    monkeypatch.setattr(ItemImages, "image", flaky)
    monkeypatch.setattr(web.images, "_cache", type(web.images._cache)())
    examples = web.examples(3)
    labels = web.service.store.items.labels
    # Each example's caption is the label of the item its click searches.
    assert len(examples) == len(web.example_ids) == 2
    assert [caption for _, caption in examples] == [labels[i] for i in web.example_ids]


def test_files_outside_the_image_roots_are_not_served(web: WebApp, tmp_path: Path) -> None:
    from retrieval.web.thumbnails import ItemImages

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    store = web.service.store
    images = ItemImages([*store.items.refs, str(secret)], store.manifest.sources)  # the shared fixture stays as it is
    with pytest.raises(RetrievalError, match="outside the index's image folders"):
        images.image(len(images.refs) - 1)


def test_blocks_build_and_the_empty_page(tiny_index: Path, tmp_path: Path) -> None:
    demo, allowed = build_app(tiny_index, device="cpu")
    assert len(allowed) == 1 and "thumbnails" in allowed[0]
    assert "search" in {d.api_name for d in demo.fns.values() if d.api_name}
    page = no_index_app(tmp_path / "none", "not found")
    texts = [c.value for c in page.blocks.values() if hasattr(c, "value") and isinstance(c.value, str)]
    assert any("bash scripts/demo.sh" in t and "not found" in t for t in texts)
    assert parse_auth("ann:secret") == ("ann", "secret")
    with pytest.raises(RetrievalError, match="user:password"):
        parse_auth("nocolon")


def test_only_the_demo_index_may_be_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import UserError
    from retrieval.options import DEFAULT_INDEX
    from retrieval.service import open_index

    monkeypatch.chdir(tmp_path)  # no runs/ here: the demo's index is missing
    path, service, why = open_index(None, device="cpu")
    assert path == DEFAULT_INDEX and service is None and str(DEFAULT_INDEX) in why
    demo, allowed = build_app(None, device="cpu")  # the page that says how to build it
    texts = [c.value for c in demo.blocks.values() if hasattr(c, "value") and isinstance(c.value, str)]
    assert allowed == [] and any("bash scripts/demo.sh" in t for t in texts)
    with pytest.raises(UserError, match="elsewhere"):  # a named index that is missing is an error
        open_index(tmp_path / "elsewhere", device="cpu")
    with pytest.raises(UserError, match="elsewhere"):
        build_app(tmp_path / "elsewhere", device="cpu")


def test_map_of_a_whitened_index_is_the_pca_of_unwhitened_vectors(tiny_index: Path, tmp_path: Path) -> None:
    import shutil

    from index import IndexStore
    from retrieval.embedding_map import EmbeddingMap

    shutil.copytree(tiny_index, tmp_path / "idx")
    store = IndexStore.load(tmp_path / "idx")
    d = store.manifest.dim
    unwhiten = np.random.default_rng(0).normal(size=(d, d)) * np.linspace(3, 0.1, d)
    m = EmbeddingMap.fit(store.vectors, unwhiten, max_points=48)
    # Naive: undo the whitening, centre, take the top two right singular vectors.
    x = np.asarray(store.vectors, dtype=np.float64) @ unwhiten
    x -= x.mean(0)
    naive = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T
    got = m.project(np.asarray(store.vectors[m.points[:, 0].astype(int)]))
    assert np.allclose(got, m.points[:, 1:3])
    for axis in range(2):  # the same axes, up to sign
        assert abs(np.corrcoef(got[:, axis], naive[m.points[:, 0].astype(int), axis])[0, 1]) > 0.999


def test_app_py_holds_a_module_level_demo_and_serve_parses_its_flags(tiny_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import subprocess
    import sys

    import gradio as gr

    monkeypatch.setenv("RETRIEVAL_INDEX", str(tiny_index))
    monkeypatch.setenv("RETRIEVAL_DEVICE", "cpu")
    sys.modules.pop("app", None)
    app = importlib.import_module("app")  # what `gradio app.py` imports: no server starts
    assert isinstance(app.demo, gr.Blocks) and "search" in {d.api_name for d in app.demo.fns.values() if d.api_name}
    root = Path(app.__file__).parent
    r = subprocess.run([sys.executable, str(root / "app.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--auth" in r.stdout and "Serve the web app" in r.stdout
