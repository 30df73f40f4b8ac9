"""The blocking client: `Registry` for one daemon, `Fleet` for a fleet, `Lease` for a booking.

A lease renews itself from a background thread while its `with` block runs, and is released
when the block ends, whether or not it raised.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse

from model_registry_client import _protocol as protocol
from model_registry_client.errors import (
    NotFound,
    Refused,
    RegistryError,
    RegistryUnavailable,
)
from model_registry_client.objects import (
    Candidate,
    Event,
    Footprint,
    Gpus,
    Instance,
    Model,
    Reservation,
    WarmSpot,
)

log = logging.getLogger("model_registry_client")
T = TypeVar("T")


class _Http:
    """An httpx client whose transport errors come out as RegistryUnavailable."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.client = httpx.Client(base_url=url, headers=protocol.headers(token), timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.url) from exc
        return protocol.check(response)

    def close(self) -> None:
        self.client.close()


class Lease(protocol.LeaseState):
    """VRAM booked on one host for one load. Use it as a context manager: it is granted on
    entry (unless it already was), renewed at a third of its term while the block runs, and
    released on exit. A lease that is lost sets `lost`; leaving the block then raises
    LeaseLost, unless the block raised something of its own."""

    def __init__(self, http: _Http, body: dict[str, Any], *, owns_http: bool = False) -> None:
        super().__init__(http.url, body)
        self._http = http
        self._owns_http = owns_http
        self._stop = threading.Event()
        self._bind_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def grant(self) -> Lease:
        """Ask for the booking now; Refused, NotFound, ... when it is not granted."""
        if self._reservation is None:
            self._took(self._http.call("POST", "/reservations", json=self._body))
        return self

    def __enter__(self) -> Lease:
        try:
            self.grant()
        except BaseException:
            self._close_http()
            raise
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.id}", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if not self.lost and self.instance is None:
                self._release()
        finally:
            self._close_http()
        if self.lost and exc_type is None:
            raise self._lost_error()

    def bind(self, pid: int | None = None, wait_s: float = 60.0) -> Instance:
        """Turn the lease into an instance of `pid` (the host's pid of the worker that loads).
        It may come as soon as the worker starts: while the daemon answers pid_not_on_gpu (no
        CUDA context yet) it retries, the lease still renewed, for up to `wait_s`. Once bound,
        renewal stops and leaving the block releases nothing."""
        body: dict[str, Any] = {"reservation": self.id}
        if pid is not None:
            body["pid"] = pid
        deadline = time.monotonic() + wait_s
        while True:
            with self._bind_lock:  # no renewal in flight meanwhile
                try:
                    answer = self._http.call("POST", "/instances", json=body)
                except Refused as exc:
                    if exc.reason != "pid_not_on_gpu" or time.monotonic() >= deadline:
                        raise
                else:
                    # The reservation is gone: renewal ends here, so no false LeaseLost.
                    self.instance = Instance.from_json(answer)
                    self._stop.set()
                    return self.instance
            self._stop.wait(protocol.BIND_RETRY_S)

    # -- internals --------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(protocol.renew_every(self.ttl_s)):
            if not self._renew():
                return

    def _renew(self) -> bool:
        """Renew, retrying transient failures until the lease would lapse; False once lost."""
        delay = 0.1
        while True:
            try:
                with self._bind_lock:
                    if self.instance is not None:
                        return True  # bound meanwhile: nothing left to renew
                    answer = self._http.call(
                        "PATCH", f"/reservations/{self.id}", json={"ttl_s": self.ttl_s}
                    )
            except NotFound:
                self._lose("the daemon no longer has it")
                return False
            except RegistryError as exc:  # unreachable, 503, 429, a token rotated: try again
                problem = str(exc)
            else:
                self._renewed(answer)
                return True
            wait_s = self._retry_in(delay, problem)
            if wait_s is None:
                return False
            if self._stop.wait(wait_s):
                return True
            delay = min(delay * 2, protocol.BACKOFF_MAX_S)

    def _release(self) -> None:
        for attempt in range(protocol.RELEASE_TRIES):
            try:
                self._http.call("DELETE", f"/reservations/{self.id}")
                return
            except NotFound:
                return  # ended already (expired, or released by an operator)
            except RegistryUnavailable:
                if attempt + 1 == protocol.RELEASE_TRIES:
                    log.warning("could not release lease %s; it ends at its expiry", self.id)
                    return
                time.sleep(0.2 * (attempt + 1))

    def _close_http(self) -> None:
        if self._owns_http:
            self._http.close()


