"""Publishes this host's state to the fleet table: on every change of its devices, GPU state or
reservations (at most one write per 100 ms), a heartbeat at least every interval, and
"offline" on a clean shutdown. Writes go through the connection that holds the host id.

The list of a host's newest reservations goes at most once a second, and only when it changed:
placement reads the counts and pending memory, which go with every write, while the list is for
people, and on a busy host it is most of the row (parsing it ten times a second took the
database enough CPU to show in the daemon's own latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from registry import __version__
from registry.database import UNAVAILABLE_ERRORS
from registry.fleet.identity import HostIdTaken, connect_as_host
from registry.fleet.own_host import OwnHost
from registry.logs import get_logger
from registry.view import CatalogView

log = get_logger("registry.fleet")

MIN_SPACING_S = 0.1
LIST_SPACING_S = 1.0
_RECONNECT_MAX_S = 5.0

Row = tuple[str, str, int, int, str, str]  # devices, newest reservations, open, pending, ...

_UPSERT = """
INSERT INTO fleet_hosts AS f (host, url, version, gpu_state, devices, reservations,
                              heartbeat_interval_s, started_at, heartbeat_at, stopped_at,
                              reservations_open, pending_mib, instances, vram_source,
                              footprint_min_samples, footprint_max_shrink, room)
VALUES ($1, $2, $3, $4, $5::jsonb, COALESCE($6::jsonb, '[]'::jsonb), $7, now(), now(), NULL,
        $9, $10, $11::jsonb, $12, $13, $14, $15::jsonb)
ON CONFLICT (host) DO UPDATE
   SET url = EXCLUDED.url, version = EXCLUDED.version, gpu_state = EXCLUDED.gpu_state,
       devices = EXCLUDED.devices, reservations = COALESCE($6::jsonb, f.reservations),
       reservations_open = EXCLUDED.reservations_open, pending_mib = EXCLUDED.pending_mib,
       instances = EXCLUDED.instances, vram_source = EXCLUDED.vram_source,
       footprint_min_samples = EXCLUDED.footprint_min_samples,
       footprint_max_shrink = EXCLUDED.footprint_max_shrink, room = EXCLUDED.room,
       heartbeat_interval_s = EXCLUDED.heartbeat_interval_s,
       started_at = CASE WHEN $8 THEN now() ELSE f.started_at END,
       heartbeat_at = now(), stopped_at = NULL
