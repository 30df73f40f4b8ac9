"""Shapes of the /reservations API: validated strictly, like model writes."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from registry.container_pid import CONTAINER_ID_PATTERN, POD_UID_PATTERN
from registry.schemas import ModelName, Pagination, Vram, integral_float_as_int

TTL_MAX_S = 3600
PID_MAX = 4_194_304  # the kernel's upper bound for pid_max


# Free text shown to operators and written to logs: no control (Cc) or format (Cf) character.
# The validator below enforces it with a clear message; this pattern says it in the schema
# (the categories as this Python's unicodedata has them; a test keeps the two in step).
NOT_SHOWN_AS_WRITTEN = (
    "\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f"
    "\\u0890-\\u0891\\u08e2\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064"
    "\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb\\U000110bd\\U000110cd\\U00013430-\\U00013438"
    "\\U0001bca0-\\U0001bca3\\U0001d173-\\U0001d17a\\U000e0001\\U000e0020-\\U000e007f"
)
_PRINTABLE = f"^[^{NOT_SHOWN_AS_WRITTEN}]+$"


def _shown_as_written(value: str) -> str:
    """Refuse what would not show as written in a terminal or a log: control characters (C0
    and C1, such as U+009B, which some terminals read as an escape) and format characters
    (bidi overrides such as U+202E reorder what follows)."""
    for character in value:
        if unicodedata.category(character) in ("Cc", "Cf"):
            raise ValueError(
                f"control or format character U+{ord(character):04X} is not allowed here"
            )
    return value


Holder = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128),
    AfterValidator(_shown_as_written),
    Field(
        description="Who holds it (a session or job id), shown to operators.",
        json_schema_extra={"pattern": _PRINTABLE},
    ),
]
TtlS = Annotated[
    int,
    Field(ge=1, le=TTL_MAX_S, description="Lease in seconds, from now."),
    BeforeValidator(integral_float_as_int),
]
Pid = Annotated[
    int,
    Field(ge=1, le=PID_MAX, description="The process that loads (as the host sees it)."),
    BeforeValidator(integral_float_as_int),
]
Priority = Annotated[
    int,
    Field(
        ge=0,
        le=100,
        description="0 to 100 (default 50): a claim may take instances of its priority or "
        "below. Above 50 only with an admin token.",
    ),
    BeforeValidator(integral_float_as_int),
]
Sessions = Annotated[
    int,
    Field(ge=0, le=1_000_000, description="Work in flight on it now (0: idle)."),
    BeforeValidator(integral_float_as_int),
]
GpuUuid = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128),
    AfterValidator(_shown_as_written),
    Field(
        description="Device UUID to reserve on; default: best fit.",
        json_schema_extra={"pattern": _PRINTABLE},
    ),
]


def _set(name: str, kind: str) -> dict[str, Any]:
    """JSON Schema: `name` is given, and not null."""
    return {"required": [name], "properties": {name: {"type": kind}}}


def _given(*alternatives: tuple[str, str]) -> list[dict[str, Any]]:
    """JSON Schema branches "this field is present and not null", one per (field, type)."""
    return [_set(name, kind) for name, kind in alternatives]


def _exactly_one_size(schema: dict[str, Any]) -> None:
    schema["oneOf"] = _given(("model", "string"), ("vram_mib", "integer"))
    in_container_rules(schema)


def _at_least_one_change(schema: dict[str, Any]) -> None:
    schema["anyOf"] = _given(("ttl_s", "integer"), ("pid", "integer"))


ContainerPid = Annotated[
    int,
    Field(
        ge=1,
        le=PID_MAX,
        description="The loading process's pid inside its container (with `container` or "
        "`pod_uid`), instead of `pid`: the daemon finds the host's pid.",
    ),
    BeforeValidator(integral_float_as_int),
]
ContainerId = Annotated[
    str,
    StringConstraints(pattern=CONTAINER_ID_PATTERN),
    Field(description="The container's id (12 to 64 hex digits) that `container_pid` is in."),
]
PodUid = Annotated[
    str,
    StringConstraints(pattern=POD_UID_PATTERN),
    Field(description="The pod's UID (Downward API) that `container_pid` is in."),
]


class InContainer(BaseModel):
    """A process named by its pid inside a container: `container_pid` with exactly one of
    `container` and `pod_uid`, never with `pid`."""

    container_pid: ContainerPid | None = None
    container: ContainerId | None = None
    pod_uid: PodUid | None = None

    @model_validator(mode="after")
    def _container_or_host_pid(self) -> InContainer:
        named = (self.container is not None) + (self.pod_uid is not None)
        if self.container_pid is None:
            if named:
                raise ValueError("container and pod_uid go with container_pid")
        elif named != 1:
            raise ValueError("container_pid goes with exactly one of container and pod_uid")
        elif getattr(self, "pid", None) is not None:
            raise ValueError("give pid or container_pid, not both")
        return self


CONTAINER_FIELDS = frozenset({"container_pid", "container", "pod_uid"})


# The rules of InContainer, for the JSON Schema (null counts as not given, as in validation).
IN_CONTAINER_RULES: list[dict[str, Any]] = [
    {"if": _set("container", "string"), "then": _set("container_pid", "integer")},
    {"if": _set("pod_uid", "string"), "then": _set("container_pid", "integer")},
    {
        "if": _set("container_pid", "integer"),
        "then": {
            "oneOf": [_set("container", "string"), _set("pod_uid", "string")],
            "not": _set("pid", "integer"),
        },
    },
]


def in_container_rules(schema: dict[str, Any]) -> None:
    schema.setdefault("allOf", []).extend(IN_CONTAINER_RULES)


class ReservationCreate(InContainer):
    """Exactly one of `model` and `vram_mib`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one_size)

    model: ModelName | None = Field(default=None, description="A catalog model, by name.")
    vram_mib: Vram | None = None
    ttl_s: TtlS = 120
    holder: Holder | None = None
    gpu: GpuUuid | None = None
    pid: Pid | None = None
    make_room: bool = Field(
        default=False,
        description="When it does not fit now: plan which idle instances to unload and hold "
        "their memory for this reservation (202, `awaiting`).",
    )
    priority: Priority = 50

    @model_validator(mode="after")
    def _one_size(self) -> ReservationCreate:
        if (self.model is None) == (self.vram_mib is None):
            raise ValueError("give exactly one of model and vram_mib")
        return self


