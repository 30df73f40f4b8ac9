"""Client connections: a cap, eviction of those that hold a slot without using it, and a
deadline for the request head.

Every connection counts against `max_connections`. When one more arrives at the cap, the oldest
connection that has not sent a complete request head, or sits idle in keep-alive, is closed to
make room; a connection busy with a request (a waiting GET, an event stream) is never evicted.
Only when every connection is busy is the newcomer refused, closed at once. A connection must
send a complete request head within `header_timeout` of connecting, or of its first byte after
a previous answer. This way slow-header attackers lose their connections to real clients.

Over HTTPS a connection counts from the moment it is accepted, not from the end of its TLS
handshake: one still in its handshake is idle (it owes a head), evicted first, and must finish
the handshake within the same header timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import __version__ as aiohttp_version
from aiohttp import web
from aiohttp.http import HttpRequestParser
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

from registry.logs import get_logger

log = get_logger("registry.guard")

# Given a lone request just parsed on an idle connection: the answer to write as it is (head and
# body), or None to leave the request to aiohttp's request loop (registry.hot_reads has one).
AnswerAtOnce = Callable[[RawRequestMessage], tuple[bytes, bytes] | None]

KEEPALIVE_TIMEOUT_S = 60.0


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, knowing whether it is idle (waiting for a request head)
    and since when it has owed one, and answering at once what `answer_at_once` can answer.

    Idle is aiohttp's own notion (its keep-alive timer uses the same test): the handler waits
    for its next message. A request in progress, a waiting GET or an event stream is not idle.
    """

    def __init__(
        self, *args: Any, answer_at_once: AnswerAtOnce | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head_since: float | None = time.monotonic()  # a new connection owes a head
        self._answer_at_once = answer_at_once

    @property
    def idle(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter if self.idle else None
        if self.head_since is None and waiter is not None:
            self.head_since = time.monotonic()  # the first byte of the next request head
        # A request that arrives on an idle connection may be answered here, before aiohttp's
        # request loop runs: its wake-up is held until that is known.
        held = waiter if self._answer_at_once is not None and not self._messages else None
        answered = False
        if held is not None:
            self._waiter = None
        try:
            super().data_received(data)
        finally:
            if held is not None:
                self._waiter = held
                if self._messages:
                    answered = self._answered_at_once()
                    if not answered:
                        held.set_result(None)
        if self._messages or answered:
            self.head_since = None  # a complete head arrived

    def _answered_at_once(self) -> bool:
        """Answer the one request just parsed, if `answer_at_once` can; whether it did."""
        messages, transport, answer_at_once = self._messages, self.transport, self._answer_at_once
        if len(messages) != 1 or transport is None or answer_at_once is None or self.writing_paused:
            return False
        message, payload = messages[0]
        if payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage):
            return False
        try:
            answer = answer_at_once(message)
        except Exception:
            # Never a stuck connection: what cannot be answered here goes the usual way.
            log.exception("answering from the connection failed", path=message.path)
            return False
        if answer is None:
            return False
        messages.popleft()
        if self._parser is not None:
            self._parser.message_consumed()  # the parser counts the requests not yet taken
        transport.writelines(answer)
        # Keep the connection alive as aiohttp's request loop does after each answer.
        self._keepalive = True
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        return True


# What answering at once touches of aiohttp's connection handler. An aiohttp without all of it
# leaves every request to aiohttp's request loop (and the start-up log says so).
_HANDLER_INTERNALS = (
    "_waiter",
    "_messages",
    "_parser",
    "_keepalive",
    "_keepalive_handle",
    "_keepalive_timeout",
    "_next_keepalive_close_time",
    "_process_keepalive",
    "_loop",
)


def can_answer_at_once() -> bool:
    """Whether this aiohttp's connection handler has what `GuardedRequestHandler` needs to
    answer a request before aiohttp's request loop."""
    names = {
        name
        for cls in web.RequestHandler.__mro__
        for name in (*getattr(cls, "__slots__", ()), *vars(cls))
    }
    return all(name in names for name in _HANDLER_INTERNALS) and hasattr(
        HttpRequestParser, "message_consumed"
    )


@dataclass
class GuardCounters:
    evicted: int = 0
    refused: int = 0
    timed_out: int = 0


class GuardedServer(web.Server):
    def __init__(
        self,
        *args: Any,
        max_connections: int,
        header_timeout_s: float,
        answer_at_once: AnswerAtOnce | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if answer_at_once is not None and not can_answer_at_once():
            log.warning(
                "this aiohttp's connection handler is not the one the listing's fast answers "
                "were built for: every request goes through aiohttp's request loop",
                aiohttp=aiohttp_version,
            )
            answer_at_once = None
        self.answer_at_once = answer_at_once
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.counters = GuardCounters()
        self._closed: set[Any] = set()  # handlers closed here, until they leave the table
        # TLS connections whose handshake has not ended: handler -> the raw TCP transport.
        self._handshaking: dict[Any, asyncio.Transport] = {}

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            self, loop=self._loop, answer_at_once=self.answer_at_once, **self._kwargs
        )

    def tls_protocol(self, context: ssl.SSLContext) -> SSLProtocol:
        """A protocol for one accepted TCP connection that speaks TLS to a new handler."""
        return _GuardedTlsProtocol(self, context)

    @property
    def open_count(self) -> int:
        return len(self._connections) + len(self._handshaking)

    def tls_accepted(self, handler: Any, transport: asyncio.Transport) -> None:
        self._handshaking[handler] = transport
        self._make_room(handler, transport)

    def tls_gone(self, handler: Any) -> None:
        self._handshaking.pop(handler, None)

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._handshaking.pop(handler, None) is None:  # counted at accept when TLS
            self._make_room(handler, transport)

    def _all_connections(self) -> Iterator[tuple[Any, asyncio.Transport]]:
        """Those still in their TLS handshake, then the others, each in the order they came:
        walked lazily, since the first idle one is usually near the front."""
        return itertools.chain(self._handshaking.items(), self._connections.items())

    def _make_room(self, handler: Any, transport: asyncio.Transport) -> None:
        if self.open_count <= self.max_connections:
            return
        # Closed connections leave the tables a little later: do not count them, and do not
        # close them twice. (Kept small, and cheap, even in a flood of connections.)
        self._closed = {h for h in self._closed if h in self._connections or h in self._handshaking}
        if self.open_count - len(self._closed) <= self.max_connections:
            return
        # Both tables keep connections in the order they came: the first idle one is the
        # oldest. A connection still in its TLS handshake serves no one yet: it goes first.
        for other, other_transport in self._all_connections():
            if other is handler or other in self._closed:
                continue
            if other in self._handshaking or getattr(other, "idle", False):
                self._closed.add(other)
                other_transport.abort()
                self.counters.evicted += 1
                return
        # Every slot is doing real work: refuse the newcomer. Soon, not now: aiohttp has yet to
        # start this connection's handler, which must see the connection before it is lost.
        self._closed.add(handler)
        self._loop.call_soon(transport.abort)
        self.counters.refused += 1

    def expire_slow_heads(self) -> int:
        """Close connections that owe a request head for longer than the header timeout."""
        deadline = time.monotonic() - self.header_timeout_s
        late = [
            transport
            for handler, transport in self._all_connections()
            if (since := getattr(handler, "head_since", None)) is not None and since < deadline
        ]
        for transport in late:
            transport.abort()
        self.counters.timed_out += len(late)
        return len(late)

    async def sweep(self, report_every_s: float = 10.0) -> None:
        """Enforce the header timeout, and say what the guard did, until cancelled.

        One line every `report_every_s` at most, however many connections it closed.
        """
        interval = min(1.0, self.header_timeout_s / 4)
        reported = GuardCounters()
        next_report = time.monotonic() + report_every_s
        while True:
            await asyncio.sleep(interval)
            self.expire_slow_heads()
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + report_every_s
                now = GuardCounters(**vars(self.counters))
                if now != reported:
                    log.warning(
                        "connections closed to keep the daemon reachable",
                        evicted=now.evicted - reported.evicted,
                        refused=now.refused - reported.refused,
                        no_request_head_in_time=now.timed_out - reported.timed_out,
                        open=self.open_count,
                        max_connections=self.max_connections,
                        within_s=report_every_s,
                    )
                    reported = now


class _GuardedTlsProtocol(SSLProtocol):
    """asyncio's own TLS layer (what `create_server(ssl=...)` builds), made visible to the
    guard from the moment the TCP connection is accepted until its handshake ends."""

    def __init__(self, server: GuardedServer, context: ssl.SSLContext) -> None:
        self._handler = server()
        self._server = server
        # No waiter (nobody awaits the handshake) and a timeout in seconds, as asyncio itself
        # builds it; the stubs are narrower than that.
        no_waiter: Any = None
        timeout_s: Any = server.header_timeout_s
        super().__init__(
            server._loop,
            self._handler,
            context,
            no_waiter,
            server_side=True,
            ssl_handshake_timeout=timeout_s,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A TCP transport: asyncio's, or uvloop's, which does not derive from asyncio.Transport.
        self._server.tls_accepted(self._handler, cast(asyncio.Transport, transport))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.tls_gone(self._handler)
        super().connection_lost(exc)


class GuardedSite(web.TCPSite):
    """A TCP site whose TLS connections the guard counts from their accept."""

    async def start(self) -> None:
        context = self._ssl_context
        if context is None:
            return await super().start()
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert isinstance(server, GuardedServer)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: server.tls_protocol(context),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server caps and sweeps its connections."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        header_timeout_s: float,
        answer_at_once: AnswerAtOnce | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s
        self._answer_at_once = answer_at_once

    async def _make_server(self) -> web.Server:
        # aiohttp's own server, rebuilt as the guarded kind with the same handler and options.
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            max_connections=self._max_connections,
            header_timeout_s=self._header_timeout_s,
            answer_at_once=self._answer_at_once,
            **plain._kwargs,
        )
