"""The view's indexes against the pure rule, without a database: a hypothesis state machine
inserts, deletes, renames (two models swapping names in one batch), changes many models at once
(past the bulk-rebuild threshold), reloads the whole catalog from a read older than the last
writes, switches models, and moves GPU snapshots, margins and
reservations. After every step each page (plain, active=true/false, by name, by id) is exactly
what `assess_all` says, model by model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gpu import MIB, GpuDevice, GpuProcess, GpuSnapshot, GpuState
from registry.bookings import Bookings
from registry.capacity import Capacity, Margins
from registry.footprint import Footprints, Observed, VramSource
from registry.model import CatalogModel
from registry.reservation import Reservation
from registry.schemas import ListQuery
from registry.view import CatalogView
from tests.reference import model_object, pending_by_reservation

T0 = datetime(2026, 11, 28, tzinfo=UTC)
NAMES = [f"m{i}" for i in range(12)]
VRAMS = [100, 2500, 5000, 9000, 10000, 20000, 40000]
FREE_MIB = [0, 4000, 9000, 10000, 12000, 30000, 81920]
BULK = 300  # above the view's bulk-rebuild threshold
MAX_MODELS = 2 * BULK + len(NAMES)


PIDS = [101, 202]


def _device(index: int, free_mib: int, healthy: bool = True, loaded: int = 0) -> GpuDevice:
    """A device; `loaded` MiB held by each of PIDS (what a named process has loaded so far)."""
    return GpuDevice(
        uuid=f"GPU-{index}",
        index=index,
        name="H200",
        total_bytes=81920 * MIB,
        free_bytes=free_mib * MIB,
        healthy=healthy,
        processes=tuple(GpuProcess(pid, None, loaded * MIB) for pid in PIDS),
    )


class ViewModel(RuleBasedStateMachine):
    """The view next to a plain dict of models: the reference needs nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[int, CatalogModel] = {}
        self.next_id = 1
        self.snapshot = GpuSnapshot(backend="simulated", state=GpuState.UNAVAILABLE)
        self.margins = Margins()
        self.reservations: list[Reservation] = []
        self.learned: dict[str, Observed] = {}  # model name -> what its loads took on H200
        self.instances: dict[str, tuple[str, str, int, int]] = {}  # id -> model, gpu, index, MiB
        self.view = CatalogView(self.snapshot, self.margins)
        self.tick = 0
        self.reading: list[CatalogModel] | None = None  # what a reload under way has read

    @initialize()
    def load(self) -> None:
        self.view.replace_catalog([])

    # -- the catalog ------------------------------------------------------------------------

    def _new(self, name: str, vram: int, enabled: bool) -> CatalogModel:
        model = CatalogModel(self.next_id, name, vram, enabled, T0, None)
        self.next_id += 1
        return model

    def _changed(self, model: CatalogModel, **fields: Any) -> CatalogModel:
        self.tick += 1
        return replace(model, updated_at=T0 + timedelta(seconds=self.tick), **fields)

    def _apply(self, gone: list[int], written: list[CatalogModel]) -> None:
        for model_id in gone:
            del self.models[model_id]
        for model in written:
            self.models[model.id] = model
        self.view.apply_changes([*gone, *(m.id for m in written)], written)

    def _free_names(self) -> list[str]:
        taken = {m.name for m in self.models.values()}
        return [name for name in NAMES if name not in taken]

    @precondition(lambda self: len(self.models) < MAX_MODELS)
    @rule(data=st.data(), vram=st.sampled_from(VRAMS), enabled=st.booleans())
    def insert(self, data: st.DataObject, vram: int, enabled: bool) -> None:
        free = self._free_names()
        if free:
            self._apply([], [self._new(data.draw(st.sampled_from(free)), vram, enabled)])

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self._apply([data.draw(st.sampled_from(sorted(self.models)))], [])

    @precondition(lambda self: len(self.models) >= 2)
    @rule(data=st.data())
    def swap_names(self, data: st.DataObject) -> None:
        first, second = data.draw(
            st.lists(st.sampled_from(sorted(self.models)), min_size=2, max_size=2, unique=True)
        )
        a, b = self.models[first], self.models[second]
        self._apply([], [self._changed(a, name=b.name), self._changed(b, name=a.name)])

    @precondition(lambda self: self.models)
    @rule(data=st.data(), vram=st.sampled_from(VRAMS), enabled=st.booleans())
    def change(self, data: st.DataObject, vram: int, enabled: bool) -> None:
        model = self.models[data.draw(st.sampled_from(sorted(self.models)))]
        free = self._free_names()
        name = data.draw(st.sampled_from([model.name, *free]))
        self._apply([], [self._changed(model, name=name, vram=vram, enabled=enabled)])

    @precondition(lambda self: len(self.models) + BULK <= MAX_MODELS)
    @rule(vram=st.sampled_from(VRAMS))
    def bulk_insert(self, vram: int) -> None:
        start = self.next_id
        fresh = [self._new(f"bulk-{start + i}", vram + i, i % 3 != 0) for i in range(BULK)]
        self._apply([], fresh)

    @precondition(lambda self: len(self.models) > BULK)
    @rule(vram=st.sampled_from(VRAMS), delete=st.booleans())
    def bulk_change(self, vram: int, delete: bool) -> None:
        """More models than the threshold change in one batch: switched, resized, or deleted."""
        chosen = sorted(self.models)[: BULK + 1]
        if delete:
            self._apply(chosen, [])
        else:
            written = [
                self._changed(self.models[i], vram=vram, enabled=not self.models[i].enabled)
                for i in chosen
            ]
            self._apply([], written)

    @precondition(lambda self: self.reading is None)  # one reader: the catalog listener
    @rule()
    def reload_whole_catalog(self) -> None:
        self.view.begin_catalog_read()
        self.view.replace_catalog(list(self.models.values()))

    @precondition(lambda self: self.reading is None)
    @rule()
    def start_reading_whole_catalog(self) -> None:
        """A reload's read begins; writes shown meanwhile are newer than what it returns."""
        self.view.begin_catalog_read()
        self.reading = list(self.models.values())

    @precondition(lambda self: self.reading is not None)
    @rule()
    def finish_reading_whole_catalog(self) -> None:
        assert self.reading is not None
        self.view.replace_catalog(self.reading)
        self.reading = None

    # -- the GPU side -----------------------------------------------------------------------

    @rule(
        frees=st.lists(st.sampled_from(FREE_MIB), min_size=0, max_size=3),
        state=st.sampled_from([GpuState.OK, GpuState.OK, GpuState.STALE, GpuState.UNAVAILABLE]),
        unhealthy=st.booleans(),
        loaded=st.sampled_from([0, 1000, 6000, 30000]),
    )
    def new_snapshot(self, frees: list[int], state: GpuState, unhealthy: bool, loaded: int) -> None:
        devices = tuple(
            _device(i, free, healthy=not (unhealthy and i == 0), loaded=loaded)
            for i, free in enumerate(frees)
        )
        self.snapshot = GpuSnapshot(backend="simulated", state=state, devices=devices, as_of=T0)
        self.view.set_snapshot(self.snapshot)

    @rule(mib=st.sampled_from([0, 512, 4096]), percent=st.sampled_from([0.0, 1.0, 5.0]))
    def new_margins(self, mib: int, percent: float) -> None:
        self.margins = Margins(mib=mib, percent=percent)
        self.view.set_margins(self.margins)

    @precondition(lambda self: self.snapshot.devices)
    @rule(
        data=st.data(),
        vram=st.sampled_from(VRAMS),
        pid=st.sampled_from([None, *PIDS]),
        baseline=st.sampled_from([0, 500]),
    )
    def reserve(self, data: st.DataObject, vram: int, pid: int | None, baseline: int) -> None:
        device = data.draw(st.sampled_from(self.snapshot.devices))
        self.tick += 1
        at = T0 + timedelta(seconds=self.tick)
        reservation = Reservation(
            id=f"r{self.tick}",
            vram_mib=vram,
            gpu_uuid=device.uuid,
            gpu_index=device.index,
            created_at=at,
            expires_at=at + timedelta(minutes=2),
            pid=pid,
            pid_baseline_mib=0 if pid is None else baseline,
        )
        self.reservations.append(reservation)
        self.view.book_reservations([reservation])

    @precondition(lambda self: self.reservations)
    @rule(data=st.data(), pid=st.sampled_from(PIDS))
    def renew_naming_a_pid(self, data: st.DataObject, pid: int) -> None:
        old = data.draw(st.sampled_from(self.reservations))
        renewed = replace(old, expires_at=old.expires_at + timedelta(minutes=1)).with_pid(pid, 0)
        self.reservations[self.reservations.index(old)] = renewed
        self.view.book_reservations([renewed])

    @precondition(lambda self: self.reservations)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        gone = data.draw(st.sampled_from(self.reservations))
        self.reservations.remove(gone)
        self.view.book_reservations([], [gone.id])

    # -- what must hold after every step ------------------------------------------------------

    def _expected(self) -> list[dict[str, Any]]:
        """Every model as a fresh application of the rule says (no index, no increments)."""
        models = sorted(self.models.values(), key=lambda m: m.id)
        footprints = Footprints()
        for name, observed in self.learned.items():
            footprints.set_model(name, {"H200": observed})
        bookings = Bookings.of(self.reservations, self.snapshot)
        for instance_id, (_name, uuid, _index, pending) in self.instances.items():
            bookings.hold(f"instance:{instance_id}", uuid, pending)
        capacity = Capacity(self.snapshot, self.margins, bookings, footprints)
        objects = []
        for model in models:
            verdict = capacity.assess(model)
            residents = [
                {"id": i, "gpu": uuid, "index": index}
                for i, (name, uuid, index, _pending) in self.instances.items()
                if name == model.name
            ]
            objects.append(model_object(model, verdict, capacity.sizes(model, verdict), residents))
        return objects

    # -- instances and learned sizes ---------------------------------------------------------

    @precondition(lambda self: self.models)
    @rule(
        data=st.data(),
        p95=st.sampled_from(VRAMS),
        recent=st.sampled_from([1, 3, 20]),
    )
    def learn_size(self, data: st.DataObject, p95: int, recent: int) -> None:
        name = data.draw(st.sampled_from(sorted(m.name for m in self.models.values())))
        self.learned[name] = Observed(p95, recent)
        self.view.set_footprint(name, {"H200": Observed(p95, recent)})

    @precondition(lambda self: self.learned)
    @rule(data=st.data())
    def forget_size(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.learned)))
        del self.learned[name]
        self.view.set_footprint(name, {})

    @precondition(lambda self: self.models and self.snapshot.devices)
    @rule(data=st.data(), pending=st.sampled_from([0, 500, 6000]))
    def bind_instance(self, data: st.DataObject, pending: int) -> None:
        name = data.draw(st.sampled_from(sorted(m.name for m in self.models.values())))
        device = data.draw(st.sampled_from(self.snapshot.devices))
        self.tick += 1
        instance_id = f"i{self.tick}"
        self.instances[instance_id] = (name, device.uuid, device.index, pending)
        self._show_instances(name, [(f"instance:{instance_id}", device.uuid, pending)])

    @precondition(lambda self: self.instances)
    @rule(data=st.data())
    def end_instance(self, data: st.DataObject) -> None:
        instance_id = data.draw(st.sampled_from(sorted(self.instances)))
        name, uuid, _index, _pending = self.instances.pop(instance_id)
        self._show_instances(name, [(f"instance:{instance_id}", uuid, 0)])

    def _show_instances(self, name: str, holds: list[tuple[str, str, int]]) -> None:
        instance_id = holds[0][0].removeprefix("instance:")
        if instance_id in self.instances:
            _name, uuid, index, _pending = self.instances[instance_id]
            shown = {"id": instance_id, "gpu": uuid, "index": index}
            self.view.place_instances([(name, instance_id, shown)], [], holds)
        else:
            self.view.place_instances([], [(name, instance_id)], holds)

    def _page(self, **query: Any) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.view.page(ListQuery(**query)).body)
        return parsed

    @invariant()
    def every_page_is_what_the_rule_says(self) -> None:
        expected = self._expected()
        for active in (None, True, False):
            matching = [m for m in expected if active is None or m["active"] is active]
            everything = self._page(limit=1000, active=active)["data"]
            if len(matching) > 1000:
                everything += self._page(skip=1000, limit=1000, active=active)["data"]
            assert everything == matching
            for skip, limit in ((0, 7), (5, 7), (len(matching), 3), (len(matching) + 10, 3)):
                page = self._page(skip=skip, limit=limit, active=active)
                assert page["data"] == matching[skip : skip + limit]
                assert page["pagination"] == {
                    "total_items": len(matching),
                    "total_pages": math.ceil(len(matching) / limit),
                    "current_page": skip // limit + 1,
                    "per_page": limit,
                }
        by_name = {m["name"]: m for m in expected}
        for name in NAMES:
            found = self._page(name=name)["data"]
            assert found == ([by_name[name]] if name in by_name else [])
        assert self.view.model_count == len(expected)
        assert self.view.active_count == sum(m["active"] for m in expected)

    @invariant()
    def pending_memory_is_what_a_fresh_count_says(self) -> None:
        expected = pending_by_reservation(self.reservations, self.snapshot)
        capacity = self.view.capacity
        assert {r.id: capacity.pending_of(r) for r in self.reservations} == expected
        by_device: dict[str, int] = {}
        for reservation in self.reservations:
            device = reservation.gpu_uuid
            by_device[device] = by_device.get(device, 0) + expected[reservation.id]
        for _name, uuid, _index, pending in self.instances.values():
            by_device[uuid] = by_device.get(uuid, 0) + pending
        for budget in capacity.budgets:
            assert budget.pending_mib == by_device.get(budget.device.uuid, 0)
        assert [r.id for r in self.view.reservations] == [
            r.id for r in sorted(self.reservations, key=lambda r: (r.created_at, r.id))
        ]

    @invariant()
    def every_model_by_id_is_what_the_rule_says(self) -> None:
        for model in self._expected()[:50]:
            single = self.view.single(model["id"])
            assert single is not None and json.loads(single.body) == model
        assert self.view.single(self.next_id) is None


