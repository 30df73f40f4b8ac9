"""A reservation: a lease on VRAM for one load, the domain type the capacity view books."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime


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
    owner: str | None = None  # the hash of the token that made it (registry.auth.owner_of)
    priority: int = 50  # a claim's: it may take instances of this priority or below
    # A claim: the instances still to go before the memory it booked is free (None: none,
    # or no longer), since when it waits, and what its victims free.
    awaiting: tuple[str, ...] | None = None
    awaiting_since: AwareDatetime | None = None
    frees_mib: int = 0
    room_freed_at: AwareDatetime | None = None  # its victims were all gone: its load starts

    @property
    def is_claim_waiting(self) -> bool:
        return self.awaiting is not None

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
            "owner": self.owner,
            "priority": self.priority,
            "awaiting": None if self.awaiting is None else list(self.awaiting),
            "awaiting_since": _iso(self.awaiting_since),
            "frees_mib": self.frees_mib,
            "room_freed_at": _iso(self.room_freed_at),
        }

    def to_api(
        self, pending_mib: int, unload: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The form the HTTP API answers with; a waiting claim's victims as `unload`."""
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
            "priority": self.priority,
            "awaiting": None
            if self.awaiting is None
            else {"unload": unload or [], "frees_mib": self.frees_mib},
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
