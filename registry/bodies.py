"""Request bodies: read within the size limit, validated strictly, 422 in FastAPI's shape."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from registry.errors import unprocessable, validation_issues

M = TypeVar("M", bound=BaseModel)


async def validated_body(request: web.Request, schema: type[M]) -> M:
    body = await request.read()  # bounded by client_max_size
    try:
        return schema.model_validate_json(body if body.strip() else b"null")
    except ValidationError as exc:
        raise unprocessable(validation_issues(exc, "body")) from None
