"""Samples to PostgreSQL, footprints back into the view.

Samples wait in memory (bounded) until they are written, so a database outage loses none but
the oldest beyond the bound. Every write is announced with NOTIFY (the model's name); each
daemon LISTENs on a dedicated connection and reads that model's footprints again, so a load on
one host teaches every host within a second. After a reconnect, everything is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from registry.database import UNAVAILABLE_ERRORS
from registry.footprints.store import (
    CHANNEL,
    RELOAD_ALL,
    FootprintStore,
    LoadSample,
    Sample,
)
from registry.logs import get_logger
from registry.view import CatalogView

log = get_logger("registry.footprints")

MAX_WAITING = 10_000  # samples kept in memory while the database is away
_RETRY_MAX_S = 5.0


class FootprintRecorder:
    """Made with the app, so instances can give samples from the start (before the database
    is reached); `run` writes them once it is."""

    def __init__(self, view: CatalogView, host: str) -> None:
        self._view = view
        self.host = host
        self._waiting: dict[str, Sample] = {}  # by instance: only its largest peak matters
        self._loads: dict[str, LoadSample] = {}  # load times waiting, by instance
        self._stale: set[str] = set()  # models a NOTIFY named, to read again
        self._reload_all = True
        self._wake = asyncio.Event()
        self._dropped = 0
        self.listening = asyncio.Event()

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._loads)

    def add(self, sample: Sample) -> None:
        """Queue a sample (a later one of the same instance replaces it)."""
        if sample.instance_id not in self._waiting and len(self._waiting) >= MAX_WAITING:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._dropped += 1
            if self._dropped == 1:
                log.warning("footprint samples dropped: the database is away too long")
        self._waiting[sample.instance_id] = sample
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def sample(self, instance_id: str, model: str, gpu_name: str, peak_mib: int) -> None:
        """What an instance gives: one load's footprint on this host."""
        self.add(Sample(instance_id, model, gpu_name, peak_mib, self.host))

    def load_time(self, instance_id: str, model: str, gpu_name: str, seconds: float) -> None:
        """How long one load took on this host, to `ready` (the oldest go beyond the bound)."""
        if instance_id not in self._loads and len(self._loads) >= MAX_WAITING:
            del self._loads[next(iter(self._loads))]
        self._loads[instance_id] = LoadSample(instance_id, model, gpu_name, seconds, self.host)
        self._wake.set()

    async def load(self, store: FootprintStore) -> None:
        """Read every model's footprints into the view (start-up)."""
        await self._refresh(store, None)

    async def run(self, dsn: str, store: FootprintStore) -> None:
        """Write samples and follow other hosts' until cancelled; survive database outages."""
        delay = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(dsn, timeout=5)
                await conn.add_listener(CHANNEL, self._heard)
                self._reload_all = True
                self.listening.set()
                delay = 0.2
                while True:
                    await self._sync(store)
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
                self.listening.clear()
                log.warning("footprints: database unavailable, retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)

    async def _sync(self, store: FootprintStore) -> None:
        if self._waiting or self._loads:
            batch, self._waiting = self._waiting, {}
            loads, self._loads = self._loads, {}
            try:
                await store.record(list(batch.values()), list(loads.values()))
            except BaseException:
                self._waiting = {**batch, **self._waiting}  # written by the next try
                self._loads = {**loads, **self._loads}
                raise
        if self._reload_all:
            self._reload_all = False
            self._stale.clear()
            await self._refresh(store, None)
        elif self._stale:
            models, self._stale = sorted(self._stale), set()
            await self._refresh(store, models)

    async def _refresh(self, store: FootprintStore, models: list[str] | None) -> None:
        by_model: dict[str, dict[str, Any]] = {name: {} for name in models or ()}
        for summary in await store.summaries(models):
            by_model.setdefault(summary.model, {})[summary.gpu_name] = summary.observed()
        if models is None:  # models with no sample left are forgotten too
            for name in self._view.footprints.models():
                by_model.setdefault(name, {})
        for name, by_product in by_model.items():
            self._view.set_footprint(name, by_product)

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == RELOAD_ALL:
            self._reload_all = True
        else:
            self._stale.add(payload)
        self._wake.set()
