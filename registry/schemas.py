"""The shapes the core serves (the listing, /gpus, errors, health) and the field types features
share, as pydantic models: they validate input and generate the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from registry.model import NAME_MAX_LENGTH, NAME_PATTERN, VRAM_MAX_MIB, VRAM_MIN_MIB

ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)
]


def integral_float_as_int(value: object) -> object:
    # JSON Schema counts 57.0 as an integer; strict validation alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Vram = Annotated[
    int,
    Field(ge=VRAM_MIN_MIB, le=VRAM_MAX_MIB, description="VRAM need in MiB"),
    BeforeValidator(integral_float_as_int),
]


class ListQuery(BaseModel):
    """Query parameters of GET /models."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str | None = Field(default=None, description="Exact model name to match.")
    skip: int = Field(default=0, ge=0, description="Items to skip from the start (offset).")
    limit: int = Field(default=100, ge=1, le=1000, description="Page size.")
    active: bool | None = Field(
        default=None, description="Only models that can (true) or cannot (false) be used now."
    )


class PlacementOut(BaseModel):
    gpu: str = Field(description="UUID of the device to load the model on.")
    index: int
    free_mib: int


class ResidentOut(BaseModel):
    id: str = Field(description="The instance (GET /instances/{id}).")
    gpu: str
    index: int


class ModelOut(BaseModel):
    id: int
    name: str
    active: bool = Field(description="enabled and fits now (without GPU awareness: enabled).")
    vram: int = Field(description="VRAM need in MiB.")
    created_at: datetime
    updated_at: datetime | None
    enabled: bool = Field(description="The operator's switch.")
    fits: bool | None = Field(description="null: GPU state unknown or GPU awareness off.")
    reason: Literal["disabled", "insufficient_vram", "too_large", "gpu_state_unknown"] | None
    placement: PlacementOut | None
    headroom_mib: int | None
    instances: list[ResidentOut] = Field(
        description="Where it is loaded on this host now: the newest 100, oldest first."
    )
    instances_total: int = Field(description="How many instances of it are live here.")
    learn: bool = Field(description="Whether its loads teach its footprint.")
    vram_observed: int | None = Field(
        description="What its loads took (p95, MiB) on the placement's GPU product; null until "
        "there are enough samples."
    )
    vram_effective: int = Field(description="What admission books for it there, MiB.")
    reload_s: float = Field(
        description="How long a load takes there: the median of its learned load times, or "
        "an estimate of 1 s per GiB of vram_effective."
    )
    reload_estimated: bool = Field(description="reload_s is the estimate: nothing learned yet.")


class Pagination(BaseModel):
    total_items: int
    total_pages: int
    current_page: int
    per_page: int


class CapacityOut(BaseModel):
    state: Literal["ok", "stale", "unavailable", "disabled"]
    as_of: datetime | None
    backend: str


class ModelList(BaseModel):
    data: list[ModelOut]
    pagination: Pagination
    capacity: CapacityOut


class GpuProcessOut(BaseModel):
    pid: int = Field(description="As the host sees it (NVML reports host pids).")
    name: str | None = Field(
        description="From the driver, else /proc; null for a process in another PID namespace."
    )
    used_mib: int | None = Field(description="null where the driver does not say.")


class GpuDeviceOut(BaseModel):
    uuid: str
    index: int
    name: str
    total_mib: int
    free_mib: int
    used_mib: int | None = Field(default=None, description="Absent when NVML does not report it.")
    reserved_mib: int | None = Field(
        default=None, description="Absent when NVML does not report it."
    )
    healthy: bool
    usable_mib: int | None = Field(
        description="Free memory after the margin and the pending reservations; null if unhealthy."
    )
    pending_mib: int = Field(description="What open reservations still hold on this device.")
    processes: list[GpuProcessOut] = Field(
        default_factory=list, description="Who holds memory on the device."
    )
    error: str | None = None
    parent_uuid: str | None = None


class GpusOut(BaseModel):
    backend: str
    state: Literal["ok", "stale", "unavailable", "disabled"]
    as_of: datetime | None
    last_poll_at: datetime | None
    poll_interval_s: float
    last_error: str | None
    margin_mib: int
    margin_percent: float
    devices: list[GpuDeviceOut]


class ValidationIssue(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: object = None


class ValidationErrorOut(BaseModel):
    detail: list[ValidationIssue]


class ErrorOut(BaseModel):
    detail: str


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    problems: list[str] = []
