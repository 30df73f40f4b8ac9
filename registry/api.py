"""HTTP handlers for the state of the host: /gpus, health, readiness, metrics, OpenAPI."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from registry import keys
from registry.errors import JSON, validated_query
from registry.gpus_report import gpus_body
from registry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from registry.watch.conditional import watched_json

routes = web.RouteTableDef()


# -- state of the host ------------------------------------------------------------------


@routes.get("/gpus")
async def gpus(request: web.Request) -> web.Response:
    app = request.app
    return await watched_json(
        request, lambda: gpus_body(app[keys.VIEW], app.get(keys.POLLER)), app[keys.FEED]
    )


@routes.get("/healthz")
async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[keys.DATABASE].problems()
    if not request.app[keys.VIEW].loaded:
        problems.append("catalog not loaded yet")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready", "problems": []})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    if (fleet := request.app.get(keys.FLEET)) is not None:
        await fleet.hosts()  # cached; read only as often as scrapes come
    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


class OpenApiQuery(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal["3.1", "3.2"] = Field(
        default="3.1",
        description="3.1, what code generators read; 3.2 models the event stream's items.",
    )


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    from registry.openapi import openapi_json

    query = validated_query(request, OpenApiQuery)
    return web.Response(text=openapi_json(query.version), content_type=JSON)
