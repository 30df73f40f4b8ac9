"""GET /: GPUs with their memory split into used, pending, margin and usable; models; the open
reservations; the fleet; the GPU backend and the age of its reading. One HTML page with its own
CSS and script (no external asset: it works on an air-gapped host), correct without JavaScript,
and with it, redrawn from the server whenever /events says something changed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from registry import __version__, keys
from registry.capacity import Capacity
from registry.schemas import ListQuery
from registry.view import CatalogView

routes = web.RouteTableDef()

MAX_ROWS = 1000


@dataclass(frozen=True, slots=True)
class Segment:
    kind: str  # used, pending, margin, usable
    mib: int
    start: float  # per mille of the total, for an SVG bar
    width: float


def memory_segments(total: int, free: int, pending: int, margin: int) -> list[Segment]:
    """The device's total split into used, pending, margin and usable; they add up to total."""
    used = max(0, total - free)
    pending = min(max(0, pending), max(0, free))
    margin = min(max(0, margin), max(0, free - pending))
    usable = max(0, free - pending - margin)
    segments, start = [], 0.0
    for kind, mib in (("used", used), ("pending", pending), ("margin", margin), ("usable", usable)):
        width = 1000 * mib / total if total else 0.0
        segments.append(Segment(kind, mib, start, width))
        start += width
    return segments


def _gpus(capacity: Capacity) -> list[dict[str, Any]]:
    return [
        {
            "device": budget.device,
            "usable": budget.usable_mib,
            "pending": budget.pending_mib,
            "segments": memory_segments(
                budget.device.total_mib,
                budget.device.free_mib,
                budget.pending_mib,
                budget.margin_mib,
            ),
        }
        for budget in capacity.budgets
    ]


def _models(view: CatalogView, active: bool | None) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    matching = 0
    for model in view.models():
        assessment = view.capacity.assess(model)
        if active is not None and assessment.active is not active:
            continue
        matching += 1
        if len(rows) < MAX_ROWS:
            rows.append({"model": model, "assessment": assessment})
    return rows, matching


def _reservations(view: CatalogView, now: datetime) -> list[dict[str, Any]]:
    capacity = view.capacity
    return [
        {
            "r": r,
            "pending": capacity.pending_of(r),
            "expires_s": (r.expires_at - now).total_seconds(),
        }
        for r in view.reservations
    ]


def _instances(app: web.Application) -> list[dict[str, object]]:
    instances = app.get(keys.INSTANCES)
    return [] if instances is None else instances.described()


async def _fleet(request: web.Request) -> list[Any]:
    reader = request.app.get(keys.FLEET)
    if reader is None:
        return []
    hosts = request.app[keys.FLEET_OWN].hosts(await reader.hosts()).hosts
    return hosts if len(hosts) > 1 else []  # a fleet of one is this host, shown above


@routes.get("/")
async def status_page(request: web.Request) -> web.StreamResponse:
    app = request.app
    view = app[keys.VIEW]
    try:
        active = ListQuery.model_validate({"active": request.query.get("active")}).active
    except ValueError:
        active = None
    snapshot = view.snapshot
    now = datetime.now(UTC)
    poller = app.get(keys.POLLER)
    read_at = poller.last_success_wall if poller is not None else snapshot.as_of
    models, matching = _models(view, active)
    nonce = secrets.token_urlsafe(16)
    context = {
        "nonce": nonce,
        "version": __version__,
        "host_id": app[keys.SETTINGS].current.host_id,
        "snapshot": snapshot,
        # How long ago the GPUs were last read (readings are re-confirmed at every poll and
        # published only on change); none while they cannot be read.
        "age_s": None
        if read_at is None or not snapshot.devices
        else (now - read_at).total_seconds(),
        "margins": view.margins,
        "gpus": _gpus(view.capacity),
        "models": models,
        "matching": matching,
        "model_count": view.model_count,
        "active_count": view.active_count,
        "active_filter": active,
        "max_rows": MAX_ROWS,
        "reservations": _reservations(view, now),
        "instances": _instances(app),
        "fleet": await _fleet(request),
        "generation": view.generation,
    }
    # The page's script asks for its changing parts alone when /events says they changed.
    template = "fragment.html" if request.headers.get("X-Status-Fragment") == "1" else "status.html"
    response = aiohttp_jinja2.render_template(template, request, context)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def instance_state(instance: dict[str, Any]) -> str:
    """What an operator should know of an instance in a word or two."""
    if instance["evicting"] is not None:
        return "asked to unload"
    words = ["pinned" if instance["pinned"] else "", "ready" if instance["ready"] else "loading"]
    return ", ".join(w for w in words if w)


def setup_templates(app: web.Application) -> None:
    environment = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("registry.ops_view", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.globals["instance_state"] = instance_state
