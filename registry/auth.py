"""Bearer tokens: admin tokens change the catalog and reserve; scheduler tokens only reserve."""

from __future__ import annotations

import enum
import hmac

from aiohttp import web

from registry import keys
from registry.errors import http_error


class Role(enum.Enum):
    ADMIN = "admin"
    SCHEDULER = "scheduler"


def _matches(given: bytes, tokens: list[str]) -> bool:
    # Compare with every token, so the time taken does not tell which one nearly matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def require(request: web.Request, role: Role) -> Role:
    """Answer 403/401 unless the request carries a token allowed to act as `role`.

    Returns the role the token actually has (an admin may act as a scheduler).
    """
    settings = request.app[keys.SETTINGS].current
    admin = settings.admin_tokens()
    scheduler = settings.scheduler_tokens()
    if role is Role.ADMIN and not admin:
        raise http_error(
            web.HTTPForbidden,
            "writes are disabled: no admin token is configured (MODEL_REGISTRY_ADMIN_TOKEN)",
        )
    if role is Role.SCHEDULER and not (admin or scheduler):
        raise http_error(
            web.HTTPForbidden,
            "reservations are disabled: no token is configured "
            "(MODEL_REGISTRY_SCHEDULER_TOKEN, or MODEL_REGISTRY_ADMIN_TOKEN)",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise http_error(
            web.HTTPUnauthorized,
            "a bearer token is required",
            headers={"WWW-Authenticate": 'Bearer realm="model-registry"'},
        )
    try:
        given = presented.strip().encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (kept as surrogates): no token of ours
        given = b""
    if given and _matches(given, admin):
        return Role.ADMIN
    if given and _matches(given, scheduler):
        if role is Role.ADMIN:
            raise http_error(
                web.HTTPForbidden, "a scheduler token may reserve VRAM but not change the catalog"
            )
        return Role.SCHEDULER
    raise http_error(
        web.HTTPUnauthorized,
        "invalid bearer token",
        headers={"WWW-Authenticate": 'Bearer realm="model-registry", error="invalid_token"'},
    )
