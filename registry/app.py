"""The application factory. Every resource is acquired and released in a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from gpu import GpuBackend, GpuPoller, GpuSnapshot, GpuState
from registry import keys
from registry.access import AccessGate, is_loopback
from registry.admission.api import routes as admission_routes
from registry.admission.book import Clock, ReservationBook, utc_now
from registry.admission.claims import Claims, RoomPolicy
from registry.admission.ledger import ReservationLedger
from registry.admission.metrics import ClaimStats, ReservationStats
from registry.api import routes
from registry.capacity import Margins
from registry.catalog.api import routes as catalog_routes
from registry.catalog.store import CatalogStore
from registry.catalog.sync import CatalogSync
from registry.config import GpuBackendName, LiveSettings, Settings
from registry.database import Database, create_pool, migrated_database
from registry.embedded_supervisor import EmbeddedStats, EmbeddedSupervisor
from registry.fleet.api import routes as fleet_routes
from registry.fleet.metrics import FleetStats
from registry.fleet.newest import NewestReservations
from registry.fleet.own_host import OwnOverlay
from registry.fleet.publisher import FleetPublisher
from registry.fleet.reader import FleetReader
from registry.footprint import Footprints
from registry.footprints.api import routes as footprint_routes
from registry.footprints.recorder import FootprintRecorder
from registry.footprints.store import FootprintStore
from registry.gpus_report import gpus_body
from registry.hot_reads import LISTING_ROUTE, HotReads
from registry.instance import this_boot
from registry.instances.api import routes as instance_routes
from registry.instances.book import InstanceBook
from registry.instances.metrics import InstanceStats
from registry.logs import get_logger
from registry.metrics import Flag, Metrics
from registry.observe import Observer
from registry.ops_view.page import routes as status_routes
from registry.ops_view.page import setup_templates
from registry.page_cache import PageCache
from registry.view import CatalogView
from registry.watch.events import routes as watch_routes
from registry.watch.feed import ChangeFeed
from registry.watch.metrics import WatchStats
from registry.watch.slots import StreamSlots

log = get_logger("registry.app")

MAX_BODY_BYTES = 64 * 1024
# Request line and header limits for the HTTP server: long enough for a 20,000-character
# query string (aiohttp's default is 8190). Longer lines get aiohttp's own plain-text 400.
# After an answer to a request whose body was not read (refused, or too slow), aiohttp reads
# what is left of it for at most lingering_time before closing: one second, not ten.
SERVER_OPTIONS: dict[str, Any] = {
    "max_line_size": 65536,
    "max_field_size": 65536,
    "lingering_time": 1.0,
}


def margins_from(settings: Settings) -> Margins:
    return Margins(mib=settings.vram_margin_mib, percent=settings.vram_margin_percent)


def build_backend(settings: Settings) -> GpuBackend | None:
    if settings.gpu_backend is GpuBackendName.NONE:
        return None
    if settings.gpu_backend is GpuBackendName.SIMULATED:
        from gpu.simulated import SimulatedBackend

        return SimulatedBackend(settings.gpu_simulated_file)
    from gpu.nvml import NvmlBackend

    return NvmlBackend()


def spawn(app: web.Application, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a background task that must live as long as the app: if it ends, the process ends."""
    task = asyncio.create_task(coro, name=name)

    def on_done(finished: asyncio.Task[None]) -> None:
        # Only its cleanup context cancels a task: when the app stops, or when a later
        # context fails at start (a duplicate host id, say). Neither is a death.
        if finished.cancelled():
            return
        error = None if finished.cancelled() else finished.exception()
        log.error("background task died", task=name, error=repr(error), exc_info=error)
        app[keys.FATAL].set()

    task.add_done_callback(on_done)
    return task


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it to end. It is cancelled again each second
    until it does: on Python 3.11 `asyncio.wait_for` can swallow a cancellation that arrives as
    the awaitable it wraps completes (CPython gh-86296), and a loop that swallowed the only one
    would run, and keep the app from stopping, forever."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pool; an embedded server started here is looked after while the app runs."""
    settings = app[keys.SETTINGS].current
    async with migrated_database(
        settings.database_dsn(), settings.state_dir, host_id=settings.host_id
    ) as server:
        supervisor = None if server.embedded is None else EmbeddedSupervisor(server.embedded)
        database = Database(server.dsn, await create_pool(server.dsn), supervisor)
        try:
            app[keys.DATABASE] = database
            if supervisor is None:
                yield
                return
            with app[keys.METRICS].collecting(EmbeddedStats(supervisor)):
                task = spawn(app, supervisor.run(), "embedded-postgres-supervisor")
                yield
                await stop_task(task)  # before the server stops: that exit is no crash
        finally:
            await database.close()


