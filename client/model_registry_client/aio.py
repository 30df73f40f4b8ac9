"""The asyncio client: `AsyncRegistry`, `AsyncFleet` and `AsyncLease`, the same methods as the
blocking client's, as coroutines. A lease renews itself in a task while its `async with` block
runs, and is released when the block ends, whether or not it raised."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse

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


class _AsyncHttp:
    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.client = httpx.AsyncClient(
            base_url=url, headers=protocol.headers(token), timeout=timeout
        )

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.url) from exc
        return protocol.check(response)

    async def close(self) -> None:
        await self.client.aclose()


class AsyncLease(protocol.LeaseState):
    """VRAM booked on one host for one load: `async with reg.reserve(...) as lease`. Granted on
    entry (unless it already was), renewed at a third of its term, released on exit; a lost
    lease sets `lost` and raises LeaseLost on exit unless the block raised."""

    def __init__(self, http: _AsyncHttp, body: dict[str, Any], *, owns_http: bool = False):
        super().__init__(http.url, body)
        self._http = http
        self._owns_http = owns_http
        self._renewer: asyncio.Task[None] | None = None
        self._bind_lock = asyncio.Lock()

    async def grant(self) -> AsyncLease:
        if self._reservation is None:
            self._took(await self._http.call("POST", "/reservations", json=self._body))
        return self

    async def __aenter__(self) -> AsyncLease:
        try:
            await self.grant()
        except BaseException:
            await self._close_http()
            raise
        self._renewer = asyncio.ensure_future(self._renew_loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop_renewing()
        try:
            if not self.lost and self.instance is None:
                await self._release()
        finally:
            await self._close_http()
        if self.lost and exc_type is None:
            raise self._lost_error()

    async def bind(self, pid: int | None = None, wait_s: float = 60.0) -> Instance:
        """Turn the lease into an instance of `pid`; retries pid_not_on_gpu for up to `wait_s`
        while the lease is still renewed. Once bound, renewal stops and nothing is released."""
        body: dict[str, Any] = {"reservation": self.id}
        if pid is not None:
            body["pid"] = pid
        deadline = time.monotonic() + wait_s
        while True:
            async with self._bind_lock:  # no renewal in flight meanwhile
                try:
                    answer = await self._http.call("POST", "/instances", json=body)
                except Refused as exc:
                    if exc.reason != "pid_not_on_gpu" or time.monotonic() >= deadline:
                        raise
                else:
                    self.instance = Instance.from_json(answer)
            if self.instance is not None:
                await self._stop_renewing()
                return self.instance
            await asyncio.sleep(protocol.BIND_RETRY_S)

    async def _stop_renewing(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(protocol.renew_every(self.ttl_s))
            if not await self._renew():
                return

    async def _renew(self) -> bool:
        delay = 0.1
        while True:
            try:
                async with self._bind_lock:
                    if self.instance is not None:
                        return True  # bound: the reservation is gone, nothing to renew
                    answer = await self._http.call(
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
            await asyncio.sleep(wait_s)
            delay = min(delay * 2, protocol.BACKOFF_MAX_S)

    async def _release(self) -> None:
        for attempt in range(protocol.RELEASE_TRIES):
            try:
                await self._http.call("DELETE", f"/reservations/{self.id}")
                return
            except NotFound:
                return
            except RegistryUnavailable:
                if attempt + 1 == protocol.RELEASE_TRIES:
                    log.warning("could not release lease %s; it ends at its expiry", self.id)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _close_http(self) -> None:
        if self._owns_http:
            await self._http.close()


class AsyncWatch:
    """`/events` as an async iterator of Event; reconnects with backoff and Last-Event-ID."""

    def __init__(self, http: _AsyncHttp, name: str | None) -> None:
        self._http = http
        self._params = {} if name is None else {"name": name}
        self._last_id: str | None = None
        self._closed = False
        self._stream: Any = None
        self._events: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Event:
        backoff = 0.1
        while not self._closed:
            try:
                if self._events is None:
                    await self._connect()
                assert self._events is not None
                sse = await self._events.__anext__()
            except (StopAsyncIteration, httpx.HTTPError, RegistryUnavailable):
                await self._disconnect()
                if not self._closed:
                    await asyncio.sleep(backoff)
                backoff = min(backoff * 2, protocol.BACKOFF_MAX_S)
                continue
            self._last_id = sse.id or self._last_id
            return protocol.event(sse.event, sse.id, sse.data)
        raise StopAsyncIteration

    async def _connect(self) -> None:
        headers = {} if self._last_id is None else {"Last-Event-ID": self._last_id}
        timeout = httpx.Timeout(self._http.timeout, read=protocol.STREAM_READ_TIMEOUT_S)
        self._stream = aconnect_sse(
            self._http.client,
            "GET",
            "/events",
            params=self._params,
            headers=headers,
            timeout=timeout,
        )
        source = await self._stream.__aenter__()
        if source.response.status_code != 200:
            await source.response.aread()
            protocol.check(source.response)
        self._events = source.aiter_sse()

    async def _disconnect(self) -> None:
        stream, self._stream, self._events = self._stream, None, None
        if stream is not None:
            with contextlib.suppress(httpx.HTTPError):
                await stream.__aexit__(None, None, None)

    async def close(self) -> None:
        self._closed = True
        await self._disconnect()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRegistry:
    """One daemon, from asyncio: `async with AsyncRegistry(url, token=...) as reg`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._http = _AsyncHttp(url, token, timeout)

    async def __aenter__(self) -> AsyncRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def models(self, active: bool | None = None, name: str | None = None) -> list[Model]:
        params = protocol.list_params(active, name)
        return await self._every_page("/models", params, Model.from_json)

    async def _every_page(
        self, path: str, params: dict[str, Any], parse: Callable[[dict[str, Any]], T]
    ) -> list[T]:
        items: list[T] = []
        while True:
            page = await self._http.call("GET", path, params={**params, "skip": len(items)})
            items.extend(parse(raw) for raw in page["data"])
            if protocol.last_page(page, len(items)):
                return items

    async def model(self, model_id: int) -> Model:
        return Model.from_json(await self._http.call("GET", f"/models/{model_id}"))

    async def gpus(self) -> Gpus:
        return Gpus.from_json(await self._http.call("GET", "/gpus"))

    async def reservations(self) -> list[Reservation]:
        answer = await self._http.call("GET", "/reservations")
        return [Reservation.from_json(r) for r in answer["data"]]

    async def footprint(self, model: str) -> Footprint:
        found = await self.models(name=model)
        if not found:
            raise NotFound(f"no model named {model!r} in the catalog", 404)
        answer = await self._http.call("GET", f"/models/{found[0].id}/footprint")
        return Footprint.from_json(answer)

    async def instances(self, model: str | None = None) -> list[Instance]:
        params = protocol.instance_params(model)
        return await self._every_page("/instances", params, Instance.from_json)

    def reserve(
        self,
        model: str | None = None,
        *,
        vram_mib: int | None = None,
        ttl_s: int = 60,
        holder: str | None = None,
        gpu: str | None = None,
        pid: int | None = None,
    ) -> AsyncLease:
        """A lease: `async with reg.reserve("large-v3") as lease`."""
        body = protocol.reservation_body(model, vram_mib, ttl_s, holder, gpu, pid)
        return AsyncLease(self._http, body)

    def watch(self, name: str | None = None) -> AsyncWatch:
        return AsyncWatch(self._http, name)


