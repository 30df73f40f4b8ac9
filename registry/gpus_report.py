"""The body of GET /gpus: devices as the poller last read them, with the books applied."""

from __future__ import annotations

import json
from typing import Any

from gpu import MIB, GpuPoller
from registry.capacity import DeviceBudget
from registry.page_cache import CachedBody, body_etag
from registry.schemas import GpuDeviceOut, GpuProcessOut, GpusOut
from registry.view import CatalogView


def gpus_document(view: CatalogView, poller: GpuPoller | None) -> dict[str, Any]:
    snapshot = view.snapshot
    devices = [_device(budget) for budget in view.capacity.budgets]
    body = GpusOut(
        backend=snapshot.backend,
        state=snapshot.state.value,
        as_of=snapshot.as_of,
        last_poll_at=poller.last_success_wall if poller else None,
        poll_interval_s=poller.interval_s if poller else 0.0,
        last_error=snapshot.error,
        margin_mib=view.margins.mib,
        margin_percent=view.margins.percent,
        devices=devices,
    )
    # Fields NVML does not report are left out, not shown as zero or null.
    payload = body.model_dump()
    for device in payload["devices"]:
        for field in ("used_mib", "reserved_mib", "error", "parent_uuid"):
            if device[field] is None:
                del device[field]
    return payload


def _device(budget: DeviceBudget) -> GpuDeviceOut:
    d = budget.device
    return GpuDeviceOut(
        uuid=d.uuid,
        index=d.index,
        name=d.name,
        total_mib=d.total_mib,
        free_mib=d.free_mib,
        used_mib=None if d.used_bytes is None else d.used_bytes // MIB,
        reserved_mib=None if d.reserved_bytes is None else d.reserved_bytes // MIB,
        healthy=d.healthy,
        usable_mib=budget.usable_mib,
        pending_mib=budget.pending_mib,
        error=d.error,
        parent_uuid=d.parent_uuid,
        processes=[
            GpuProcessOut(
                pid=p.pid,
                name=p.name,
                used_mib=None if p.used_bytes is None else p.used_bytes // MIB,
            )
            for p in d.processes
        ],
    )


def gpus_body(view: CatalogView, poller: GpuPoller | None) -> CachedBody:
    """The body and a weak ETag: `last_poll_at` moves at every poll, so it is left out of the
    ETag, which changes only when something a client acts on does."""
    document = gpus_document(view, poller)
    body = _dumps(document).encode()
    meaningful = {key: value for key, value in document.items() if key != "last_poll_at"}
    return CachedBody(body, "W/" + body_etag(_dumps(meaningful).encode()))


def _dumps(value: Any) -> str:
    # datetime.isoformat keeps "+00:00", as in the /models listing.
    return json.dumps(value, default=lambda v: v.isoformat())
