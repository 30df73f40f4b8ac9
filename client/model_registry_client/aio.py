"""The asyncio client: `AsyncRegistry`, `AsyncFleet` and `AsyncLease`, the same methods as the
blocking client's, as coroutines. A lease is booked by `await reg.reserve(...)` (or on entering
`async with reg.reserve(...)`) and renews itself in a task until it is bound, released or
lost; its `async with` block releases it when it ends, whether or not it raised."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Generator, Sequence
from types import TracebackType
from typing import Any, Callable, TypeVar

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
    Eviction,
    Footprint,
    Gpus,
    Host,
    Instance,
    InstancesEvent,
    Model,
    Reservation,
    RoomSpot,
    Route,
    SnapshotEvent,
    WarmSpot,
)

log = logging.getLogger("model_registry_client")
T = TypeVar("T")
DEFAULT_TIMEOUT = httpx.Timeout(10.0)


class _AsyncHttp:
    """Requests to one daemon; transport errors come out as RegistryUnavailable."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: protocol.Timeout,
        client: httpx.AsyncClient | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.headers = protocol.headers(token)
        self._owns_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=timeout, transport=transport, verify=verify
        )

    def to(self, url: str, token: str | None) -> _AsyncHttp:
        return _AsyncHttp(url, token, self.timeout, self.client)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(
                method, self.url + path, headers=self.headers, **kwargs
            )
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.url) from exc
        return protocol.check(response)

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


