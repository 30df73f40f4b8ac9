"""/instances: bind a reservation to the process that loaded it, adopt a loaded model, list,
and report an unload."""

from __future__ import annotations

from aiohttp import web

from registry import keys
from registry.admission.api import json_answer, not_recorded, require_priority
from registry.admission.book import NotFound, TooMany
from registry.admission.schemas import InstanceCreate, InstancePatch, InstanceQuery
from registry.auth import Role, check_owner, require
from registry.bodies import validated_body
from registry.container_pid import Unresolved, in_host_terms
from registry.errors import http_error, unprocessable, validated_query
from registry.instance import Instance
from registry.instances.book import (
    AlreadyLoaded,
    InstanceBook,
    PidNotOnGpu,
    ProcessesUnknown,
)
from registry.paging import pagination

routes = web.RouteTableDef()


def _instances(request: web.Request) -> InstanceBook:
    return request.app[keys.INSTANCES]


def _found(request: web.Request) -> Instance:
    instance = _instances(request).get(request.match_info["id"])
    if instance is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    return instance


def _refusal(status: int, reason: str, detail: str, **extra: object) -> web.Response:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return json_answer({"detail": detail, "reason": reason, **extra}, status, headers)


@routes.post("/instances")
async def create_instance(request: web.Request) -> web.StreamResponse:
    caller = require(request, Role.SCHEDULER)
    data = await validated_body(request, InstanceCreate)
    require_priority(caller, data.priority)
    app = request.app
    view, instances, book = app[keys.VIEW], _instances(request), app[keys.BOOK]
    reservation = None
    if data.reservation is not None:
        reservation = book.get(data.reservation)
        if reservation is None:
            raise http_error(web.HTTPNotFound, f"no open reservation {data.reservation!r}")
        check_owner(caller, reservation.owner, "reservation")
        gpu, model = reservation.gpu_uuid, reservation.model
    else:
        assert data.gpu is not None and data.model is not None
        gpu, model = data.gpu, data.model
        if view.model_by_name(model) is None:
            raise http_error(web.HTTPNotFound, f"no model named {model!r} in the catalog")
    try:
        in_container = await in_host_terms(request, data)
    except Unresolved as exc:
        return _refusal(422, "pid_unresolved", str(exc))
    pid = in_container or data.pid or (reservation.pid if reservation is not None else None)
    if pid is None:
        issue = {"type": "missing", "loc": ["body", "pid"], "msg": "Field required", "input": None}
        raise unprocessable(
            [{**issue, "msg": "give the loading process: this reservation names none"}]
        )
    snapshot = view.snapshot
    if not snapshot.known:
        return _refusal(503, "gpu_state_unknown", f"GPU state is {snapshot.state.value}")
    device = next((d for d in snapshot.devices if d.uuid == gpu), None)
    if device is None:
        raise http_error(web.HTTPNotFound, f"no GPU with uuid {gpu!r} on this host")
    if device.processes_known and not device.has_process(pid):
        # Not in the latest poll: maybe it just made its CUDA context. Look again (once per
        # poll interval, however many requests ask).
        poller = app.get(keys.POLLER)
        if poller is not None:
            fresh = await poller.recent_poll(app[keys.SETTINGS].current.gpu_call_timeout + 1)
            device = next((d for d in fresh.devices if d.uuid == gpu), device)
        if data.reservation is not None and (reservation := book.get(data.reservation)) is None:
            raise http_error(web.HTTPNotFound, f"no open reservation {data.reservation!r}")
    try:
        if reservation is not None:
            instance = instances.bind(
                reservation,
                pid,
                device,
                caller.owner,
                sessions=data.sessions,
                pinned=data.pinned,
                priority=data.priority,
            )
        else:
            assert data.model is not None
            instance = instances.adopt(
                data.model,
                device,
                pid,
                data.holder,
                caller.owner,
                teaches=caller.role is Role.ADMIN,
                sessions=data.sessions,
                pinned=data.pinned,
                priority=data.priority,
            )
    except AlreadyLoaded as exc:
        return _refusal(409, "already_loaded", str(exc), instance=exc.existing.id)
    except ProcessesUnknown as exc:
        return _refusal(503, "processes_unknown", str(exc))
    except PidNotOnGpu as exc:
        return _refusal(409, "pid_not_on_gpu", str(exc))
    except TooMany as exc:
        return _refusal(429, "too_many", str(exc))
    except NotFound as exc:
        raise http_error(web.HTTPNotFound, str(exc)) from None
    try:
        await book.persist()
    except OSError as exc:
        instances.undo(instance, reservation)
        raise not_recorded(exc) from None
    return json_answer(instances.describe(instance), 201, {"Location": f"/instances/{instance.id}"})


@routes.get("/instances")
async def list_instances(request: web.Request) -> web.StreamResponse:
    query, instances = validated_query(request, InstanceQuery), _instances(request)
    listed = instances.listed(query.model)
    page = listed[query.skip : query.skip + query.limit]
    return json_answer(
        {
            "data": [instances.describe(i) for i in page],
            "pagination": pagination(len(listed), query.skip, query.limit),
        }
    )


@routes.get("/instances/{id}")
async def get_instance(request: web.Request) -> web.StreamResponse:
    return json_answer(_instances(request).describe(_found(request)))


@routes.patch("/instances/{id}")
async def change_instance(request: web.Request) -> web.StreamResponse:
    """Its owner (or an admin) says how it stands: sessions, pin, priority, or ready."""
    caller = require(request, Role.SCHEDULER)
    check_owner(caller, _found(request).owner, "instance")
    data = await validated_body(request, InstancePatch)
    require_priority(caller, data.priority)
    instance = _found(request)  # again: it may have ended while the body was read
    changed = _instances(request).change(
        instance,
        sessions=data.sessions,
        pinned=data.pinned,
        priority=data.priority,
        ready=bool(data.ready),
    )
    try:
        await request.app[keys.BOOK].persist()
    except OSError as exc:
        raise not_recorded(exc) from None
    return json_answer(_instances(request).describe(changed))


@routes.delete("/instances/{id}")
async def delete_instance(request: web.Request) -> web.StreamResponse:
    caller = require(request, Role.SCHEDULER)
    check_owner(caller, _found(request).owner, "instance")
    if _instances(request).end(request.match_info["id"], "unloaded") is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    return web.Response(status=204)
