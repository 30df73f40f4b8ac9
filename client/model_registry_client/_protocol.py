"""What the sync and async clients share: the answers mapped to exceptions, the request bodies,
and the lease's timing."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from model_registry_client.errors import (
    Forbidden,
    LeaseLost,
    NotFound,
    Refused,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from model_registry_client.objects import (
    Candidate,
    Event,
    GpuRef,
    Instance,
    Reservation,
    WarmSpot,
)

log = logging.getLogger("model_registry_client")

# Statuses on which a renewal is tried again (until the lease would lapse) and on which a
# fleet placement moves on to the next host.
TRANSIENT = frozenset({429, 500, 502, 503, 504})
PAGE = 1000  # models asked for per page when listing them all
RELEASE_TRIES = 3
# An event stream is idle between changes; the daemon sends a keep-alive every 15 s by default.
STREAM_READ_TIMEOUT_S = 60.0
BACKOFF_MAX_S = 5.0


def headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def renew_every(ttl_s: float) -> float:
    """How often a lease is renewed: a third of its term, as etcd does."""
    return ttl_s / 3


def reservation_body(
    model: str | None,
    vram_mib: int | None,
    ttl_s: int,
    holder: str | None,
    gpu: str | None,
    pid: int | None,
) -> dict[str, Any]:
    if (model is None) == (vram_mib is None):
        raise ValueError("give a model name or vram_mib, one of the two")
    body = {"model": model, "vram_mib": vram_mib, "ttl_s": ttl_s, "holder": holder}
    body.update(gpu=gpu, pid=pid)
    return {key: value for key, value in body.items() if value is not None}


def place_body(model: str, options: dict[str, Any]) -> dict[str, Any]:
    """The reservation body for Fleet.place(model, **options)."""
    options = dict(options)
    body = reservation_body(
        model,
        None,
        options.pop("ttl_s", 60),
        options.pop("holder", None),
        options.pop("gpu", None),
        options.pop("pid", None),
    )
    if options:
        raise TypeError(f"unexpected arguments: {', '.join(options)}")
    return body


def last_page(page: dict[str, Any], collected: int) -> bool:
    """Whether a paged listing is done, `collected` items in (an empty page ends it too)."""
    return not page["data"] or collected >= page["pagination"]["total_items"]


def instance_params(model: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": PAGE}
    if model is not None:
        params["model"] = model
    return params


def list_params(active: bool | None, name: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": PAGE}
    if active is not None:
        params["active"] = "true" if active else "false"
    if name is not None:
        params["name"] = name
    return params


class LeaseState:
    """What a lease knows, shared by the blocking and the asyncio lease: what was granted,
    when it lapses if not renewed (by this process's clock), and whether it was lost."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self._body = body
        self._granted_by = url
        self.ttl_s: int = body["ttl_s"]
        self.lost = False
        self.renewals = 0
        self._reservation: Reservation | None = None
        self._lapses_at = 0.0
        self.instance: Instance | None = None  # what it became, once bound

    @property
    def reservation(self) -> Reservation:
        if self._reservation is None:
            raise RuntimeError("the lease has not been granted yet: enter its with block")
        return self._reservation

    @property
    def id(self) -> str:
        return self.reservation.id

    @property
    def model(self) -> str | None:
        return self.reservation.model

    @property
    def vram_mib(self) -> int:
        return self.reservation.vram_mib

    @property
    def gpu(self) -> GpuRef:
        return self.reservation.gpu

    @property
    def expires_at(self) -> Any:
        return self.reservation.expires_at

    @property
    def url(self) -> str:
        """The daemon that granted it."""
        return self._granted_by

    def _took(self, answer: Any) -> None:
        self._reservation = Reservation.from_json(answer)
        self._lapses_at = time.monotonic() + self.ttl_s

    def _renewed(self, answer: Any) -> None:
        self._took(answer)
        self.renewals += 1

    def _lose(self, why: str) -> None:
        self.lost = True
        log.error("lease %s lost: %s", self.id, why)

    def _retry_in(self, delay: float, problem: str) -> float | None:
        """Seconds to wait before trying a failed renewal again; None (and lost) once the
        lease would have lapsed."""
        remaining = self._lapses_at - time.monotonic()
        if remaining <= 0:
            self._lose(f"it could not be renewed before it lapsed ({problem})")
            return None
        log.warning("lease %s: renewal failed, retrying: %s", self.id, problem)
        return min(delay, remaining / 2)

    def _lost_error(self) -> LeaseLost:
        return LeaseLost(f"reservation {self.id} was lost while it was held")


def unreachable(exc: httpx.TransportError, url: object) -> RegistryUnavailable:
    return RegistryUnavailable(f"cannot reach {url}: {exc!r}")


def check(response: httpx.Response) -> Any:
    """The answer's JSON for a 2xx (None for 204); otherwise the matching exception."""
    status = response.status_code
    if 200 <= status < 300:
        return None if status == 204 or not response.content else response.json()
    payload = _payload(response)
    detail = payload.get("detail")
    text = detail if isinstance(detail, str) else json.dumps(detail) if detail else response.text
    reason = payload.get("reason")
    if isinstance(reason, str):
        raise Refused(reason, text, status, _retry_after(response))
    if status == 401:
        raise Unauthorized(text, status)
    if status == 403:
        raise Forbidden(text, status)
    if status == 404:
        raise NotFound(text, status)
    if status == 503:
        raise RegistryUnavailable(text, status)
    raise RegistryError(text, status)


def check_stream(response: httpx.Response) -> None:
    """Raise for an event stream that was not opened (its body is not read first)."""
    if response.status_code != 200:
        response.read()
        check(response)


def candidates(model: str, answer: Any) -> list[Candidate]:
    """The hosts of a `/fleet/models?name=` answer, best fit first."""
    if not answer["data"]:
        raise NotFound(f"no model named {model!r} in the catalog", 404)
    return [
        Candidate(h["host"], h["url"], h["gpu"], h["index"], h["usable_mib"])
        for h in answer["data"][0]["hosts"]
    ]


def warm_spots(model: str, answer: Any) -> list[WarmSpot]:
    """Where a `/fleet/models?name=` answer says the model is loaded now."""
    if not answer["data"]:
        raise NotFound(f"no model named {model!r} in the catalog", 404)
    return [WarmSpot(**spot) for spot in answer["data"][0].get("warm", [])]


BIND_RETRY_S = 0.25  # between binds while the worker has no CUDA context yet


def nowhere(model: str, refusal: Refused | None) -> Refused:
    """What Fleet.place raises when no host granted: the last host's refusal, if one said no."""
    return refusal or Refused(
        "insufficient_vram", f"no host of the fleet has room for {model!r} now", 409
    )


def event(name: str, event_id: str, data: str) -> Event:
    try:
        parsed: Any = json.loads(data) if data else None
    except ValueError:
        parsed = data
    return Event(name or "message", event_id, parsed)


def _payload(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return None if value is None else float(value)
    except ValueError:
        return None