async def admission_ctx(app: web.Application, *, clock: Clock) -> AsyncIterator[None]:
    """The reservations this host promised, from the state directory; expired ones end."""
    settings = app[keys.SETTINGS].current
    boot = this_boot()
    ledger = ReservationLedger(settings.state_dir, boot_id=boot)
    book = ReservationBook(app[keys.VIEW], ledger, clock=clock, max_open=settings.max_reservations)
    held = await asyncio.to_thread(ledger.open, book.open, lambda: book.open_count)
    try:
        book.load(held)
        if held:
            log.info(
                "reservations restored",
                open=book.open_count,
                expired=len(held) - book.open_count,
                file=str(ledger.path),
            )
        instances = InstanceBook(
            app[keys.VIEW],
            book,
            ledger,
            clock=clock,
            boot_id=boot,
            max_open=settings.max_instances,
            max_per_owner=settings.instances_per_token(),
            on_sample=app[keys.FOOTPRINTS].sample,
            on_load_time=app[keys.FOOTPRINTS].load_time,
        )
        instances.load(ledger.instances)
        claims = Claims(
            app[keys.VIEW],
            instances,
            clock=clock,
            policy=RoomPolicy(
                settings.idle_after_s, settings.min_residency_s, settings.room_timeout_s
            ),
        )
        claims.attach(book)
        book.claims = claims
        instances.on_gone = claims.instance_gone
        instances.on_victim_changed = claims.victim_changed
        claims.reconcile(instances.listed)
        if ledger.instances:
            log.info("instances restored", open=instances.open_count)
        app[keys.BOOK] = book
        app[keys.INSTANCES] = instances
        metrics = app[keys.METRICS]
        with (
            metrics.collecting(ReservationStats(book)),
            metrics.collecting(InstanceStats(instances)),
            metrics.collecting(ClaimStats(claims)),
        ):
            task = spawn(app, book.run_expiry(), "reservation-expiry")
            yield
            await stop_task(task)
            await book.persist()
    finally:
        ledger.close()


async def gpu_ctx(
    app: web.Application, *, backend_override: GpuBackend | None
) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS].current
    view = app[keys.VIEW]
    backend = backend_override or build_backend(settings)
    if backend is None:
        log.info("gpu awareness is off (backend none): active = enabled")
        yield
        return
    poller = GpuPoller(
        backend,
        interval_s=settings.poll_interval,
        deadline_s=settings.gpu_call_timeout,
        on_poll=app[keys.METRICS].observe_poll,
    )
    poller.subscribe(view.set_snapshot)
    if (instances := app.get(keys.INSTANCES)) is not None:
        poller.on_each_poll(instances.on_poll)  # absent from two polls in a row: ended
    app[keys.POLLER] = poller
    task = spawn(app, poller.run(), "gpu-poller")
    first = await poller.wait_first(settings.gpu_call_timeout + 1)
    if not first.known:
        log.warning(
            "gpu state unknown: models show gpu_state_unknown until the GPUs can be read",
            backend=first.backend,
            state=first.state.value,
            error=first.error,
        )
    yield
    await stop_task(task)


async def catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, database = app[keys.SETTINGS].current, app[keys.DATABASE]
    store = CatalogStore(database.pool)
    if settings.seed_catalog and await store.seed_default_catalog():
        log.info("default catalog inserted")
    app[keys.CATALOG_STORE] = store
    sync = CatalogSync(
        database.dsn, store, app[keys.VIEW], reload_interval_s=settings.catalog_reload_interval
    )
    await sync.load()
    app[keys.CATALOG_SYNC] = sync
    supervisor = database.supervisor
    reachable = Flag(
        "model_registry_database_up",
        "1 while the daemon holds a connection to its database (its catalog listener).",
        lambda: sync.listening.is_set() and (supervisor is None or not supervisor.restarting),
    )
    with app[keys.METRICS].collecting(reachable):
        task = spawn(app, sync.run(), "catalog-sync")
        yield
        await stop_task(task)


async def footprints_ctx(app: web.Application) -> AsyncIterator[None]:
    """Samples of this host's loads to PostgreSQL, every host's footprints into the view."""
    database, recorder = app[keys.DATABASE], app[keys.FOOTPRINTS]
    store = app[keys.FOOTPRINT_STORE] = FootprintStore(database.pool)
    await recorder.load(store)
    task = spawn(app, recorder.run(database.dsn, store), "footprints")
    yield
    await stop_task(task)


