"""GET /events: the registry as Server-Sent Events (aiohttp-sse).

On connect: event `snapshot` (every model object, capacity, the /gpus body, the reservations).
Then, per generation that changed them: `models` (only the objects that changed, and the ids
deleted), `gpus`, `reservations` (those made or changed, and the ids that ended) and `instances`
(those made, and the ids that ended). Every event's id is the generation it brings the client to;
a client that reconnects with `Last-Event-ID` equal to the current generation is already up to
date, any other gets a fresh snapshot (state, not history). `?name=a,b` limits model objects to
those names. A comment every 15 s (MODEL_REGISTRY_EVENTS_KEEPALIVE) keeps proxies from closing
an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from pydantic import TypeAdapter, ValidationError

from registry import keys
from registry.errors import http_error, unprocessable, validation_issues
from registry.schemas import ModelName
from registry.watch.feed import Batch, Subscription
from registry.watch.slots import StreamSlots

routes = web.RouteTableDef()

CHUNK_BYTES = 64 * 1024
# A stream whose client has not taken a chunk within this long has stopped reading.
STALLED_AFTER_S = 30.0

_NAMES = TypeAdapter(list[ModelName])


def _name_filter(request: web.Request) -> frozenset[str] | None:
    raw = request.query.get("name")
    if raw is None:
        return None
    try:
        # Exactly what the OpenAPI document says (NAME_LIST_PATTERN): no blanks, no spaces.
        names = _NAMES.validate_python(raw.split(","))
    except ValidationError as exc:
        # loc: ["query", "name", position in the list]
        raise unprocessable(validation_issues(exc, "query", "name")) from None
    return frozenset(names)


def _frame(generation: int, event: str, data: str) -> str:
    # JSON from json.dumps has no raw line break, so the data is one `data:` line.
    return f"id: {generation}\r\nevent: {event}\r\ndata: {data}\r\n\r\n"


def _snapshot(request: web.Request, names: frozenset[str] | None) -> tuple[int, bytes]:
    """The snapshot event, encoded. Streams without a filter share one per generation: a
    thousand streams of a 10,000-model catalog hold one copy, not a thousand."""
    app = request.app
    view, feed = app[keys.VIEW], app[keys.FEED]
    if names is None and feed.snapshot is not None and feed.snapshot[0] == view.generation:
        return feed.snapshot
    objects = view.model_objects() if names is None else view.named_model_objects(names)
    models = ",".join(obj for _id, _name, obj in objects)
    gpus = feed.gpus_body().body.decode()
    reservations, instances = feed.reservations_json(), feed.instances_json()
    data = (
        f'{{"generation":{view.generation},"models":[{models}],'
        f'"capacity":{view.capacity_json},"gpus":{gpus},"reservations":{reservations},'
        f'"instances":{instances}}}'
    )
    encoded = (view.generation, _frame(view.generation, "snapshot", data).encode())
    if names is None:
        feed.snapshot = encoded
    return encoded


def _encoded(batch: Batch, names: frozenset[str] | None) -> bytes:
    """The batch's events as the stream's bytes. Streams without a filter (most) share one
    encoding per batch, instead of each formatting the same events again."""
    if names is None and batch.encoded is not None:
        return batch.encoded
    payload = "".join(
        _frame(batch.generation, event, data) for event, data in _batch_events(batch, names)
    ).encode()
    if names is None:
        batch.encoded = payload
    return payload


def _batch_events(batch: Batch, names: frozenset[str] | None) -> list[tuple[str, str]]:
    events = []
    if names is None:
        changed = [obj for _name, obj in batch.models.values()]
        deleted = [str(i) for i in batch.deleted]
    else:  # by name: what this stream asked for, not a walk over every change per stream
        changed, deleted = batch.named(names)
    if changed or deleted:
        models, gone = ",".join(changed), ",".join(deleted)
        events.append(("models", f'{{"models":[{models}],"deleted":[{gone}]}}'))
    if batch.gpus is not None:
        events.append(("gpus", batch.gpus))
    if batch.reservations is not None:
        events.append(("reservations", batch.reservations))
    if batch.instances is not None:
        events.append(("instances", batch.instances))
    return events


class _ChunkedWriter:
    """Writes a stream's events in chunks, each once the previous one has drained, and counts
    what the stream's transport holds against the budget for all streams. A client that does
    not read within STALLED_AFTER_S, or while streams hold more than the budget, is cut off."""

    def __init__(self, request: web.Request, sse: EventSourceResponse, slots: StreamSlots):
        self._request = request
        self._sse = sse
        self._slots = slots
        self._buffered = 0

    async def send(self, payload: bytes) -> None:
        data = memoryview(payload)
        try:
            for start in range(0, len(data), CHUNK_BYTES):
                async with asyncio.timeout(STALLED_AFTER_S):
                    await self._sse.write(data[start : start + CHUNK_BYTES])
                    if not self._account() and self._buffered:
                        self._cut()
                    await self._request.writer.drain()
                self._account()
        except TimeoutError:
            self._cut()

    def close(self) -> None:
        self._slots.rebuffered(self._buffered, 0)
        self._buffered = 0

    def _account(self) -> bool:
        transport = self._request.transport
        size = 0 if transport is None else transport.get_write_buffer_size()
        fits = self._slots.rebuffered(self._buffered, size)
        self._buffered = size
        return fits

    def _cut(self) -> None:
        # Do not wait on a client that stopped reading to close: abort, and free its memory.
        self._slots.counters.cut_off += 1
        if (transport := self._request.transport) is not None:
            transport.abort()
        raise ConnectionResetError("the client stopped reading")


async def _stream(
    request: web.Request,
    writer: _ChunkedWriter,
    subscription: Subscription,
    names: frozenset[str] | None,
    last_event_id: str | None,
) -> None:
    generation = request.app[keys.VIEW].generation
    if last_event_id != str(generation):
        generation, snapshot = _snapshot(request, names)
        await writer.send(snapshot)
    while (batch := await subscription.queue.get()) is not None:
        if subscription.overflowed:  # fell too far behind: relist instead of replaying
            subscription.overflowed = False
            while not subscription.queue.empty():
                if subscription.queue.get_nowait() is None:
                    return
            generation, snapshot = _snapshot(request, names)
            await writer.send(snapshot)
            continue
        if batch.generation <= generation:
            continue  # already in the snapshot this stream started with
        generation = batch.generation
        if payload := _encoded(batch, names):
            await writer.send(payload)


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    names = _name_filter(request)
    feed = request.app[keys.FEED]
    if feed.closed:
        raise http_error(web.HTTPServiceUnavailable, "the daemon is stopping")
    slots = request.app[keys.STREAM_SLOTS]
    started = time.perf_counter()
    with slots.hold(request):
        subscription = feed.subscribe()
        try:
            keepalive_s = request.app[keys.SETTINGS].current.events_keepalive
            async with sse_response(request, ping_interval=keepalive_s) as sse:
                # aiohttp-sse's keep-alive writes find a client that went away; end the stream
                # then, not at the next event, so that it does not hold its connection slot.
                gone = asyncio.create_task(sse.wait())
                gone.add_done_callback(lambda _: subscription.offer(None))
                writer = _ChunkedWriter(request, sse, slots)
                try:
                    # The client went away, or was cut off for not reading.
                    with contextlib.suppress(ConnectionResetError):
                        await _stream(request, writer, subscription, names, sse.last_event_id)
                finally:
                    writer.close()
                    gone.cancel()
        finally:
            feed.unsubscribe(subscription)
            request[keys.WAITED_S] = time.perf_counter() - started
    return sse
