"""The web app's handlers and layout (Gradio), on top of :class:`retrieval.service.Service`.

Handlers are plain methods that tests call directly; :meth:`WebApp.build` wires them into a
``gr.Blocks``. Searches go through a :class:`retrieval.batcher.Batcher` (the HTTP API's, when
both are served): requests that queue up together are embedded and searched in one pass.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from common.errors import UserError
from retrieval.answers import Answer
from retrieval.batcher import Batcher
from retrieval.duplicates import DuplicateReport, report
from retrieval.embedding_map import MAP_POINTS, EmbeddingMap
from retrieval.errors import RetrievalError
from retrieval.service import Options, Service, open_index
from retrieval.web.mapplot import MapPlot
from retrieval.web.thumbnails import ItemImages

log = logging.getLogger(__name__)

MAX_BATCH = 16
CACHE_SECONDS = 3600
DUPLICATE_GROUPS = 60  # groups the Duplicates view shows (the largest)
DUPLICATE_ROWS = 2000  # members listed in its table at most
DUPLICATE_SCANS = 4  # scans kept (the latest thresholds asked for)
SHEET_ITEMS = 8  # thumbnails per group (two rows of four)
DUPLICATES_DOC = ("Items that are the same picture: exact copies (same file content) and near duplicates "
                  "(re-encoded, resized, slightly cropped or turned, brightened ...): pairs the embedding proposes above the "
                  "similarity threshold, kept when their small grayscale thumbnails, aligned for crops and turns, agree. "
                  "Leave the threshold empty for the index's calibrated one.")

HOW_TO_BUILD = """
# No index yet

This app searches an index folder built by the `retrieval` command line. To build the default one
(Fashion-MNIST, about 10 minutes on a laptop CPU), run the README's first command:

```
bash scripts/demo.sh
```

or, step by step, with your own images:

