"""GET /fleet (every host and its state) and GET /fleet/models (where each model fits now)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from datetime import UTC, datetime

from aiohttp import web

from registry import keys
from registry.errors import validated_query
from registry.fleet.reader import Candidate, Placements
from registry.fleet.room import room_for
from registry.fleet.schemas import FleetModelsQuery, FleetQuery
from registry.footprint import Footprints, VramSource, product_of
from registry.model import CatalogModel
from registry.page_cache import CachedBody, body_etag
from registry.paging import pagination_json
from registry.view import CatalogView
from registry.watch.conditional import cached_json

routes = web.RouteTableDef()
_SOURCES = frozenset(source.value for source in VramSource)


def _fleet_state(stale: bool) -> str:
    return "stale" if stale else "ok"


@routes.get("/fleet")
async def fleet_hosts(request: web.Request) -> web.StreamResponse:
    query = validated_query(request, FleetQuery)
    fleet = request.app[keys.FLEET_OWN].hosts(await request.app[keys.FLEET].hosts())
    rows = [
        f'{{"host":{json.dumps(h.host)},"url":{json.dumps(h.url)},"state":"{h.state}",'
        f'"heartbeat_at":"{h.heartbeat_at.isoformat()}","gpu_state":{json.dumps(h.gpu_state)},'
        f'"version":{json.dumps(h.version)},"devices":{h.devices_json},'
        f'"reservations":{h.reservations_json},"reservations_total":{h.reservations_total},'
        f'"pending_mib":{h.pending_mib}}}'
        for h in fleet.hosts
        if query.state is None or h.state == query.state
    ]
    body = f'{{"data":[{",".join(rows)}],"fleet_state":"{_fleet_state(fleet.stale)}"}}'.encode()
    return cached_json(request, CachedBody(body, body_etag(body)))


def _candidates(
    model: CatalogModel, fleet: Placements, footprints: Footprints, hosts_limit: int
) -> tuple[int, list[tuple[Candidate, int]]]:
    """How many up hosts the model fits on, and the best-fitting device of each with what that
    host would book there: its learned size per GPU product under the host's own policy."""
    if not model.learn or not footprints.of_model(model.name):
        return fleet.hosts_fitting(model.vram), [
            (c, model.vram) for c in fleet.best_fits(model.vram, hosts_limit)
        ]

    def need(i: int) -> int:
        source = VramSource(fleet.sources[i]) if fleet.sources[i] in _SOURCES else VramSource.MAX
        gpu_product = product_of(fleet.names[i])
        return footprints.effective_under(
            model, gpu_product, source, fleet.min_samples[i], fleet.max_shrink[i]
        )

    return fleet.fits_by_device(need, hosts_limit)


def _model_object(
    model: CatalogModel,
    fleet: Placements,
    view: CatalogView,
    hosts_limit: int,
    now: datetime,
) -> str:
    footprints = view.footprints
    total, candidates = _candidates(model, fleet, footprints, hosts_limit)
    active = model.enabled and total > 0
    if active:
        reason = None
    elif not model.enabled:
        reason = "disabled"
    elif not fleet.host_best:
        reason = "gpu_state_unknown"
    else:
        reason = "insufficient_vram"
    hosts = [
        {
            "host": c.host,
            "url": c.url,
            "gpu": c.gpu,
            "index": c.index,
            "usable_mib": c.usable_mib,
            "headroom_mib": c.usable_mib - needed,
        }
        for c, needed in candidates
    ]
    warm = fleet.warm.get(model.name, [])
    return json.dumps(
        {
            "id": model.id,
            "name": model.name,
            "active": active,
            "vram": model.vram,
            "created_at": model.created_at.isoformat(),
            "updated_at": None if model.updated_at is None else model.updated_at.isoformat(),
            "enabled": model.enabled,
            "reason": reason,
            "hosts_total": total,
            "hosts": hosts,
            "warm_total": sum(spot.instances for spot in warm),
            "warm": [
                {
                    "host": spot.host,
                    "url": spot.url,
                    "gpu": spot.gpu,
                    "index": spot.index,
                    "instances": spot.instances,
                }
                for spot in warm
            ],
            "room": []
            if not model.enabled
            else room_for(model, fleet.rooms, footprints, view.model_by_name, now, hosts_limit),
        },
        separators=(",", ":"),
    )


def _fits_somewhere(model: CatalogModel, fleet: Placements, footprints: Footprints) -> bool:
    """Active across the fleet: switched on, and fits on at least one host that is up."""
    return model.enabled and _candidates(model, fleet, footprints, 1)[0] > 0


def _render(request: web.Request, query: FleetModelsQuery, fleet: Placements) -> CachedBody:
    view = request.app[keys.VIEW]
    end = query.skip + query.limit
    if query.name is None and query.active is None:  # no filter: only the page is touched
        total = view.model_count
        # Bounded by the count: islice takes no stop beyond sys.maxsize, and a client may
        # ask to skip more than that (an empty page, as /models answers).
        page = list(itertools.islice(view.models(), min(query.skip, total), min(end, total)))
    else:
        models: Iterable[CatalogModel] = view.models()
        if query.name is not None:
            named = view.model_by_name(query.name)
            models = [] if named is None else [named]
        matching = [
            m
            for m in models
            if query.active is None or _fits_somewhere(m, fleet, view.footprints) is query.active
        ]
        total, page = len(matching), matching[query.skip : end]
    now = datetime.now(UTC)
    objects = ",".join(_model_object(m, fleet, view, query.hosts_limit, now) for m in page)
    body = (
        f'{{"data":[{objects}],"pagination":{pagination_json(total, query.skip, query.limit)},'
        f'"fleet_state":"{_fleet_state(fleet.stale)}"}}'
    ).encode()
    return CachedBody(body, body_etag(body))


@routes.get("/fleet/models")
async def fleet_models(request: web.Request) -> web.StreamResponse:
    query = validated_query(request, FleetModelsQuery)
    reader = request.app[keys.FLEET]
    fleet = request.app[keys.FLEET_OWN].placements(await reader.placements())
    view = request.app[keys.VIEW]
    key = ("fleet/models", fleet.version, fleet.stale, view.generation, query)
    cached = view.pages.get(key)
    if cached is None:
        cached = view.pages.put(key, _render(request, query, fleet))
    return cached_json(request, cached)