class ReservationPatch(BaseModel):
    """Renew the lease from now, name the loading process, or both."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_at_least_one_change)

    ttl_s: TtlS | None = None
    pid: Pid | None = None

    @model_validator(mode="after")
    def _something(self) -> ReservationPatch:
        if self.ttl_s is None and self.pid is None:
            raise ValueError("give ttl_s, pid or both")
        return self


class ReservationQuery(BaseModel):
    """Query parameters of POST /reservations."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    dry_run: bool = Field(
        default=False, description="Book nothing: say what a real request would get now."
    )


class ReservedGpu(BaseModel):
    uuid: str
    index: int


class ReservationOut(BaseModel):
    id: str
    model: str | None
    vram_mib: int
    gpu: ReservedGpu
    holder: str | None
    pid: int | None
    created_at: datetime
    expires_at: datetime
    pending_mib: int = Field(description="What it still holds: vram_mib less what pid loaded.")
    priority: int
    awaiting: Awaiting | None = Field(
        description="A claim's room not yet free: the instances still to go. null: none."
    )


class Awaiting(BaseModel):
    unload: list[InstanceOut] = Field(description="The instances still to unload.")
    frees_mib: int = Field(description="What they free.")


class TrialOut(BaseModel):
    """POST /reservations?dry_run=true: what a real request would get now."""

    fits: bool = Field(description="Granted now (true), or once `unload` has gone (false).")
    gpu: ReservedGpu
    vram_mib: int = Field(description="What it would book there.")
    unload: list[InstanceOut] = Field(description="The instances to unload first.")
    frees_mib: int


class ReservationList(BaseModel):
    data: list[ReservationOut]


