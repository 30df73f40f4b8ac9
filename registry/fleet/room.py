"""Where in the fleet a model would fit after unloading idle instances: each up host's rows
(its devices and what its instances offer, published by that host under its own settings)
put through the same plan a claim uses (registry.room), with the asker's footprints for what
the model books there and what reloading each victim would cost."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from registry.fleet.reader import HostRoom
from registry.footprint import Footprints, VramSource, product_of, reload_estimate
from registry.model import CatalogModel
from registry.room import DeviceRoom, Loaded, Plan, Rules, plan_device

_SOURCES = frozenset(source.value for source in VramSource)
# The host decided who may go (its own idle and residency settings, in `eligible_from`).
_RULES = Rules(priority=50, idle_after_s=0.0, min_residency_s=0.0)
_NEVER = float("inf")


def room_for(
    model: CatalogModel,
    hosts: list[HostRoom],
    footprints: Footprints,
    catalog: Callable[[str], CatalogModel | None],
    now: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    """Per up host where the model does not fit now but would once idle instances went, its
    cheapest plan: least reload first, at most `limit` hosts."""
    found: list[tuple[Plan, HostRoom]] = []
    for host in hosts:
        best = None
        for device, room in _rooms(model, host, footprints, catalog, now):
            if device["usable_mib"] >= room.need_mib:
                best = None
                break  # it fits there now: this host is in `hosts`, not here
            planned = plan_device(room, _RULES)
            if planned is None or not planned.victims:
                continue
            if best is None or _cost(planned) < _cost(best):
                best = planned
        if best is not None:
            found.append((best, host))
    found.sort(key=lambda pair: (_cost(pair[0]), pair[1].host))
    return [
        {
            "host": host.host,
            "url": host.url,
            "gpu": planned.gpu,
            "index": planned.index,
            "unload_mib": planned.frees_mib,
            "reload_s": round(planned.reload_s, 3),
            "victims": len(planned.instance_ids),
        }
        for planned, host in found[:limit]
    ]


def _cost(planned: Plan) -> tuple[float, int, int]:
    return (planned.reload_s, len(planned.victims), planned.leftover_mib)


def _rooms(
    model: CatalogModel,
    host: HostRoom,
    footprints: Footprints,
    catalog: Callable[[str], CatalogModel | None],
    now: datetime,
) -> list[tuple[dict[str, Any], DeviceRoom]]:
    source = VramSource(host.source) if host.source in _SOURCES else VramSource.MAX
    on_device: dict[str, list[dict[str, Any]]] = {}
    for process in host.processes:
        on_device.setdefault(process["gpu"], []).append(process)
    rooms = []
    for device in host.devices:
        if not device.get("healthy") or device.get("usable_mib") is None:
            continue
        gpu_product = product_of(device["name"])
        need = footprints.effective_under(
            model, gpu_product, source, host.min_samples, host.max_shrink
        )
        loaded: list[Loaded] = []
        process_mib: dict[int, int] = {}
        for process in on_device.get(device["uuid"], []):
            process_mib[process["pid"]] = process["used_mib"]
            for n, instance in enumerate(process["instances"]):
                may_go = instance["eligible_from"] is not None and (
                    datetime.fromisoformat(instance["eligible_from"]) <= now
                )
                last_active = datetime.fromisoformat(instance["last_active_at"])
                loaded.append(
                    Loaded(
                        instance_id=instance["id"],
                        pid=process["pid"],
                        priority=instance["priority"],
                        pinned=not may_go,
                        sessions=0,
                        idle_s=max(0.0, (now - last_active).total_seconds()),
                        resident_s=_NEVER,
                        reload_s=_reload_s(instance["model"], gpu_product, footprints, catalog),
                        pending_mib=process["pending_mib"] if n == 0 else 0,
                    )
                )
        rooms.append(
            (
                device,
                DeviceRoom(
                    uuid=device["uuid"],
                    index=device["index"],
                    usable_mib=device["usable_mib"],
                    capacity_mib=device["total_mib"] - device.get("margin_mib", 0),
                    need_mib=need,
                    loaded=tuple(loaded),
                    process_mib=process_mib,
                ),
            )
        )
    return rooms


def _reload_s(
    name: str | None,
    gpu_product: str,
    footprints: Footprints,
    catalog: Callable[[str], CatalogModel | None],
) -> float:
    if name is None:
        return 1.0
    learned = footprints.reload_s(name, gpu_product)
    if learned is not None:
        return learned
    model = catalog(name)
    return 1.0 if model is None else reload_estimate(model.vram)
