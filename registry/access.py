"""Who may reach the daemon at all, checked before any handler runs.

- A daemon that listens on loopback only answers 403 to a `Host` other than localhost,
  127.0.0.1 or [::1] (any port), or one in MODEL_REGISTRY_ALLOWED_HOSTS: a web page whose DNS
  name was rebound to 127.0.0.1 cannot read or act through a user's browser.
- With MODEL_REGISTRY_READ_TOKEN set, every GET but /healthz and /readyz needs a read, scheduler
  or admin token. A browser cannot send a bearer token, so the status page takes `?token=` once
  and answers with an HttpOnly, SameSite=Strict cookie that `/` and `/events` accept.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from registry import keys
from registry.auth import bearer_token, matches_any
from registry.config import Settings
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
    """The name part of a Host header, lower case, without port or trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.partition("]")[0] + "]"
    name, colon, port = header.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        header = name
    return header.rstrip(".")


class AccessGate:
    def __init__(self, settings: Settings) -> None:
        self._check_host = is_loopback(settings.host)
        self._hosts = LOOPBACK_NAMES | settings.allowed_host_names()
        self._seen: set[str] = set()  # Host headers already let through: the hot path

    def __call__(self, request: web.Request) -> web.Response | None:
        """Raise 403 or 401, or answer in place of the handler (None: on to the handler)."""
        if self._check_host:
            self._require_own_host(request)
        settings = request.app[keys.SETTINGS].current
        if settings.read_token is None or request.method not in _READS:
            return None  # the hot path: reads are open
        if request.path in _OPEN_PATHS or not (read_tokens := settings.read_tokens()):
            return None
        return _require_reader(request, settings, read_tokens)

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


def _require_reader(
    request: web.Request, settings: Settings, read_tokens: list[str]
) -> web.Response | None:
    readers = read_tokens + settings.scheduler_tokens() + settings.admin_tokens()
    given = bearer_token(request)
    if given is None and request.path in _COOKIE_PATHS:
        given = _encoded(request.cookies.get(COOKIE))
    if given is not None and matches_any(given, readers):
        return None
    offered = _encoded(request.query.get("token")) if request.path == "/" else None
    if offered is not None and matches_any(offered, readers):
        # The status page, opened once with ?token=: a cookie from now on, and a URL without it.
        page = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        page.set_cookie(
            COOKIE,
            offered.decode(),
            httponly=True,
            samesite="Strict",
            secure=settings.tls,
            path="/",
        )
        return page
    raise http_error(
        web.HTTPUnauthorized,
        "reads need a token here (MODEL_REGISTRY_READ_TOKEN is set): send a read, scheduler or "
        "admin token as a bearer token; in a browser, open /?token=... once",
        headers={"WWW-Authenticate": 'Bearer realm="model-registry"'},
    )


def _encoded(value: str | None) -> bytes | None:
    try:
        return value.encode() if value else None
    except UnicodeEncodeError:
        return None
