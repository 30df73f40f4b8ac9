"""An instance: a model loaded on this host, by a process (pid) on one GPU.

It is made from a reservation once its worker runs (the reservation ends, and what it still
booked lives on as the instance's pending memory until the load shows) or adopted as it is.
Its memory is real use, in NVML's used figure; it ends when its process leaves the GPU. Pids
are reused across boots, so each instance records the boot it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def this_boot() -> str:
    """The kernel's id of the running boot ("unknown" where there is none to read)."""
    try:
        return BOOT_ID_FILE.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    model: str | None
    gpu_uuid: str
    gpu_index: int
    pid: int
    loaded_at: AwareDatetime
    boot_id: str
    holder: str | None = None
    reservation: str | None = None  # the reservation it was bound from
    # What that reservation booked, held as pending until the process has grown by as much
    # above `baseline_mib`, or until `booked_until` (the reservation's expiry) passes. 0 for an
    # adopted instance.
    booked_mib: int = 0
    booked_until: AwareDatetime | None = None
    owner: str | None = None  # the hash of the token that made it (registry.auth.owner_of)
    # What the process held on the device before this load: its memory in the reading current
    # when the reservation was made (0 when it was not listed then), or, where that reading is
    # no longer known, at the bind. Only growth above it is this load's.
    baseline_mib: int = 0
    # Whether its load may teach the model's footprint: bound with a known baseline, or
    # adopted by an admin. Anything else (an adoption by a scheduler token, a baseline taken
    # at the bind) could teach a size that is not the model's.
    teaches: bool = False

    def to_record(self) -> dict[str, Any]:
        """The form kept on disk."""
        return {
            "id": self.id,
            "model": self.model,
            "gpu_uuid": self.gpu_uuid,
            "gpu_index": self.gpu_index,
            "pid": self.pid,
            "loaded_at": self.loaded_at.isoformat(),
            "boot_id": self.boot_id,
            "holder": self.holder,
            "reservation": self.reservation,
            "booked_mib": self.booked_mib,
            "booked_until": None if self.booked_until is None else self.booked_until.isoformat(),
            "owner": self.owner,
            "baseline_mib": self.baseline_mib,
            "teaches": self.teaches,
        }

    def to_api(self, used_mib: int | None, peak_mib: int, pending_mib: int) -> dict[str, Any]:
        """The form the HTTP API answers with."""
        return {
            "id": self.id,
            "model": self.model,
            "gpu": {"uuid": self.gpu_uuid, "index": self.gpu_index},
            "pid": self.pid,
            "holder": self.holder,
            "reservation": self.reservation,
            "loaded_at": self.loaded_at.isoformat(),
            "used_mib": used_mib,
            "peak_mib": peak_mib,
            "baseline_mib": self.baseline_mib,
            "pending_mib": pending_mib,
        }

    def booking_over(self, now: datetime) -> bool:
        return self.booked_until is None or now >= self.booked_until