class Watch:
    """The daemon's `/events` as an iterator of Event. It reconnects with backoff and
    Last-Event-ID, so a restart of the daemon shows as a fresh `snapshot`. Call close() (or
    leave its with block) to stop."""

    def __init__(self, http: _Http, name: str | None) -> None:
        self._http = http
        self._params = {} if name is None else {"name": name}
        self._last_id: str | None = None
        self._closed = threading.Event()
        self._stream: Any = None
        self._events: Iterator[Any] | None = None

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                if self._events is None:
                    self._connect()
                assert self._events is not None
                sse = next(self._events)
            except (StopIteration, httpx.HTTPError, RegistryUnavailable):
                self._disconnect()
                self._closed.wait(backoff)
                backoff = min(backoff * 2, protocol.BACKOFF_MAX_S)
                continue
            self._last_id = sse.id or self._last_id
            return protocol.event(sse.event, sse.id, sse.data)
        raise StopIteration

    def _connect(self) -> None:
        headers = {} if self._last_id is None else {"Last-Event-ID": self._last_id}
        timeout = httpx.Timeout(self._http.timeout, read=protocol.STREAM_READ_TIMEOUT_S)
        self._stream = connect_sse(
            self._http.client,
            "GET",
            "/events",
            params=self._params,
            headers=headers,
            timeout=timeout,
        )
        source = self._stream.__enter__()
        protocol.check_stream(source.response)
        self._events = source.iter_sse()

    def _disconnect(self) -> None:
        stream, self._stream, self._events = self._stream, None, None
        if stream is not None:
            with contextlib.suppress(httpx.HTTPError):
                stream.__exit__(None, None, None)

    def close(self) -> None:
        self._closed.set()
        self._disconnect()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registry:
    """One daemon. `Registry(url, token=None, timeout=10.0)`, best used as a context manager."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._token = token
        self._http = _Http(url, token, timeout)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self, active: bool | None = None, name: str | None = None) -> list[Model]:
        """Every model (across pages), optionally only those (not) active now, or by name."""
        params = protocol.list_params(active, name)
        return self._every_page("/models", params, Model.from_json)

    def _every_page(
        self, path: str, params: dict[str, Any], parse: Callable[[dict[str, Any]], T]
    ) -> list[T]:
        items: list[T] = []
        while True:
            page = self._http.call("GET", path, params={**params, "skip": len(items)})
            items.extend(parse(raw) for raw in page["data"])
            if protocol.last_page(page, len(items)):
                return items

    def model(self, model_id: int) -> Model:
        return Model.from_json(self._http.call("GET", f"/models/{model_id}"))

    def gpus(self) -> Gpus:
        return Gpus.from_json(self._http.call("GET", "/gpus"))

    def reservations(self) -> list[Reservation]:
        return [Reservation.from_json(r) for r in self._http.call("GET", "/reservations")["data"]]

    def footprint(self, model: str) -> Footprint:
        """What `model`'s loads really took, per GPU product, and what admission books."""
        found = self.models(name=model)
        if not found:
            raise NotFound(f"no model named {model!r} in the catalog", 404)
        return Footprint.from_json(self._http.call("GET", f"/models/{found[0].id}/footprint"))

    def instances(self, model: str | None = None) -> list[Instance]:
        """Models loaded on the host now, oldest first (across pages); of one model when named."""
        return self._every_page("/instances", protocol.instance_params(model), Instance.from_json)

    def reserve(
        self,
        model: str | None = None,
        *,
        vram_mib: int | None = None,
        ttl_s: int = 60,
        holder: str | None = None,
        gpu: str | None = None,
        pid: int | None = None,
    ) -> Lease:
        """A lease on the memory `model` (or `vram_mib`) needs: `with reg.reserve(...) as lease`."""
        body = protocol.reservation_body(model, vram_mib, ttl_s, holder, gpu, pid)
        return Lease(self._http, body)

    def watch(self, name: str | None = None) -> Watch:
        """The daemon's events, optionally only for these model names (comma-separated)."""
        return Watch(self._http, name)


class Fleet:
    """Every host on the daemon's shared database: `Fleet(url, token)` names any one of them."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._token = token
        self._timeout = timeout
        self._http = _Http(url, token, timeout)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def candidates(self, model: str) -> list[Candidate]:
        """The hosts where `model` fits now, best fit first."""
        return protocol.candidates(
            model,
            self._http.call("GET", "/fleet/models", params={"name": model, "hosts_limit": 1000}),
        )

    def warm(self, model: str) -> list[WarmSpot]:
        """Where `model` is loaded now across the fleet (host, url, device, instances), so a
        session can go where it is warm instead of waiting for a new load."""
        answer = self._http.call("GET", "/fleet/models", params={"name": model})
        return protocol.warm_spots(model, answer)

    def place(self, model: str, **reserve_kwargs: Any) -> Lease:
        """Reserve on the first candidate host that grants; the lease is granted already and
        is used as a context manager as usual. Refused when no host granted."""
        body = protocol.place_body(model, reserve_kwargs)
        refusal: Refused | None = None
        for candidate in self.candidates(model):
            lease = Lease(_Http(candidate.url, self._token, self._timeout), body, owns_http=True)
            try:
                return lease.grant()
            except Refused as exc:
                refusal = exc
            except RegistryUnavailable as exc:
                log.info("host %s unavailable: %s", candidate.host, exc)
            except BaseException:
                lease._close_http()
                raise
            lease._close_http()
        raise protocol.nowhere(model, refusal)