class AsyncLease(protocol.LeaseState):
    """VRAM booked on one host for one load: `lease = await reg.reserve(...)`, or
    `async with reg.reserve(...) as lease` (released when the block ends). Renewed at a third
    of its term until bound, released or lost; a lost lease sets `lost`, calls
    `on_lost(lease)` once, makes `bind`, `renew` and `wait_room` raise LeaseLost, and leaving
    the block raises LeaseLost unless the block raised."""

    def __init__(
        self,
        http: _AsyncHttp,
        body: dict[str, Any],
        *,
        owns_http: bool = False,
        on_lost: protocol.OnLost = None,
    ) -> None:
        super().__init__(http.url, body, on_lost)
        self._http = http
        self._owns_http = owns_http
        self._renewer: asyncio.Task[None] | None = None
        self._bind_lock = asyncio.Lock()

    async def grant(self) -> AsyncLease:
        """Book now (once), and start renewing."""
        if self._reservation is None:
            self._took(await self._http.call("POST", "/reservations", json=self._body))
            self._renewer = asyncio.ensure_future(self._renew_loop())
        return self

    def __await__(self) -> Generator[Any, None, AsyncLease]:
        return self.grant().__await__()

    async def __aenter__(self) -> AsyncLease:
        try:
            await self.grant()
        except BaseException:
            await self._close_http()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop_renewing()
        try:
            if self.active:
                await self._release()
        finally:
            await self._close_http()
        if self.lost and exc_type is None:
            raise self._lost_error()

    async def renew(self, ttl_s: int | None = None) -> Reservation:
        """Renew now (for `ttl_s`, from now on, when given); LeaseLost if it is gone."""
        self._check_usable()
        if ttl_s is not None:
            self.ttl_s = ttl_s
        async with self._bind_lock:
            try:
                answer = await self._http.call(
                    "PATCH", f"/reservations/{self.id}", json={"ttl_s": self.ttl_s}
                )
            except NotFound:
                self._lose("the daemon no longer has it")
                raise self._lost_error() from None
            self._renewed(answer)
        return self.reservation

    async def release(self) -> None:
        """Give the memory back now (once; a lease bound or lost has nothing to release)."""
        await self._stop_renewing()
        try:
            if self.active:
                await self._release()
        finally:
            self.released = True
            await self._close_http()

    async def bind(self, pid: int | None = None, wait_s: float = 60.0, **fields: Any) -> Instance:
        """Turn the lease into an instance of `pid`; retries pid_not_on_gpu for up to `wait_s`
        while the lease is still renewed. Once bound, renewal stops and nothing is released.
        LeaseLost when the lease was lost."""
        self._check_usable()
        body = protocol.bind_body(self.id, pid, fields)
        deadline = time.monotonic() + wait_s
        while True:
            self._check_usable()
            answer = None
            async with self._bind_lock:  # no renewal in flight meanwhile
                try:
                    answer = await self._http.call("POST", "/instances", json=body)
                except Refused as exc:
                    if exc.reason != "pid_not_on_gpu" or time.monotonic() >= deadline:
                        raise
                except NotFound:
                    self._lose("the daemon no longer had it at the bind")
                    raise self._lost_error() from None
            if answer is not None:
                instance = self._bound(answer)
                await self._stop_renewing()
                return instance
            await asyncio.sleep(protocol.BIND_RETRY_S)

    async def wait_room(self, timeout: float | None = None) -> bool:
        """For a claim (make_room): wait until its victims have gone (True), or `timeout`
        seconds (False). LeaseLost when the claim ended instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_usable()
            if self.awaiting is None:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(protocol.WAIT_POLL_S)
            try:
                answer = await self._http.call("GET", f"/reservations/{self.id}")
            except NotFound:
                self._lose("its claim ended before its room was made")
                continue
            self._reservation = Reservation.from_json(answer)

    async def _stop_renewing(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not asyncio.current_task():
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
                    if not self.active:
                        return True  # bound or released: nothing to renew
                    answer = await self._http.call(
                        "PATCH", f"/reservations/{self.id}", json={"ttl_s": self.ttl_s}
                    )
            except NotFound:
                self._lose("the daemon no longer has it")
                return False
            except RegistryError as exc:  # unreachable, 503, 429, a token rotated: try again
                problem = str(exc)
            except RuntimeError:
                if not self._http.client.is_closed:
                    raise
                # Its Registry (or Fleet) was closed while the lease was held.
                log.warning("lease %s: its client was closed; it ends at its expiry", self.id)
                return False
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
    """`/events` as an async iterator of typed events (keep-alives never show); reconnects
    with backoff and Last-Event-ID."""

    def __init__(self, http: _AsyncHttp, name: str | None, host: str | None = None) -> None:
        self._http = http
        self._params = {} if name is None else {"name": name}
        self._host = host
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
            if protocol.is_keepalive(sse.event, sse.data):
                continue
            self._last_id = sse.id or self._last_id
            return protocol.event(sse.event, sse.id, sse.data, self._host)
        raise StopAsyncIteration

    async def _connect(self) -> None:
        headers = dict(self._http.headers)
        if self._last_id is not None:
            headers["Last-Event-ID"] = self._last_id
        self._stream = aconnect_sse(
            self._http.client,
            "GET",
            self._http.url + "/events",
            params=self._params,
            headers=headers,
            timeout=protocol.stream_timeout(self._http.timeout),
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
    """One daemon, from asyncio: `async with AsyncRegistry(url, token=...) as reg`. `client`,
    `transport` and `verify` as for the blocking Registry."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: protocol.Timeout = DEFAULT_TIMEOUT,
        *,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self._http = _AsyncHttp(url, token, timeout, client, transport=transport, verify=verify)

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

    async def hosts(self) -> list[Host]:
        return [Host.from_json(h) for h in (await self._http.call("GET", "/fleet"))["data"]]

    def reserve(
        self,
        model: str | None = None,
        *,
        vram_mib: int | None = None,
        ttl_s: int = 60,
        holder: str | None = None,
        gpu: str | None = None,
        pid: int | None = None,
        make_room: bool = False,
        priority: int | None = None,
        on_lost: Callable[[AsyncLease], None] | None = None,
    ) -> AsyncLease:
        """A lease: `lease = await reg.reserve("large-v3")` books it now, and
        `async with reg.reserve("large-v3") as lease` also releases it at the end."""
        body = protocol.reservation_body(
            model, vram_mib, ttl_s, holder, gpu, pid, make_room, priority
        )
        return AsyncLease(self._http, body, on_lost=on_lost)

    async def instances(self, model: str | None = None) -> list[Instance]:
        params = protocol.instance_params(model)
        return await self._every_page("/instances", params, Instance.from_json)

    async def instance(self, instance_id: str) -> Instance:
        return Instance.from_json(await self._http.call("GET", f"/instances/{instance_id}"))

    async def adopt(
        self,
        model: str,
        gpu: str,
        pid: int | None = None,
        *,
        container_pid: int | None = None,
        container: str | None = None,
        pod_uid: str | None = None,
        holder: str | None = None,
        sessions: int | None = None,
        pinned: bool | None = None,
        priority: int | None = None,
        ready: bool | None = None,
    ) -> Instance:
        body = protocol.instance_body(
            model=model,
            gpu=gpu,
            pid=pid,
            container_pid=container_pid,
            container=container,
            pod_uid=pod_uid,
            holder=holder,
            sessions=sessions,
            pinned=pinned,
            priority=priority,
            ready=ready,
        )
        return Instance.from_json(await self._http.call("POST", "/instances", json=body))

    async def update_instance(
        self,
        instance_id: str,
        *,
        sessions: int | None = None,
        pinned: bool | None = None,
        priority: int | None = None,
        ready: bool | None = None,
    ) -> Instance:
        body = protocol.instance_body(
            sessions=sessions, pinned=pinned, priority=priority, ready=ready
        )
        answer = await self._http.call("PATCH", f"/instances/{instance_id}", json=body)
        return Instance.from_json(answer)

    async def set_sessions(self, instance_id: str, sessions: int) -> Instance:
        return await self.update_instance(instance_id, sessions=sessions)

    async def pin(self, instance_id: str) -> Instance:
        return await self.update_instance(instance_id, pinned=True)

    async def unpin(self, instance_id: str) -> Instance:
        return await self.update_instance(instance_id, pinned=False)

    async def ready(self, instance_id: str) -> Instance:
        return await self.update_instance(instance_id, ready=True)

    async def unload(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._http.call("DELETE", f"/instances/{instance_id}")

    async def wait_gone(self, instance_id: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                await self._http.call("GET", f"/instances/{instance_id}")
            except NotFound:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(protocol.WAIT_POLL_S)

    def watch(self, name: str | None = None) -> AsyncWatch:
        return AsyncWatch(self._http, name)

    async def watch_evictions(
        self, holder: str | None = None, instance_ids: Sequence[str] | None = None
    ) -> AsyncIterator[Instance]:
        """Instances asked to go for a claim, each once per claim (see Registry)."""
        told: set[tuple[str, str]] = set()
        async with self.watch() as events:
            async for event in events:
                found = await self.instances() if isinstance(event, SnapshotEvent) else []
                if isinstance(event, InstancesEvent):
                    found = event.instances
                for instance in protocol.evicted(found, holder, instance_ids, told):
                    yield instance


class AsyncFleetWatch:
    """Every host's events merged, each tagged with its `host` (see FleetWatch)."""

    def __init__(self, fleet: AsyncFleet, name: str | None) -> None:
        self._fleet = fleet
        self._name = name
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watches: dict[str, AsyncWatch] = {}
        self.urls: dict[str, str] = {}  # host -> url
        self._tasks: list[asyncio.Task[None]] = [asyncio.ensure_future(self._discover())]

    async def _discover(self) -> None:
        while True:
            try:
                hosts = await self._fleet.hosts()
            except RegistryError as exc:
                log.info("fleet watch: cannot list the hosts: %s", exc)
                hosts = []
            for host in hosts:
                if host.state != "offline" and host.host not in self._watches:
                    http = self._fleet._http_for(host.host, host.url)
                    if http is not None:
                        self.urls[host.host] = http.url
                        watch = self._watches[host.host] = AsyncWatch(http, self._name, host.host)
                        self._tasks.append(asyncio.ensure_future(self._pump(watch)))
            await asyncio.sleep(protocol.FLEET_REFRESH_S)

    async def _pump(self, watch: AsyncWatch) -> None:
        async for event in watch:
            await self._queue.put(event)

    def __aiter__(self) -> AsyncFleetWatch:
        return self

    async def __anext__(self) -> Event:
        return await self._queue.get()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for watch in list(self._watches.values()):
            await watch.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncFleetWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncFleet:
    """Every host on the daemons' shared database, from asyncio (see Fleet)."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: protocol.Timeout = DEFAULT_TIMEOUT,
        *,
        allowed_hosts: Sequence[str] = (),
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give at least one daemon's URL")
        self._token = token
        self._allowed = protocol.AllowedHosts(urls, allowed_hosts)
        first = _AsyncHttp(urls[0], token, timeout, client, transport=transport, verify=verify)
        self._entries = [first] + [first.to(u, token) for u in urls[1:]]
        self._current = 0
        self._own = protocol.OwnBinds()

    async def __aenter__(self) -> AsyncFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._entries[0].close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        last: RegistryUnavailable | None = None
        for step in range(len(self._entries)):
            index = (self._current + step) % len(self._entries)
            try:
                answer = await self._entries[index].call(method, path, **kwargs)
            except RegistryUnavailable as exc:
                log.info("fleet entry %s unavailable: %s", self._entries[index].url, exc)
                last = exc
                continue
            self._current = index
            return answer
        assert last is not None
        raise last

    async def _fleet_model(self, model: str) -> Any:
        params = {"name": model, "hosts_limit": 1000}
        return await self._call("GET", "/fleet/models", params=params)

    def _http_for(self, host: str, url: str) -> _AsyncHttp | None:
        why = self._allowed.why_not(url)
        if why is not None:
            self._allowed.skip(host, why)
            return None
        return self._entries[0].to(url, self._token)

    async def hosts(self) -> list[Host]:
        return [Host.from_json(h) for h in (await self._call("GET", "/fleet"))["data"]]

    async def candidates(self, model: str) -> list[Candidate]:
        return protocol.candidates(model, await self._fleet_model(model))

    async def room(self, model: str) -> list[RoomSpot]:
        return protocol.room_spots(model, await self._fleet_model(model))

    async def warm(self, model: str) -> list[WarmSpot]:
        answer = await self._fleet_model(model)
        return self._own.merged(model, protocol.warm_spots(model, answer))

    async def place(
        self,
        model: str,
        *,
        make_room: bool = False,
        exclude: Sequence[str] = (),
        host: str | None = None,
        gpu: str | None = None,
        ttl_s: int = 60,
        holder: str | None = None,
        pid: int | None = None,
        priority: int | None = None,
        on_lost: Callable[[AsyncLease], None] | None = None,
    ) -> AsyncLease:
        """Book a new load on the best host that grants (see Fleet.place)."""
        protocol.check_target(host, gpu)
        answer = await self._fleet_model(model)
        tries = protocol.placement_tries(model, answer, make_room, exclude, host, gpu)
        refusal: Refused | None = None
        skipped: dict[str, str] = {}
        for target in tries:
            http = self._http_for(target.host, target.url)
            if http is None:
                skipped[target.host] = self._allowed.why_not(target.url) or ""
                continue
            body = protocol.reservation_body(
                model, None, ttl_s, holder, target.gpu, pid, target.make_room, priority
            )
            lease = AsyncLease(http, body, on_lost=on_lost)
            lease.host = target.host
            lease._on_bound = self._bound
            try:
                return await lease.grant()
            except (Refused, NotFound) as exc:
                refusal = exc if isinstance(exc, Refused) else refusal
                log.info("host %s did not grant %s: %s", target.host, model, exc)
            except RegistryUnavailable as exc:
                log.info("host %s unavailable: %s", target.host, exc)
        if skipped and refusal is None:
            raise protocol.nobody_allowed(model, skipped)
        raise protocol.nowhere(model, refusal)

    async def route(self, model: str, **place_options: Any) -> Route:
        """A warm instance when one exists, else a new lease (see Fleet.route)."""
        exclude = place_options.get("exclude", ())
        for spot in await self.warm(model):
            if spot.host not in exclude:
                return Route(instance=spot)
        return Route(lease=await self.place(model, **place_options))

    def watch(self, name: str | None = None) -> AsyncFleetWatch:
        return AsyncFleetWatch(self, name)

    async def watch_evictions(
        self, holder: str | None = None, instance_ids: Sequence[str] | None = None
    ) -> AsyncIterator[Eviction]:
        """Instances of any host asked to go for a claim (see Fleet.watch_evictions)."""
        told: set[tuple[str, str]] = set()
        async with self.watch() as events:
            async for event in events:
                host = event.host or ""
                url = events.urls.get(host, "")
                found: list[Instance] = []
                if isinstance(event, InstancesEvent):
                    found = event.instances
                elif isinstance(event, SnapshotEvent):
                    found = await self._instances_of(host, url)
                for instance in protocol.evicted(found, holder, instance_ids, told):
                    yield Eviction(host, url, instance)

    async def _instances_of(self, host: str, url: str) -> list[Instance]:
        http = self._http_for(host, url)
        if http is None:
            return []
        try:
            params = protocol.instance_params(None)
            page = await http.call("GET", "/instances", params=params)
        except RegistryError as exc:
            log.info("cannot list the instances of %s: %s", host, exc)
            return []
        return [Instance.from_json(raw) for raw in page["data"]]

    def _bound(self, lease: protocol.LeaseState, instance: Instance) -> None:
        if lease.host is not None:
            self._own.bound(instance.model, lease.host, lease.url, instance.gpu)
