"""What every request goes through: request id, JSON errors, metrics and the access log.

Handlers are wrapped one by one instead of through an aiohttp middleware: the middleware
machinery alone costs about a tenth of the listing's throughput, and the listing is the
product's hot path. A catch-all route answers unmatched paths (404) and methods (405).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from registry.config import AccessLog
from registry.errors import JSON, error_response
from registry.keys import WAITED_S
from registry.logs import get_logger, request_id_var
from registry.metrics import Metrics

log = get_logger("registry.http")
access_log = get_logger("registry.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNMATCHED = "unmatched"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_QUIET_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ALL_METHODS = frozenset({*_QUIET_METHODS, "POST", "PUT", "PATCH", "DELETE"})
# Ids are a per-process random prefix and a counter: unique enough, and far cheaper than uuid4.
_ID_PREFIX = os.urandom(4).hex()
_id_counter = itertools.count(1)


CLIENT_CLOSED = 499


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id where it sent a sane one, else a new id."""
    given = headers.get("X-Request-Id")
    if given is None or _REQUEST_ID.match(given) is None:
        return f"{_ID_PREFIX}-{next(_id_counter):x}"
    return given


def _as_json(exc: web.HTTPException) -> web.Response:
    headers = {
        key: value
        for key, value in exc.headers.items()
        if key.lower() not in ("content-type", "content-length")
    }
    if exc.content_type == JSON and exc.text:
        return web.Response(status=exc.status, text=exc.text, content_type=JSON, headers=headers)
    return error_response(exc.status, exc.reason, headers=headers)


class Observer:
    """Wraps handlers; `busy_routes` take writes too frequent for the default access log
    (reservations: thousands a second from schedulers), which logs them like reads."""

    def __init__(
        self,
        metrics: Metrics,
        access: AccessLog,
        slow_request_ms: float,
        busy_routes: frozenset[str] = frozenset(),
        gate: Callable[[web.Request], web.StreamResponse | None] | None = None,
    ) -> None:
        self._gate = gate
        self._metrics = metrics
        self._access = access
        self._slow_s = slow_request_ms / 1000
        self._busy_routes = busy_routes

    def wrap(self, route: str, handler: Handler) -> Handler:
        access, slow_s, gate = self._access, self._slow_s, self._gate
        observe = self._metrics.route_requests(route)
        quiet_methods = _ALL_METHODS if route in self._busy_routes else _QUIET_METHODS

        async def observed(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            request_id = request_id_from(request.headers)
            # Set per request, not reset: the next request on this connection sets its own.
            request_id_var.set(request_id)
            try:
                # Who may reach the daemon at all (registry.access): it may answer in place.
                if gate is None or (response := gate(request)) is None:
                    response = await handler(request)
            except web.HTTPException as exc:
                response = _as_json(exc)
            except ConnectionResetError:
                # The client went away mid-request (its body cut short): no one to answer, and
                # no fault of ours. 499 in the access log and metrics, as nginx counts it.
                response = error_response(CLIENT_CLOSED, "the client closed the connection")
            except Exception:
                log.exception("unhandled error", method=request.method, path=request.path)
                response = error_response(500, "Internal Server Error")
            response.headers["X-Request-Id"] = request_id
            elapsed = time.perf_counter() - started
            status = response.status
            method = request.method
            observe(method, status, elapsed)
            # Waiting by request (a blocking GET, an event stream) is not slowness.
            slow = elapsed > slow_s and elapsed - request.get(WAITED_S, 0.0) > slow_s
            if access is AccessLog.ALL or (
                access is AccessLog.DEFAULT
                and (status >= 400 or slow or method not in quiet_methods)
            ):
                access_log.info(
                    "request",
                    method=method,
                    path=request.path,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    remote=request.remote,
                )
            return response

        return observed

    def add_routes(self, app: web.Application, *tables: web.RouteTableDef) -> None:
        """Register every table's routes, each wrapped, then the catch-all for everything else."""
        for route in (route for table in tables for route in table):
            assert isinstance(route, web.RouteDef)
            wrapped = self.wrap(route.path, route.handler)
            web.RouteDef(route.method, route.path, wrapped, route.kwargs).register(app.router)
        app.router.add_route("*", "/{unmatched_path:.*}", self.wrap(UNMATCHED, _unmatched))


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """404, or 405 with Allow when the path exists under other methods."""
    fallback = request.match_info.route.resource  # this catch-all itself
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not fallback:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        return error_response(
            405, "Method Not Allowed", headers={"Allow": ",".join(sorted(allowed))}
        )
    return error_response(404, "Not Found")
