"""Who may reach the daemon at all, checked before any handler runs.

- A daemon that listens on loopback only answers 403 to a `Host` other than localhost,
  127.0.0.1 or [::1] (any port), or one in MODEL_REGISTRY_ALLOWED_HOSTS: a web page whose DNS
  name was rebound to 127.0.0.1 cannot read or act through a user's browser.
- With MODEL_REGISTRY_READ_TOKEN set, every GET but /healthz and /readyz needs a read, scheduler
  or admin token. A browser cannot send a bearer token, so the status page takes `?token=` once
  and answers with an HttpOnly, SameSite=Strict cookie that `/` and `/events` accept. The cookie
  is not the token: it is an HMAC, under a key of this daemon's own, of the tokens allowed to
  read, so it grants reading only (whatever token was offered), and stops working when those
  tokens change (a reload that rotates them) or the daemon restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping

from aiohttp import web

from registry.auth import bearer_token, matches_any
from registry.config import LiveSettings, Settings
from registry.errors import http_error

COOKIE = "model_registry_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_COOKIE_PATHS = frozenset({"/", "/events"})
_READS = frozenset({"GET", "HEAD"})


def is_loopback(host: str) -> bool:
    """Whether listening on `host` means listening on loopback only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header, lower case, without port or trailing dot. A bracketed
    IPv6 host is `[address]`, optionally followed by `:port` and nothing else: anything else
    (`[::1]evil.com`) is returned whole, so it matches no allowed name."""
    header = header.strip().lower()
    if header.startswith("["):
        address, bracket, rest = header.partition("]")
        if bracket and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return address + "]"
        return header
    name, colon, port = header.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        header = name
    return header.rstrip(".")


class AccessGate:
    def __init__(self, live: LiveSettings) -> None:
        # The settings in force, held here: no lookup through the app on every request.
        self._live = live
        settings = live.current
        self._check_host = is_loopback(settings.host)
        self._hosts = LOOPBACK_NAMES | settings.allowed_host_names()
        self._seen: set[str] = set()  # Host headers already let through: the hot path
        self._cookie_key = secrets.token_bytes(32)
        self._cookie: tuple[tuple[str, ...], str] = ((), "")  # (readers, its cookie), last made

    def __call__(self, request: web.Request) -> web.Response | None:
        """Raise 403 or 401, or answer in place of the handler (None: on to the handler)."""
        if self._check_host:
            self._require_own_host(request)
        settings = self._live.current
        if settings.read_token is None or request.method not in _READS:
            return None  # the hot path: reads are open
        if request.path in _OPEN_PATHS or not (read_tokens := settings.read_tokens()):
            return None
        return self._require_reader(request, settings, read_tokens)

    def admits_at_once(self, headers: Mapping[str, str]) -> bool:
        """Whether a read with these headers may pass, told without its path or a token: reads
        are open, and its Host, where this daemon checks it, was let through before."""
        if self._live.current.read_token is not None:
            return False
        return not self._check_host or headers.get("Host") in self._seen

    def _require_reader(
        self, request: web.Request, settings: Settings, read_tokens: list[str]
    ) -> web.Response | None:
        readers = read_tokens + settings.scheduler_tokens() + settings.admin_tokens()
        given = bearer_token(request)
        if given is not None and matches_any(given, readers):
            return None
        if given is None and request.path in _COOKIE_PATHS:
            cookie = request.cookies.get(COOKIE, "").encode(errors="replace")
            if hmac.compare_digest(cookie, self._reading_cookie(readers)):
                return None
        offered = _encoded(request.query.get("token")) if request.path == "/" else None
        if offered is not None and matches_any(offered, readers):
            # The status page, opened once with ?token=: a cookie from now on, a URL without it.
            page = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
            page.set_cookie(
                COOKIE,
                self._reading_cookie(readers).decode(),
                httponly=True,
                samesite="Strict",
                secure=settings.tls,
                path="/",
            )
            return page
        raise http_error(
            web.HTTPUnauthorized,
            "reads need a token here (MODEL_REGISTRY_READ_TOKEN is set): send a read, scheduler "
            "or admin token as a bearer token; in a browser, open /?token=... once",
            headers={"WWW-Authenticate": 'Bearer realm="model-registry"'},
        )

    def _reading_cookie(self, readers: list[str]) -> bytes:
        """The cookie that lets a browser read while exactly these tokens may read."""
        key = tuple(sorted(readers))
        if self._cookie[0] != key:
            message = b"read\0" + "\0".join(key).encode()
            self._cookie = (key, hmac.new(self._cookie_key, message, hashlib.sha256).hexdigest())
        return self._cookie[1].encode()

    def _require_own_host(self, request: web.Request) -> None:
        header = request.headers.get("Host")
        if header is None or header in self._seen:  # no Host: no browser sent it
            return
        name = host_name(header)
        if name not in self._hosts:
            raise http_error(
                web.HTTPForbidden,
                f"this daemon listens on loopback and answers to localhost, 127.0.0.1 and "
                f"[::1], not to {name!r} (MODEL_REGISTRY_ALLOWED_HOSTS adds names)",
            )
        if len(self._seen) < 4096:
            self._seen.add(header)


def _encoded(value: str | None) -> bytes | None:
    try:
        return value.encode() if value else None
    except UnicodeEncodeError:
        return None
