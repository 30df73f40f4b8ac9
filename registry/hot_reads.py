"""The listing answered from the connection itself, for the requests that need nothing else.

Schedulers poll `GET /models`, and the view holds each page they ask for already rendered. For
such a request aiohttp's own machinery (a task, a Request, the router, a Response and its
headers) costs several times what the daemon does, so the connection handler
(registry.guard.connections) offers each lone request head that arrives on an idle keep-alive
connection to `HotReads.answer` before aiohttp's request loop wakes for it.

An answer from here is the handler's, byte for byte (only Date and X-Request-Id differ, as they
do between any two answers), counts in the same request metrics under the same labels, and
passes the same access gate. Everything else goes the usual way: another method or path, a
conditional or waiting GET, a body, Connection: close, HTTP/1.0, a page not yet rendered at this
generation, a read token to check, a Host not yet let through, or an access log of every request.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage

from registry.access import AccessGate
from registry.config import AccessLog
from registry.errors import JSON_UTF8
from registry.observe import request_id_from
from registry.page_cache import CachedBody
from registry.view import CatalogView

LISTING_ROUTE = "/models"
_HEADS_KEPT = 64  # rendered heads, by ETag: the hot pages of a generation or two


class HotReads:
    def __init__(
        self,
        view: CatalogView,
        gate: AccessGate,
        observe: Callable[[str, int, float], None],
        access: AccessLog,
    ) -> None:
        self._view = view
        self._gate = gate
        self._observe = observe  # the listing route's request metrics
        self._enabled = access is not AccessLog.ALL  # that log takes every request's line
        self._heads: dict[str, tuple[bytes, bytes]] = {}
        self._date_second = -1
        self._date_tail = b""
        self.answered = 0

    def answer(self, message: RawRequestMessage) -> tuple[bytes, bytes] | None:
        """The answer to this request (its head and body, to write as they are), or None when
        it must go the usual way. The caller has checked that it carries no body."""
        started = time.perf_counter()
        if (
            message.method != "GET"
            or message.version != HttpVersion11
            or message.should_close
            or message.upgrade
            or not self._enabled
        ):
            return None
        headers = message.headers
        if "If-None-Match" in headers or not self._gate.admits_at_once(headers):
            return None
        cached = self._view.hot_listing(message.path)
        if cached is None:
            return None
        before_id, after_id = self._head(cached)
        request_id = request_id_from(headers).encode()
        head = b"".join((before_id, request_id, after_id, self._date_and_server()))
        self.answered += 1
        self._observe("GET", 200, time.perf_counter() - started)
        return head, cached.body

    def _head(self, cached: CachedBody) -> tuple[bytes, bytes]:
        """The response head up to the request id, and from it up to the Date header: the
        headers, in the order, that the listing handler's answer carries."""
        found = self._heads.get(cached.etag)
        if found is None:
            if len(self._heads) >= _HEADS_KEPT:
                self._heads.clear()
            found = self._heads[cached.etag] = (
                (
                    f"HTTP/1.1 200 OK\r\nContent-Type: {JSON_UTF8}\r\n"
                    f"ETag: {cached.etag}\r\nX-Request-Id: "
                ).encode(),
                f"\r\nContent-Length: {len(cached.body)}\r\nDate: ".encode(),
            )
        return found

    def _date_and_server(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            date = email.utils.formatdate(now, usegmt=True)
            self._date_tail = f"{date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()
            self._date_second = now
        return self._date_tail