class AsyncFleet:
    """Every host on the daemon's shared database, from asyncio."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._token = token
        self._timeout = timeout
        self._http = _AsyncHttp(url, token, timeout)

    async def __aenter__(self) -> AsyncFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def candidates(self, model: str) -> list[Candidate]:
        answer = await self._http.call(
            "GET", "/fleet/models", params={"name": model, "hosts_limit": 1000}
        )
        return protocol.candidates(model, answer)

    async def warm(self, model: str) -> list[WarmSpot]:
        answer = await self._http.call("GET", "/fleet/models", params={"name": model})
        return protocol.warm_spots(model, answer)

    async def place(self, model: str, **reserve_kwargs: Any) -> AsyncLease:
        """Reserve on the first candidate host that grants; Refused when none did."""
        body = protocol.place_body(model, reserve_kwargs)
        refusal: Refused | None = None
        for candidate in await self.candidates(model):
            http = _AsyncHttp(candidate.url, self._token, self._timeout)
            lease = AsyncLease(http, body, owns_http=True)
            try:
                return await lease.grant()
            except Refused as exc:
                refusal = exc
            except RegistryUnavailable as exc:
                log.info("host %s unavailable: %s", candidate.host, exc)
            except BaseException:
                await http.close()
                raise
            await http.close()
        raise protocol.nowhere(model, refusal)
