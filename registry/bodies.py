"""Request bodies: read within a size limit and a time limit, validated strictly, with 422 in
FastAPI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from registry import keys
from registry.errors import JSON, http_error, unprocessable, validation_issues

M = TypeVar("M", bound=BaseModel)


async def validated_body(request: web.Request, schema: type[M]) -> M:
    async with _body_deadline(request):
        body = await request.read()  # bounded by client_max_size
    try:
        return schema.model_validate_json(body if body.strip() else b"null")
    except ValidationError as exc:
        raise unprocessable(validation_issues(exc, "body")) from None


def _too_large(limit: int, size: int) -> web.HTTPRequestEntityTooLarge:
    detail = f"request body over {limit // (1024 * 1024)} MiB"
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size, text=json.dumps({"detail": detail}), content_type=JSON
    )


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, up to `limit` bytes (for the one route allowed more than the app's limit)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, request.content_length)
    chunks, size = [], 0
    async with _body_deadline(request):
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit, size)
            chunks.append(chunk)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def _body_deadline(request: web.Request) -> AsyncIterator[None]:
    """The body must arrive within MODEL_REGISTRY_BODY_TIMEOUT: else 408, and the connection
    is closed after it (a client that trickles its body holds nothing for long)."""
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].current.body_timeout):
            yield
    except TimeoutError:
        request.protocol.keep_alive(False)  # answer, then close
        raise http_error(
            web.HTTPRequestTimeout, "the request body did not arrive in time"
        ) from None
