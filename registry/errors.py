"""Errors in the original system's (FastAPI's) shape, so its clients keep working."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

JSON = "application/json"
JSON_UTF8 = "application/json; charset=utf-8"


def _plain(value: Any) -> Any:
    """Make a pydantic error's input/ctx JSON-safe (they may hold exceptions or bytes)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return str(value)[:1000]
    return value


def validation_issues(error: ValidationError, *location: str) -> list[dict[str, Any]]:
    """The errors in FastAPI's shape, each `loc` starting with `location` ("body", ...)."""
    issues = []
    for item in error.errors(include_url=False):
        issue: dict[str, Any] = {
            "type": item["type"],
            "loc": [*location, *item["loc"]],
            "msg": item["msg"],
            "input": _plain(item.get("input")),
        }
        if "ctx" in item:
            issue["ctx"] = {key: _plain(value) for key, value in item["ctx"].items()}
        issues.append(issue)
    return issues


def unprocessable(issues: Sequence[dict[str, Any]]) -> web.HTTPUnprocessableEntity:
    return web.HTTPUnprocessableEntity(
        text=json.dumps({"detail": list(issues)}, ensure_ascii=False), content_type=JSON
    )


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"detail": detail}, ensure_ascii=False),
        content_type=JSON,
        headers=headers,
    )


def http_error(
    cls: type[web.HTTPException], detail: str, headers: dict[str, str] | None = None
) -> web.HTTPException:
    return cls(
        text=json.dumps({"detail": detail}, ensure_ascii=False), content_type=JSON, headers=headers
    )


Q = TypeVar("Q", bound=BaseModel)


def validated_query(request: web.Request, schema: type[Q]) -> Q:
    """The request's query parameters as `schema`, or a 422 naming each problem. A repeated
    parameter counts with its last value, as in the original system."""
    try:
        return schema.model_validate(dict(request.query.items()))
    except ValidationError as exc:
        raise unprocessable(validation_issues(exc, "query")) from None
