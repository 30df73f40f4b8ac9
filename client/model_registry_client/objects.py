"""The daemon's answers as typed objects. Fields the daemon adds later are kept in `extra`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _rest(raw: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in raw.items() if key not in known}


@dataclass(frozen=True)
class GpuRef:
    """A device of the host: its NVML UUID and index."""

    uuid: str
    index: int


@dataclass(frozen=True)
class Placement:
    gpu: str
    index: int
    free_mib: int


_MODEL_FIELDS = (
    "id",
    "name",
    "active",
    "vram",
    "created_at",
    "updated_at",
    "enabled",
    "fits",
    "reason",
    "placement",
    "headroom_mib",
)


@dataclass(frozen=True)
class Model:
    """One model as `GET /models` shows it."""

    id: int
    name: str
    active: bool
    vram: int
    created_at: datetime
    updated_at: datetime | None
    enabled: bool
    fits: bool | None
    reason: str | None
    placement: Placement | None
    headroom_mib: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Model:
        placement = raw.get("placement")
        created_at = _when(raw["created_at"])
        assert created_at is not None
        return cls(
            id=raw["id"],
            name=raw["name"],
            active=raw["active"],
            vram=raw["vram"],
            created_at=created_at,
            updated_at=_when(raw.get("updated_at")),
            enabled=raw["enabled"],
            fits=raw.get("fits"),
            reason=raw.get("reason"),
            placement=None if placement is None else Placement(**placement),
            headroom_mib=raw.get("headroom_mib"),
            extra=_rest(raw, _MODEL_FIELDS),
        )


@dataclass(frozen=True)
class GpuDevice:
    uuid: str
    index: int
    name: str
    total_mib: int
    free_mib: int
    usable_mib: int | None
    pending_mib: int
    healthy: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GpuDevice:
        known = (
            "uuid",
            "index",
            "name",
            "total_mib",
            "free_mib",
            "usable_mib",
            "pending_mib",
            "healthy",
        )
        return cls(**{key: raw.get(key) for key in known}, extra=_rest(raw, known))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Gpus:
    """`GET /gpus`: the backend, whether its readings can be trusted, and the devices."""

    backend: str
    state: str
    as_of: datetime | None
    last_error: str | None
    devices: list[GpuDevice]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Gpus:
        return cls(
            backend=raw["backend"],
            state=raw["state"],
            as_of=_when(raw.get("as_of")),
            last_error=raw.get("last_error"),
            devices=[GpuDevice.from_json(d) for d in raw.get("devices", [])],
        )


@dataclass(frozen=True)
class Reservation:
    """An open reservation as `GET /reservations` lists it."""

    id: str
    model: str | None
    vram_mib: int
    gpu: GpuRef
    holder: str | None
    pid: int | None
    created_at: datetime
    expires_at: datetime
    pending_mib: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Reservation:
        created_at, expires_at = _when(raw["created_at"]), _when(raw["expires_at"])
        assert created_at is not None and expires_at is not None
        return cls(
            id=raw["id"],
            model=raw.get("model"),
            vram_mib=raw["vram_mib"],
            gpu=GpuRef(raw["gpu"]["uuid"], raw["gpu"]["index"]),
            holder=raw.get("holder"),
            pid=raw.get("pid"),
            created_at=created_at,
            expires_at=expires_at,
            pending_mib=raw["pending_mib"],
        )


@dataclass(frozen=True)
class Candidate:
    """A host of the fleet where a model fits now, best fit first."""

    host: str
    url: str
    gpu: str
    index: int
    usable_mib: int


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of `GET /events`: its name, its id (a generation) and its data."""

    event: str
    id: str
    data: Any


@dataclass(frozen=True)
class Instance:
    """A model loaded on a host by a process, as `GET /instances` lists it."""

    id: str
    model: str | None
    gpu: GpuRef
    pid: int
    holder: str | None
    reservation: str | None
    loaded_at: datetime
    used_mib: int | None
    peak_mib: int
    pending_mib: int
    baseline_mib: int = 0  # what the process held before this load

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Instance:
        loaded_at = _when(raw["loaded_at"])
        assert loaded_at is not None
        return cls(
            id=raw["id"],
            model=raw.get("model"),
            gpu=GpuRef(raw["gpu"]["uuid"], raw["gpu"]["index"]),
            pid=raw["pid"],
            holder=raw.get("holder"),
            reservation=raw.get("reservation"),
            loaded_at=loaded_at,
            used_mib=raw.get("used_mib"),
            peak_mib=raw["peak_mib"],
            pending_mib=raw["pending_mib"],
            baseline_mib=raw.get("baseline_mib", 0),
        )


@dataclass(frozen=True)
class WarmSpot:
    """Where a model is loaded now in a fleet: a host's device, and how many instances."""

    host: str
    url: str
    gpu: str
    index: int
    instances: int


@dataclass(frozen=True)
class ProductFootprint:
    """What a model's loads took on one GPU product."""

    gpu_name: str
    samples: int
    peak_mib: int
    p95_mib: int
    updated_at: datetime
    below_declared: bool = False  # more than 30% below what the model declares


@dataclass(frozen=True)
class Footprint:
    """`GET /models/{id}/footprint`: declared, effective (what admission books) and observed."""

    model: str
    declared_mib: int
    effective_mib: int
    source: str
    observed: list[ProductFootprint]
    floor_mib: int | None = None  # the least booked under source "observed"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Footprint:
        observed = []
        for product in raw["observed"]:
            updated_at = _when(product["updated_at"])
            assert updated_at is not None
            observed.append(
                ProductFootprint(
                    gpu_name=product["gpu_name"],
                    samples=product["samples"],
                    peak_mib=product["peak_mib"],
                    p95_mib=product["p95_mib"],
                    updated_at=updated_at,
                    below_declared=bool(product.get("below_declared", False)),
                )
            )
        return cls(
            model=raw["model"],
            declared_mib=raw["declared_mib"],
            effective_mib=raw["effective_mib"],
            source=raw["source"],
            observed=observed,
            floor_mib=raw.get("floor_mib"),
        )