class RefusalOut(BaseModel):
    detail: str
    reason: Literal[
        "insufficient_vram",
        "too_large",
        "disabled",
        "gpu_state_unknown",
        "too_many",
        "pid_not_on_gpu",
        "processes_unknown",
        "already_loaded",
        "pid_unresolved",
    ]
    instance: str | None = Field(
        default=None, description="already_loaded: the live instance that holds the load."
    )


def _bind_or_adopt(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [
        {
            "required": ["reservation"],
            "properties": {
                "reservation": {"type": "string"},
                "model": {"type": "null"},
                "gpu": {"type": "null"},
            },
        },
        {
            "required": ["model", "gpu"],
            "properties": {
                "reservation": {"type": "null"},
                "model": {"type": "string"},
                "gpu": {"type": "string"},
            },
            # adopting needs the process: by its host pid, or by its pid in a container
            "anyOf": _given(("pid", "integer"), ("container_pid", "integer")),
        },
    ]
    in_container_rules(schema)


class InstanceCreate(InContainer):
    """Bind: `reservation` (and `pid`, unless the reservation names one). Adopt: `model`,
    `gpu` and `pid`, for a model that is already loaded. A process in a container may be
    named by `container_pid` and `container` (or `pod_uid`) instead of `pid`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_bind_or_adopt)

    reservation: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    model: ModelName | None = None
    gpu: GpuUuid | None = None
    pid: Pid | None = None
    holder: Holder | None = None
    sessions: Sessions = 0
    pinned: bool = Field(default=False, description="Never unloaded to make room.")
    priority: Priority = 50

    @model_validator(mode="after")
    def _bind_or_adopt(self) -> InstanceCreate:
        if self.reservation is not None:
            if self.model is not None or self.gpu is not None:
                raise ValueError("a bind names the reservation only: not model or gpu")
        elif self.model is None or self.gpu is None or not (self.pid or self.container_pid):
            raise ValueError("give a reservation to bind, or model, gpu and pid to adopt")
        return self


class InstanceOut(BaseModel):
    id: str
    model: str | None
    gpu: ReservedGpu
    pid: int
    holder: str | None
    reservation: str | None = Field(description="The reservation it was bound from.")
    loaded_at: datetime
    used_mib: int | None = Field(description="What NVML attributes to pid on the device.")
    peak_mib: int = Field(description="The most used_mib seen.")
    baseline_mib: int = Field(
        description="What pid held on the device before this load: only growth above it counts."
    )
    pending_mib: int = Field(description="What its reservation still books, until the load shows.")
    sessions: int
    pinned: bool
    priority: int
    ready: bool = Field(description="Its load is done (reported, or grown to what it booked).")
    ready_at: datetime | None
    last_active_at: datetime = Field(
        description="The last time it had sessions or GPU activity (else when it was loaded)."
    )
    idle_s: float = Field(description="Seconds since last_active_at (0 while it has sessions).")
    evicting: EvictingOut | None = Field(description="A claim waits for it to be unloaded.")


class EvictingOut(BaseModel):
    reservation: str = Field(description="The claim that waits for it.")
    since: datetime


def _some_change(schema: dict[str, Any]) -> None:
    schema["minProperties"] = 1


class InstancePatch(BaseModel):
    """What its owner says of it now; give at least one."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_some_change)

    sessions: Sessions | None = None
    pinned: bool | None = None
    priority: Priority | None = None
    ready: Literal[True] | None = Field(default=None, description="Its load is done.")

    @model_validator(mode="after")
    def _something(self) -> InstancePatch:
        if self.model_fields_set == set() or all(
            getattr(self, name) is None for name in self.model_fields_set
        ):
            raise ValueError("give sessions, pinned, priority or ready")
        return self


class InstanceList(BaseModel):
    data: list[InstanceOut]
    pagination: Pagination


class InstanceQuery(BaseModel):
    """Query parameters of GET /instances."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str | None = Field(default=None, description="Only this model's instances.")
    skip: int = Field(default=0, ge=0, description="Items to skip from the start (offset).")
    limit: int = Field(default=100, ge=1, le=1000, description="Page size.")


# Shapes that name others defined after them.
for _shape in (ReservationOut, Awaiting, TrialOut, InstanceOut):
    _shape.model_rebuild()
