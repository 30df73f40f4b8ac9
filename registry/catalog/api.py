"""The catalog's HTTP handlers. Reads are answered from the in-memory view; writes go through
the store, then straight into the view."""

from __future__ import annotations

import json

from aiohttp import web

from registry import keys
from registry.auth import Role, require
from registry.bodies import read_limited, validated_body
from registry.catalog.document import CatalogInvalid, parse_catalog
from registry.catalog.schemas import ApplyQuery, ModelCreate, ModelPatch
from registry.catalog.store import DuplicateName
from registry.database import UNAVAILABLE_ERRORS
from registry.errors import http_error, unprocessable, validated_query
from registry.model import CatalogModel
from registry.observe import Handler
from registry.page_cache import CachedBody
from registry.schemas import ListQuery
from registry.watch.conditional import cached_json, json_answer, watched_json

_BIGINT_MAX = 2**63 - 1
CATALOG_MAX_BYTES = 16 * 1024 * 1024  # PUT /models only; every other body: 64 KiB

routes = web.RouteTableDef()


@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    view = request.app[keys.VIEW]
    if "If-None-Match" not in request.headers:  # the hot path
        return json_answer(view.listing(request.raw_path, lambda: _list_query(request)))
    query = view.queries.get(request.raw_path, lambda: _list_query(request))
    return await watched_json(request, lambda: view.page(query), request.app[keys.FEED])


def _list_query(request: web.Request) -> ListQuery:
    return validated_query(request, ListQuery)


def model_id_of(request: web.Request) -> int:
    """The `{id}` of a /models/{id} path: 422 when it is no integer, 404 when out of range."""
    raw = request.match_info["id"]
    try:
        model_id = int(raw)
    except ValueError:
        raise unprocessable(
            [
                {
                    "type": "int_parsing",
                    "loc": ["path", "id"],
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                    "input": raw,
                }
            ]
        ) from None
    if not 1 <= model_id <= _BIGINT_MAX:
        raise http_error(web.HTTPNotFound, "Not Found")
    return model_id


@routes.get("/models/{id}")
async def get_model(request: web.Request) -> web.Response:
    model_id, view = model_id_of(request), request.app[keys.VIEW]
    return await watched_json(request, lambda: view.single(model_id), request.app[keys.FEED])


# -- writes -------------------------------------------------------------------------------


def _admin_write(handler: Handler) -> Handler:
    """Authenticate, then run the write; a database that is down answers 503."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        require(request, Role.ADMIN)
        try:
            return await handler(request)
        except UNAVAILABLE_ERRORS:
            raise http_error(
                web.HTTPServiceUnavailable, "database unavailable; try again later"
            ) from None

    return wrapped


def _show_written(request: web.Request, model: CatalogModel) -> CachedBody:
    """Put a model this daemon just wrote into its view at once, and return its JSON."""
    view = request.app[keys.VIEW]
    view.apply_changes([model.id], [model])
    cached = view.single(model.id)
    assert cached is not None
    return cached


@routes.post("/models")
@_admin_write
async def create_model(request: web.Request) -> web.StreamResponse:
    data = await validated_body(request, ModelCreate)
    store = request.app[keys.CATALOG_STORE]
    try:
        model = await store.create(data.name, data.vram, data.enabled, data.learn)
    except DuplicateName as exc:
        raise http_error(web.HTTPConflict, str(exc)) from None
    cached = _show_written(request, model)
    response = cached_json(request, cached, status=201)
    response.headers["Location"] = f"/models/{model.id}"
    return response


@routes.patch("/models/{id}")
@_admin_write
async def patch_model(request: web.Request) -> web.StreamResponse:
    model_id = model_id_of(request)
    data = await validated_body(request, ModelPatch)
    if not data.model_fields_set:
        raise unprocessable(
            [
                {
                    "type": "missing",
                    "loc": ["body"],
                    "input": {},
                    "msg": "give at least one of name, vram, enabled, learn",
                }
            ]
        )
    store = request.app[keys.CATALOG_STORE]
    try:
        model = await store.update(
            model_id, name=data.name, vram=data.vram, enabled=data.enabled, learn=data.learn
        )
    except DuplicateName as exc:
        raise http_error(web.HTTPConflict, str(exc)) from None
    if model is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    return cached_json(request, _show_written(request, model))


@routes.put("/models")
@_admin_write
async def apply_catalog(request: web.Request) -> web.StreamResponse:
    """The whole catalog in one request: upsert by name, optionally prune, in one transaction."""
    options = validated_query(request, ApplyQuery)
    body = await read_limited(request, CATALOG_MAX_BYTES)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        issue = {"type": "json_invalid", "loc": ["body"], "msg": f"Invalid JSON: {exc}"}
        raise unprocessable([issue]) from None
    try:
        entries = parse_catalog(document)
    except CatalogInvalid as exc:
        raise unprocessable(exc.issues) from None
    applied = await request.app[keys.CATALOG_STORE].apply(
        entries, prune=options.prune, dry_run=options.dry_run
    )
    request.app[keys.VIEW].apply_changes(applied.changed_ids, applied.written)
    answer = {**applied.plan.answer(), "dry_run": options.dry_run}
    return web.json_response(answer)


@routes.delete("/models/{id}")
@_admin_write
async def delete_model(request: web.Request) -> web.StreamResponse:
    model_id = model_id_of(request)
    if not await request.app[keys.CATALOG_STORE].delete(model_id):
        raise http_error(web.HTTPNotFound, "Not Found")
    request.app[keys.VIEW].apply_changes([model_id], [])
    return web.Response(status=204)
