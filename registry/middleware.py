"""One middleware for every request: request id, JSON errors, metrics and the access log."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from registry.config import AccessLog
from registry.errors import JSON, error_response
from registry.logs import get_logger, request_id_var
from registry.metrics import Metrics

log = get_logger("registry.http")
access_log = get_logger("registry.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Ids are a per-process random prefix and a counter: unique enough, and far cheaper than uuid4.
_ID_PREFIX = os.urandom(4).hex()
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


def _as_json(exc: web.HTTPException) -> web.Response:
    headers = {
        key: value
        for key, value in exc.headers.items()
        if key.lower() not in ("content-type", "content-length")
    }
    if exc.content_type == JSON and exc.text:
        return web.Response(status=exc.status, text=exc.text, content_type=JSON, headers=headers)
    return error_response(exc.status, exc.reason, headers=headers)


def make_middleware(metrics: Metrics, access: AccessLog, slow_request_ms: float) -> Middleware:
    slow_s = slow_request_ms / 1000

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-Id")
        if request_id is None or _REQUEST_ID.match(request_id) is None:
            request_id = _new_request_id()
        token = request_id_var.set(request_id)
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _as_json(exc)
            except Exception:
                log.exception("unhandled error", method=request.method, path=request.path)
                response = error_response(500, "Internal Server Error")
            response.headers["X-Request-Id"] = request_id
            elapsed = time.perf_counter() - started
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            status = response.status
            metrics.observe_request(route, request.method, status, elapsed)
            if access is AccessLog.ALL or (
                access is AccessLog.DEFAULT
                and (status >= 400 or elapsed > slow_s or request.method not in _QUIET_METHODS)
            ):
                access_log.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    remote=request.remote,
                )
            return response
        finally:
            request_id_var.reset(token)

    return observe
