"""Bearer tokens: admin tokens change the catalog and reserve; scheduler tokens only reserve.

What a token books (a reservation, an instance) is that token's: only it, or an admin token, may
renew, bind or release it. The owner is kept as a hash of the token, never the token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from registry import keys
from registry.errors import http_error


class Role(enum.Enum):
    ADMIN = "admin"
    SCHEDULER = "scheduler"


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    owner: str  # the hash of the token presented


def owner_of(token: bytes) -> str:
    """What a booking keeps of the token that made it: not the token, and not a way back."""
    return hashlib.blake2b(token, digest_size=16, person=b"mr-owner").hexdigest()


def check_owner(caller: Caller, owner: str | None, what: str) -> None:
    """403 unless `caller` may change what `owner` booked. Bookings made before owners were
    kept have none: any scheduler token may act on them."""
    if caller.role is Role.ADMIN or owner is None or hmac.compare_digest(owner, caller.owner):
        return
    raise http_error(
        web.HTTPForbidden,
        f"this {what} was made with another token: only that token, or an admin token, "
        "may change it",
    )


def matches_any(given: bytes, tokens: list[str]) -> bool:
    # Compare with every token, so the time taken does not tell which one nearly matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def bearer_token(request: web.Request) -> bytes | None:
    """The bearer token the request carries; None when it carries none. A token that is not
    UTF-8 (kept as surrogates) comes back empty: it matches no token of ours."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    try:
        return presented.strip().encode()
    except UnicodeEncodeError:
        return b""


def require(request: web.Request, role: Role) -> Caller:
    """Answer 403/401 unless the request carries a token allowed to act as `role`.

    Returns who called: the role the token actually has (an admin may act as a scheduler).
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
    given = bearer_token(request)
    if given is None:
        raise http_error(
            web.HTTPUnauthorized,
            "a bearer token is required",
            headers={"WWW-Authenticate": 'Bearer realm="model-registry"'},
        )
    if given and matches_any(given, admin):
        return Caller(Role.ADMIN, owner_of(given))
    if given and matches_any(given, scheduler):
        if role is Role.ADMIN:
            raise http_error(
                web.HTTPForbidden, "a scheduler token may reserve VRAM but not change the catalog"
            )
        return Caller(Role.SCHEDULER, owner_of(given))
    raise http_error(
        web.HTTPUnauthorized,
        "invalid bearer token",
        headers={"WWW-Authenticate": 'Bearer realm="model-registry", error="invalid_token"'},
    )
