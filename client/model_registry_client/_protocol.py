"""What the sync and async clients share: the answers mapped to exceptions, the request bodies,
and the lease's timing."""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

import httpx

from model_registry_client.errors import (
    Forbidden,
    Invalid,
    LeaseLost,
    NotFound,
    Refused,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from model_registry_client.objects import (
    Awaiting,
    Candidate,
    Event,
    GpuRef,
    Instance,
    Reservation,
    RoomSpot,
    WarmSpot,
    parse_event,
)

Timeout = Union[float, httpx.Timeout]
OnLost = Optional[Callable[[Any], None]]

log = logging.getLogger("model_registry_client")

# Statuses on which a renewal is tried again (until the lease would lapse) and on which a
# fleet placement moves on to the next host.
TRANSIENT = frozenset({429, 500, 502, 503, 504})
PAGE = 1000  # models asked for per page when listing them all
RELEASE_TRIES = 3
# An event stream is idle between changes; the daemon sends a keep-alive every 15 s by default.
STREAM_READ_TIMEOUT_S = 60.0
BACKOFF_MAX_S = 5.0
FLEET_REFRESH_S = 10.0  # a fleet watch looks for new hosts this often
WAIT_POLL_S = 0.25  # between looks while waiting for an instance to go or a claim's room


def headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def stream_timeout(timeout: Timeout) -> httpx.Timeout:
    """The client's timeouts, but a read may wait for the next event or keep-alive."""
    base = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    return httpx.Timeout(
        connect=base.connect, read=STREAM_READ_TIMEOUT_S, write=base.write, pool=base.pool
    )


def bind_body(reservation: str, pid: int | None, fields: dict[str, Any]) -> dict[str, Any]:
    return instance_body(reservation=reservation, pid=pid, **fields)


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
    make_room: bool = False,
    priority: int | None = None,
) -> dict[str, Any]:
    if (model is None) == (vram_mib is None):
        raise ValueError("give a model name or vram_mib, one of the two")
    body = {"model": model, "vram_mib": vram_mib, "ttl_s": ttl_s, "holder": holder}
    body.update(gpu=gpu, pid=pid, priority=priority, make_room=make_room or None)
    return {key: value for key, value in body.items() if value is not None}


def instance_body(**fields: Any) -> dict[str, Any]:
    """A bind, adoption or change of an instance: the fields given, None left out."""
    return {key: value for key, value in fields.items() if value is not None}


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

    def __init__(self, url: str, body: dict[str, Any], on_lost: OnLost = None) -> None:
        self._body = body
        self._granted_by = url
        self.ttl_s: int = body["ttl_s"]
        self.lost = False
        self.released = False
        self.renewals = 0
        self._reservation: Reservation | None = None
        self._lapses_at = 0.0
        self._on_lost = on_lost
        self.instance: Instance | None = None  # what it became, once bound
        self.host: str | None = None  # the fleet host that granted it, when placed
        self._on_bound: Callable[[LeaseState, Instance], None] | None = None

    @property
    def reservation(self) -> Reservation:
        if self._reservation is None:
            raise RuntimeError("the lease has not been granted yet")
        return self._reservation

    @property
    def awaiting(self) -> Awaiting | None:
        """For a claim (make_room): the instances it waits for; None once it holds its room."""
        return self.reservation.awaiting

    @property
    def active(self) -> bool:
        """Granted, and not lost, released or bound."""
        granted = self._reservation is not None
        return granted and not (self.lost or self.released or self.instance is not None)

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

    def _bound(self, answer: Any) -> Instance:
        self.instance = Instance.from_json(answer)
        if self._on_bound is not None:
            self._on_bound(self, self.instance)
        return self.instance

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        log.error("lease %s lost: %s", self.id, why)
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                log.exception("the on_lost callback of lease %s failed", self.id)

    def _check_usable(self) -> None:
        """Raise LeaseLost for a lease that was lost; RuntimeError after a release."""
        if self.lost:
            raise self._lost_error()
        if self.released:
            raise RuntimeError(f"lease {self.id} was released")

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
    if status == 422 and isinstance(detail, list):
        raise Invalid(_summary(detail), [e for e in detail if isinstance(e, dict)])
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


