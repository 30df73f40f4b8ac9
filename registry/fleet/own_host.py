"""This host's part of the fleet as it is now, laid over what was last read from PostgreSQL.

The fleet table is written at most every 100 ms and read at most every 0.4 s, so the row of
the daemon answering `/fleet` or `/fleet/models` could lag its own binds and reservations; a
scheduler that just bound here would not see its own load. The answering daemon knows its own
state exactly, so it never serves its own row from the table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from registry.fleet.reader import HostRoom, Hosts, Placements, WarmSpot


@dataclass(frozen=True, slots=True)
class OwnHost:
    """What this host would publish now."""

    host: str
    url: str
    gpu_state: str
    devices: list[dict[str, Any]]  # as the fleet row has them
    spots: list[dict[str, Any]]  # per model and device: {"model", "gpu", "index", "count"}
    room: Callable[[], str]  # what its instances offer to make room (JSON), made when needed
    reservations_json: str  # the newest, as a JSON array
    reservations_total: int
    pending_mib: int
    source: str
    min_samples: int
    max_shrink: float


def hosts_with_own(read: Hosts, own: OwnHost) -> Hosts:
    """The hosts as read, this host's row (when it was read) as it is now."""
    hosts = [
        replace(
            h,
            state="ok",  # it is answering
            gpu_state=own.gpu_state,
            devices_json=json.dumps(own.devices),
            reservations_json=own.reservations_json,
            reservations_total=own.reservations_total,
            pending_mib=own.pending_mib,
        )
        if h.host == own.host
        else h
        for h in read.hosts
    ]
    return Hosts(hosts, stale=read.stale)


def _own_devices(own: OwnHost) -> list[tuple[Any, ...]]:
    if own.gpu_state != "ok":
        return []
    return [
        (
            d["usable_mib"],
            own.host,
            d["index"],
            own.url,
            d["uuid"],
            d["name"],
            own.source,
            own.min_samples,
            own.max_shrink,
        )
        for d in own.devices
        if d["healthy"] and d["usable_mib"] is not None
    ]


def placements_with_own(read: Placements, own: OwnHost) -> Placements:
    """Where loads can go, this host's devices and warm spots taken from `own`."""
    others = [
        (
            read.usable[i],
            host,
            read.indexes[i],
            read.urls[i],
            read.gpus[i],
            read.names[i],
            read.sources[i],
            read.min_samples[i],
            read.max_shrink[i],
        )
        for i, host in enumerate(read.hosts)
        if host != own.host
    ]
    devices = sorted(others + _own_devices(own), key=lambda d: (d[0], d[1], d[2]))
    best: dict[str, int] = {}
    for usable, host, *_ in devices:
        best[host] = max(usable, best.get(host, usable))
    columns: list[list[Any]] = [list(column) for column in zip(*devices, strict=True)] or [
        [] for _ in range(9)
    ]
    usable, hosts, indexes, urls, gpus, names, sources, min_samples, max_shrink = columns
    return Placements(
        usable,
        hosts,
        urls,
        gpus,
        indexes,
        sorted(best.values()),
        names=names,
        sources=sources,
        min_samples=min_samples,
        max_shrink=max_shrink,
        warm=_warm_with_own(read.warm, own),
        rooms=_rooms_with_own(read.rooms, own),
        version=read.version,
        stale=read.stale,
    )


def _warm_with_own(read: dict[str, list[WarmSpot]], own: OwnHost) -> dict[str, list[WarmSpot]]:
    warm = {
        model: [spot for spot in spots if spot.host != own.host] for model, spots in read.items()
    }
    for spot in own.spots:
        mine = WarmSpot(own.host, own.url, spot["gpu"], spot["index"], spot["count"])
        warm.setdefault(spot["model"], []).append(mine)
    for spots in warm.values():
        spots.sort(key=lambda s: (s.host, s.index))
    return {model: spots for model, spots in warm.items() if spots}


def _rooms_with_own(read: list[HostRoom], own: OwnHost) -> list[HostRoom]:
    rooms = [room for room in read if room.host != own.host]
    processes = json.loads(own.room()) if own.gpu_state == "ok" else []
    if processes:
        mine = HostRoom(
            own.host,
            own.url,
            own.devices,
            processes,
            own.source,
            own.min_samples,
            own.max_shrink,
        )
        rooms.append(mine)
        rooms.sort(key=lambda room: room.host)
    return rooms


class OwnOverlay:
    """`placements_with_own`, made once per fleet read and change of this host."""

    def __init__(self, own: Callable[[], OwnHost], generation: Callable[[], int]) -> None:
        self.own = own
        self._generation = generation
        self._made: tuple[tuple[int, bool, int], Placements] | None = None

    def placements(self, read: Placements) -> Placements:
        key = (read.version, read.stale, self._generation())
        if self._made is None or self._made[0] != key:
            self._made = (key, placements_with_own(read, self.own()))
        return self._made[1]

    def hosts(self, read: Hosts) -> Hosts:
        return hosts_with_own(read, self.own())
