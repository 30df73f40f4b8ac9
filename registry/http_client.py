"""Talking to a running daemon from the command line: JSON over HTTP, errors in one line."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from registry.config import Settings

_TIMEOUT_S = 10
PAGE = 1000  # items per request when reading a whole paged listing


class ClientError(Exception):
    """The daemon could not be reached or said no; the message is for the user."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A request that carries a token never follows a redirect: the token would go wherever
    the answer points. A daemon never redirects; whatever did is not one to trust."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise ClientError(
            f"{req.full_url} answered with a redirect (HTTP {code}) to {newurl}, which is not "
            "followed: give the daemon's own address with --url"
        )


_OPENER = urllib.request.build_opener(_NoRedirects)


def base_url(settings: Settings, url: str | None) -> str:
    """`url` as given, else the configured host and port (a wildcard address as loopback)."""
    if url:
        return url.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def call(base: str, method: str, path: str, body: object = None, token: str | None = None) -> Any:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=_TIMEOUT_S) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise ClientError(_explain(exc.code, exc.read())) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach the daemon at {base}: {reason}") from None
    return json.loads(payload) if payload else None


def every_page(
    base: str, path: str, params: dict[str, str], token: str | None = None
) -> list[dict[str, Any]]:
    """Every item of a paged listing (`data` and `pagination`), page by page."""
    items: list[dict[str, Any]] = []
    while True:
        query = urllib.parse.urlencode({**params, "skip": len(items), "limit": PAGE})
        page = call(base, "GET", f"{path}?{query}", token=token)
        items.extend(page["data"])
        if not page["data"] or len(items) >= page["pagination"]["total_items"]:
            return items


def event_names(base: str, token: str | None = None) -> Iterator[str]:
    """The name of each event of GET /events as it arrives (keep-alive comments skipped)."""
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + "/events", headers=headers)
    try:
        with _OPENER.open(request) as response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    yield line.partition(":")[2].strip()
    except urllib.error.HTTPError as exc:
        raise ClientError(_explain(exc.code, exc.read())) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"lost the daemon at {base}: {reason}") from None


def _explain(status: int, payload: bytes) -> str:
    try:
        answer = json.loads(payload)
    except ValueError:
        return f"HTTP {status}"
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if isinstance(detail, list):  # 422: one line per problem
        detail = "; ".join(
            f"{'.'.join(str(p) for p in issue.get('loc', [])[1:]) or 'body'}: {issue.get('msg')}"
            for issue in detail
        )
    reason = f", {answer['reason']}" if isinstance(answer, dict) and "reason" in answer else ""
    return f"{detail} (HTTP {status}{reason})"
