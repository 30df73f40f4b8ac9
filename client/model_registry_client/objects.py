"""The daemon's answers as typed objects. Fields the daemon adds later are kept in `extra`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _at(value: str) -> datetime:
    when = _when(value)
    assert when is not None
    return when


def _rest(raw: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in raw.items() if key not in known}


@dataclass(frozen=True)
class GpuRef:
    """A device of the host: its NVML UUID and index."""

    uuid: str
    index: int


@dataclass(frozen=True)
class Placement:
    """Where a model of `/models` would go now: the best-fitting device."""

    gpu: str
    index: int
    free_mib: int


@dataclass(frozen=True)
class Evicting:
    """An instance asked to go: the claim (a make-room reservation) that waits for it."""

    reservation: str
    since: datetime

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Evicting | None:
        return None if raw is None else cls(raw["reservation"], _at(raw["since"]))


@dataclass(frozen=True)
class ModelInstance:
    """Where a model of `/models` is loaded on the host (the short form)."""

    id: str
    gpu: str
    index: int
    sessions: int = 0
    pinned: bool = False
    priority: int = 50
    ready: bool = True
    last_active_at: datetime | None = None
    evicting: Evicting | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelInstance:
        return cls(
            id=raw["id"],
            gpu=raw["gpu"],
            index=raw["index"],
            sessions=raw.get("sessions", 0),
            pinned=raw.get("pinned", False),
            priority=raw.get("priority", 50),
            ready=raw.get("ready", True),
            last_active_at=_when(raw.get("last_active_at")),
            evicting=Evicting.from_json(raw.get("evicting")),
        )


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
    "instances",
    "instances_total",
    "learn",
    "vram_observed",
    "vram_effective",
    "reload_s",
    "reload_estimated",
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
    instances: list[ModelInstance] = field(default_factory=list)  # the newest 100
    instances_total: int = 0
    learn: bool = True
    vram_observed: int | None = None  # what loads took (p95) on the placement's GPU product
    vram_effective: int | None = None  # what admission books there
    reload_s: float | None = None
    reload_estimated: bool = True

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Model:
        placement = raw.get("placement")
        return cls(
            id=raw["id"],
            name=raw["name"],
            active=raw["active"],
            vram=raw["vram"],
            created_at=_at(raw["created_at"]),
            updated_at=_when(raw.get("updated_at")),
            enabled=raw["enabled"],
            fits=raw.get("fits"),
            reason=raw.get("reason"),
            placement=None if placement is None else Placement(**placement),
            headroom_mib=raw.get("headroom_mib"),
            extra=_rest(raw, _MODEL_FIELDS),
            instances=[ModelInstance.from_json(i) for i in raw.get("instances", [])],
            instances_total=raw.get("instances_total", 0),
            learn=raw.get("learn", True),
            vram_observed=raw.get("vram_observed"),
            vram_effective=raw.get("vram_effective"),
            reload_s=raw.get("reload_s"),
            reload_estimated=raw.get("reload_estimated", True),
        )


_DEVICE_FIELDS = (
    "uuid",
    "index",
    "name",
    "total_mib",
    "free_mib",
    "usable_mib",
    "pending_mib",
    "healthy",
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
        known = {key: raw.get(key) for key in _DEVICE_FIELDS}
        return cls(**known, extra=_rest(raw, _DEVICE_FIELDS))  # type: ignore[arg-type]


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


_INSTANCE_FIELDS = (
    "id",
    "model",
    "gpu",
    "pid",
    "holder",
    "reservation",
    "loaded_at",
    "used_mib",
    "peak_mib",
    "pending_mib",
    "baseline_mib",
    "sessions",
    "pinned",
    "priority",
    "ready",
    "ready_at",
    "last_active_at",
    "idle_s",
    "evicting",
)


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
    sessions: int = 0  # in-flight work its owner reported
    pinned: bool = False  # never asked to go
    priority: int = 50
    ready: bool = False  # the load is done
    ready_at: datetime | None = None
    last_active_at: datetime | None = None
    idle_s: float | None = None
    evicting: Evicting | None = None  # asked to go, for a claim
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Instance:
        return cls(
            id=raw["id"],
            model=raw.get("model"),
            gpu=GpuRef(raw["gpu"]["uuid"], raw["gpu"]["index"]),
            pid=raw["pid"],
            holder=raw.get("holder"),
            reservation=raw.get("reservation"),
            loaded_at=_at(raw["loaded_at"]),
            used_mib=raw.get("used_mib"),
            peak_mib=raw["peak_mib"],
            pending_mib=raw["pending_mib"],
            baseline_mib=raw.get("baseline_mib", 0),
            sessions=raw.get("sessions", 0),
            pinned=raw.get("pinned", False),
            priority=raw.get("priority", 50),
            ready=raw.get("ready", False),
            ready_at=_when(raw.get("ready_at")),
            last_active_at=_when(raw.get("last_active_at")),
            idle_s=raw.get("idle_s"),
            evicting=Evicting.from_json(raw.get("evicting")),
            extra=_rest(raw, _INSTANCE_FIELDS),
        )


@dataclass(frozen=True)
class Awaiting:
    """What a claim waits for: the instances asked to go, and what they free."""

    unload: list[Instance]
    frees_mib: int

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Awaiting | None:
        if raw is None:
            return None
        return cls([Instance.from_json(i) for i in raw["unload"]], raw["frees_mib"])


_RESERVATION_FIELDS = (
    "id",
    "model",
    "vram_mib",
    "gpu",
    "holder",
    "pid",
    "created_at",
    "expires_at",
    "pending_mib",
    "priority",
    "awaiting",
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
    priority: int = 50
    awaiting: Awaiting | None = None  # a claim still waiting for room
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Reservation:
        return cls(
            id=raw["id"],
            model=raw.get("model"),
            vram_mib=raw["vram_mib"],
            gpu=GpuRef(raw["gpu"]["uuid"], raw["gpu"]["index"]),
            holder=raw.get("holder"),
            pid=raw.get("pid"),
            created_at=_at(raw["created_at"]),
            expires_at=_at(raw["expires_at"]),
            pending_mib=raw["pending_mib"],
            priority=raw.get("priority", 50),
            awaiting=Awaiting.from_json(raw.get("awaiting")),
            extra=_rest(raw, _RESERVATION_FIELDS),
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
class RoomSpot:
    """A host of the fleet where a model fits once idle instances go (a make_room claim)."""

    host: str
    url: str
    gpu: str
    index: int
    unload_mib: int
    reload_s: float | None = None


@dataclass(frozen=True)
class WarmSpot:
    """Where a model is loaded now in a fleet: a host's device, and how many instances."""

    host: str
    url: str
    gpu: str
    index: int
    instances: int


