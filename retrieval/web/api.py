"""The JSON search API: FastAPI routes under ``/api/v1``, served beside the app or alone.

Every search goes through the server's one :class:`retrieval.batcher.Batcher`, which the app's
handlers share: requests that arrive together are embedded and searched in one pass, and the
encoder and the index are loaded once. Answers carry the fields of ``retrieval query --json``.

::

    POST /api/v1/search          one image (multipart field "image", or the raw body), or a JSON
                                 body naming an indexed item: {"id": 12} or {"ref": "..."}
    POST /api/v1/search/batch    several images (multipart, every file field in order), or JSON
                                 {"items": [{"id": 1}, {"ref": "..."}]}
    GET  /api/v1/info            the index's facts
    GET  /api/v1/items/{id}      an item's ref, label and content hash
    GET  /api/v1/items/{id}/image  its image (only files inside the index's folders)
    GET  /api/v1/duplicates      near-duplicate groups (``retrieval duplicates --json``)
    GET  /api/v1/docs            the OpenAPI documentation (schema: /api/v1/openapi.json)

Search options (``k``, ``classify``, ``anomaly``, ``knn_k`` ...) go in the query string, or in the
JSON body beside ``id``/``ref``. Errors are JSON ``{"error": "..."}``: 400 an unreadable image or
a malformed body, 401 no or wrong credentials, 404 an unknown item, 413 a body over the size
limit, 422 a bad option.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from common.errors import UserError
from retrieval.batcher import Batcher, Reply
from retrieval.item_source import ItemSource
from retrieval.options import Options

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_BODY = 32 << 20  # bytes a request body may have
MAX_BATCH_ITEMS = 256  # queries in one batch request
MAX_K = 1000
IMAGE_TYPES = ("image/", "application/octet-stream")


# ---------------------------------------------------------------------------- options
class SearchOptions(BaseModel):
    """What to answer; the defaults are ``retrieval query``'s."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(Options.k, ge=1, le=MAX_K, description="Results per query.")
    classify: bool = Field(False, description="Add the weighted-kNN label and its probabilities.")
    anomaly: bool = Field(False, description="Add the anomaly score, its percentile and verdict.")
    knn_k: int = Field(Options.knn_k, ge=1, le=10_000, description="Neighbours that vote for the label.")
    temperature: float = Field(Options.temperature, gt=0, description="Vote temperature.")
    anomaly_k: int | None = Field(None, ge=1, le=MAX_K, description="Neighbours of the anomaly score (default: the index's).")
    percentile: float | None = Field(None, gt=0, lt=100, description="Verdict threshold percentile (default: the index's).")
    nprobe: int | None = Field(None, ge=1, description="IVF lists to visit (approximate indexes).")
    ef_search: int | None = Field(None, ge=1, description="HNSW search breadth (approximate indexes).")
    exclude_duplicates: bool = Field(False, description="Fold hits that duplicate a better hit into it.")
    duplicate_threshold: float | None = Field(None, ge=-1, le=1, description="Similarity above which a hit duplicates a better one.")

    def options(self) -> Options:
        return Options(**self.model_dump())


