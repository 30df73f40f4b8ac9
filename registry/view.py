"""The catalog and its capacity view, held in memory, with each answer's bytes cached.

Requests never touch the database nor recompute capacity: the view is rebuilt when the catalog,
the GPU snapshot or the margins change, and each distinct page is serialised once per rebuild.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from gpu import GpuSnapshot
from registry.admission.reservation import (
    Reservation,
    pending_by_device,
    pending_by_reservation,
)
from registry.capacity import Assessment, Margins, UsableDevice, assess_all, usable_devices
from registry.catalog import CatalogModel
from registry.logs import get_logger
from registry.schemas import ListQuery

log = get_logger("registry.view")

_MAX_CACHED_PAGES = 4096
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class CachedBody:
    body: bytes
    etag: str


def _remember(cache: dict[K, CachedBody], key: K, value: CachedBody) -> CachedBody:
    # Clients choose query strings: the caches must not grow without bound.
    if len(cache) >= _MAX_CACHED_PAGES:
        cache.clear()
    cache[key] = value
    return value


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=10).hexdigest() + '"'


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _iso(value: object) -> str:
    return "null" if value is None else _json(value.isoformat())  # type: ignore[attr-defined]


class _Entry:
    """One model's JSON, split around the parts that depend on the GPU state."""

    __slots__ = ("assessment", "head", "json", "model", "tail")

    def __init__(self, model: CatalogModel) -> None:
        self.model = model
        self.head = f'{{"id":{model.id},"name":{_json(model.name)},"active":'
        self.tail = (
            f',"vram":{model.vram},"created_at":{_iso(model.created_at)},'
            f'"updated_at":{_iso(model.updated_at)},"enabled":{_json(model.enabled)},"fits":'
        )
        self.assessment: Assessment | None = None
        self.json = ""

    def render(self, assessment: Assessment) -> None:
        self.assessment = assessment
        placement = assessment.placement
        placement_json = (
            "null"
            if placement is None
            else f'{{"gpu":{_json(placement.gpu)},"index":{placement.index},'
            f'"free_mib":{placement.free_mib}}}'
        )
        reason = "null" if assessment.reason is None else f'"{assessment.reason.value}"'
        headroom = "null" if assessment.headroom_mib is None else str(assessment.headroom_mib)
        self.json = (
            f"{self.head}{_json(assessment.active)}{self.tail}{_json(assessment.fits)}"
            f',"reason":{reason},"placement":{placement_json},"headroom_mib":{headroom}}}'
        )


