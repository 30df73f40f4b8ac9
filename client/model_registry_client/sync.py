"""The blocking client: `Registry` for one daemon, `Fleet` for a fleet, `Lease` for a booking.

A lease is booked when `reserve` (or `place`) returns and renews itself from a background
thread until it is bound, released or lost; used as a context manager it is also released when
the block ends, whether or not it raised.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Callable, TypeVar

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


class _Http:
    """Requests to one daemon; transport errors come out as RegistryUnavailable. Several may
    share one httpx.Client (a fleet's hosts); only the one that made it closes it."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: protocol.Timeout,
        client: httpx.Client | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.headers = protocol.headers(token)
        self._owns_client = client is None
        self.client = client or httpx.Client(timeout=timeout, transport=transport, verify=verify)

    def to(self, url: str, token: str | None) -> _Http:
        """Another daemon, through the same httpx client."""
        return _Http(url, token, self.timeout, self.client)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, self.url + path, headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.url) from exc
        return protocol.check(response)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


class Lease(protocol.LeaseState):
    """VRAM booked on one host for one load. Booked when `reserve` returns, renewed at a third
    of its term until it is bound, released or lost. `with reg.reserve(...) as lease` releases
    it when the block ends. A lost lease sets `lost`, calls `on_lost(lease)` once, makes
    `bind`, `renew` and `wait_room` raise LeaseLost, and leaving the block raises LeaseLost
    unless the block raised something of its own."""

    def __init__(
        self,
        http: _Http,
        body: dict[str, Any],
        *,
        owns_http: bool = False,
        on_lost: protocol.OnLost = None,
    ) -> None:
        super().__init__(http.url, body, on_lost)
        self._http = http
        self._owns_http = owns_http
        self._stop = threading.Event()
        self._bind_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def grant(self) -> Lease:
        """Book now (once), and start renewing; Refused, NotFound, ... when not granted."""
        if self._reservation is None:
            self._took(self._http.call("POST", "/reservations", json=self._body))
            self._renewer = threading.Thread(
                target=self._renew_loop, name=f"lease-{self.id}", daemon=True
            )
            self._renewer.start()
        return self

    def __enter__(self) -> Lease:
        try:
            self.grant()
        except BaseException:
            self._close_http()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop_renewing()
        try:
            if self.active:
                self._release()
        finally:
            self._close_http()
        if self.lost and exc_type is None:
            raise self._lost_error()

    def renew(self, ttl_s: int | None = None) -> Reservation:
        """Renew now (for `ttl_s`, from now on, when given); LeaseLost if the daemon no longer
        has it."""
        self._check_usable()
        if ttl_s is not None:
            self.ttl_s = ttl_s
        with self._bind_lock:
            try:
                answer = self._http.call(
                    "PATCH", f"/reservations/{self.id}", json={"ttl_s": self.ttl_s}
                )
            except NotFound:
                self._lose("the daemon no longer has it")
                raise self._lost_error() from None
            self._renewed(answer)
        return self.reservation

    def release(self) -> None:
        """Give the memory back now (once; a lease bound or lost has nothing to release)."""
        self._stop_renewing()
        try:
            if self.active:
                self._release()
        finally:
            self.released = True
            self._close_http()

    def bind(self, pid: int | None = None, wait_s: float = 60.0, **fields: Any) -> Instance:
        """Turn the lease into an instance of `pid` (the host's pid of the worker that loads),
        with `sessions`, `pinned`, `priority` or `ready` when given (from inside a container:
        `container_pid=os.getpid()` and `container=own_container_id()` or `pod_uid=...`,
        instead of `pid`). It may come as soon as the
        worker starts: while the daemon answers pid_not_on_gpu (no CUDA context yet) it
        retries, the lease still renewed, for up to `wait_s`. Once bound, renewal stops and
        releasing does nothing. LeaseLost when the lease was lost."""
        self._check_usable()
        body = protocol.bind_body(self.id, pid, fields)
        deadline = time.monotonic() + wait_s
        while True:
            self._check_usable()
            with self._bind_lock:  # no renewal in flight meanwhile
                try:
                    answer = self._http.call("POST", "/instances", json=body)
                except Refused as exc:
                    if exc.reason != "pid_not_on_gpu" or time.monotonic() >= deadline:
                        raise
                except NotFound:
                    self._lose("the daemon no longer had it at the bind")
                    raise self._lost_error() from None
                else:
                    # The reservation is gone: renewal ends here, so no false LeaseLost.
                    self._stop.set()
                    return self._bound(answer)
            self._stop.wait(protocol.BIND_RETRY_S)

    def wait_room(self, timeout: float | None = None) -> bool:
        """For a claim (make_room): wait until its victims have gone (True), or `timeout`
        seconds (False). LeaseLost when the claim ended instead (its room was withdrawn)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_usable()
            if self.awaiting is None:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(protocol.WAIT_POLL_S)
            try:
                self._reservation = Reservation.from_json(
                    self._http.call("GET", f"/reservations/{self.id}")
                )
            except NotFound:
                self._lose("its claim ended before its room was made")

    # -- internals --------------------------------------------------------------------------

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()

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
                    if not self.active:
                        return True  # bound or released meanwhile: nothing left to renew
                    answer = self._http.call(
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
    """The daemon's `/events` as an iterator of typed events (keep-alives never show). It
    reconnects with backoff and Last-Event-ID, so a restart of the daemon shows as a fresh
    `snapshot`. Call close() (or leave its with block) to stop."""

    def __init__(self, http: _Http, name: str | None, host: str | None = None) -> None:
        self._http = http
        self._params = {} if name is None else {"name": name}
        self._host = host
        self._last_id: str | None = None
        self._closed = threading.Event()
        self._stream: Any = None
        self._response: httpx.Response | None = None
        self._events: Iterator[Any] | None = None
        self._busy = threading.Lock()  # held while a thread iterates

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        with self._busy:
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
                except Exception:
                    if self._closed.is_set():  # closed from another thread mid-read
                        break
                    raise
                if protocol.is_keepalive(sse.event, sse.data):
                    continue
                self._last_id = sse.id or self._last_id
                return protocol.event(sse.event, sse.id, sse.data, self._host)
            self._disconnect()
        raise StopIteration

    def _connect(self) -> None:
        headers = dict(self._http.headers)
        if self._last_id is not None:
            headers["Last-Event-ID"] = self._last_id
        self._stream = connect_sse(
            self._http.client,
            "GET",
            self._http.url + "/events",
            params=self._params,
            headers=headers,
            timeout=protocol.stream_timeout(self._http.timeout),
        )
        source = self._stream.__enter__()
        self._response = source.response
        protocol.check_stream(source.response)
        self._events = source.iter_sse()

    def _disconnect(self) -> None:
        stream, self._stream, self._events, self._response = self._stream, None, None, None
        if stream is not None:
            with contextlib.suppress(httpx.HTTPError):
                stream.__exit__(None, None, None)

    def close(self) -> None:
        """Stop; from another thread too (a read under way then ends, and the thread that
        iterates lets go of the stream)."""
        self._closed.set()
        if self._busy.acquire(blocking=False):
            try:
                self._disconnect()
            finally:
                self._busy.release()
        elif (response := self._response) is not None:
            with contextlib.suppress(Exception):
                response.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Registry:
    """One daemon: `Registry(url, token=None, timeout=httpx.Timeout(10.0), *, client=None,
    transport=None, verify=True)`, best used as a context manager. `client` is an httpx.Client
    of your own (left open at close); `transport` (httpx.MockTransport in tests) and `verify`
    (a CA bundle path or an ssl.SSLContext) go to the client made otherwise."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: protocol.Timeout = DEFAULT_TIMEOUT,
        *,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self._token = token
        self._http = _Http(url, token, timeout, client, transport=transport, verify=verify)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- reading ----------------------------------------------------------------------------

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

    def hosts(self) -> list[Host]:
        """The hosts of the fleet this daemon belongs to (itself, when alone)."""
        return [Host.from_json(h) for h in self._http.call("GET", "/fleet")["data"]]

    # -- reservations -----------------------------------------------------------------------

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
        on_lost: Callable[[Lease], None] | None = None,
    ) -> Lease:
        """Book the memory `model` (or `vram_mib`) needs, now, and keep it renewed: a Lease,
        best used as `with reg.reserve(...) as lease`. With `make_room`, a model that fits
        once idle instances go is a claim: `lease.awaiting` names them, `lease.wait_room()`
        waits for them. Refused (with its reason), NotFound, ... when not granted."""
        body = protocol.reservation_body(
            model, vram_mib, ttl_s, holder, gpu, pid, make_room, priority
        )
        return Lease(self._http, body, on_lost=on_lost).grant()

    # -- instances --------------------------------------------------------------------------

    def instances(self, model: str | None = None) -> list[Instance]:
        """Models loaded on the host now, oldest first (across pages); of one model when named."""
        return self._every_page("/instances", protocol.instance_params(model), Instance.from_json)

    def instance(self, instance_id: str) -> Instance:
        """One instance; NotFound once it has ended."""
        return Instance.from_json(self._http.call("GET", f"/instances/{instance_id}"))

    def adopt(
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
        """Record a model that process `pid` loaded on `gpu` without a reservation. A process in
        a container may be named by `container_pid` and `container` (or `pod_uid`) instead."""
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
        return Instance.from_json(self._http.call("POST", "/instances", json=body))

    def update_instance(
        self,
        instance_id: str,
        *,
        sessions: int | None = None,
        pinned: bool | None = None,
        priority: int | None = None,
        ready: bool | None = None,
    ) -> Instance:
        """Report what changed (owner or admin): sessions in flight, pinned, priority, ready."""
        body = protocol.instance_body(
            sessions=sessions, pinned=pinned, priority=priority, ready=ready
        )
        return Instance.from_json(self._http.call("PATCH", f"/instances/{instance_id}", json=body))

    def set_sessions(self, instance_id: str, sessions: int) -> Instance:
        """Sessions in flight now: an instance with any is never asked to go."""
        return self.update_instance(instance_id, sessions=sessions)

    def pin(self, instance_id: str) -> Instance:
        """Never ask this instance to go."""
        return self.update_instance(instance_id, pinned=True)

    def unpin(self, instance_id: str) -> Instance:
        return self.update_instance(instance_id, pinned=False)

    def ready(self, instance_id: str) -> Instance:
        """The load is done (the daemon learns how long loads take from it)."""
        return self.update_instance(instance_id, ready=True)

    def unload(self, instance_id: str) -> None:
        """Report that the instance was unloaded; one that already ended is no error."""
        with contextlib.suppress(NotFound):
            self._http.call("DELETE", f"/instances/{instance_id}")

    def wait_gone(self, instance_id: str, timeout: float | None = None) -> bool:
        """Wait until the instance has ended (its process left the GPU, or it was unloaded):
        True, or False after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._http.call("GET", f"/instances/{instance_id}")
            except NotFound:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(protocol.WAIT_POLL_S)

    # -- watching ---------------------------------------------------------------------------

    def watch(self, name: str | None = None) -> Watch:
        """The daemon's events, optionally only for these model names (comma-separated)."""
        return Watch(self._http, name)

    def watch_evictions(
        self, holder: str | None = None, instance_ids: Sequence[str] | None = None
    ) -> Iterator[Instance]:
        """Instances asked to go for a claim, each once per claim: of `holder`, or with one of
        `instance_ids`, or all. Answer each: unload it, or take it back (sessions, pin).
        Closing the iterator closes its stream."""
        told: set[tuple[str, str]] = set()
        with self.watch() as events:
            for event in events:
                found = self.instances() if isinstance(event, SnapshotEvent) else []
                if isinstance(event, InstancesEvent):
                    found = event.instances
                yield from protocol.evicted(found, holder, instance_ids, told)


class FleetWatch:
    """Every host's events merged, each tagged with its `host`; per host reconnecting on its
    own. Hosts that join the fleet are picked up. Call close() (or leave its with block)."""

    def __init__(self, fleet: Fleet, name: str | None) -> None:
        self._fleet = fleet
        self._name = name
        self._queue: queue.Queue[Event] = queue.Queue()
        self._watches: dict[str, Watch] = {}
        self.urls: dict[str, str] = {}  # host -> url
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._discover, daemon=True)]
        self._threads[0].start()

    def _discover(self) -> None:
        while not self._closed.is_set():
            try:
                hosts = self._fleet.hosts()
            except RegistryError as exc:
                log.info("fleet watch: cannot list the hosts: %s", exc)
                hosts = []
            except Exception:
                if self._closed.is_set():  # the fleet was closed meanwhile
                    return
                raise
            for host in hosts:
                if host.state != "offline" and host.host not in self._watches:
                    http = self._fleet._http_for(host.host, host.url)
                    if http is not None:
                        self._start(host.host, http)
            self._closed.wait(protocol.FLEET_REFRESH_S)

    def _start(self, host: str, http: _Http) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self.urls[host] = http.url
            watch = self._watches[host] = Watch(http, self._name, host)

            def pump() -> None:
                for event in watch:
                    self._queue.put(event)

            thread = threading.Thread(target=pump, name=f"watch-{host}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def __iter__(self) -> FleetWatch:
        return self

    def __next__(self) -> Event:
        while not self._closed.is_set():
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=0.2)
        raise StopIteration

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        for watch in list(self._watches.values()):
            watch.close()
        # The host lister waits on the closed flag; the streams' threads end at their next
        # read (a keep-alive at the latest), and find the watch closed.
        self._threads[0].join(timeout=protocol.STREAM_READ_TIMEOUT_S)

    def __enter__(self) -> FleetWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fleet:
    """Every host on the daemons' shared database. `Fleet(url_or_urls, token)`: any of them
    answers for the fleet; when one is down, the next is asked. The token goes only to the
    hosts of those URLs and to `allowed_hosts` (patterns such as `*.gpu.example`, or `"*"`),
    never from https to http; other hosts are skipped with a warning."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: protocol.Timeout = DEFAULT_TIMEOUT,
        *,
        allowed_hosts: Sequence[str] = (),
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give at least one daemon's URL")
        self._token = token
        self._allowed = protocol.AllowedHosts(urls, allowed_hosts)
        first = _Http(urls[0], token, timeout, client, transport=transport, verify=verify)
        self._entries = [first] + [first.to(u, token) for u in urls[1:]]
        self._current = 0
        self._own = protocol.OwnBinds()
        self._lock = threading.Lock()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._entries[0].close()

    # -- asking the fleet -------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Ask the entry daemon that answered last, then the others in turn."""
        last: RegistryUnavailable | None = None
        for step in range(len(self._entries)):
            index = (self._current + step) % len(self._entries)
            try:
                answer = self._entries[index].call(method, path, **kwargs)
            except RegistryUnavailable as exc:
                log.info("fleet entry %s unavailable: %s", self._entries[index].url, exc)
                last = exc
                continue
            self._current = index
            return answer
        assert last is not None
        raise last

    def _fleet_model(self, model: str) -> Any:
        return self._call("GET", "/fleet/models", params={"name": model, "hosts_limit": 1000})

    def _http_for(self, host: str, url: str) -> _Http | None:
        """A host's daemon, with the token when it is allowed; None (said once) when not."""
        why = self._allowed.why_not(url)
        if why is not None:
            self._allowed.skip(host, why)
            return None
        return self._entries[0].to(url, self._token)

    def hosts(self) -> list[Host]:
        """Every host of the fleet and its state."""
        return [Host.from_json(h) for h in self._call("GET", "/fleet")["data"]]

    def candidates(self, model: str) -> list[Candidate]:
        """The hosts where `model` fits now, best fit first."""
        return protocol.candidates(model, self._fleet_model(model))

    def room(self, model: str) -> list[RoomSpot]:
        """The hosts where `model` fits once idle instances go, least reloading first."""
        return protocol.room_spots(model, self._fleet_model(model))

    def warm(self, model: str) -> list[WarmSpot]:
        """Where `model` is loaded now across the fleet (host, url, device, instances), so a
        session can go where it is warm instead of waiting for a new load. Binds made through
        this client show at once."""
        return self._own.merged(model, protocol.warm_spots(model, self._fleet_model(model)))

    # -- placing ----------------------------------------------------------------------------

    def place(
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
        on_lost: Callable[[Lease], None] | None = None,
    ) -> Lease:
        """Book a new load of `model` on the best host that grants: where it fits now first,
        then (with `make_room`) where it fits once idle instances go (a claim). `exclude`
        names hosts to pass over; `host` (with `gpu`, a device of that host) names the one to
        use. The lease is renewed from the moment it is granted. Refused when no host
        granted, naming the hosts skipped for the token's sake."""
        protocol.check_target(host, gpu)
        answer = self._fleet_model(model)
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
            lease = Lease(http, body, owns_http=False, on_lost=on_lost)
            lease.host = target.host
            lease._on_bound = self._bound
            try:
                return lease.grant()
            except (Refused, NotFound) as exc:
                refusal = exc if isinstance(exc, Refused) else refusal
                log.info("host %s did not grant %s: %s", target.host, model, exc)
            except RegistryUnavailable as exc:
                log.info("host %s unavailable: %s", target.host, exc)
        if skipped and refusal is None:
            raise protocol.nobody_allowed(model, skipped)
        raise protocol.nowhere(model, refusal)

    def route(self, model: str, **place_options: Any) -> Route:
        """Where to send a session of `model`: a warm instance when one exists (nothing
        booked: `route.instance`), else a new lease as `place` would book (`route.lease`)."""
        exclude = place_options.get("exclude", ())
        for spot in self.warm(model):
            if spot.host not in exclude:
                return Route(instance=spot)
        return Route(lease=self.place(model, **place_options))

    def watch(self, name: str | None = None) -> FleetWatch:
        """Every host's events, merged and tagged with `event.host`."""
        return FleetWatch(self, name)

    def watch_evictions(
        self, holder: str | None = None, instance_ids: Sequence[str] | None = None
    ) -> Iterator[Eviction]:
        """Instances of any host asked to go for a claim, each once per claim: of `holder`,
        or with one of `instance_ids`, or all; one stream for the whole fleet."""
        told: set[tuple[str, str]] = set()
        with self.watch() as events:
            for event in events:
                host = event.host or ""
                url = events.urls.get(host, "")
                found: list[Instance] = []
                if isinstance(event, InstancesEvent):
                    found = event.instances
                elif isinstance(event, SnapshotEvent):
                    found = self._instances_of(host, url)
                for instance in protocol.evicted(found, holder, instance_ids, told):
                    yield Eviction(host, url, instance)

    def _instances_of(self, host: str, url: str) -> list[Instance]:
        http = self._http_for(host, url)
        if http is None:
            return []
        try:
            page = http.call("GET", "/instances", params=protocol.instance_params(None))
        except RegistryError as exc:
            log.info("cannot list the instances of %s: %s", host, exc)
            return []
        return [Instance.from_json(raw) for raw in page["data"]]

    def _bound(self, lease: protocol.LeaseState, instance: Instance) -> None:
        if lease.host is not None:
            self._own.bound(instance.model, lease.host, lease.url, instance.gpu)
