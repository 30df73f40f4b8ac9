"""Reads the fleet from PostgreSQL on demand, with a short cache.

A daemon does no work when other hosts change: it reads the rows only when asked, at most
every `ttl_s` while asked often, and answers are never older than `max_age_s` while the
database answers. While it does not, the last state read is served, marked stale.

Placement needs only the devices that can take a load now; the database flattens, filters and
sorts them itself and sends them as a few arrays, which asyncpg decodes without Python objects
per device. The hosts' full rows are read only for GET /fleet.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg

from registry.database import UNAVAILABLE_ERRORS
from registry.logs import get_logger

log = get_logger("registry.fleet")

_HOSTS = """
SELECT host, url, version, gpu_state, devices::text AS devices,
       reservations::text AS reservations, reservations_open, pending_mib, heartbeat_at,
       CASE WHEN stopped_at IS NOT NULL THEN 'offline'
            WHEN now() - heartbeat_at > 3 * heartbeat_interval_s * interval '1 second'
                 THEN 'stale'
            ELSE 'ok' END AS state
  FROM fleet_hosts
 ORDER BY host
"""

# Devices that can take a load now: healthy, on hosts that are up and whose GPU readings hold;
# least usable first, and each host's most usable device (for "how many hosts fit").
_CANDIDATES = """
WITH d AS (
    SELECT h.host, h.url, d.uuid, d.index, d.usable_mib, d.name, h.vram_source,
           h.footprint_min_samples, h.footprint_max_shrink
      FROM fleet_hosts AS h,
           jsonb_to_recordset(h.devices)
               AS d(uuid text, index int, usable_mib int, healthy bool, name text)
     WHERE h.stopped_at IS NULL
       AND now() - h.heartbeat_at <= 3 * h.heartbeat_interval_s * interval '1 second'
       AND h.gpu_state = 'ok' AND d.healthy AND d.usable_mib IS NOT NULL
)
SELECT coalesce(array_agg(usable_mib ORDER BY usable_mib, host, index), '{}') AS usable,
       coalesce(array_agg(host ORDER BY usable_mib, host, index), '{}') AS hosts,
       coalesce(array_agg(url ORDER BY usable_mib, host, index), '{}') AS urls,
       coalesce(array_agg(uuid ORDER BY usable_mib, host, index), '{}') AS gpus,
       coalesce(array_agg(index ORDER BY usable_mib, host, index), '{}') AS indexes,
       coalesce(array_agg(name ORDER BY usable_mib, host, index), '{}') AS names,
       coalesce(array_agg(vram_source ORDER BY usable_mib, host, index), '{}') AS sources,
       coalesce(array_agg(footprint_min_samples ORDER BY usable_mib, host, index), '{}')
           AS min_samples,
       coalesce(array_agg(footprint_max_shrink ORDER BY usable_mib, host, index), '{}')
           AS max_shrink,
       (SELECT coalesce(array_agg(best ORDER BY best), '{}')
          FROM (SELECT max(usable_mib) AS best FROM d GROUP BY host) AS per_host) AS host_best
  FROM d
"""

# Where models are loaded now, on hosts that are up: one row per model and device.
_WARM = """
SELECT w.model, h.host, h.url, w.gpu, w.index, w.count
  FROM fleet_hosts AS h,
       jsonb_to_recordset(h.instances) AS w(model text, gpu text, index int, count int)
 WHERE h.stopped_at IS NULL
   AND now() - h.heartbeat_at <= 3 * h.heartbeat_interval_s * interval '1 second'
 ORDER BY w.model, h.host, w.index
"""


# What up hosts offer to make room: their devices and their instances, per process.
_ROOM = """
SELECT h.host, h.url, h.devices, h.room, h.vram_source, h.footprint_min_samples,
       h.footprint_max_shrink
  FROM fleet_hosts AS h
 WHERE h.stopped_at IS NULL
   AND now() - h.heartbeat_at <= 3 * h.heartbeat_interval_s * interval '1 second'
   AND h.gpu_state = 'ok' AND jsonb_array_length(h.room) > 0
 ORDER BY h.host
