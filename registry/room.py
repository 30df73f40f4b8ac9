"""Making room: which idle instances to unload so that a model fits, as a pure function.

A device's deficit is what the asker books there less what is usable there now. The victims
are processes, not instances: a process goes only if every instance it holds is eligible (not
pinned, no sessions, idle for at least `idle_after_s`, loaded for at least `min_residency_s`,
of a priority at most the asker's, not promised to another claim), and it frees its whole
measured memory plus what its instances still hold pending. Victims are ranked by
`idle_s / (reload_s x (1 + priority / 50))` (the longest idle, cheapest to reload, least
important first), taken in that order until the deficit is covered; then each one whose removal
still covers it (lowest score first) is dropped again, so the plan is minimal. Among devices,
the plan with the least total `reload_s` wins, then the fewest victims, then the best fit.
A device that could never hold the asker (its need above the device's capacity) has no plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_MIN_RELOAD_S = 0.001  # a load is never free: no division by zero, no infinite score


@dataclass(frozen=True, slots=True)
class Loaded:
    """One instance on a device, as the plan sees it."""

    instance_id: str
    pid: int
    priority: int
    pinned: bool
    sessions: int
    idle_s: float
    resident_s: float
    reload_s: float
    pending_mib: int = 0
    evicting_for: str | None = None  # the claim it is promised to


@dataclass(frozen=True, slots=True)
class DeviceRoom:
    """One healthy device: what is usable now, the most it could ever hold (its total less the
    margin), what the asker would book on it, and what is loaded there."""

    uuid: str
    index: int
    usable_mib: int  # may be negative while claims wait for their victims
    capacity_mib: int
    need_mib: int
    loaded: tuple[Loaded, ...] = ()
    process_mib: Mapping[int, int] = field(default_factory=dict)  # pid -> measured memory


@dataclass(frozen=True, slots=True)
class Rules:
    priority: int = 50  # the asker's
    idle_after_s: float = 30.0
    min_residency_s: float = 60.0
    claim: str | None = None  # replanning a claim: its own victims may be named again


@dataclass(frozen=True, slots=True)
class Victim:
    """A process to unload: the instances it holds and what its going frees."""

    pid: int
    instance_ids: tuple[str, ...]
    frees_mib: int
    reload_s: float
    score: float


@dataclass(frozen=True, slots=True)
class Plan:
    gpu: str
    index: int
    victims: tuple[Victim, ...]
    need_mib: int  # what the asker books on the device
    deficit_mib: int  # what was missing on the device (at most 0: nothing was)
    leftover_mib: int  # usable there once the victims are gone and the asker booked

    @property
    def frees_mib(self) -> int:
        return sum(v.frees_mib for v in self.victims)

    @property
    def reload_s(self) -> float:
        return sum(v.reload_s for v in self.victims)

    @property
    def instance_ids(self) -> tuple[str, ...]:
        return tuple(i for v in self.victims for i in v.instance_ids)


def held_back(
    pinned: bool, sessions: int, priority: int, evicting_for: str | None, rules: Rules
) -> bool:
    """What keeps an instance (and its process) from going whatever the clock says: a pin,
    work in flight, a priority above the asker's, a promise to another claim."""
    return (
        pinned
        or sessions > 0
        or priority > rules.priority
        or evicting_for not in (None, rules.claim)
    )


def eligible(loaded: Loaded, rules: Rules) -> bool:
    return (
        not held_back(loaded.pinned, loaded.sessions, loaded.priority, loaded.evicting_for, rules)
        and loaded.idle_s >= rules.idle_after_s
        and loaded.resident_s >= rules.min_residency_s
    )


def victims_on(device: DeviceRoom, rules: Rules) -> list[Victim]:
    """The processes on `device` that may go, best first."""
    by_pid: dict[int, list[Loaded]] = {}
    for loaded in device.loaded:
        by_pid.setdefault(loaded.pid, []).append(loaded)
    found = []
    for pid, instances in by_pid.items():
        if not all(eligible(i, rules) for i in instances):
            continue
        reload_s = max(sum(i.reload_s for i in instances), _MIN_RELOAD_S)
        priority = max(i.priority for i in instances)
        idle_s = min(i.idle_s for i in instances)
        frees = device.process_mib.get(pid, 0) + sum(i.pending_mib for i in instances)
        found.append(
            Victim(
                pid=pid,
                instance_ids=tuple(sorted(i.instance_id for i in instances)),
                frees_mib=frees,
                reload_s=reload_s,
                score=idle_s / (reload_s * (1 + priority / 50)),
            )
        )
    found.sort(key=lambda v: (-v.score, -v.frees_mib, v.pid))
    return found


def plan_device(device: DeviceRoom, rules: Rules) -> Plan | None:
    """The minimal set of victims that makes room for the asker on `device`, or None."""
    if device.need_mib > device.capacity_mib:
        return None
    deficit = device.need_mib - device.usable_mib
    chosen: list[Victim] = []
    freed = 0
    if deficit > 0:
        for victim in victims_on(device, rules):
            if freed >= deficit:
                break
            chosen.append(victim)
            freed += victim.frees_mib
        if freed < deficit:
            return None
        for victim in sorted(chosen, key=lambda v: (v.score, v.pid)):
            if freed - victim.frees_mib >= deficit:
                chosen.remove(victim)
                freed -= victim.frees_mib
    return Plan(
        gpu=device.uuid,
        index=device.index,
        victims=tuple(chosen),
        need_mib=device.need_mib,
        deficit_mib=deficit,
        leftover_mib=device.usable_mib + freed - device.need_mib,
    )


def plan(devices: Iterable[DeviceRoom], rules: Rules) -> Plan | None:
    """The cheapest plan over the devices: least reload, then fewest victims, then best fit."""
    plans = [p for d in devices if (p := plan_device(d, rules)) is not None]
    if not plans:
        return None
    return min(plans, key=lambda p: (p.reload_s, len(p.victims), p.leftover_mib, p.index, p.gpu))