```
retrieval train --data path/to/images --out runs/mine
retrieval index --encoder runs/mine/encoder.pt --source path/to/images --out runs/mine/index
retrieval serve runs/mine/index
```
"""


@dataclass
class SearchResult:
    """What one search shows: gallery items, label probabilities, anomaly text, hit ids, map position."""

    gallery: list[tuple[str, str]]  # (thumbnail file, caption)
    label: dict[str, float] | None
    anomaly: str
    hit_ids: list[int]
    position: tuple[float, float] | None


@dataclass
class DuplicatesView:
    """What the Duplicates view shows: a sheet of thumbnails per group, a summary, a member table."""

    gallery: list[tuple[str, str]]  # (sheet file, caption)
    summary: str
    rows: list[list[Any]]  # group, kind, id, similarity, pixels, label, ref


class WebApp:
    """Handlers for one loaded index."""

    def __init__(self, service: Service, map_points: int = MAP_POINTS, batcher: Batcher | None = None):
        self.service = service
        self.batcher = batcher or Batcher(service)  # shared with the HTTP API when it is served
        store = service.store
        self.thumbnails = Path(tempfile.mkdtemp(prefix="retrieval-thumbnails-"))
        atexit.register(shutil.rmtree, self.thumbnails, True)
        self.images = ItemImages(store.items.refs, store.manifest.sources, folder=self.thumbnails)
        self.placeholder = str(self.thumbnails / "unavailable.png")
        Image.new("RGB", (32, 32), (220, 220, 220)).save(self.placeholder)
        self._map: EmbeddingMap | None = None
        self._plot: MapPlot | None = None
        self._map_points = map_points
        self._duplicates: dict[float, DuplicateReport] = {}

    # ------------------------------------------------------------------ handlers
    def search(self, images: list[str | Image.Image | None], ks: list[int]) -> list[SearchResult]:
        """Answer a batch of queries (files, PIL images or None) with their own k each."""
        results: list[SearchResult | None] = [None] * len(images)
        todo = [i for i, im in enumerate(images) if im is not None]
        for i, im in enumerate(images):
            if im is None:
                results[i] = _message("Upload an image, or pick an example, to search.")
        if todo:
            opts = Options(k=max(int(ks[i]) for i in todo), classify=bool(self.service.store.manifest.classes), anomaly=True)
            replies = self.batcher.ask([images[i] for i in todo], opts)
            xy = self.embedding_map().project(np.stack([r.vector for r in replies]))
            for row, i in enumerate(todo):
                results[i] = self._show(replies[row].answer, int(ks[i]))
                if replies[row].answer.error is None:
                    results[i].position = (float(xy[row, 0]), float(xy[row, 1]))
        return results

    def _show(self, answer: Answer, k: int) -> SearchResult:
        if answer.error is not None:
            return _message(f"⚠️ {answer.error}")
        gallery, ids = [], []
        for hit in answer.hits[:k]:
            try:
                thumb = self.images.file(hit.id)
            except UserError as exc:
                log.warning("%s", exc)
                thumb = self.placeholder
            name = Path(hit.ref).name if "/" in hit.ref else hit.ref
            gallery.append((thumb, f"{hit.similarity:.3f} · {hit.label or '-'} · {name}"))
            ids.append(hit.id)
        label = answer.prediction.probabilities if answer.prediction and answer.prediction.label else None
        return SearchResult(gallery, label, _anomaly_text(answer), ids, None)

    def duplicates(self, threshold: str | float | None = None) -> DuplicatesView:
        """The index's duplicate groups at ``threshold`` (None or empty text: its calibrated one),
        the largest :data:`DUPLICATE_GROUPS` of them shown. The scans of the latest
        :data:`DUPLICATE_SCANS` thresholds are kept, so that going back to one is instant."""
        text = "" if threshold is None else str(threshold).strip()
        given = None
        if text:
            try:
                given = float(text)
            except ValueError:
                raise RetrievalError(f"threshold must be a number, got {text!r}") from None
            if not -1.0 <= given <= 1.0:
                raise RetrievalError(f"threshold must be a cosine similarity in [-1, 1], got {given}")
        chosen = self.service.duplicate_threshold(given)
        key = round(chosen.similarity, 6)
        rep = self._duplicates.pop(key, None) or report(self.service.store, chosen)
        self._duplicates[key] = rep  # re-inserted: the dict's order is the order of use
        while len(self._duplicates) > DUPLICATE_SCANS:
            self._duplicates.pop(next(iter(self._duplicates)))
        gallery, rows = [], []
        for n, g in enumerate(rep.groups[:DUPLICATE_GROUPS], 1):
            path = self.thumbnails / f"duplicates-{key:.6f}-{n}.png"
            if not path.exists():
                self.images.sheet([m.id for m in g.members[:SHEET_ITEMS]]).save(path)
            more = f" (first {SHEET_ITEMS} shown)" if g.size > SHEET_ITEMS else ""
            least = min(m.similarity for m in g.members)
            gallery.append((str(path), f"group {n} · {g.kind} · {g.size} items{more} · least similarity {least:.3f}"))
            rows += [[n, g.kind, m.id, round(m.similarity, 4), "" if m.pixels is None else round(m.pixels, 4),
                      m.label or "", m.ref] for m in g.members]
        c = rep.counts()
        shown = f"; the largest {DUPLICATE_GROUPS} shown" if len(rep.groups) > DUPLICATE_GROUPS else ""
        if len(rows) > DUPLICATE_ROWS:
            shown += f"; the table lists their first {DUPLICATE_ROWS:,} members of {len(rows):,}"
            rows = rows[:DUPLICATE_ROWS]
        summary = (f"**{c['near']} near-duplicate** and **{c['exact']} exact-copy** groups "
                   f"({sum(g.size for g in rep.groups):,} of {rep.items:,} images){shown}  \n"
                   f"threshold **{rep.threshold:.4f}**"
                   + ("" if rep.pixel_threshold is None else f", pixels **{rep.pixel_threshold:.4f}**")
                   + f" ({rep.threshold_source}); {rep.search}; {rep.seconds:.1f} s")
        return DuplicatesView(gallery, summary, rows)

    def item_image(self, item_id: int) -> Image.Image:
        return self.images.image(item_id)

    def examples(self, count: int = 8) -> list[tuple[Image.Image, str]]:
        """One item per class (or evenly spaced items), for the example row."""
        store = self.service.store
        labels = store.items.labels
        chosen: list[int] = []
        seen: set[str | None] = set()
        for i, lbl in enumerate(labels):
            if lbl not in seen:
                seen.add(lbl)
                chosen.append(i)
            if len(chosen) == count:
                break
        if len(chosen) < count:
            step = max(1, len(labels) // count)
            chosen += [i for i in range(0, len(labels), step) if i not in chosen][: count - len(chosen)]
        out, ids = [], []
        for i in chosen:
            try:
                out.append((self.images.image(i), labels[i] or Path(store.items.refs[i]).name))
            except UserError as exc:  # left out, and its id with it, so that the clicks stay aligned
                log.warning("example %d left out: %s", i, exc)
                continue
            ids.append(i)
        self.example_ids = ids
        return out

    def map_image(self, position: tuple[float, float] | None) -> Image.Image:
        """The gallery's 2-D map coloured by label, with the query's star when there is one."""
        if self._plot is None:
            m = self.embedding_map()
            labels = self.service.store.items.labels
            self._plot = MapPlot(m.points[:, 1:3], [labels[int(i)] for i in m.points[:, 0]])
        return self._plot.render(position)

    def embedding_map(self) -> EmbeddingMap:
        if self._map is None:
            unwhiten = self.service.encoder.unwhitening()
            self._map = EmbeddingMap.of_store(self.service.store, None if unwhiten is None else unwhiten.numpy(),
                                              self._map_points)
        return self._map

    def facts_markdown(self) -> str:
        f = self.service.facts()
        sources = ", ".join(f"`{s}`" for s in f.sources)
        return (
            f"**{f.items:,} images** · {f.classes} classes · index `{f.index_type}` ({f.dimension}-d) · "
            f"encoder {f.encoder}, sha256 `{f.encoder_sha256[:12]}` · sources {sources}"
        )

    # ------------------------------------------------------------------ layout
    def _search_tab(self, examples: list[tuple[Image.Image, str]]) -> None:
        hits = gr.State([])
        position = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(label="Query image", type="filepath", sources=["upload", "clipboard", "webcam"], height=260)
                k = gr.Slider(1, 50, value=10, step=1, label="Results (k)")
                button = gr.Button("Search", variant="primary")
                example_row = gr.Gallery(value=examples, label="Examples from the index (click one)", columns=8,
                                         height=110, allow_preview=False, object_fit="contain")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Most similar images (click one to search with it)", columns=5, height=330,
                                     allow_preview=False, object_fit="contain", elem_id="results")
                with gr.Row():
                    label = gr.Label(label="kNN label", num_top_classes=5, elem_id="knn-label")
                    anomaly = gr.Markdown("", elem_id="anomaly")
        plot = gr.Image(value=self.map_image(None), type="pil", interactive=False, show_label=True, buttons=["download"],
                        label="Embedding map (PCA of the index; the query is the black star)", elem_id="map")

        def run(images: list, ks: list) -> tuple[list, list, list, list, list]:
            try:
                results = self.search(images, ks)
            except UserError as exc:
                raise gr.Error(str(exc)) from None
            except Exception as exc:  # never a stack trace in the UI; the server keeps serving
                log.exception("search failed")
                raise gr.Error(f"search failed: {type(exc).__name__}") from None
            return ([r.gallery for r in results], [r.label for r in results], [r.anomaly for r in results],
                    [r.hit_ids for r in results], [r.position for r in results])

        outputs = [gallery, label, anomaly, hits, position]
        search_event = dict(fn=run, inputs=[query, k], outputs=outputs, batch=True, max_batch_size=MAX_BATCH)
        button.click(**search_event, api_name="search").then(
            self.map_image, inputs=position, outputs=plot, api_visibility="private")
        query.upload(**search_event, api_visibility="private").then(
            self.map_image, inputs=position, outputs=plot, api_visibility="private")

        def pick(ids: list[int], evt: gr.SelectData) -> Image.Image:
            try:
                return self.item_image(ids[evt.index])
            except (IndexError, TypeError, UserError) as exc:
                raise gr.Error(f"cannot open that image: {exc}") from None

        chosen = gr.State(list(self.example_ids))
        for source, ids in ((gallery, hits), (example_row, chosen)):
            source.select(pick, inputs=ids, outputs=query, api_visibility="private").then(
                **search_event, api_visibility="private").then(
                self.map_image, inputs=position, outputs=plot, api_visibility="private")

    def _duplicates_tab(self) -> None:
        calibrated = "calibrated"
        if self.service.store.manifest.duplicates is not None:  # else measured on the first scan, not now
            chosen = self.service.duplicate_threshold()
            pixels = "" if chosen.pixels is None else f", then pixels {chosen.pixels:.4f}"
            calibrated = f"the calibrated {chosen.similarity:.4f}{pixels}"
        gr.Markdown(DUPLICATES_DOC)
        with gr.Row():
            # A text box, not a number box: an empty number box sends 0, which would group everything.
            threshold = gr.Textbox(value="", label=f"Similarity threshold (empty: {calibrated})",
                                   placeholder="e.g. 0.9", max_lines=1)
            find = gr.Button("Find duplicates", variant="primary")
        summary = gr.Markdown("", elem_id="duplicates-summary")
        sheets = gr.Gallery(label="Groups, largest first", columns=4, height=560, allow_preview=False,
                            object_fit="contain", elem_id="duplicate-groups")
        table = gr.Dataframe(headers=["group", "kind", "id", "similarity", "pixels", "label", "ref"], interactive=False,
                             label="Members (similarity and aligned pixel score to the group's first member)")

        def run(value: str | None) -> tuple[list, str, list]:
            try:
                view = self.duplicates(value)
            except UserError as exc:
                raise gr.Error(str(exc)) from None
            except Exception as exc:  # never a stack trace in the UI; the server keeps serving
                log.exception("duplicate scan failed")
                raise gr.Error(f"duplicate scan failed: {type(exc).__name__}") from None
            return view.gallery, view.summary, view.rows

        find.click(run, inputs=threshold, outputs=[sheets, summary, table], api_name="duplicates")

    def build(self) -> gr.Blocks:
        self.embedding_map()
        examples = self.examples()
        # Uploads, results and maps that Gradio caches as files are deleted after an hour.
        with gr.Blocks(title="Image retrieval", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
            gr.Markdown("## Image retrieval\n" + self.facts_markdown())
            with gr.Tab("Search"):
                self._search_tab(examples)
            with gr.Tab("Duplicates"):
                self._duplicates_tab()
        return demo


def _message(text: str) -> SearchResult:
    return SearchResult([], None, text, [], None)


def _anomaly_text(answer: Answer) -> str:
    a = answer.anomaly
    if a is None:
        return ""
    if a.unusual is None:
        return (f"### Anomaly: no verdict\n"
                f"score **{a.score:.4f}** (mean distance to the {a.k} nearest images)  \n"
                f"{answer.note[0].upper() + answer.note[1:] if answer.note else 'The index has too few images to calibrate one'}")
    verdict = '<span style="color:#c0392b">● **UNUSUAL**</span>' if a.unusual else '<span style="color:#1e8449">● **normal**</span>'
    return (
        f"### Anomaly: {verdict}\n"
        f"score **{a.score:.4f}** (mean distance to the {a.k} nearest images)  \n"
        f"higher than **{a.percentile:.1f}%** of indexed images; threshold {a.threshold:.4f}"
    )


def no_index_app(path: Path, reason: str) -> gr.Blocks:
    with gr.Blocks(title="Image retrieval") as demo:
        gr.Markdown(f"{HOW_TO_BUILD}\n\n_Looked for `{path}`: {reason}_")
    return demo


def build_app(index_dir: str | Path | None = None, device: str = "auto") -> tuple[gr.Blocks, list[str]]:
    """The app for ``index_dir`` (default: the README demo's index), or a page saying how to build
    one; with the folders it may serve files from (its thumbnails)."""
    path, service, why = open_index(index_dir, device)
    if service is None:
        return no_index_app(path, why), []
    web = WebApp(service)
    return web.build(), [str(web.thumbnails)]


def launch(index_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           share: bool = False, device: str = "auto", **kwargs: Any) -> None:
    """Serve the app and the JSON API (:func:`retrieval.web.server.serve` takes the options)."""
    from retrieval.web.server import serve

    serve(index_dir, host=host, port=port, auth=auth, share=share, device=device, **kwargs)