"""


@dataclass(frozen=True, slots=True)
class HostRoom:
    """An up host with instances: what another daemon needs to plan room there."""

    host: str
    url: str
    devices: list[dict[str, Any]]
    processes: list[dict[str, Any]]  # per process: gpu, pid, used_mib, pending_mib, instances
    source: str
    min_samples: int
    max_shrink: float


@dataclass(frozen=True, slots=True)
class WarmSpot:
    """A device of an up host where a model is loaded, and how many instances of it."""

    host: str
    url: str
    gpu: str
    index: int
    instances: int


@dataclass(frozen=True, slots=True)
class FleetHost:
    host: str
    url: str
    version: str
    state: str  # ok, stale, offline
    gpu_state: str
    heartbeat_at: datetime
    devices_json: str
    reservations_json: str  # the newest 100
    reservations_total: int
    pending_mib: int


@dataclass(frozen=True, slots=True)
class Candidate:
    host: str
    url: str
    gpu: str
    index: int
    usable_mib: int


@dataclass
class Placements:
    """Where loads can go now, as last read: parallel arrays, least usable first."""

    usable: list[int] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    host_best: list[int] = field(default_factory=list)  # each up host's most usable, sorted
    names: list[str] = field(default_factory=list)  # each device's name (its GPU product)
    sources: list[str] = field(default_factory=list)  # its host's MODEL_REGISTRY_VRAM_SOURCE
    min_samples: list[int] = field(default_factory=list)  # ... and FOOTPRINT_MIN_SAMPLES
    max_shrink: list[float] = field(default_factory=list)  # ... and FOOTPRINT_MAX_SHRINK
    warm: dict[str, list[WarmSpot]] = field(default_factory=dict)  # model name -> where
    rooms: list[HostRoom] = field(default_factory=list)  # up hosts with instances
    version: int = 0
    stale: bool = True

    def hosts_fitting(self, vram: int) -> int:
        """How many up hosts have a device that holds `vram` now."""
        return len(self.host_best) - bisect.bisect_left(self.host_best, vram)

    def fits_by_device(
        self, need: Callable[[int], int], limit: int
    ) -> tuple[int, list[tuple[Candidate, int]]]:
        """For a model whose size differs by device (learned per product, per host policy):
        how many up hosts it fits on, and per host its best-fitting device with the need
        there, best fit first. Walks every device: for the few models with samples."""
        found: list[tuple[Candidate, int]] = []
        seen: set[str] = set()
        for i, usable in enumerate(self.usable):
            host = self.hosts[i]
            needed = need(i)
            if host in seen or usable < needed:
                continue
            seen.add(host)
            if len(found) < limit:
                candidate = Candidate(host, self.urls[i], self.gpus[i], self.indexes[i], usable)
                found.append((candidate, needed))
        return len(seen), found

    def best_fits(self, vram: int, limit: int) -> list[Candidate]:
        """Per host, the device with the least usable memory that still holds `vram`; hosts in
        that order (best fit first), at most `limit`."""
        found: list[Candidate] = []
        seen: set[str] = set()
        for i in range(bisect.bisect_left(self.usable, vram), len(self.usable)):
            host = self.hosts[i]
            if host not in seen:
                seen.add(host)
                found.append(
                    Candidate(host, self.urls[i], self.gpus[i], self.indexes[i], self.usable[i])
                )
                if len(found) == limit:
                    break
        return found


@dataclass
class Hosts:
    hosts: list[FleetHost] = field(default_factory=list)
    stale: bool = True


T = TypeVar("T")


class _CachedRead(Generic[T]):
    """One query's result, re-read on demand: at most every `ttl_s`, never served older than
    `max_age_s` unless the database fails, then retried at most once a second."""

    def __init__(
        self,
        what: str,
        read: Callable[[], Awaitable[T]],
        empty: T,
        mark_stale: Callable[[T], None],
        *,
        ttl_s: float,
        max_age_s: float,
    ) -> None:
        self._what = what
        self._read = read
        self.value = empty
        self._mark_stale = mark_stale
        self.ttl_s = ttl_s
        self.max_age_s = max_age_s
        self._read_at = float("-inf")
        self._retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def current(self) -> T:
        now = time.monotonic()
        age = now - self._read_at
        if age <= self.ttl_s or now < self._retry_at:
            return self.value
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh())
        if age > self.max_age_s:
            await asyncio.shield(self._task)  # too old to serve: wait for the read
        return self.value

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(1.0):
                value = await self._read()
        except (asyncpg.PostgresError, *UNAVAILABLE_ERRORS) as exc:
            if not self._failing:
                log.warning(
                    "fleet read failed; serving the last state", part=self._what, error=str(exc)
                )
            self._failing = True
            self._retry_at = time.monotonic() + 1.0
            self._mark_stale(self.value)
            return
        if self._failing:
            log.info("fleet read works again", part=self._what)
        self._failing = False
        self.value, self._read_at = value, time.monotonic()


class FleetReader:
    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 0.4, max_age_s: float = 0.8) -> None:
        self._pool = pool
        self._placements = _CachedRead(
            "fleet", self._read_placements, Placements(), _stale, ttl_s=ttl_s, max_age_s=max_age_s
        )
        self._hosts = _CachedRead(
            "fleet hosts", self._read_hosts, Hosts(), _stale, ttl_s=ttl_s, max_age_s=max_age_s
        )
        self._versions = 0

    @property
    def max_age_s(self) -> float:
        return self._placements.max_age_s

    async def placements(self) -> Placements:
        return await self._placements.current()

    async def hosts(self) -> Hosts:
        return await self._hosts.current()

    def last_hosts(self) -> Hosts:
        """The hosts as last read, without reading."""
        return self._hosts.value

    async def _read_placements(self) -> Placements:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_CANDIDATES)
            warm_rows = await conn.fetch(_WARM)
            room_rows = await conn.fetch(_ROOM)
        warm: dict[str, list[WarmSpot]] = {}
        for w in warm_rows:
            spot = WarmSpot(w["host"], w["url"], w["gpu"], w["index"], w["count"])
            warm.setdefault(w["model"], []).append(spot)
        self._versions += 1
        return Placements(
            row["usable"],
            row["hosts"],
            row["urls"],
            row["gpus"],
            row["indexes"],
            row["host_best"],
            names=row["names"],
            sources=row["sources"],
            min_samples=row["min_samples"],
            max_shrink=row["max_shrink"],
            warm=warm,
            rooms=[
                HostRoom(
                    r["host"],
                    r["url"],
                    json.loads(r["devices"]),
                    json.loads(r["room"]),
                    r["vram_source"],
                    r["footprint_min_samples"],
                    r["footprint_max_shrink"],
                )
                for r in room_rows
            ],
            version=self._versions,
            stale=False,
        )

    async def _read_hosts(self) -> Hosts:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_HOSTS)
        return Hosts(
            [
                FleetHost(
                    r["host"],
                    r["url"],
                    r["version"],
                    r["state"],
                    r["gpu_state"],
                    r["heartbeat_at"],
                    r["devices"],
                    r["reservations"],
                    r["reservations_open"],
                    r["pending_mib"],
                )
                for r in rows
            ],
            stale=False,
        )


def _stale(value: Placements | Hosts) -> None:
    value.stale = True