async def fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    """Publish this host to the fleet table (holding its host id) and read the fleet from it."""
    settings, database = app[keys.SETTINGS].current, app[keys.DATABASE]
    url = settings.advertised_url()
    if settings.database_url is not None and is_loopback(settings.host):
        log.warning(
            "listening on loopback only while sharing a database: other hosts cannot reach "
            "this daemon at its advertised URL (set MODEL_REGISTRY_HOST)",
            host=settings.host,
            advertise_url=url,
        )
    publisher = FleetPublisher(
        database.dsn,
        settings.host_id,
        url,
        app[keys.VIEW],
        reservations=NewestReservations(app[keys.VIEW]),
        instances=lambda: _fleet_instances(app),
        room=lambda: _fleet_room(app, settings),
        heartbeat_interval_s=settings.heartbeat_interval,
    )
    await publisher.start()
    log.info("in the fleet", host=settings.host_id, url=url)
    reader = app[keys.FLEET] = FleetReader(database.pool)
    view = app[keys.VIEW]
    app[keys.FLEET_OWN] = OwnOverlay(publisher.current, lambda: view.generation)
    with app[keys.METRICS].collecting(FleetStats(reader)):
        task = spawn(app, publisher.run(), "fleet-publisher")
        yield
        await stop_task(task)
        await publisher.stop()


def _initial_snapshot(settings: Settings) -> GpuSnapshot:
    if settings.gpu_backend is GpuBackendName.NONE:
        return GpuSnapshot(backend="none", state=GpuState.DISABLED)
    return GpuSnapshot(
        backend=settings.gpu_backend.value, state=GpuState.UNAVAILABLE, error="no reading yet"
    )


async def _mark_stopping(app: web.Application) -> None:
    app[keys.STOP].set()
    app[keys.FEED].close()  # waiting GETs answer and event streams end now, not at the timeout


def _reservations(app: web.Application) -> list[dict[str, object]]:
    book = app.get(keys.BOOK)
    return [] if book is None else [book.describe(r) for r in book.open()]


def _instances(app: web.Application) -> list[dict[str, object]]:
    instances = app.get(keys.INSTANCES)
    return [] if instances is None else instances.described()


def _fleet_instances(app: web.Application) -> list[dict[str, Any]]:
    """Where this host has models loaded: one entry per model and device, with a count."""
    instances = app.get(keys.INSTANCES)
    return [] if instances is None else instances.spots()


def _fleet_room(app: web.Application, settings: Settings) -> str:
    """What this host's instances offer other daemons to plan room with (JSON)."""
    instances = app.get(keys.INSTANCES)
    if instances is None:
        return "[]"
    return instances.room_row(settings.idle_after_s, settings.min_residency_s)


def create_app(
    settings: Settings, *, gpu_backend: GpuBackend | None = None, clock: Clock = utc_now
) -> web.Application:
    """The application. `gpu_backend` and `clock` replace the configured backend and the wall
    clock (tests); they reach the cleanup contexts that use them as arguments."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[keys.SETTINGS] = LiveSettings(settings)
    app[keys.STOP] = asyncio.Event()
    app[keys.FATAL] = asyncio.Event()
    footprints = Footprints(
        settings.vram_source, settings.footprint_min_samples, settings.footprint_max_shrink
    )
    pages = PageCache(settings.page_cache_mib * 1024 * 1024)
    view = CatalogView(_initial_snapshot(settings), margins_from(settings), footprints, pages)
    app[keys.VIEW] = view
    app[keys.FOOTPRINTS] = FootprintRecorder(view, settings.host_id)
    app[keys.METRICS] = Metrics(view, dcgm=settings.dcgm_metrics)
    feed = app[keys.FEED] = ChangeFeed(
        view,
        gpus_body=lambda: gpus_body(view, app.get(keys.POLLER)),
        reservations_json=lambda: json.dumps(_reservations(app)),
        instances_json=lambda: json.dumps(_instances(app)),
        describe_reservation=lambda r: app[keys.BOOK].describe(r),
    )
    slots = app[keys.STREAM_SLOTS] = StreamSlots(
        settings.max_streams, settings.max_streams_per_client
    )
    app[keys.METRICS].registry.register(WatchStats(feed, slots))
    app.on_shutdown.append(_mark_stopping)
    contexts: list[Callable[[web.Application], AsyncIterator[None]]] = [
        functools.partial(admission_ctx, clock=clock),
        database_ctx,
        functools.partial(gpu_ctx, backend_override=gpu_backend),
        catalog_ctx,
        footprints_ctx,
        fleet_ctx,
    ]
    app.cleanup_ctx.extend(contexts)
    gate = AccessGate(app[keys.SETTINGS])
    app[keys.HOT_READS] = HotReads(
        view, gate, app[keys.METRICS].route_requests(LISTING_ROUTE), settings.access_log
    )
    observer = Observer(
        app[keys.METRICS],
        settings.access_log,
        settings.slow_request_ms,
        busy_routes=frozenset(
            {"/reservations", "/reservations/{id}", "/instances", "/instances/{id}"}
        ),
        gate=gate,
    )
    observer.add_routes(
        app,
        catalog_routes,
        footprint_routes,
        routes,
        admission_routes,
        instance_routes,
        watch_routes,
        fleet_routes,
        status_routes,
    )
    setup_templates(app)
    return app
