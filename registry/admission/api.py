"""HTTP handlers for /reservations: reserve, look, renew, release."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from registry import keys
from registry.admission.book import (
    NotFound,
    Refused,
    ReservationBook,
    ReservationRequest,
    TooMany,
    Trial,
)
from registry.admission.schemas import (
    CONTAINER_FIELDS,
    ReservationCreate,
    ReservationPatch,
    ReservationQuery,
)
from registry.auth import Caller, Role, check_owner, require
from registry.bodies import validated_body
from registry.capacity import Reason
from registry.container_pid import Unresolved, in_host_terms
from registry.errors import JSON, http_error, validated_query
from registry.logs import get_logger
from registry.reservation import Reservation

log = get_logger("registry.admission")

routes = web.RouteTableDef()

_REFUSAL_STATUS = {
    Reason.INSUFFICIENT_VRAM: 409,
    Reason.TOO_LARGE: 409,  # never here: no Retry-After, nothing to wait for
    Reason.DISABLED: 409,
    Reason.GPU_STATE_UNKNOWN: 503,
}
HIGH_PRIORITY = 50  # above this only an admin token may ask


def json_answer(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type=JSON, headers=headers)


def _refusal(refusal: Refused, retry_after_s: float) -> web.Response:
    status = _REFUSAL_STATUS[refusal.reason]
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if status == 503 else None
    return json_answer({"detail": refusal.detail, "reason": refusal.reason.value}, status, headers)


def not_recorded(exc: OSError) -> web.HTTPException:
    log.error("could not record reservations on disk", error=str(exc))
    return http_error(
        web.HTTPServiceUnavailable,
        f"the reservation could not be recorded on disk ({exc.strerror or exc}); nothing changed",
    )


def _book(request: web.Request) -> ReservationBook:
    return request.app[keys.BOOK]


def _found(request: web.Request) -> Reservation:
    reservation = _book(request).get(request.match_info["id"])
    if reservation is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    return reservation


def require_priority(caller: Caller, priority: int | None) -> None:
    """A priority above 50 outranks what others load: only an admin token may ask for it."""
    if priority is not None and priority > HIGH_PRIORITY and caller.role is not Role.ADMIN:
        raise http_error(
            web.HTTPForbidden,
            f"priority {priority} is above {HIGH_PRIORITY}: only an admin token may ask for it",
        )


@routes.post("/reservations")
async def create_reservation(request: web.Request) -> web.StreamResponse:
    caller = require(request, Role.SCHEDULER)
    query = request.app[keys.VIEW].queries.get(
        f"POST {request.raw_path}", lambda: validated_query(request, ReservationQuery)
    )
    data = await validated_body(request, ReservationCreate)
    require_priority(caller, data.priority)
    book = _book(request)
    try:
        in_container = await in_host_terms(request, data)
    except Unresolved as exc:
        return json_answer({"detail": str(exc), "reason": "pid_unresolved"}, 422)
    fields = data.model_dump(exclude=set(CONTAINER_FIELDS))
    if in_container is not None:
        fields["pid"] = in_container
    asked = ReservationRequest(**fields, owner=caller.owner)
    try:
        if query.dry_run:
            return json_answer(_trial(request, book.trial(asked)))
        reservation = book.reserve(asked)
    except NotFound as exc:
        raise http_error(web.HTTPNotFound, str(exc)) from None
    except Refused as refusal:
        return _refusal(refusal, request.app[keys.SETTINGS].current.poll_interval)
    except TooMany as exc:
        return json_answer({"detail": str(exc), "reason": "too_many"}, 429, {"Retry-After": "1"})
    try:
        await book.persist()
    except OSError as exc:
        book.discard(reservation.id)
        raise not_recorded(exc) from None
    return json_answer(
        book.describe(reservation),
        # 202: granted, and booked, but its memory is free only once `awaiting` has gone.
        status=201 if reservation.awaiting is None else 202,
        headers={"Location": f"/reservations/{reservation.id}"},
    )


def _trial(request: web.Request, trial: Trial) -> dict[str, object]:
    victims = () if trial.plan is None else trial.plan.instance_ids
    instances = request.app[keys.INSTANCES]
    unload = [instances.describe(i) for v in victims if (i := instances.get(v)) is not None]
    return {
        "fits": not unload,
        "gpu": {"uuid": trial.gpu, "index": trial.index},
        "vram_mib": trial.reservation_vram,
        "unload": unload,
        "frees_mib": 0 if trial.plan is None else trial.plan.frees_mib,
    }


@routes.get("/reservations")
async def list_reservations(request: web.Request) -> web.StreamResponse:
    book = _book(request)
    return json_answer({"data": [book.describe(r) for r in book.open()]})


@routes.get("/reservations/{id}")
async def get_reservation(request: web.Request) -> web.StreamResponse:
    return json_answer(_book(request).describe(_found(request)))


@routes.patch("/reservations/{id}")
async def renew_reservation(request: web.Request) -> web.StreamResponse:
    caller = require(request, Role.SCHEDULER)
    check_owner(caller, _found(request).owner, "reservation")
    data = await validated_body(request, ReservationPatch)
    before = _found(request)  # again: it may have ended while the body was read
    book = _book(request)
    renewed = book.renew(before.id, ttl_s=data.ttl_s, pid=data.pid)
    assert renewed is not None
    try:
        await book.persist()
    except OSError as exc:
        if book.get(before.id) is not None:
            book.restore(before)
        raise not_recorded(exc) from None
    return json_answer(book.describe(renewed))


@routes.delete("/reservations/{id}")
async def release_reservation(request: web.Request) -> web.StreamResponse:
    caller = require(request, Role.SCHEDULER)
    check_owner(caller, _found(request).owner, "reservation")
    book = _book(request)
    if book.release(request.match_info["id"]) is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    book.persist_soon()
    return web.Response(status=204)