def _summary(errors: list[Any]) -> str:
    """A 422's errors in one line: `query.skip: Input should be ...; ...`."""
    parts = []
    for error in errors:
        if isinstance(error, dict):
            where = ".".join(str(part) for part in error.get("loc", []))
            parts.append(f"{where}: {error.get('msg', '')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "the request did not validate"


def _fleet_model(model: str, answer: Any) -> dict[str, Any]:
    if not answer["data"]:
        raise NotFound(f"no model named {model!r} in the catalog", 404)
    found: dict[str, Any] = answer["data"][0]
    return found


def candidates(model: str, answer: Any) -> list[Candidate]:
    """The hosts of a `/fleet/models?name=` answer, best fit first."""
    return [
        Candidate(h["host"], h["url"], h["gpu"], h["index"], h["usable_mib"])
        for h in _fleet_model(model, answer)["hosts"]
    ]


def room_spots(model: str, answer: Any) -> list[RoomSpot]:
    """The hosts of a `/fleet/models?name=` answer where the model fits once idle instances
    go, least reloading first."""
    return [
        RoomSpot(r["host"], r["url"], r["gpu"], r["index"], r["unload_mib"], r.get("reload_s"))
        for r in _fleet_model(model, answer).get("room", [])
    ]


def warm_spots(model: str, answer: Any) -> list[WarmSpot]:
    """Where a `/fleet/models?name=` answer says the model is loaded now."""
    return [WarmSpot(**spot) for spot in _fleet_model(model, answer).get("warm", [])]


BIND_RETRY_S = 0.25  # between binds while the worker has no CUDA context yet


def nowhere(model: str, refusal: Refused | None) -> Refused:
    """What Fleet.place raises when no host granted: the last host's refusal, if one said no."""
    return refusal or Refused(
        "insufficient_vram", f"no host of the fleet has room for {model!r} now", 409
    )


def is_keepalive(name: str, data: str) -> bool:
    """A comment (`: ping`) that an SSE parser still turned into an empty event."""
    return not data and name in ("", "message")


def event(name: str, event_id: str, data: str, host: str | None = None) -> Event:
    try:
        parsed: Any = json.loads(data) if data else None
    except ValueError:
        parsed = data
    return parse_event(name or "message", event_id, parsed, host)


@dataclass(frozen=True)
class Target:
    """A host to ask for a placement, and how."""

    host: str
    url: str
    gpu: str | None
    make_room: bool


def check_target(host: str | None, gpu: str | None) -> None:
    if gpu is not None and host is None:
        raise ValueError("a gpu names a device of one host: give host= too")


def placement_tries(
    model: str,
    answer: Any,
    make_room: bool,
    exclude: Iterable[str],
    host: str | None,
    gpu: str | None,
) -> list[Target]:
    """The hosts Fleet.place asks, in order: where the model fits now, best fit first, then
    (make_room) where it fits once idle instances go. A `gpu` is a device of `host` only."""
    check_target(host, gpu)
    skip = set(exclude)
    tries = [
        Target(c.host, c.url, gpu, False)
        for c in candidates(model, answer)
        if c.host not in skip and host in (None, c.host)
    ]
    if make_room:
        tries += [
            Target(r.host, r.url, gpu if host else r.gpu, True)
            for r in room_spots(model, answer)
            if r.host not in skip and host in (None, r.host)
        ]
    if host is not None and not tries and host not in skip:
        # Not offered as fitting: ask it anyway, and let its answer say why not.
        url = _host_url(answer, host)
        if url is not None:
            tries.append(Target(host, url, gpu, make_room))
    return tries


def _host_url(answer: Any, host: str) -> str | None:
    model = answer["data"][0] if answer.get("data") else {}
    for spot in [*model.get("hosts", []), *model.get("room", []), *model.get("warm", [])]:
        if spot["host"] == host:
            url: str = spot["url"]
            return url
    return None


def evicted(
    instances: Iterable[Instance],
    holder: str | None,
    ids: Iterable[str] | None,
    told: set[tuple[str, str]],
) -> list[Instance]:
    """The instances newly asked to go (each once per claim), of `holder` or among `ids`."""
    wanted = None if ids is None else set(ids)
    found = []
    for instance in instances:
        if instance.evicting is None:
            continue
        if holder is not None and instance.holder != holder:
            continue
        if wanted is not None and instance.id not in wanted:
            continue
        key = (instance.id, instance.evicting.reservation)
        if key not in told:
            told.add(key)
            found.append(instance)
    return found


class AllowedHosts:
    """Where a fleet client sends its token: the host names of the URLs it was given (any
    port), and the patterns the caller names (`*.gpu.example`; `"*"` trusts every advertised
    host). Never from https to http."""

    def __init__(self, entries: Iterable[str], patterns: Iterable[str]) -> None:
        parts = [urlsplit(url) for url in entries]
        self._names = {(p.hostname or "").lower() for p in parts}
        self._patterns = [pattern.lower() for pattern in patterns]
        self._secure = any(p.scheme == "https" for p in parts)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def why_not(self, url: str) -> str | None:
        """None when `url` may have the token; else why not."""
        parts = urlsplit(url)
        name = (parts.hostname or "").lower()
        if self._secure and parts.scheme != "https":
            return f"{url} is not https, and the fleet was reached over https"
        if name in self._names or any(fnmatch.fnmatchcase(name, p) for p in self._patterns):
            return None
        return f"{name or url} is not among the allowed hosts"

    def skip(self, host: str, why: str) -> None:
        """Say once per host that it is skipped."""
        with self._lock:
            if host in self._warned:
                return
            self._warned.add(host)
        log.warning("fleet host %s skipped: %s (name it in allowed_hosts to use it)", host, why)


def nobody_allowed(model: str, skipped: dict[str, str]) -> Refused:
    hosts = ", ".join(f"{host} ({why})" for host, why in sorted(skipped.items()))
    return Refused(
        "insufficient_vram",
        f"no allowed host of the fleet granted {model!r}; skipped: {hosts}. To send the "
        "token there, name them in Fleet(..., allowed_hosts=[...])",
        409,
    )


class OwnBinds:
    """The binds a fleet client made itself, until the fleet shows them (read-your-writes)."""

    KEEP_S = 10.0

    def __init__(self) -> None:
        self._binds: list[tuple[float, str, WarmSpot]] = []  # (when, model, spot of one)
        self._lock = threading.Lock()

    def bound(self, model: str | None, host: str, url: str, gpu: GpuRef) -> None:
        if model is not None:
            with self._lock:
                self._binds.append(
                    (time.monotonic(), model, WarmSpot(host, url, gpu.uuid, gpu.index, 1))
                )

    def merged(self, model: str, shown: list[WarmSpot]) -> list[WarmSpot]:
        """`shown`, plus this client's own binds of `model` on devices it does not list yet."""
        cutoff = time.monotonic() - self.KEEP_S
        with self._lock:
            self._binds = [b for b in self._binds if b[0] >= cutoff]
            mine = [spot for _, name, spot in self._binds if name == model]
        listed = {(s.host, s.gpu) for s in shown}
        extra: dict[tuple[str, str], WarmSpot] = {}
        for spot in mine:
            key = (spot.host, spot.gpu)
            if key in listed:
                continue
            seen = extra.get(key)
            count = 1 if seen is None else seen.instances + 1
            extra[key] = WarmSpot(spot.host, spot.url, spot.gpu, spot.index, count)
        return shown + list(extra.values())


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
