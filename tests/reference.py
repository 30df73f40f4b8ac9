"""What the listing must say, built from the pure capacity rule: the reference for faster paths."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gpu import GpuSnapshot
from registry.capacity import Assessment, Sizes
from registry.footprint import reload_estimate
from registry.model import CatalogModel
from registry.reservation import Reservation


def model_object(
    model: CatalogModel,
    verdict: Assessment,
    sizes: Sizes | None = None,
    instances: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The listing's JSON object for `model`, as the pure rule's `verdict` has it (with its
    (observed, effective) sizes and instances, when the caller knows of any)."""
    placement = verdict.placement
    if sizes is None:
        sizes = Sizes(None, model.vram, reload_estimate(model.vram), True)
    return {
        "id": model.id,
        "name": model.name,
        "active": verdict.active,
        "vram": model.vram,
        "created_at": model.created_at.isoformat(),
        "updated_at": None if model.updated_at is None else model.updated_at.isoformat(),
        "enabled": model.enabled,
        "fits": verdict.fits,
        "reason": None if verdict.reason is None else verdict.reason.value,
        "placement": None
        if placement is None
        else {"gpu": placement.gpu, "index": placement.index, "free_mib": placement.free_mib},
        "headroom_mib": verdict.headroom_mib,
        "instances": instances or [],
        "instances_total": len(instances or []),
        "learn": model.learn,
        "vram_observed": sizes.observed,
        "vram_effective": sizes.effective,
        "reload_s": sizes.reload_s,
        "reload_estimated": sizes.reload_estimated,
    }


def pending_by_reservation(
    reservations: Iterable[Reservation], snapshot: GpuSnapshot
) -> dict[str, int]:
    """MiB each reservation still holds, computed from scratch the plain way: in full, less what
    its named process has loaded beyond its baseline, shared out oldest first per (device, pid).
    The reference for the incremental Bookings."""
    devices = {device.uuid: device for device in snapshot.devices}
    ordered = sorted(reservations, key=lambda r: (r.created_at, r.id))
    credit: dict[tuple[str, int], int] = {}
    for reservation in ordered:
        if reservation.pid is None:
            continue
        key = (reservation.gpu_uuid, reservation.pid)
        device = devices.get(reservation.gpu_uuid)
        used = None if device is None else device.process_used_mib(reservation.pid)
        if used is None:
            continue
        credit[key] = max(credit.get(key, 0), max(0, used - reservation.pid_baseline_mib))
    pending: dict[str, int] = {}
    for reservation in ordered:
        key = (reservation.gpu_uuid, reservation.pid or 0)
        loaded = min(reservation.vram_mib, credit.get(key, 0)) if reservation.pid else 0
        if loaded:
            credit[key] -= loaded
        pending[reservation.id] = reservation.vram_mib - loaded
    return pending
