"""Keeps the in-memory view in step with the catalog table, across every daemon sharing it.

Writers NOTIFY model ids on one channel (a trigger does it, whoever writes; a bulk apply sends
all its ids in one notification, or "*" for "reload everything"). Each daemon LISTENs
on a dedicated connection, refreshes the ids it hears about, LISTENs again after a reconnect
(reloading everything, since notifications sent meanwhile are lost), and reloads everything
every `reload_interval_s` in case a notification went missing anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from registry.catalog.store import CHANNEL, CatalogStore
from registry.database import UNAVAILABLE_ERRORS
from registry.logs import get_logger
from registry.view import CatalogView

log = get_logger("registry.catalog_sync")

_RECONNECT_MAX_S = 5.0


class CatalogSync:
    def __init__(
        self, dsn: str, store: CatalogStore, view: CatalogView, *, reload_interval_s: float = 30.0
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._view = view
        self.reload_interval_s = reload_interval_s
        self._changed_ids: set[int] = set()
        self._wake = asyncio.Event()
        self._reload_all = False
        self._lost = False
        self.listening = asyncio.Event()

    async def load(self) -> tuple[int, int]:
        """Read the whole catalog into the view: how many models changed and were removed."""
        self._view.begin_catalog_read()
        return self._view.replace_catalog(await self._store.list_all())

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # A row trigger sends one id; a bulk apply sends "1,2,3", or "*" when too many.
        try:
            self._changed_ids.update(int(part) for part in payload.split(","))
        except ValueError:
            self._reload_all = True
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        delay = 0.1
        while True:
            try:
                await self._listen_until_lost()
                delay = 0.1
            except UNAVAILABLE_ERRORS as exc:
                log.warning("catalog listener lost the database", error=str(exc), retry_in_s=delay)
            except asyncpg.PostgresError as exc:
                log.warning("catalog listener failed", error=str(exc), retry_in_s=delay)
            self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)

    def _on_lost(self, _conn: Any) -> None:
        self._lost = True
        self._wake.set()

    async def _listen_until_lost(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=5)
        self._lost = False
        conn.add_termination_listener(self._on_lost)
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            await self.load()  # anything written while we were not listening
            log.info("catalog listener connected", models=self._view.model_count)
            self.listening.set()
            next_reload = time.monotonic() + self.reload_interval_s
            while not self._lost:
                # Wait only when nothing is pending: a notification that arrived during the
                # last reload has already set (and must not lose) the wake-up.
                if not (self._changed_ids or self._reload_all):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), max(next_reload - time.monotonic(), 0)
                        )
                self._wake.clear()
                if time.monotonic() >= next_reload:
                    await conn.execute("SELECT 1", timeout=5)  # is the listener still alive?
                    next_reload = time.monotonic() + self.reload_interval_s
                    await self._reload_unannounced()
                await self._apply_pending()
            log.warning("catalog listener connection lost; reconnecting")
        finally:
            if not conn.is_closed():
                conn.terminate()

    async def _reload_unannounced(self) -> None:
        """The periodic reload: what it finds changed, no notification announced (a restore,
        a write with the triggers off): said, since nobody else will."""
        self._changed_ids.clear()
        changed, removed = await self.load()
        if changed or removed:
            log.info(
                "catalog changes no notification announced were picked up (a restore, or a "
                "write without the triggers)",
                changed=changed,
                removed=removed,
                models=self._view.model_count,
            )

    async def _apply_pending(self) -> None:
        if self._reload_all:
            self._reload_all = False
            self._changed_ids.clear()
            await self.load()
        elif self._changed_ids:
            ids, self._changed_ids = self._changed_ids, set()
            try:
                found = await self._store.get_many(ids)
            except BaseException:
                self._changed_ids |= ids
                raise
            self._view.apply_changes(ids, found)
