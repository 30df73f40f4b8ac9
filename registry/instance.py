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


DEFAULT_PRIORITY = 50


@dataclass(frozen=True, slots=True)
class Evicting:
    """A claim waits for the instance to go: its owner is asked to unload it."""

    reservation: str
    since: AwareDatetime

    def to_api(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "since": self.since.isoformat()}


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
    # What its owner says of it, and what the daemon saw: the inputs of making room.
    sessions: int = 0  # work in flight, as the scheduler reports it
    pinned: bool = False  # never a victim
    priority: int = DEFAULT_PRIORITY  # 0..100: a claim may take it only at this or above
    ready_at: AwareDatetime | None = None  # its load is done (reported, or grown to its booking)
    # The last time it had sessions, or its process showed GPU activity; None: since loaded.
    last_active_at: AwareDatetime | None = None
    # When its load began (its reservation was made, or a claim's room was freed), for the
    # load time; None for an adoption.
    load_started_at: AwareDatetime | None = None
    evicting: Evicting | None = None

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
            "sessions": self.sessions,
            "pinned": self.pinned,
            "priority": self.priority,
            "ready_at": _iso(self.ready_at),
            "last_active_at": _iso(self.last_active_at),
            "load_started_at": _iso(self.load_started_at),
            "evicting": None if self.evicting is None else self.evicting.to_api(),
        }

    @property
    def evicting_for(self) -> str | None:
        """The claim waiting for it to go, if one is."""
        return None if self.evicting is None else self.evicting.reservation

    def active_at(self) -> datetime:
        """The last time it was in use (or loaded)."""
        return self.last_active_at or self.loaded_at

    def idle_s(self, now: datetime) -> float:
        """Seconds since it was last in use: 0 while it has sessions."""
        if self.sessions > 0:
            return 0.0
        return max(0.0, (now - self.active_at()).total_seconds())

    def to_api(
        self, used_mib: int | None, peak_mib: int, pending_mib: int, now: datetime | None = None
    ) -> dict[str, Any]:
        """The form the HTTP API answers with (`idle_s` only when `now` is given: it moves with
        the clock, so what is cached or compared leaves it out)."""
        shown: dict[str, Any] = {
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
            **self.standing(),
            "ready_at": _iso(self.ready_at),
        }
        if now is not None:
            shown["idle_s"] = round(self.idle_s(now), 3)
        return shown

    def standing(self) -> dict[str, Any]:
        """How it stands for making room, as every form the API shows it in has it."""
        return {
            "sessions": self.sessions,
            "pinned": self.pinned,
            "priority": self.priority,
            "ready": self.ready_at is not None,
            "last_active_at": self.active_at().isoformat(),
            "evicting": None if self.evicting is None else self.evicting.to_api(),
        }

    def booking_over(self, now: datetime) -> bool:
        return self.booked_until is None or now >= self.booked_until


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
