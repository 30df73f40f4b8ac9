"""Typed keys for the objects the application shares between handlers and background tasks.

Imports of project modules are for type checking only, so any module can use a key without
pulling in the rest of the application.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gpu import GpuPoller
    from registry.admission.book import ReservationBook
    from registry.catalog.store import CatalogStore
    from registry.catalog.sync import CatalogSync
    from registry.config import LiveSettings
    from registry.database import Database
    from registry.fleet.own_host import OwnOverlay
    from registry.fleet.reader import FleetReader
    from registry.footprints.recorder import FootprintRecorder
    from registry.footprints.store import FootprintStore
    from registry.hot_reads import HotReads
    from registry.instances.book import InstanceBook
    from registry.metrics import Metrics
    from registry.view import CatalogView
    from registry.watch.feed import ChangeFeed
    from registry.watch.slots import StreamSlots

SETTINGS: web.AppKey[LiveSettings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
VIEW: web.AppKey[CatalogView] = web.AppKey("view")
DATABASE: web.AppKey[Database] = web.AppKey("database")
CATALOG_STORE: web.AppKey[CatalogStore] = web.AppKey("catalog_store")
CATALOG_SYNC: web.AppKey[CatalogSync] = web.AppKey("catalog_sync")
POLLER: web.AppKey[GpuPoller] = web.AppKey("poller")
BOOK: web.AppKey[ReservationBook] = web.AppKey("book")
INSTANCES: web.AppKey[InstanceBook] = web.AppKey("instances")
FEED: web.AppKey[ChangeFeed] = web.AppKey("feed")
STREAM_SLOTS: web.AppKey[StreamSlots] = web.AppKey("stream_slots")
FLEET: web.AppKey[FleetReader] = web.AppKey("fleet")
FLEET_OWN: web.AppKey[OwnOverlay] = web.AppKey("fleet_own")
FOOTPRINTS: web.AppKey[FootprintRecorder] = web.AppKey("footprints")
FOOTPRINT_STORE: web.AppKey[FootprintStore] = web.AppKey("footprint_store")
HOT_READS: web.AppKey[HotReads] = web.AppKey("hot_reads")
# Seconds a request spent waiting by design (a blocking GET, an event stream): not slowness.
WAITED_S: web.RequestKey[float] = web.RequestKey("waited_s")
STOP: web.AppKey[asyncio.Event] = web.AppKey("stop", asyncio.Event)
FATAL: web.AppKey[asyncio.Event] = web.AppKey("fatal", asyncio.Event)