class CatalogView:
    def __init__(self, snapshot: GpuSnapshot, margins: Margins) -> None:
        self._snapshot = snapshot
        self._margins = margins
        self._entries: dict[int, _Entry] = {}
        self._ordered: list[_Entry] = []
        self._by_name: dict[str, _Entry] = {}
        self._pages: dict[ListQuery, CachedBody] = {}
        self._pages_by_raw_query: dict[str, CachedBody] = {}
        self._singles: dict[int, CachedBody] = {}
        self._capacity_json = ""
        self._reservations: tuple[Reservation, ...] = ()
        self.pending_by_reservation: dict[str, int] = {}
        self.pending_by_device: dict[str, int] = {}
        self.usable: list[UsableDevice] = []  # healthy devices, least usable first
        self._listeners: list[Callable[[], None]] = []
        self.loaded = False
        self.generation = 0
        self.active_count = 0
        self._rebuild(log_flips=False)

    # -- inputs --------------------------------------------------------------------------

    @property
    def snapshot(self) -> GpuSnapshot:
        return self._snapshot

    @property
    def margins(self) -> Margins:
        return self._margins

    def replace_catalog(self, models: Iterable[CatalogModel]) -> None:
        previous = self._entries
        entries = {}
        for model in models:
            old = previous.get(model.id)
            entries[model.id] = old if old is not None and old.model == model else _Entry(model)
        self.loaded = True
        unchanged = entries.keys() == previous.keys() and all(
            entries[key] is previous[key] for key in entries
        )
        if not unchanged:  # a periodic reload that finds nothing new keeps every cached answer
            self._entries = entries
            self._rebuild()

    def apply_changes(self, requested_ids: Iterable[int], found: Iterable[CatalogModel]) -> None:
        """Refresh the models whose ids were asked for; an id not found was deleted."""
        for model_id in requested_ids:
            self._entries.pop(model_id, None)
        for model in found:
            self._entries[model.id] = _Entry(model)
        self._rebuild()

    def set_snapshot(self, snapshot: GpuSnapshot) -> None:
        self._snapshot = snapshot
        self._rebuild()

    def set_margins(self, margins: Margins) -> None:
        if margins != self._margins:
            self._margins = margins
            self._rebuild()

    def set_reservations(self, reservations: Iterable[Reservation]) -> None:
        self._reservations = tuple(reservations)
        self._rebuild()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the view."""
        self._listeners.append(listener)

    # -- outputs -------------------------------------------------------------------------

    @property
    def models(self) -> list[CatalogModel]:
        return [entry.model for entry in self._ordered]

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        return self._reservations

    def model_by_name(self, name: str) -> CatalogModel | None:
        entry = self._by_name.get(name)
        return None if entry is None else entry.model

    def assessment(self, model_id: int) -> Assessment | None:
        entry = self._entries.get(model_id)
        return None if entry is None else entry.assessment

    def page(self, query: ListQuery) -> CachedBody:
        cached = self._pages.get(query)
        if cached is None:
            cached = _remember(self._pages, query, self._render_page(query))
        return cached

    def page_for_raw_query(self, raw_query: str) -> CachedBody | None:
        """The answer already rendered for this exact request target, if any."""
        return self._pages_by_raw_query.get(raw_query)

    def remember_raw_query(self, raw_query: str, cached: CachedBody) -> None:
        _remember(self._pages_by_raw_query, raw_query, cached)

    def single(self, model_id: int) -> CachedBody | None:
        cached = self._singles.get(model_id)
        if cached is None:
            entry = self._entries.get(model_id)
            if entry is None:
                return None
            body = entry.json.encode()
            cached = self._singles[model_id] = CachedBody(body, _etag(body))
        return cached

    # -- internals -----------------------------------------------------------------------

    def _matching(self, query: ListQuery) -> list[_Entry]:
        if query.name is not None:
            entry = self._by_name.get(query.name)
            candidates = [] if entry is None else [entry]
        else:
            candidates = self._ordered
        if query.active is None:
            return candidates
        return [
            e
            for e in candidates
            if e.assessment is not None and e.assessment.active is query.active
        ]

    def _render_page(self, query: ListQuery) -> CachedBody:
        matching = self._matching(query)
        total = len(matching)
        page = matching[query.skip : query.skip + query.limit]
        body = (
            '{"data":['
            + ",".join(entry.json for entry in page)
            + f'],"pagination":{{"total_items":{total},'
            f'"total_pages":{math.ceil(total / query.limit)},'
            f'"current_page":{query.skip // query.limit + 1},"per_page":{query.limit}}},'
            f'"capacity":{self._capacity_json}}}'
        ).encode()
        return CachedBody(body, _etag(body))

    def _rebuild(self, *, log_flips: bool = True) -> None:
        snapshot = self._snapshot
        self._ordered = sorted(self._entries.values(), key=lambda e: e.model.id)
        self._by_name = {e.model.name: e for e in self._ordered}
        self.pending_by_reservation = pending_by_reservation(self._reservations, snapshot)
        self.pending_by_device = pending_by_device(self._reservations, self.pending_by_reservation)
        self.usable = usable_devices(snapshot, self._margins, self.pending_by_device)
        assessments = assess_all(
            (e.model for e in self._ordered), snapshot, self._margins, self.pending_by_device
        )
        active = 0
        for entry in self._ordered:
            new = assessments[entry.model.id]
            old = entry.assessment
            if new != old:
                if log_flips and old is not None and old.active != new.active:
                    _log_flip(entry.model, new)
                entry.render(new)
            active += new.active
        self.active_count = active
        self._capacity_json = (
            f'{{"state":"{snapshot.state.value}","as_of":{_iso(snapshot.as_of)},'
            f'"backend":{_json(snapshot.backend)}}}'
        )
        self._pages = {}
        self._pages_by_raw_query = {}
        self._singles = {}
        self.generation += 1
        for listener in self._listeners:
            listener()


def _log_flip(model: CatalogModel, assessment: Assessment) -> None:
    log.info(
        "model availability changed",
        model=model.name,
        model_id=model.id,
        active=assessment.active,
        reason=assessment.reason.value if assessment.reason else None,
        vram_mib=model.vram,
        headroom_mib=assessment.headroom_mib,
        gpu=assessment.placement.gpu if assessment.placement else None,
    )