class ItemRef(BaseModel):
    """An indexed item, by id or by ref (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(None, description="The item's id (its row in the index).")
    ref: str | None = Field(None, description="The item's ref: its file path, or dataset:split:n.")


class ItemSearch(SearchOptions, ItemRef):
    """A JSON search body: the item, and options (which override the query string's)."""


class BatchSearch(SearchOptions):
    """A JSON batch body: the items, and options (which override the query string's)."""

    items: list[ItemRef] = Field(..., min_length=1, max_length=MAX_BATCH_ITEMS)


class Json(JSONResponse):
    """A JSON response of plain data (dicts, lists, str, numbers), encoded at once with orjson
    (no pass through FastAPI's jsonable_encoder, which costs more than a search's own answer)."""

    def render(self, content: Any) -> bytes:
        import orjson

        return orjson.dumps(content)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---------------------------------------------------------------------------- access
@dataclass(frozen=True)
class Access:
    """Who may call the API: HTTP basic with the app's ``--auth`` user and password, or a bearer
    ``token``; anyone when neither is set."""

    credentials: tuple[str, str] | None = None
    token: str | None = None

    @property
    def open(self) -> bool:
        return self.credentials is None and not self.token

    def allows(self, header: str | None) -> bool:
        if self.open:
            return True
        scheme, _, value = (header or "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token:
            return secrets.compare_digest(value.encode(), self.token.encode())
        if scheme == "basic" and self.credentials is not None:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            want_user, want_password = self.credentials
            # Both compared, always: the time taken does not tell which one was wrong.
            same_user = secrets.compare_digest(user.encode(), want_user.encode())
            same_password = secrets.compare_digest(password.encode(), want_password.encode())
            return bool(sep) and same_user and same_password
        return False

    def challenge(self) -> str:
        schemes = (['Basic realm="retrieval"'] if self.credentials else []) + (["Bearer"] if self.token else [])
        return ", ".join(schemes)


# ---------------------------------------------------------------------------- body limit
class BodyLimit:
    """ASGI middleware: a request to ``prefix`` whose body exceeds ``limit`` bytes is answered
    413 without reading further (by its Content-Length, or while it streams in)."""

    def __init__(self, app: Any, limit: int = MAX_BODY, prefix: str = PREFIX):
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge:
            if not started:
                await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body over the limit of {limit / (1 << 20):g} MiB"}, status_code=413)


# ---------------------------------------------------------------------------- the routes
class Api:
    """The routes over one batcher (and so one service)."""

    def __init__(self, batcher: Batcher, access: Access = Access()):
        self.batcher = batcher
        self.service = batcher.service
        self.access = access
        store = self.service.store
        self.source = ItemSource(store.items.refs, store.manifest.sources)

    # ------------------------------------------------------------------ helpers
    def check_access(self, request: Request) -> None:
        if not self.access.allows(request.headers.get("authorization")):
            raise ApiError(401, "authentication required (HTTP basic with the server's --auth, or a bearer token)",
                           {"WWW-Authenticate": self.access.challenge()})

    def item_id(self, ref: ItemRef) -> int:
        """The id an :class:`ItemRef` names (404 when it names nothing)."""
        if (ref.id is None) == (ref.ref is None):
            raise ApiError(422, 'name an indexed item by "id" or by "ref" (one of them)')
        if ref.id is not None:
            try:
                self.service.check_item(ref.id)
            except UserError as exc:
                raise ApiError(404, str(exc)) from None
            return ref.id
        found = self.service.item_of_ref(ref.ref)
        if found is None:
            raise ApiError(404, f"no indexed item has ref {ref.ref!r}")
        return found

    async def queries(self, request: Request, many: bool) -> tuple[list[tuple[Any, str]], dict[str, Any]]:
        """The request's queries (bytes of an image, or ``id:N``, with a name each) and the
        options its JSON body sets."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the body is not valid JSON") from None
            try:
                parsed = (BatchSearch if many else ItemSearch).model_validate(body)
            except ValidationError as exc:
                raise ApiError(422, _validation_message(exc.errors())) from None
            refs = parsed.items if many else [parsed]
            ids = [self.item_id(ItemRef(id=r.id, ref=r.ref)) for r in refs]
            options = parsed.model_dump(include=set(SearchOptions.model_fields) & parsed.model_fields_set)
            return [(f"id:{i}", f"id:{i}") for i in ids], options
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=MAX_BATCH_ITEMS + 1, max_fields=64)
            except Exception as exc:  # noqa: BLE001  (a malformed multipart body)
                raise ApiError(400, f"cannot read the multipart body: {exc}") from None
            files = [(key, v) for key, v in form.multi_items() if isinstance(v, UploadFile)]
            if not many:
                files = [(key, v) for key, v in files if key == "image"] or files[:1]
            if not files:
                raise ApiError(400, 'no image in the form (send it as the file field "image")')
            if len(files) > MAX_BATCH_ITEMS:
                raise ApiError(422, f"at most {MAX_BATCH_ITEMS} images per batch, got {len(files)}")
            out = [(await f.read(), f.filename or "image") for _, f in files]
            await form.close()
            return out, {}
        if kind.startswith(IMAGE_TYPES) or not kind:
            if many:
                raise ApiError(400, "a batch is a multipart form of image files, or JSON naming indexed items")
            body = await request.body()
            if not body:
                raise ApiError(400, "empty body: send an image, a multipart form, or JSON naming an indexed item")
            return [(body, "image")], {}
        raise ApiError(415 if kind else 400, f"unsupported content type {kind!r}: send an image, multipart/form-data or JSON")

    async def answer(self, request: Request, options: SearchOptions, many: bool) -> list[Reply]:
        queries, overrides = await self.queries(request, many)
        if overrides:
            try:
                options = SearchOptions.model_validate({**options.model_dump(), **overrides})
            except ValidationError as exc:
                raise ApiError(422, _validation_message(exc.errors())) from None
        try:
            opts = options.options()
            opts.check()
        except UserError as exc:
            raise ApiError(422, str(exc)) from None
        # Each decoded off the event loop; those of a batch request go through the batcher together.
        return list(await asyncio.gather(*(self.batcher.ask_async(query, opts, name) for query, name in queries)))

    # ------------------------------------------------------------------ routes
    def router(self) -> APIRouter:
        router = APIRouter(prefix=PREFIX, dependencies=[Depends(self.check_access)])
        body_doc = {"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ItemSearch.model_json_schema()},
        }}}
        batch_doc = {"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": BatchSearch.model_json_schema()},
        }}}

        @router.post("/search", openapi_extra=body_doc, summary="Search with one image or indexed item", response_class=Json)
        async def search(request: Request, options: Annotated[SearchOptions, Query()]) -> Json:
            """Hits (rank, id, similarity, ref, label), and with ``classify`` the kNN label, with
            ``anomaly`` the score, percentile and verdict: ``retrieval query --json``'s fields."""
            [reply] = await self.answer(request, options, many=False)
            if reply.answer.error is not None:
                raise ApiError(400, reply.answer.error)
            return Json(reply.answer.to_dict())

        @router.post("/search/batch", openapi_extra=batch_doc, summary="Search with several images or indexed items",
                     response_class=Json)
        async def search_batch(request: Request, options: Annotated[SearchOptions, Query()]) -> Json:
            """One answer per query, in order; a query that cannot be read has an ``error``."""
            replies = await self.answer(request, options, many=True)
            return Json({"results": [r.answer.to_dict() for r in replies]})

        @router.get("/info", summary="The index's facts, and the server's searches so far")
        def info() -> dict[str, Any]:
            b = self.batcher
            return {**self.service.facts().to_dict(),
                    "server": {"searches": b.answered, "passes": b.batches, "max_batch": b.max_batch}}

        @router.get("/items/{item_id}", summary="An indexed item's ref, label and content hash")
        def item(item_id: int) -> dict[str, Any]:
            i = self.item_id(ItemRef(id=item_id))
            items = self.service.store.items
            return {"id": i, "ref": items.refs[i], "label": items.labels[i], "hash": items.hashes[i] or None}

        @router.get("/items/{item_id}/image", summary="An indexed item's image", response_class=Response)
        def item_image(item_id: int) -> Response:
            i = self.item_id(ItemRef(id=item_id))
            try:
                path = self.source.file(i)  # the id is known: it can only refuse a file outside the folders
            except UserError as exc:
                raise ApiError(403, str(exc)) from None
            if path is not None:
                if not path.is_file():
                    raise ApiError(404, f"item {i}: {path} no longer exists")
                return FileResponse(path)
            buf = io.BytesIO()
            try:
                self.source.open(i).save(buf, "PNG")
            except UserError as exc:
                raise ApiError(404, str(exc)) from None
            return Response(buf.getvalue(), media_type="image/png")

        @router.get("/duplicates", summary="Near-duplicate groups (retrieval duplicates --json)")
        def duplicates(threshold: Annotated[float | None, Query(ge=-1, le=1)] = None,
                       pixel_threshold: Annotated[float | None, Query(ge=-1, le=1)] = None,
                       k: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
            from retrieval.duplicates import report

            try:
                chosen = self.service.duplicate_threshold(threshold, pixel_threshold)
            except UserError as exc:  # a pixel threshold for an index without thumbnails
                raise ApiError(422, str(exc)) from None
            return report(self.service.store, chosen, k).to_dict()

        return router


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def add_api(app: FastAPI, batcher: Batcher, access: Access = Access(), max_body: int = MAX_BODY) -> None:
    """Add the API's routes, its JSON errors and its body limit to ``app``."""
    api = Api(batcher, access)
    app.include_router(api.router())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_option(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(list(exc.errors()))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(BodyLimit, limit=max_body)


def api_app(batcher: Batcher, access: Access = Access(), max_body: int = MAX_BODY) -> FastAPI:
    """A FastAPI application serving the API alone (the UI is mounted on it by the server)."""
    app = FastAPI(title="Image retrieval API", version="1", docs_url=f"{PREFIX}/docs",
                  openapi_url=f"{PREFIX}/openapi.json", redoc_url=None)
    add_api(app, batcher, access, max_body)
    return app
