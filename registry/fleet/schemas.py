"""Shapes of the fleet endpoints: their queries (validated) and answers (documented)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.schemas import ListQuery, Pagination


class FleetQuery(BaseModel):
    """Query parameters of GET /fleet."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: Literal["ok", "stale", "offline"] | None = Field(
        default=None, description="Only hosts in this state."
    )


class FleetModelsQuery(ListQuery):
    """Query parameters of GET /fleet/models: those of GET /models, and how many hosts."""

    hosts_limit: int = Field(
        default=10, ge=1, le=1000, description="Most candidate hosts listed per model."
    )


class FleetDeviceOut(BaseModel):
    uuid: str
    index: int
    name: str
    total_mib: int
    free_mib: int
    usable_mib: int | None
    pending_mib: int
    healthy: bool


class FleetHostOut(BaseModel):
    host: str
    url: str
    state: Literal["ok", "stale", "offline"] = Field(
        description="stale: no heartbeat for 3 intervals; offline: stopped cleanly."
    )
    heartbeat_at: datetime
    gpu_state: str
    version: str
    devices: list[FleetDeviceOut]
    reservations: list[dict[str, Any]] = Field(description="The newest 100 open, newest first.")
    reservations_total: int = Field(description="Reservations open on the host.")
    pending_mib: int = Field(description="Memory its reservations still hold, all devices.")


class FleetOut(BaseModel):
    data: list[FleetHostOut]
    fleet_state: Literal["ok", "stale"] = Field(
        description="stale: the database cannot be read; this is the last state read."
    )


class CandidateHostOut(BaseModel):
    host: str
    url: str
    gpu: str
    index: int
    usable_mib: int
    headroom_mib: int


class WarmSpotOut(BaseModel):
    host: str
    url: str
    gpu: str
    index: int
    instances: int


class FleetModelOut(BaseModel):
    id: int
    name: str
    active: bool = Field(description="enabled, and fits on at least one host that is up.")
    vram: int
    created_at: datetime
    updated_at: datetime | None
    enabled: bool
    reason: Literal["disabled", "insufficient_vram", "gpu_state_unknown"] | None
    hosts_total: int = Field(description="Hosts, up, where it fits now.")
    hosts: list[CandidateHostOut] = Field(description="Best fit first, at most hosts_limit.")
    warm_total: int = Field(description="Instances of it loaded now, on hosts that are up.")
    warm: list[WarmSpotOut] = Field(description="Where it is loaded now: host and device.")
    room: list[RoomOut] = Field(
        description="Hosts where it does not fit now but would once idle instances were "
        "unloaded (a make_room reservation there), least reload first."
    )


class RoomOut(BaseModel):
    host: str
    url: str
    gpu: str
    index: int
    unload_mib: int = Field(description="What unloading the victims frees.")
    reload_s: float = Field(description="What reloading the victims would cost, together.")
    victims: int = Field(description="Instances to unload.")


class FleetModelList(BaseModel):
    data: list[FleetModelOut]
    pagination: Pagination
    fleet_state: Literal["ok", "stale"]


FleetModelOut.model_rebuild()  # it names RoomOut, defined after it