@dataclass(frozen=True)
class Eviction:
    """An instance of a fleet's host asked to go for a claim."""

    host: str
    url: str
    instance: Instance


@dataclass(frozen=True)
class Route:
    """Where to send a session: a warm `instance` (nothing booked), or a new `lease` (a Lease
    or AsyncLease, granted and renewed) for a load to start."""

    instance: WarmSpot | None = None
    lease: Any = None


@dataclass(frozen=True)
class Host:
    """A host of the fleet, as `GET /fleet` shows it."""

    host: str
    url: str
    state: str  # ok, stale or offline
    heartbeat_at: datetime
    gpu_state: str
    version: str
    devices: list[GpuDevice]
    reservations: list[Reservation]  # the newest 100
    reservations_total: int
    pending_mib: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Host:
        return cls(
            host=raw["host"],
            url=raw["url"],
            state=raw["state"],
            heartbeat_at=_at(raw["heartbeat_at"]),
            gpu_state=raw["gpu_state"],
            version=raw["version"],
            devices=[GpuDevice.from_json(d) for d in raw["devices"]],
            reservations=[Reservation.from_json(r) for r in raw["reservations"]],
            reservations_total=raw["reservations_total"],
            pending_mib=raw["pending_mib"],
        )


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
        observed = [
            ProductFootprint(
                gpu_name=product["gpu_name"],
                samples=product["samples"],
                peak_mib=product["peak_mib"],
                p95_mib=product["p95_mib"],
                updated_at=_at(product["updated_at"]),
                below_declared=bool(product.get("below_declared", False)),
            )
            for product in raw["observed"]
        ]
        return cls(
            model=raw["model"],
            declared_mib=raw["declared_mib"],
            effective_mib=raw["effective_mib"],
            source=raw["source"],
            observed=observed,
            floor_mib=raw.get("floor_mib"),
        )


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of `GET /events`: its name, its id (a generation) and its data
    (parsed JSON). `host` names the host it came from in a fleet's merged watch. Events the
    client knows come as subclasses with typed fields."""

    event: str
    id: str
    data: Any
    host: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SnapshotEvent(Event):
    """On connect (and after falling behind): the whole state."""

    models: list[Model] = field(default_factory=list)
    gpus: Gpus | None = None
    reservations: list[Reservation] = field(default_factory=list)


@dataclass(frozen=True)
class ModelsEvent(Event):
    """Models that changed (objects as in /models), and the ids of those deleted."""

    models: list[Model] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class GpusEvent(Event):
    """The /gpus body, changed."""

    gpus: Gpus | None = None


@dataclass(frozen=True)
class ReservationsEvent(Event):
    """Reservations made or changed, and the ids of those ended (with why, when said)."""

    reservations: list[Reservation] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstancesEvent(Event):
    """Instances made or changed (an `evicting` mark, sessions, ...), and those ended."""

    instances: list[Instance] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)


def parse_event(name: str, event_id: str, data: Any, host: str | None = None) -> Event:
    """The typed event for a known name with the data it should have; else a plain Event."""
    if not isinstance(data, dict):
        return Event(name, event_id, data, host)
    try:
        if name == "snapshot":
            gpus = data.get("gpus")
            return SnapshotEvent(
                name,
                event_id,
                data,
                host,
                models=[Model.from_json(m) for m in data.get("models", [])],
                gpus=None if gpus is None else Gpus.from_json(gpus),
                reservations=[Reservation.from_json(r) for r in data.get("reservations", [])],
            )
        if name == "models":
            return ModelsEvent(
                name,
                event_id,
                data,
                host,
                models=[Model.from_json(m) for m in data.get("models", [])],
                deleted=list(data.get("deleted", [])),
            )
        if name == "gpus":
            return GpusEvent(name, event_id, data, host, gpus=Gpus.from_json(data))
        if name == "reservations":
            return ReservationsEvent(
                name,
                event_id,
                data,
                host,
                reservations=[Reservation.from_json(r) for r in data.get("reservations", [])],
                ended=list(data.get("ended", [])),
                reasons=dict(data.get("reasons", {})),
            )
        if name == "instances":
            return InstancesEvent(
                name,
                event_id,
                data,
                host,
                instances=[Instance.from_json(i) for i in data.get("instances", [])],
                ended=list(data.get("ended", [])),
            )
    except (KeyError, TypeError, ValueError):
        pass  # a shape this client does not know: the plain event still carries it
    return Event(name, event_id, data, host)
