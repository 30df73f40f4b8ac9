"""GET /models/{id}/footprint: what the model's loads took, per GPU product, and what admission
books; DELETE (admin) discards its samples, for when its serving setup changed."""

from __future__ import annotations

import json

from aiohttp import web

from registry import keys
from registry.auth import Role, require
from registry.catalog.api import model_id_of
from registry.database import UNAVAILABLE_ERRORS
from registry.errors import JSON, http_error
from registry.footprint import shrink_floor
from registry.model import CatalogModel

routes = web.RouteTableDef()


def _model(request: web.Request) -> CatalogModel:
    model = request.app[keys.VIEW].model(model_id_of(request))
    if model is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    return model


@routes.get("/models/{id}/footprint")
async def get_footprint(request: web.Request) -> web.Response:
    model = _model(request)
    app = request.app
    try:
        summaries = await app[keys.FOOTPRINT_STORE].summaries([model.name])
    except UNAVAILABLE_ERRORS:
        raise http_error(
            web.HTTPServiceUnavailable, "database unavailable; try again later"
        ) from None
    view = app[keys.VIEW]
    capacity = view.capacity
    assessment = capacity.assess(model)
    effective = capacity.sizes(model, assessment).effective
    footprints = view.footprints
    reload_s, estimated = view.reload_s_on_placement(model, assessment)
    body = {
        "model": model.name,
        "declared_mib": model.vram,
        "effective_mib": effective,
        "source": footprints.source.value,  # MODEL_REGISTRY_VRAM_SOURCE
        "floor_mib": shrink_floor(model.vram, footprints.max_shrink),
        "learn": model.learn,
        "reload_s": reload_s,
        "reload_estimated": estimated,
        "observed": [
            {**s.to_api(), "below_declared": footprints.below_declared(model, s.gpu_name)}
            for s in summaries
        ],
    }
    return web.Response(text=json.dumps(body), content_type=JSON)


@routes.delete("/models/{id}/footprint")
async def delete_footprint(request: web.Request) -> web.Response:
    require(request, Role.ADMIN)
    model = _model(request)
    try:
        await request.app[keys.FOOTPRINT_STORE].forget(model.name)
    except UNAVAILABLE_ERRORS:
        raise http_error(
            web.HTTPServiceUnavailable, "database unavailable; try again later"
        ) from None
    request.app[keys.VIEW].set_footprint(model.name, {})
    return web.Response(status=204)
