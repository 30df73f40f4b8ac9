"""What can go wrong when talking to a daemon, as exceptions a scheduler can act on."""

from __future__ import annotations


class RegistryError(Exception):
    """Any error the daemon answered with, or failing to reach it; `status` is the HTTP status
    (None when no answer came) and `detail` the daemon's words."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class Refused(RegistryError):
    """The daemon said no for a reason: `insufficient_vram`, `disabled`, `gpu_state_unknown`,
    `processes_unknown`, `pid_not_on_gpu` or `too_many`. `retry_after` is in seconds, when
    the daemon said when to try again."""

    def __init__(
        self,
        reason: str,
        detail: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status)
        self.reason = reason
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


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
    """A reservation ended while its holder still counted on it (removed by an operator, or
    expired while the daemon could not be reached): its memory is no longer booked."""
