"""What can go wrong when talking to a daemon, as exceptions a scheduler can act on."""

from __future__ import annotations

from enum import Enum
from typing import Any


class Reason(str, Enum):
    """Why the daemon said no. Compares equal to its string (`Reason.TOO_LARGE ==
    "too_large"`); a reason this client does not know yet comes as the plain string."""

    INSUFFICIENT_VRAM = "insufficient_vram"
    TOO_LARGE = "too_large"
    DISABLED = "disabled"
    GPU_STATE_UNKNOWN = "gpu_state_unknown"
    PROCESSES_UNKNOWN = "processes_unknown"
    PID_NOT_ON_GPU = "pid_not_on_gpu"
    PID_UNRESOLVED = "pid_unresolved"
    ALREADY_LOADED = "already_loaded"
    TOO_MANY = "too_many"
    ROOM_WITHDRAWN = "room_withdrawn"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value: str) -> Reason | str:
        try:
            return cls(value)
        except ValueError:
            return value


class RegistryError(Exception):
    """Any error the daemon answered with, or failing to reach it: `status_code` is the HTTP
    status (None when no answer came; `status` is the same) and `detail` the daemon's words."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status

    @property
    def status(self) -> int | None:
        return self.status_code


class Refused(RegistryError):
    """The daemon said no for a reason (a `Reason`, or the daemon's string for one this client
    does not know). `retry_after` is in seconds, when the daemon said when to try again."""

    def __init__(
        self,
        reason: str,
        detail: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status)
        self.reason: Reason | str = Reason.of(reason)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class Invalid(RegistryError):
    """422: the request did not validate. `errors` is the daemon's list, each with `loc`,
    `msg` and `type` (FastAPI's shape)."""

    def __init__(self, detail: str, errors: list[dict[str, Any]], status: int = 422) -> None:
        super().__init__(detail, status)
        self.errors = errors


class NotFound(RegistryError):
    """404: no such model, GPU, reservation or instance."""


class Unauthorized(RegistryError):
    """401: no token, or a token the daemon does not know."""


class Forbidden(RegistryError):
    """403: the token may not do this, or the daemon has no token configured for it."""


class RegistryUnavailable(RegistryError):
    """The daemon cannot be reached, or answered 503 without a reason (its database is down, it
    could not record a change): try again later, or another host."""


class LeaseLost(RegistryError):
    """A reservation ended while its holder still counted on it (removed by an operator,
    expired while the daemon could not be reached, or its room withdrawn): its memory is no
    longer booked."""