ViewModel.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_the_view_agrees_with_the_rule = ViewModel.TestCase


def test_a_learned_size_counts_in_the_active_count_and_pages() -> None:
    snapshot = GpuSnapshot(
        backend="simulated", state=GpuState.OK, devices=(_device(0, 10000),), as_of=T0
    )
    view = CatalogView(snapshot, Margins())
    small = CatalogModel(1, "small", 2500, True, T0, None)
    big = CatalogModel(2, "big", 12000, True, T0, None)
    view.replace_catalog([small, big])
    assert view.active_count == 1
    view.set_footprint("small", {"H200": Observed(12000, 3)})  # its loads take 12,000
    view.set_footprint("big", {"H200": Observed(5000, 3)})  # max: declared stays a floor
    assert view.active_count == 0
    assert json.loads(view.page(ListQuery(active=True)).body)["data"] == []
    observed = CatalogView(snapshot, Margins(), Footprints(VramSource.OBSERVED))
    observed.replace_catalog([small, big])
    observed.set_footprint("big", {"H200": Observed(5000, 3)})
    assert observed.active_count == 2
    [entry] = json.loads(observed.page(ListQuery(name="big")).body)["data"]
    # Never below half of what it declares (MODEL_REGISTRY_FOOTPRINT_MAX_SHRINK, 0.5).
    assert (entry["vram_observed"], entry["vram_effective"], entry["active"]) == (5000, 6000, True)
    trusting = CatalogView(snapshot, Margins(), Footprints(VramSource.OBSERVED, max_shrink=0.75))
    trusting.replace_catalog([small, big])
    trusting.set_footprint("big", {"H200": Observed(5000, 3)})
    [entry] = json.loads(trusting.page(ListQuery(name="big")).body)["data"]
    assert (entry["vram_observed"], entry["vram_effective"]) == (5000, 5000)
