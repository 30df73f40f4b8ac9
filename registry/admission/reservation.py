"""A reservation (a lease on VRAM for one load) and what it still holds on its device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime

from gpu import GpuSnapshot


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    vram_mib: int
    gpu_uuid: str
    gpu_index: int
    created_at: AwareDatetime  # with an offset: checked when read back from the journal
    expires_at: AwareDatetime
    model: str | None = None
    holder: str | None = None
    pid: int | None = None
    # What NVML attributed to `pid` on the device when the reservation named it: only memory
    # the process takes on top of this counts as the load's progress.
    pid_baseline_mib: int = 0

    def renewed(self, expires_at: datetime) -> Reservation:
        return replace(self, expires_at=expires_at)

    def with_pid(self, pid: int, baseline_mib: int) -> Reservation:
        return replace(self, pid=pid, pid_baseline_mib=baseline_mib)

    def to_record(self) -> dict[str, Any]:
        """The form kept on disk."""
        return {
            "id": self.id,
            "vram_mib": self.vram_mib,
            "gpu_uuid": self.gpu_uuid,
            "gpu_index": self.gpu_index,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "model": self.model,
            "holder": self.holder,
            "pid": self.pid,
            "pid_baseline_mib": self.pid_baseline_mib,
        }

    def to_api(self, pending_mib: int) -> dict[str, Any]:
        """The form the HTTP API answers with."""
        return {
            "id": self.id,
            "model": self.model,
            "vram_mib": self.vram_mib,
            "gpu": {"uuid": self.gpu_uuid, "index": self.gpu_index},
            "holder": self.holder,
            "pid": self.pid,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "pending_mib": pending_mib,
        }


def pending_by_reservation(
    reservations: Iterable[Reservation], snapshot: GpuSnapshot
) -> dict[str, int]:
    """MiB each reservation still holds: in full, less what its named process has loaded.

    A process is credited only with memory NVML shows it holding on the reservation's device
    beyond its baseline, and that credit is shared out oldest reservation first, so several
    reservations naming one process never shrink by more than it actually took.
    """
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
        growth = max(0, used - reservation.pid_baseline_mib)
        credit[key] = max(credit.get(key, 0), growth)
    pending: dict[str, int] = {}
    for reservation in ordered:
        key = (reservation.gpu_uuid, reservation.pid or 0)
        loaded = min(reservation.vram_mib, credit.get(key, 0)) if reservation.pid else 0
        if loaded:
            credit[key] -= loaded
        pending[reservation.id] = reservation.vram_mib - loaded
    return pending


def pending_by_device(
    reservations: Iterable[Reservation], per_reservation: dict[str, int]
) -> dict[str, int]:
    """MiB held per device uuid, from `pending_by_reservation`'s answer."""
    totals: dict[str, int] = {}
    for reservation in reservations:
        totals[reservation.gpu_uuid] = (
            totals.get(reservation.gpu_uuid, 0) + per_reservation[reservation.id]
        )
    return totals
