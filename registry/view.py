"""The one place that combines catalog, GPU snapshot, margins and reservations into answers.

Every change costs work in proportion to what changed: a write touches one model's entry; a
GPU or reservation change recomputes the per-device capacity and finds the models that flip
by bisecting the enabled models sorted by VRAM. Pages are rendered only when asked for and
cached until the next change; each change bumps `generation`, which every output keys on.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from gpu import GpuDevice, GpuSnapshot
from registry.bookings import Bookings
from registry.capacity import Assessment, Capacity, Margins, Sizes
from registry.footprint import Footprints, Observed
from registry.logs import FLAP_EVENT, get_logger
from registry.model import CatalogModel
from registry.page_cache import (
    DEFAULT_PAGE_CACHE_BYTES,
    CachedBody,
    PageCache,
    ParsedQueries,
    body_etag,
)
from registry.paging import pagination_json
from registry.reservation import Reservation
from registry.schemas import ListQuery

log = get_logger("registry.view")

_HOT_PAGES = 16  # listing pages kept by request target, for the current generation
_HOT_PAGE_MAX_BYTES = 64 * 1024
_BULK_CHANGE = 256  # more changes than this at once: rebuild the indexes instead
RESIDENTS_SHOWN = 100  # a model's instances in the listing: the newest, and their count
K = TypeVar("K")


# One encoder for every fragment: json.dumps with options makes a new one at each call.
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_LITERAL = {True: "true", False: "false", None: "null"}


def _iso(value: object) -> str:
    return "null" if value is None else _json(value.isoformat())  # type: ignore[attr-defined]


class _Entry:
    """One model, with the parts of its JSON that do not depend on the GPU state."""

    __slots__ = ("head", "learn", "model", "tail")

    def __init__(self, model: CatalogModel) -> None:
        self.model = model
        self.head = f'{{"id":{model.id},"name":{_json(model.name)},"active":'
        self.tail = (
            f',"vram":{model.vram},"created_at":{_iso(model.created_at)},'
            f'"updated_at":{_iso(model.updated_at)},"enabled":{_json(model.enabled)},"fits":'
        )
        self.learn = f',"learn":{_json(model.learn)}'

    def render(self, assessment: Assessment, residents_json: str, sizes: Sizes) -> str:
        placement = assessment.placement
        placement_json = (
            "null"
            if placement is None
            else f'{{"gpu":{_json(placement.gpu)},"index":{placement.index},'
            f'"free_mib":{placement.free_mib}}}'
        )
        reason = "null" if assessment.reason is None else f'"{assessment.reason.value}"'
        headroom = "null" if assessment.headroom_mib is None else str(assessment.headroom_mib)
        observed = "null" if sizes.observed is None else str(sizes.observed)
        return (
            f"{self.head}{_LITERAL[assessment.active]}{self.tail}{_LITERAL[assessment.fits]}"
            f',"reason":{reason},"placement":{placement_json},"headroom_mib":{headroom}'
            f",{residents_json}{self.learn}"
            f',"vram_observed":{observed},"vram_effective":{sizes.effective}'
            f',"reload_s":{sizes.reload_s}'
            f',"reload_estimated":{_LITERAL[sizes.reload_estimated]}}}'
        )


class CatalogView:
    def __init__(
        self,
        snapshot: GpuSnapshot,
        margins: Margins,
        footprints: Footprints | None = None,
        pages: PageCache | None = None,
    ) -> None:
        self._snapshot = snapshot
        # Rendered answers of every listing, /fleet/models included, within one byte budget.
        self.pages = pages if pages is not None else PageCache(DEFAULT_PAGE_CACHE_BYTES)
        self.queries = ParsedQueries()
        # The listing's hot path: request target -> its page, for this generation only. A
        # dictionary lookup by the raw target instead of hashing a parsed query and moving an
        # LRU entry per request; few and small pages only, so it holds little beside the cache.
        self._hot_pages: dict[str, CachedBody] = {}
        self._hot_generation = -1  # none yet
        self._margins = margins
        self._footprints = footprints if footprints is not None else Footprints()
        self._bookings = Bookings(snapshot)
        # The reservations the last change put or ended (empty for any other change), for the
        # event streams, which send what changed rather than the whole book.
        self.last_reservations_change: tuple[list[Reservation], list[str]] = ([], [])
        # Where each model is loaded on this host: model name -> instance id -> the instance as
        # the listing shows it, and each model's `instances` JSON, made when a page needs it.
        self._residents: dict[str, dict[str, dict[str, object]]] = {}
        self._residents_json: dict[str, str] = {}
        # Instances the last change made (as the API shows them) and ended, for the streams.
        self.last_instances_change: tuple[list[dict[str, object]], list[str]] = ([], [])
        self.last_reservation_reasons: dict[str, str] = {}  # ended reservation id -> why
        self._entries: dict[int, _Entry] = {}
        # Ids changed since a whole-catalog read began (None when none is under way): that
        # read may predate them, so it must not undo them (a write of our own, just shown).
        self._changed_since_read: set[int] | None = None
        self._ids: list[int] = []  # ascending: the listing's order
        self._by_name: dict[str, _Entry] = {}
        self._enabled: list[tuple[int, int]] = []  # (vram, id) of enabled models, ascending
        # Enabled models whose effective size was learned, so may differ by GPU product: few
        # (those loaded here or in the fleet), assessed one by one instead of by bisection.
        self._learned: set[int] = set()
        self._drift_logged: set[str] = set()  # models whose drift (up) was logged
        self._shrink_logged: set[str] = set()  # models whose drift down was logged
        self._listeners: list[Callable[[], None]] = []
        self._capacity = Capacity(snapshot, margins)
        self._capacity_json = ""
        self.loaded = False
        # Counted from the start time in microseconds, so a generation a client saw before a
        # restart is never mistaken for the current one (event ids, Last-Event-ID).
        self.generation = time.time_ns() // 1000
        self._recompute_capacity(log_flips=False)

    # -- inputs --------------------------------------------------------------------------

    @property
    def snapshot(self) -> GpuSnapshot:
        return self._snapshot

    @property
    def margins(self) -> Margins:
        return self._margins

    @property
    def reservations(self) -> list[Reservation]:
        """The open reservations, oldest first (a sort: for listings, not per change)."""
        return self._bookings.ordered()

    @property
    def bookings(self) -> Bookings:
        """The open reservations as the capacity rule books them. Read only: change them
        through `book_reservations` and `set_reservations`."""
        return self._bookings

    def begin_catalog_read(self) -> None:
        """A whole-catalog read is starting: what changes from now on is newer than what it
        will return, and `replace_catalog` keeps it."""
        self._changed_since_read = set()

    def replace_catalog(self, models: Iterable[CatalogModel]) -> tuple[int, int]:
        """Take the whole catalog (start-up, reconnect, periodic reload); how many models it
        changed (or added) and removed. Models changed since `begin_catalog_read` are kept as
        they are: their own notifications bring anything newer."""
        newer, self._changed_since_read = self._changed_since_read or set(), None
        fresh = {model.id: model for model in models if model.id not in newer}
        was_loaded, self.loaded = self.loaded, True
        changed = [m for m in fresh.values() if self._model(m.id) != m]
        gone = [i for i in self._entries if i not in fresh and i not in newer]
        if changed or gone or not was_loaded:
            self._apply(gone, changed)
        return len(changed), len(gone)

    def apply_changes(self, requested_ids: Iterable[int], found: Iterable[CatalogModel]) -> None:
        """Refresh the models whose ids were asked for; an id not found was deleted."""
        requested_ids = list(requested_ids)
        if self._changed_since_read is not None:
            self._changed_since_read.update(requested_ids)
        found_by_id = {model.id: model for model in found}
        gone = [i for i in requested_ids if i not in found_by_id and i in self._entries]
        changed = [m for m in found_by_id.values() if self._model(m.id) != m]
        if changed or gone:  # our own write, echoed by NOTIFY, changes nothing the second time
            self._apply(gone, changed)

    def set_snapshot(self, snapshot: GpuSnapshot) -> None:
        self._snapshot = snapshot
        # A process's memory moves the pending memory of the reservations that name it.
        self.last_reservations_change = (self._bookings.set_snapshot(snapshot), [])
        self._recompute_capacity()

    def set_margins(self, margins: Margins) -> None:
        if margins != self._margins:
            self._margins = margins
            self._recompute_capacity()

    def set_reservations(self, reservations: Iterable[Reservation]) -> None:
        """Take the whole book (start-up)."""
        self._bookings.clear()
        for reservation in reservations:
            self._bookings.put(reservation)
        self.last_reservations_change = (list(self._bookings), [])
        self._recompute_capacity()

    @property
    def footprints(self) -> Footprints:
        """Learned sizes as the rule applies them. Change them through `set_footprint`."""
        return self._footprints

    def set_footprint(self, name: str, by_product: dict[str, Observed]) -> None:
        """What a model's loads took, per GPU product (from PostgreSQL, any host's loads)."""
        entry = self._by_name.get(name)
        before = entry is not None and self._capacity.is_active(entry.model)
        if not self._footprints.set_model(name, by_product):
            return
        if entry is not None:
            self._note_drift(entry.model)
            self._remove(entry.model.id)
            self._insert(entry)
            if before != self._capacity.is_active(entry.model):
                _log_flip(entry.model, self._capacity.assess(entry.model))
        self._changed()

    def _note_drift(self, model: CatalogModel) -> None:
        """Log once per model when what its loads take first exceeds its declared size by
        more than 10%, or falls more than 30% below it: either the catalog is wrong, or (below)
        the samples are, and operators should hear of it."""
        footprints = self._footprints
        for gpu_name in footprints.of_model(model.name):
            observed = footprints.observed(model.name, gpu_name)
            if observed is None:
                continue
            if observed > 1.1 * model.vram and model.name not in self._drift_logged:
                self._drift_logged.add(model.name)
                event = "a model's loads take more than it declares"
            elif (
                footprints.below_declared(model, gpu_name) and model.name not in self._shrink_logged
            ):
                self._shrink_logged.add(model.name)
                event = "a model's loads take much less than it declares"
            else:
                continue
            log.warning(
                event,
                model=model.name,
                gpu_name=gpu_name,
                declared_mib=model.vram,
                observed_mib=observed,
                effective_mib=footprints.effective(model, gpu_name),
                learn=model.learn,
            )

    def place_instances(
        self,
        placed: Iterable[tuple[str, str, dict[str, object]]] = (),
        gone: Iterable[tuple[str, str]] = (),
        holds: Iterable[tuple[str, str, int]] = (),
        *,
        made: list[dict[str, object]] | None = None,
        ended: list[str] | None = None,
    ) -> None:
        """Instances changed: `placed` (model, instance id, the instance as the listing shows
        it) and `gone` (model, instance id) say where models are loaded and how they stand;
        `holds` what instances still hold pending, (key, uuid, MiB). Work in proportion to the
        change, not to the instances."""
        touched = False
        for name, instance_id, shown in placed:
            self._residents.setdefault(name, {})[instance_id] = shown
            self._residents_json.pop(name, None)
            touched = True
        for name, instance_id in gone:
            of_model = self._residents.get(name, {})
            if of_model.pop(instance_id, None) is not None:
                touched = True
                self._residents_json.pop(name, None)
                if not of_model:
                    del self._residents[name]
        self.last_instances_change = (made or [], ended or [])
        if self._take_holds(holds):
            self._recompute_capacity()
        elif touched or made or ended:
            self._changed()

    def hold(self, holds: Iterable[tuple[str, str, int]]) -> None:
        """Pending memory that instances hold changed: (key, uuid, MiB); 0 lets go."""
        if self._take_holds(holds):
            self._recompute_capacity()

    def _take_holds(self, holds: Iterable[tuple[str, str, int]]) -> bool:
        """Apply every hold; whether any changed the books."""
        changed = False
        for key, uuid, mib in holds:
            changed = self._bookings.hold(key, uuid, mib) or changed
        return changed

    def book_reservations(
        self,
        put: Iterable[Reservation],
        ended: Iterable[str] = (),
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        """Reservations made, renewed or ended (with why, where the holder did not end it
        itself): work in proportion to them, not to the book."""
        changed, gone = list(put), list(ended)
        for reservation in changed:
            self._bookings.put(reservation)
        for reservation_id in gone:
            self._bookings.remove(reservation_id)
        self.last_reservations_change = (changed, gone)
        self.last_reservation_reasons = dict(reasons or {})
        self._recompute_capacity()

    def reload_s_on_placement(
        self, model: CatalogModel, assessment: Assessment
    ) -> tuple[float, bool]:
        """How long `model` takes to load where the listing places it, and whether that is
        an estimate."""
        sizes = self._capacity.sizes(model, assessment)
        return sizes.reload_s, sizes.reload_estimated

    def reload_s(self, model: CatalogModel, device: GpuDevice) -> tuple[float, bool]:
        """How long `model` takes to load on `device`, and whether that is an estimate."""
        return self._capacity.reload_s(model, device)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the view."""
        self._listeners.append(listener)

    # -- outputs -------------------------------------------------------------------------

    @property
    def capacity_json(self) -> str:
        """The listing's `capacity` object: GPU state, as_of, backend."""
        return self._capacity_json

    @property
    def capacity(self) -> Capacity:
        """The rule applied to the current inputs: per-device budgets, best fit, assessments."""
        return self._capacity

    @property
    def model_count(self) -> int:
        return len(self._ids)

    @property
    def active_count(self) -> int:
        declared = bisect.bisect_right(self._enabled, (self.capacity.threshold, math.inf))
        entries, is_active = self._entries, self.capacity.is_active
        return declared + sum(is_active(entries[i].model) for i in self._learned)

    def models(self) -> Iterator[CatalogModel]:
        """Every model, in id order."""
        entries = self._entries
        return (entries[model_id].model for model_id in self._ids)

    def model_objects(self) -> Iterator[tuple[int, str, str]]:
        """(id, name, JSON object) of every model as the listing shows it now, in id order."""
        entries = self._entries
        for model_id in self._ids:
            entry = entries[model_id]
            yield model_id, entry.model.name, self._render(entry)

    def named_model_objects(self, names: Iterable[str]) -> list[tuple[int, str, str]]:
        """(id, name, JSON object) of the models with these names, in id order: what a
        stream filtered by name needs, without rendering the rest of the catalog."""
        found = (self._by_name.get(name) for name in names)
        entries = sorted((e for e in found if e is not None), key=lambda e: e.model.id)
        return [(e.model.id, e.model.name, self._render(e)) for e in entries]

    def model(self, model_id: int) -> CatalogModel | None:
        return self._model(model_id)

    def model_by_name(self, name: str) -> CatalogModel | None:
        entry = self._by_name.get(name)
        return None if entry is None else entry.model

    def assessment(self, model_id: int) -> Assessment | None:
        entry = self._entries.get(model_id)
        return None if entry is None else self.capacity.assess(entry.model)

    def listing(self, target: str, parse: Callable[[], ListQuery]) -> CachedBody:
        """The page a `GET /models` request target asks for (`parse` reads its query)."""
        found = self.hot_listing(target)
        if found is not None:
            return found
        cached = self.page(self.queries.get(target, parse))
        if (
            len(cached.body) <= _HOT_PAGE_MAX_BYTES
            and len(target) <= ParsedQueries.MAX_TARGET_BYTES
            and len(self._hot_pages) < _HOT_PAGES
        ):
            self._hot_pages[target] = cached
        return cached

    def hot_listing(self, target: str) -> CachedBody | None:
        """The page for this exact `GET /models` request target, where `listing` rendered it at
        the current generation; None otherwise (nothing is parsed or rendered here)."""
        if self._hot_generation != self.generation:
            self._hot_pages, self._hot_generation = {}, self.generation
        return self._hot_pages.get(target)

    def page(self, query: ListQuery) -> CachedBody:
        key = ("models", self.generation, query)
        cached = self.pages.get(key)
        if cached is None:
            cached = self.pages.put(key, self._render_page(query))
        return cached

    def single(self, model_id: int) -> CachedBody | None:
        key = ("model", self.generation, model_id)
        cached = self.pages.get(key)
        if cached is None:
            entry = self._entries.get(model_id)
            if entry is None:
                return None
            body = self._render(entry).encode()
            cached = self.pages.put(key, CachedBody(body, body_etag(body)))
        return cached

    # -- internals -----------------------------------------------------------------------

    def _model(self, model_id: int) -> CatalogModel | None:
        entry = self._entries.get(model_id)
        return None if entry is None else entry.model

    def _resident_json(self, name: str) -> str:
        """`"instances":[...],"instances_total":N`: where the model is loaded (its newest
        RESIDENTS_SHOWN instances, oldest first, as /instances lists them) and how many."""
        cached = self._residents_json.get(name)
        if cached is None:
            residents = self._residents.get(name, {})
            shown = list(
                itertools.islice(residents.values(), max(0, len(residents) - RESIDENTS_SHOWN), None)
            )
            cached = self._residents_json[name] = (
                f'"instances":{_json(shown)},"instances_total":{len(residents)}'
            )
        return cached

    def _render(self, entry: _Entry) -> str:
        model, capacity = entry.model, self._capacity
        assessment = capacity.assess(model)
        residents = self._resident_json(model.name)
        return entry.render(assessment, residents, capacity.sizes(model, assessment))

    def _apply(self, gone: list[int], changed: list[CatalogModel]) -> None:
        capacity = self._capacity
        for model in changed:
            old = self._model(model.id)
            if old is not None and capacity.is_active(old) != capacity.is_active(model):
                _log_flip(model, capacity.assess(model))
        if len(gone) + len(changed) > _BULK_CHANGE:
            self._apply_in_bulk(gone, changed)
        else:
            for model_id in gone:
                self._remove(model_id)
            for model in changed:
                if model.id in self._entries:
                    self._remove(model.id)
                self._insert(_Entry(model))
        self._changed()

    def _apply_in_bulk(self, gone: list[int], changed: list[CatalogModel]) -> None:
        """Many changes at once (a whole catalog): sort once instead of inserting one by one."""
        entries = self._entries
        for model_id in gone:
            del entries[model_id]
        for model in changed:
            entries[model.id] = _Entry(model)
        self._ids = sorted(entries)
        self._by_name = {entries[i].model.name: entries[i] for i in self._ids}
        enabled = [(i, e.model) for i, e in entries.items() if e.model.enabled]
        learned = self._footprints.learned
        self._learned = {i for i, model in enabled if learned(model)}
        self._enabled = sorted((m.vram, i) for i, m in enabled if i not in self._learned)

    def _insert(self, entry: _Entry) -> None:
        model = entry.model
        self._entries[model.id] = entry
        self._by_name[model.name] = entry
        if not self._ids or model.id > self._ids[-1]:
            self._ids.append(model.id)  # new models have the highest ids
        else:
            bisect.insort(self._ids, model.id)
        if model.enabled and self._footprints.learned(model):
            self._learned.add(model.id)
        elif model.enabled:
            bisect.insort(self._enabled, (model.vram, model.id))

    def _remove(self, model_id: int) -> None:
        entry = self._entries.pop(model_id)
        model = entry.model
        # Two models swapping names in one batch: by the time the second one is removed, the
        # first may already hold its old name, and that entry must stay.
        if self._by_name.get(model.name) is entry:
            del self._by_name[model.name]
        del self._ids[bisect.bisect_left(self._ids, model_id)]
        if model.id in self._learned:
            self._learned.discard(model.id)
        elif model.enabled:
            del self._enabled[bisect.bisect_left(self._enabled, (model.vram, model.id))]

    def _recompute_capacity(self, *, log_flips: bool = True) -> None:
        snapshot = self._snapshot
        previous = self._capacity
        self._capacity = Capacity(snapshot, self._margins, self._bookings, self._footprints)
        if log_flips:
            self._log_flips_between(previous.threshold, self._capacity.threshold)
            for model_id in self._learned:
                model = self._entries[model_id].model
                if previous.is_active(model) != self._capacity.is_active(model):
                    _log_flip(model, self._capacity.assess(model))
        self._capacity_json = (
            f'{{"state":"{snapshot.state.value}","as_of":{_iso(snapshot.as_of)},'
            f'"backend":{_json(snapshot.backend)}}}'
        )
        self._changed()

    def _log_flips_between(self, before: float, after: float) -> None:
        """Log each enabled model whose vram lies between the old and the new threshold."""
        if before == after:
            return
        low, high = min(before, after), max(before, after)
        start = bisect.bisect_right(self._enabled, (low, math.inf))
        stop = bisect.bisect_right(self._enabled, (high, math.inf))
        for _vram, model_id in self._enabled[start:stop]:
            model = self._entries[model_id].model
            _log_flip(model, self.capacity.assess(model))

    def _changed(self) -> None:
        self.generation += 1  # pages of the last generation are never asked for again
        for listener in self._listeners:
            listener()
        self.last_reservations_change = ([], [])
        self.last_reservation_reasons = {}
        self.last_instances_change = ([], [])

    def _matching_ids(self, query: ListQuery) -> list[int]:
        if query.name is not None:
            entry = self._by_name.get(query.name)
            candidates = [] if entry is None else [entry.model.id]
        else:
            candidates = self._ids
        if query.active is None:
            return candidates
        is_active, entries = self.capacity.is_active, self._entries
        return [i for i in candidates if is_active(entries[i].model) is query.active]

    def _render_page(self, query: ListQuery) -> CachedBody:
        if query.name is None and query.active is None:
            total = len(self._ids)  # the common case: no scan, only the page is touched
            page_ids = self._ids[query.skip : query.skip + query.limit]
        else:
            matching = self._matching_ids(query)
            total = len(matching)
            page_ids = matching[query.skip : query.skip + query.limit]
        entries = self._entries
        body = (
            '{"data":['
            + ",".join(self._render(entries[i]) for i in page_ids)
            + f'],"pagination":{pagination_json(total, query.skip, query.limit)},'
            f'"capacity":{self._capacity_json}}}'
        ).encode()
        return CachedBody(body, body_etag(body))


def _log_flip(model: CatalogModel, assessment: Assessment) -> None:
    log.info(
        FLAP_EVENT,
        model=model.name,
        model_id=model.id,
        active=assessment.active,
        reason=assessment.reason.value if assessment.reason else None,
        vram_mib=model.vram,
        headroom_mib=assessment.headroom_mib,
        gpu=assessment.placement.gpu if assessment.placement else None,
    )