"""


def host_devices(view: CatalogView) -> list[dict[str, Any]]:
    """The devices as this host sees them, its margins and reservations applied."""
    return [
        {
            "uuid": b.device.uuid,
            "index": b.device.index,
            "name": b.device.name,
            "total_mib": b.device.total_mib,
            "free_mib": b.device.free_mib,
            "usable_mib": b.usable_mib,
            "pending_mib": b.pending_mib,
            "margin_mib": b.margin_mib,
            "healthy": b.device.healthy,
        }
        for b in view.capacity.budgets
    ]


class FleetPublisher:
    def __init__(
        self,
        dsn: str,
        host_id: str,
        url: str,
        view: CatalogView,
        reservations: Callable[[], tuple[str, int, int]],
        instances: Callable[[], list[dict[str, Any]]] = list,
        room: Callable[[], str] = lambda: "[]",
        *,
        heartbeat_interval_s: float,
    ) -> None:
        self._dsn = dsn
        self.host_id = host_id
        self.url = url
        self._view = view
        self._reservations = reservations
        self._instances = instances
        self._room = room
        self.heartbeat_interval_s = heartbeat_interval_s
        self._conn: asyncpg.Connection | None = None
        self._changed = asyncio.Event()
        self._first_write = True
        self._wake_due = -math.inf
        self.writes = 0
        self.list_writes = 0  # writes that carried the list of the newest reservations
        view.subscribe(self._changed.set)

    async def start(self) -> None:
        """Take the host id (HostIdTaken if another daemon has it) and publish once."""
        self._conn = await connect_as_host(self._dsn, self.host_id)
        await self._write(self._row())

    def current(self) -> OwnHost:
        """This host as it is now: what the next write publishes, and what the daemon shows
        of itself when it answers for the fleet."""
        newest, open_count, pending_mib = self._reservations()
        footprints = self._view.footprints
        return OwnHost(
            host=self.host_id,
            url=self.url,
            gpu_state=self._view.snapshot.state.value,
            devices=host_devices(self._view),
            spots=self._instances(),
            room=self._room,
            reservations_json=newest,
            reservations_total=open_count,
            pending_mib=pending_mib,
            source=footprints.source.value,
            min_samples=footprints.min_samples,
            max_shrink=footprints.max_shrink,
        )

    def _row(self) -> Row:
        own = self.current()
        return (
            json.dumps(own.devices),
            own.reservations_json,
            own.reservations_total,
            own.pending_mib,
            json.dumps(own.spots),
            own.room(),
        )

    async def _write(self, row: Row, *, with_list: bool = True) -> None:
        """Write `row`; without its list, the one last written stays."""
        assert self._conn is not None
        devices, newest, open_count, pending_mib, instances, room = row
        reservations = newest if with_list else None
        await self._conn.execute(
            _UPSERT,
            self.host_id,
            self.url,
            __version__,
            self._view.snapshot.state.value,
            devices,
            reservations,
            self.heartbeat_interval_s,
            self._first_write,
            open_count,
            pending_mib,
            instances,
            self._view.footprints.source.value,
            self._view.footprints.min_samples,
            self._view.footprints.max_shrink,
            room,
            timeout=5,
        )
        self._first_write = False
        self.writes += 1
        self.list_writes += with_list

    async def run(self) -> None:
        """Publish changes and heartbeats until cancelled; survive database outages."""
        last_row: Row | None = None  # as last written, its list the one last published
        last_write = time.monotonic()
        listed_at = -math.inf
        delay = 0.1
        while True:
            with contextlib.suppress(TimeoutError):
                timeout = max(0.0, last_write + self.heartbeat_interval_s - time.monotonic())
                await asyncio.wait_for(self._changed.wait(), timeout)
            # Coalesce: at most one write per MIN_SPACING_S, however busy the host is.
            await asyncio.sleep(max(0.0, last_write + MIN_SPACING_S - time.monotonic()))
            self._changed.clear()
            row = self._row()
            with_list = last_row is None or row[1] != last_row[1]
            if with_list and last_row is not None and time.monotonic() < listed_at + LIST_SPACING_S:
                # Not yet: the list last published stands until its second is up.
                row, with_list = (row[0], last_row[1], *row[2:]), False
                self._wake_at(listed_at + LIST_SPACING_S)
            if row == last_row and time.monotonic() - last_write < self.heartbeat_interval_s:
                continue
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._reconnect()
                await self._write(row, with_list=with_list)
            except (HostIdTaken, asyncpg.PostgresError, *UNAVAILABLE_ERRORS) as exc:
                log.warning("fleet publication failed", error=str(exc), retry_in_s=delay)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
                last_row = None  # write all of it again
                self._changed.set()  # try again, with whatever is current then
                continue
            if delay > 0.1:
                log.info("fleet publication resumed", host=self.host_id)
            delay = 0.1
            last_row, last_write = row, time.monotonic()
            if with_list:
                listed_at = last_write

    def _wake_at(self, when: float) -> None:
        """Look again at `when` (monotonic), even if nothing else changes by then."""
        if self._wake_due > time.monotonic():
            return  # a look is already due
        self._wake_due = when
        asyncio.get_running_loop().call_later(when - time.monotonic(), self._changed.set)

    async def _reconnect(self) -> None:
        await self._drop_connection()
        self._conn = await connect_as_host(self._dsn, self.host_id)

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.terminate()

    async def stop(self) -> None:
        """Mark the host offline and let go of the host id."""
        if self._conn is None or self._conn.is_closed():
            return
        try:
            await self._conn.execute(
                "UPDATE fleet_hosts SET stopped_at = now() WHERE host = $1",
                self.host_id,
                timeout=2,
            )
        except (asyncpg.PostgresError, *UNAVAILABLE_ERRORS) as exc:
            log.warning("could not mark this host offline", error=str(exc))
        finally:
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None
