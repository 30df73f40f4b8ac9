"""Typed keys for the objects the application shares between handlers and background tasks."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gpu import GpuBackend, GpuPoller
from registry.admission.book import Clock, ReservationBook
from registry.catalog_sync import CatalogSync
from registry.config import Settings
from registry.database import Database
from registry.fleet.reader import FleetReader
from registry.metrics import Metrics
from registry.view import CatalogView
from registry.watch.feed import ChangeFeed

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
VIEW = web.AppKey("view", CatalogView)
DATABASE = web.AppKey("database", Database)
CATALOG_SYNC = web.AppKey("catalog_sync", CatalogSync)
POLLER = web.AppKey("poller", GpuPoller)
BOOK = web.AppKey("book", ReservationBook)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
FEED = web.AppKey("feed", ChangeFeed)
FLEET = web.AppKey("fleet", FleetReader)
# Seconds a request spent waiting by design (a blocking GET, an event stream): not slowness.
WAITED_S = web.RequestKey("waited_s", float)
STOP = web.AppKey("stop", asyncio.Event)
FATAL = web.AppKey("fatal", asyncio.Event)
GPU_BACKEND_OVERRIDE = web.AppKey("gpu_backend_override", GpuBackend)
