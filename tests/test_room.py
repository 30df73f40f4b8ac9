"""The make-room plan, a pure function: never an ineligible victim, always enough, minimal, and
found whenever some set of eligible victims would do (checked against brute force)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.room import DeviceRoom, Loaded, Rules, eligible, plan, plan_device

RULES = Rules(priority=50, idle_after_s=30, min_residency_s=60)


def _loaded(pid: int, n: int, **overrides: object) -> Loaded:
    values: dict[str, object] = {
        "instance_id": f"i-{pid}-{n}",
        "pid": pid,
        "priority": 50,
        "pinned": False,
        "sessions": 0,
        "idle_s": 600.0,
        "resident_s": 3600.0,
        "reload_s": 10.0,
        "pending_mib": 0,
    }
    values.update(overrides)
    return Loaded(**values)  # type: ignore[arg-type]


@st.composite
def devices(draw: st.DrawFn, uuid: str = "GPU-0", index: int = 0) -> DeviceRoom:
    pids = draw(st.lists(st.integers(1000, 1006), min_size=0, max_size=6, unique=True))
    loaded = []
    for pid in pids:
        for n in range(draw(st.integers(1, 2))):
            loaded.append(
                _loaded(
                    pid,
                    n,
                    priority=draw(st.sampled_from([0, 50, 80])),
                    pinned=draw(st.booleans()),
                    sessions=draw(st.sampled_from([0, 0, 0, 1])),
                    idle_s=draw(st.sampled_from([0.0, 10.0, 45.0, 600.0])),
                    resident_s=draw(st.sampled_from([5.0, 90.0, 3600.0])),
                    reload_s=draw(st.sampled_from([0.0, 1.0, 10.0, 60.0])),
                    pending_mib=draw(st.sampled_from([0, 0, 500])),
                    evicting_for=draw(st.sampled_from([None, None, "other-claim"])),
                )
            )
    return DeviceRoom(
        uuid=uuid,
        index=index,
        usable_mib=draw(st.integers(-4000, 8000)),
        capacity_mib=draw(st.integers(8000, 80000)),
        need_mib=draw(st.integers(1, 40000)),
        loaded=tuple(loaded),
        process_mib={pid: draw(st.integers(0, 12000)) for pid in pids},
    )


def _eligible_processes(device: DeviceRoom) -> dict[int, int]:
    """Brute force's view: pid -> what it frees, for processes whose every instance may go."""
    by_pid: dict[int, list[Loaded]] = {}
    for loaded in device.loaded:
        by_pid.setdefault(loaded.pid, []).append(loaded)
    return {
        pid: device.process_mib.get(pid, 0) + sum(i.pending_mib for i in instances)
        for pid, instances in by_pid.items()
        if all(eligible(i, RULES) for i in instances)
    }


@settings(max_examples=400, deadline=None)
@given(devices())
def test_a_plan_is_eligible_enough_and_minimal_and_exists_whenever_brute_force_finds_one(
    device: DeviceRoom,
) -> None:
    found = plan_device(device, RULES)
    deficit = device.need_mib - device.usable_mib
    candidates = _eligible_processes(device)
    if device.need_mib > device.capacity_mib:
        assert found is None
        return
    possible = deficit <= 0 or any(
        sum(candidates[p] for p in subset) >= deficit
        for size in range(1, len(candidates) + 1)
        for subset in itertools.combinations(candidates, size)
    )
    assert (found is not None) == possible
    if found is None:
        return
    by_id = {i.instance_id: i for i in device.loaded}
    for victim in found.victims:
        assert victim.pid in candidates  # every instance of the process is eligible ...
        held = {i.instance_id for i in device.loaded if i.pid == victim.pid}
        assert set(victim.instance_ids) == held  # ... and the whole process goes
        assert all(eligible(by_id[i], RULES) for i in victim.instance_ids)
    assert device.usable_mib + found.frees_mib >= device.need_mib  # enough
    for victim in found.victims:  # minimal: none of them could stay
        assert device.usable_mib + found.frees_mib - victim.frees_mib < device.need_mib
    assert len({v.pid for v in found.victims}) == len(found.victims)


@settings(max_examples=200, deadline=None)
@given(devices("GPU-0", 0), devices("GPU-1", 1))
def test_across_devices_the_cheapest_plan_wins(first: DeviceRoom, second: DeviceRoom) -> None:
    each = [p for d in (first, second) if (p := plan_device(d, RULES)) is not None]
    chosen = plan([first, second], RULES)
    assert (chosen is None) == (not each)
    if chosen is not None:
        assert chosen.reload_s == min(p.reload_s for p in each)


def test_what_may_not_go_never_does() -> None:
    def room(*loaded: Loaded) -> DeviceRoom:
        return DeviceRoom(
            "GPU-0",
            0,
            usable_mib=0,
            capacity_mib=80000,
            need_mib=1000,
            loaded=loaded,
            process_mib={i.pid: 5000 for i in loaded},
        )

    for reason, refused in (
        ("pinned", _loaded(1, 0, pinned=True)),
        ("busy", _loaded(1, 0, sessions=2)),
        ("recently used", _loaded(1, 0, idle_s=10.0)),
        ("just loaded", _loaded(1, 0, resident_s=20.0)),
        ("more important", _loaded(1, 0, priority=80)),
        ("promised", _loaded(1, 0, evicting_for="another-claim")),
    ):
        assert plan_device(room(refused), RULES) is None, reason
    # A process goes whole or not at all: one busy instance keeps its idle sibling.
    assert plan_device(room(_loaded(1, 0), _loaded(1, 1, sessions=1)), RULES) is None
    # Replanning a claim may name its own victims again.
    own = _loaded(1, 0, evicting_for="this-claim")
    assert plan_device(room(own), Rules(claim="this-claim")) is not None


def test_the_longest_idle_and_cheapest_to_reload_go_first_and_only_as_many_as_needed() -> None:
    device = DeviceRoom(
        "GPU-0",
        0,
        usable_mib=1000,
        capacity_mib=80000,
        need_mib=9000,
        loaded=(
            _loaded(1, 0, idle_s=3600.0, reload_s=5.0),  # score 360
            _loaded(2, 0, idle_s=3600.0, reload_s=60.0),  # 30
            _loaded(3, 0, idle_s=120.0, reload_s=5.0),  # 12
            _loaded(4, 0, idle_s=3600.0, reload_s=5.0, priority=0),  # 720
        ),
        process_mib={1: 4000, 2: 9000, 3: 4000, 4: 4000},
    )
    found = plan_device(device, RULES)
    assert found is not None
    # 4 then 1 (8,000) covers the 8,000 missing: 2 and 3 are never named.
    assert sorted(v.pid for v in found.victims) == [1, 4]
    assert (found.frees_mib, found.reload_s, found.leftover_mib) == (8000, 10.0, 0)


def test_a_device_that_could_never_hold_the_model_gives_no_plan() -> None:
    small = DeviceRoom(
        "GPU-0",
        0,
        usable_mib=0,
        capacity_mib=22000,
        need_mib=30000,
        loaded=(_loaded(1, 0),),
        process_mib={1: 40000},
    )
    big = replace(small, uuid="GPU-1", index=1, capacity_mib=80000)
    assert plan_device(small, RULES) is None  # whatever could go there
    found = plan([small, big], RULES)
    assert found is not None and found.gpu == "GPU-1" and found.need_mib == 30000
