"""Claims: reservations that made room. The freed memory is held for the one who asked.

A `make_room` reservation that does not fit now asks the plan (registry.room) which idle
instances to unload. With a plan it is granted at once, booked in full on the plan's device
(whose headroom may go negative meanwhile, so nobody else is promised the memory being freed),
and its victims are marked `evicting` for it: their owners unload them (the daemon kills
nothing). When every victim has gone, the claim is an ordinary reservation. A victim that its
owner takes back (pins it, gives it work, raises its priority above the claim's: whatever
`held_back` names) is replaced by a new plan for what is still missing;
when there is none, or when the victims have not gone within the room timeout, the claim ends
(`room_withdrawn`) and its other victims stop evicting. A claim released, expired or bound
before its room came frees its victims too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from gpu import MIB
from registry.instance import Instance
from registry.logs import get_logger
from registry.model import CatalogModel
from registry.reservation import Reservation
from registry.room import DeviceRoom, Loaded, Plan, Rules, held_back, plan
from registry.view import CatalogView

if TYPE_CHECKING:
    from registry.admission.book import ReservationBook

log = get_logger("registry.admission.claims")

ROOM_WITHDRAWN = "room_withdrawn"
OUTCOMES = ("completed", "withdrawn", "expired", "released")


class RoomSource(Protocol):
    """What is loaded, as the claims need it (the instances book)."""

    def get(self, instance_id: str) -> Instance | None: ...

    def describe(self, instance: Instance) -> dict[str, object]: ...

    def loaded_on(
        self, device_uuid: str, reload_s: Callable[[Instance], float], rules: Rules
    ) -> list[Loaded]: ...

    def mark_evicting(self, instance_ids: Iterable[str], reservation_id: str | None) -> None: ...

    def freeable_mib(self, device_uuid: str) -> int: ...


@dataclass
class ClaimCounters:
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    evicted: int = 0  # victims that went for a claim


@dataclass(frozen=True)
class RoomPolicy:
    idle_after_s: float = 30.0
    min_residency_s: float = 60.0
    timeout_s: float = 120.0


class Claims:
    def __init__(
        self,
        view: CatalogView,
        instances: RoomSource,
        *,
        clock: Callable[[], datetime],
        policy: RoomPolicy,
    ) -> None:
        self._view = view
        self._instances = instances
        self._clock = clock
        self.policy = policy
        self._book: ReservationBook | None = None
        self.counters = ClaimCounters()

    def attach(self, book: ReservationBook) -> None:
        self._book = book

    # -- planning ---------------------------------------------------------------------------

    def rooms(
        self, model: CatalogModel | None, vram: int, gpu: str | None, rules: Rules
    ) -> list[DeviceRoom]:
        """Every healthy device the request may use (only `gpu` when named), as the plan sees
        it: what is usable, what it could ever hold, what the asker books there, what is on it."""
        capacity = self._view.capacity
        reloads: dict[tuple[str | None, str], float] = {}

        def reload_s(instance: Instance) -> float:
            key = (instance.model, instance.gpu_uuid)
            if key not in reloads:
                reloads[key] = self.reload_s(instance)
            return reloads[key]

        found = []
        for usable in capacity.healthy_devices(gpu):
            device = usable.device
            need = vram if model is None else capacity.need(model, device)
            if usable.usable_mib + self._instances.freeable_mib(device.uuid) < need:
                continue  # not even unloading everything there would do: no plan to make
            loaded = tuple(self._instances.loaded_on(device.uuid, reload_s, rules))
            pids = {i.pid for i in loaded}
            found.append(
                DeviceRoom(
                    uuid=device.uuid,
                    index=device.index,
                    usable_mib=usable.usable_mib,
                    capacity_mib=capacity.capacity_of(device),
                    need_mib=need,
                    loaded=loaded,
                    process_mib={
                        p.pid: (p.used_bytes or 0) // MIB for p in device.processes if p.pid in pids
                    },
                )
            )
        return found

    def plan(
        self, model: CatalogModel | None, vram: int, gpu: str | None, priority: int
    ) -> Plan | None:
        rules = self._rules(priority)
        return plan(self.rooms(model, vram, gpu, rules), rules)

    def reload_s(self, instance: Instance) -> float:
        """How long the instance's model would take to load again on its device."""
        model = None if instance.model is None else self._view.model_by_name(instance.model)
        device = next((d for d in self._view.snapshot.devices if d.uuid == instance.gpu_uuid), None)
        if model is None or device is None:
            return 1.0
        seconds, _estimated = self._view.reload_s(model, device)
        return seconds

    def _rules(self, priority: int, claim: str | None = None) -> Rules:
        return Rules(
            priority=priority,
            idle_after_s=self.policy.idle_after_s,
            min_residency_s=self.policy.min_residency_s,
            claim=claim,
        )

    # -- a claim's life ---------------------------------------------------------------------

    def started(self, reservation: Reservation) -> None:
        """A claim was granted: its victims are promised to it."""
        assert reservation.awaiting is not None
        self._instances.mark_evicting(reservation.awaiting, reservation.id)
        log.info(
            "room claimed",
            reservation=reservation.id,
            model=reservation.model,
            gpu=reservation.gpu_uuid,
            unload=list(reservation.awaiting),
            frees_mib=reservation.frees_mib,
        )

    def unload(self, reservation: Reservation) -> list[dict[str, object]]:
        """A waiting claim's victims as GET /instances/{id} shows them."""
        shown = []
        for instance_id in reservation.awaiting or ():
            instance = self._instances.get(instance_id)
            if instance is not None:
                shown.append(self._instances.describe(instance))
        return shown

    def instance_gone(self, instance: Instance) -> None:
        """An instance ended: if a claim waited for it, one victim fewer."""
        claim = self._claim_of(instance)
        if claim is None or claim.awaiting is None:
            return
        self.counters.evicted += 1
        left = tuple(i for i in claim.awaiting if i != instance.id)
        if left:
            self._keep(replace(claim, awaiting=left))
            return
        self.counters.outcomes["completed"] += 1
        log.info("room made", reservation=claim.id, model=claim.model, gpu=claim.gpu_uuid)
        self._keep(replace(claim, awaiting=None, awaiting_since=None, room_freed_at=self._clock()))

    def victim_changed(self, instance: Instance) -> None:
        """Its owner changed a victim: if that holds it back from this claim (a pin, work, a
        priority above the claim's), plan again for what is still missing, or give the claim
        up."""
        claim = self._claim_of(instance)
        if claim is None or claim.awaiting is None:
            return
        rules = self._rules(claim.priority, claim=claim.id)
        if not held_back(
            instance.pinned, instance.sessions, instance.priority, instance.evicting_for, rules
        ):
            return
        replanned = self._replan(claim, rules)
        if replanned is None:
            self._withdraw(claim, f"instance {instance.id} was taken back and nothing else fits")
            return
        kept = set(replanned.instance_ids)
        self._instances.mark_evicting([i for i in claim.awaiting if i not in kept], None)
        self._instances.mark_evicting(kept, claim.id)
        updated = replace(claim, awaiting=tuple(sorted(kept)), frees_mib=replanned.frees_mib)
        if not kept:
            self.counters.outcomes["completed"] += 1
            updated = replace(
                updated, awaiting=None, awaiting_since=None, room_freed_at=self._clock()
            )
        self._keep(updated)
        log.info(
            "room claim replanned",
            reservation=claim.id,
            taken_back=instance.id,
            unload=sorted(kept),
        )

    def ended(self, reservation: Reservation, outcome: str) -> None:
        """A claim ended before its room came (released, expired, bound): its victims are
        free to stay."""
        if reservation.awaiting is None:
            return
        self.counters.outcomes[outcome] += 1
        self._instances.mark_evicting(reservation.awaiting, None)

    def expire_due(self, now: datetime) -> None:
        """Give up the claims whose room has not come within the timeout (renewing a claim
        does not extend this: no claim holds a device forever)."""
        assert self._book is not None
        limit = timedelta(seconds=self.policy.timeout_s)
        for claim in self._book.waiting_claims():
            if claim.awaiting_since is not None and now - claim.awaiting_since >= limit:
                self._withdraw(claim, f"its victims did not go within {self.policy.timeout_s:g} s")

    def reconcile(self, live: Callable[[], Iterable[Instance]]) -> None:
        """At start: what the journal says of claims and their victims, made consistent (an
        instance that ended while a claim's line was not yet written, say)."""
        assert self._book is not None
        instances = {i.id: i for i in live()}
        for claim in self._book.waiting_claims():
            assert claim.awaiting is not None
            left = tuple(i for i in claim.awaiting if i in instances)
            if left == claim.awaiting:
                continue
            if left:
                self._keep(replace(claim, awaiting=left))
            else:
                self._keep(replace(claim, awaiting=None, awaiting_since=None))
        stray = [
            i.id
            for i in instances.values()
            if i.evicting is not None and not self._waits_for(i.evicting.reservation, i.id)
        ]
        self._instances.mark_evicting(stray, None)

    def _waits_for(self, reservation_id: str, instance_id: str) -> bool:
        assert self._book is not None
        claim = self._book.get(reservation_id)
        return claim is not None and instance_id in (claim.awaiting or ())

    # -- internals --------------------------------------------------------------------------

    def _claim_of(self, instance: Instance) -> Reservation | None:
        if instance.evicting is None or self._book is None:
            return None
        return self._book.get(instance.evicting.reservation)

    def _replan(self, claim: Reservation, rules: Rules) -> Plan | None:
        """The claim is booked in full already: what must go for its device's usable memory
        to be at least 0 once the victims are gone."""
        rooms = [r for r in self.rooms(None, 0, claim.gpu_uuid, rules) if r.uuid == claim.gpu_uuid]
        return plan(rooms, rules)

    def _withdraw(self, claim: Reservation, why: str) -> None:
        assert self._book is not None and claim.awaiting is not None
        self.counters.outcomes["withdrawn"] += 1
        self._instances.mark_evicting(claim.awaiting, None)
        log.warning("room claim withdrawn", reservation=claim.id, model=claim.model, why=why)
        self._book.end_claim(claim.id, ROOM_WITHDRAWN)

    def _keep(self, claim: Reservation) -> None:
        assert self._book is not None
        self._book.restore(claim)
        self._book.persist_soon()
