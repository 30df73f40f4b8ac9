"""Conditional answers: ETag and If-None-Match, and blocking GETs with `Prefer: wait=N`.

A GET with `If-None-Match` naming the current ETag and `Prefer: wait=N` (RFC 7240) is held
until the answer's ETag changes (200 with the new body) or N seconds pass (304), as Consul's
blocking queries and Kubernetes watches do. Without `Prefer`, it is a plain conditional GET.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from registry import keys
from registry.errors import JSON_UTF8, http_error
from registry.keys import WAITED_S
from registry.page_cache import CachedBody
from registry.watch.feed import ChangeFeed

WAIT_MAX_S = 300


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes do not matter."""
    if header.strip() == "*":
        return True
    etag = etag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == etag for part in header.split(","))


def preferred_wait_s(request: web.Request) -> int | None:
    """The `wait` preference in seconds (at most WAIT_MAX_S); None when absent or unusable."""
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            token = preference.split(";", 1)[0]
            name, equals, value = token.partition("=")
            if name.strip().lower() != "wait" or not equals:
                continue
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                return None
            return min(seconds, WAIT_MAX_S) if seconds >= 1 else None
    return None


def json_answer(cached: CachedBody, status: int = 200) -> web.Response:
    # Headers given whole: aiohttp's content_type= argument costs a parse per response.
    return web.Response(
        status=status, body=cached.body, headers={"Content-Type": JSON_UTF8, "ETag": cached.etag}
    )


def cached_json(request: web.Request, cached: CachedBody, status: int = 200) -> web.Response:
    """The body, or 304 when the client already holds it (no waiting)."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and etag_matches(if_none_match, cached.etag):
        return web.Response(status=304, headers={"ETag": cached.etag})
    return json_answer(cached, status)


async def watched_json(
    request: web.Request, current: Callable[[], CachedBody | None], feed: ChangeFeed
) -> web.Response:
    """A conditional GET that may block; `current` gives the answer now (None: 404)."""
    cached = current()
    if cached is None:
        raise http_error(web.HTTPNotFound, "Not Found")
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is None or not etag_matches(if_none_match, cached.etag):
        return json_answer(cached)
    wait_s = preferred_wait_s(request)
    if wait_s is None:
        return web.Response(status=304, headers={"ETag": cached.etag})
    with request.app[keys.STREAM_SLOTS].hold(request):
        return await _wait_for_other(request, current, feed, cached, if_none_match, wait_s)


async def _wait_for_other(
    request: web.Request,
    current: Callable[[], CachedBody | None],
    feed: ChangeFeed,
    cached: CachedBody,
    if_none_match: str,
    wait_s: int,
) -> web.Response:
    """Wait up to `wait_s` for an answer whose ETag `if_none_match` does not match."""
    applied = {"Preference-Applied": f"wait={wait_s}"}
    clock = asyncio.get_running_loop()
    started = clock.time()
    deadline = started + wait_s
    while True:
        remaining = deadline - clock.time()
        changed = remaining > 0 and await feed.wait_for_change(remaining)
        request[WAITED_S] = clock.time() - started
        if not changed:
            return web.Response(status=304, headers={"ETag": cached.etag, **applied})
        fresh = current()
        if fresh is None:
            raise http_error(web.HTTPNotFound, "Not Found", headers=applied)
        if not etag_matches(if_none_match, fresh.etag):
            answer = json_answer(fresh)
            answer.headers.update(applied)
            return answer
