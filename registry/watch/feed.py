"""Turns the view's changes into what watchers need: a wake-up per generation for blocking GETs,
and per generation one batch of what changed (models, GPUs, reservations) for event streams.

The batch is computed once per generation and shared by every stream. Model objects are
compared only while a stream is open: without one, a GPU change costs no work per model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.page_cache import CachedBody
from registry.reservation import Reservation
from registry.view import CatalogView

STREAM_BACKLOG = 64  # batches a stream may fall behind before it gets a fresh snapshot


@dataclass(slots=True)
class Batch:
    """What one generation changed; None where that part did not change."""

    generation: int
    models: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (name, JSON)
    deleted: dict[int, str] = field(default_factory=dict)  # id -> name
    gpus: str | None = None
    reservations: str | None = None  # {"reservations": [made or changed], "ended": [ids]}
    instances: str | None = None  # {"instances": [made], "ended": [ids]}
    encoded: bytes | None = None  # as streams without a filter send it, once encoded
    _by_name: dict[str, list[tuple[int, str | None]]] | None = None  # name -> (id, JSON or gone)

    def named(self, names: frozenset[str]) -> tuple[list[str], list[str]]:
        """The changed objects and deleted ids of models with these names, in id order. The
        index by name is made once per batch, for every stream with a filter."""
        if self._by_name is None:
            self._by_name = {}
            for model_id, (name, obj) in self.models.items():
                self._by_name.setdefault(name, []).append((model_id, obj))
            for model_id, name in self.deleted.items():
                self._by_name.setdefault(name, []).append((model_id, None))
        found = sorted(item for name in names for item in self._by_name.get(name, ()))
        changed = [obj for _id, obj in found if obj is not None]
        deleted = [str(model_id) for model_id, obj in found if obj is None]
        return changed, deleted


class Subscription:
    """One event stream's queue of batches; `None` in it means "the daemon is stopping"."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=STREAM_BACKLOG)
        self.overflowed = False

    def offer(self, batch: Batch | None) -> None:
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overflowed = True  # the stream catches up with a snapshot instead
            if batch is None:
                self.queue.get_nowait()
                self.queue.put_nowait(None)


class ChangeFeed:
    def __init__(
        self,
        view: CatalogView,
        gpus_body: Callable[[], CachedBody],
        reservations_json: Callable[[], str],
        instances_json: Callable[[], str] = lambda: "[]",
        describe_reservation: Callable[[Reservation], dict[str, object]] | None = None,
    ) -> None:
        self._view = view
        self._describe_reservation = describe_reservation
        self.gpus_body = gpus_body
        self.reservations_json = reservations_json
        self.instances_json = instances_json
        self._instances_made: dict[str, dict[str, object]] = {}
        self._instances_ended: dict[str, None] = {}
        self._waiters: set[asyncio.Future[bool]] = set()
        self._subscriptions: set[Subscription] = set()
        self._models: dict[int, tuple[str, str]] | None = None  # as streams last saw them
        self._gpus_etag = ""
        # Reservations made or changed, and ended, since the last batch (only while a stream
        # is open): a batch carries these, never the whole book.
        self._reservations_put: dict[str, Reservation] = {}
        self._reservations_ended: dict[str, None] = {}
        self._reservations_reasons: dict[str, str] = {}  # why they ended, where it says
        self._scheduled = False
        self.closed = False
        # The last snapshot event without a name filter, encoded: (generation, bytes).
        self.snapshot: tuple[int, bytes] | None = None
        view.subscribe(self._on_change)

    @property
    def waiting(self) -> int:
        """Blocking GETs waiting for the next change now."""
        return len(self._waiters)

    @property
    def streams(self) -> int:
        """Event streams open now."""
        return len(self._subscriptions)

    # -- blocking GETs --------------------------------------------------------------------

    async def wait_for_change(self, timeout_s: float) -> bool:
        """Wait for the next generation; False on timeout or when the daemon is stopping."""
        if self.closed:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        # One future per waiter and a plain timer: a thousand waiting GETs wake with one loop
        # over a set, without a shield or a cancellation scope each.
        timer = loop.call_later(timeout_s, _settle, waiter, False)
        self._waiters.add(waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)

    # -- event streams --------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        if self._models is None:  # the first stream: start comparing from here
            self._models = self._current_models()
            self._gpus_etag = self.gpus_body().etag
        subscription = Subscription()
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        if not self._subscriptions:
            self._models = None
            self.snapshot = None  # no stream left to share it
            self._reservations_put, self._reservations_ended = {}, {}
            self._reservations_reasons = {}
            self._instances_made, self._instances_ended = {}, {}

    def close(self) -> None:
        """The daemon is stopping: every waiter and stream ends now."""
        self.closed = True
        self._wake_waiters(False)
        for subscription in self._subscriptions:
            subscription.offer(None)

    # -- internals ------------------------------------------------------------------------

    def _wake_waiters(self, changed: bool) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            _settle(waiter, changed)

    def _on_change(self) -> None:
        self._wake_waiters(True)
        if not self._subscriptions:
            return
        self._note_reservations(*self._view.last_reservations_change)
        self._reservations_reasons.update(self._view.last_reservation_reasons)
        made, ended = self._view.last_instances_change
        for instance in made:
            self._instances_made[str(instance["id"])] = instance
        for instance_id in ended:
            if self._instances_made.pop(instance_id, None) is None:
                self._instances_ended[instance_id] = None
        # Changes made in one turn of the event loop make one batch.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _note_reservations(self, put: list[Reservation], ended: list[str]) -> None:
        for reservation in put:
            self._reservations_put[reservation.id] = reservation
            self._reservations_ended.pop(reservation.id, None)
        for reservation_id in ended:
            self._reservations_put.pop(reservation_id, None)
            self._reservations_ended[reservation_id] = None

    def _instances_delta(self) -> str | None:
        if not self._instances_made and not self._instances_ended:
            return None
        delta = {
            "instances": list(self._instances_made.values()),
            "ended": list(self._instances_ended),
        }
        self._instances_made, self._instances_ended = {}, {}
        return json.dumps(delta)

    def _reservations_delta(self) -> str | None:
        put, ended = self._reservations_put, self._reservations_ended
        if not put and not ended:
            return None
        capacity = self._view.capacity
        describe = self._describe_reservation or (lambda r: r.to_api(capacity.pending_of(r)))
        delta: dict[str, object] = {
            "reservations": [describe(r) for r in put.values()],
            "ended": list(ended),
        }
        reasons = {i: why for i, why in self._reservations_reasons.items() if i in ended}
        if reasons:
            delta["reasons"] = reasons  # why those it names ended (a claim withdrawn, say)
        self._reservations_put, self._reservations_ended = {}, {}
        self._reservations_reasons = {}
        return json.dumps(delta)

    def _current_models(self) -> dict[int, tuple[str, str]]:
        return {model_id: (name, obj) for model_id, name, obj in self._view.model_objects()}

    def _publish(self) -> None:
        self._scheduled = False
        if not self._subscriptions or self._models is None or self.closed:
            return
        models = self._current_models()
        previous = self._models
        changed = {i: pair for i, pair in models.items() if previous.get(i) != pair}
        deleted = {i: name for i, (name, _obj) in previous.items() if i not in models}
        self._models = models
        gpus = self.gpus_body()
        batch = Batch(
            self._view.generation,
            changed,
            deleted,
            gpus.body.decode() if gpus.etag != self._gpus_etag else None,
            self._reservations_delta(),
            self._instances_delta(),
        )
        self._gpus_etag = gpus.etag
        for subscription in self._subscriptions:
            subscription.offer(batch)


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
