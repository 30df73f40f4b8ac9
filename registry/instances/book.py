"""The instances of this host: models loaded by a process on a GPU, bound from a reservation or
adopted, and ended when their process leaves the GPU (absent from two polls in a row) or when
the scheduler reports an unload.

An instance bound before its load showed keeps what its reservation still booked as pending
memory, `max(0, booked - (used - baseline))`, until the process has grown by that much above
what it held before (its baseline) or the reservation's expiry passes; after that it holds
nothing: its memory is real use, in NVML's used figure. Nothing ends while the GPU state is
unknown or the device's process list cannot be read (but a booking still ends at its expiry).

What a load took teaches the model's footprint only when the daemon watched the load to its
end: the process grew by what was booked, or lived SAMPLE_AFTER_S, or its owner reported the
unload. A process that vanishes before that (a worker that crashed while loading) teaches
nothing; so does an adoption, unless an admin made it. A sample is the growth above the
baseline, at most the device's total, and discarded under MIN_SAMPLE_MIB. A bound load also
teaches how long it took (from its start to `ready`), beside its footprint.

What making room needs is kept here too: the scheduler's sessions, pins and priority, when the
instance was last active (sessions above 0, or GPU activity where the driver reports it), and
whether a claim waits for it to go (`evicting`). The claims learn from `on_gone` when an
instance ended and from `on_victim_changed` when its owner changed one they wait for.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from gpu import MIB, GpuDevice, GpuSnapshot
from registry.admission.book import Clock, NotFound, ReservationBook, TooMany
from registry.admission.ledger import ReservationLedger
from registry.footprint import product
from registry.instance import DEFAULT_PRIORITY, Evicting, Instance
from registry.logs import get_logger
from registry.reservation import Reservation
from registry.room import Loaded, Rules, held_back
from registry.view import CatalogView

log = get_logger("registry.instances")

ABSENT_POLLS_TO_END = 2
SAMPLE_AFTER_S = 60.0  # a live instance's load counts as done after this long
MIN_SAMPLE_MIB = 64  # less than this is a CUDA context, not a model
# GPU activity moves `last_active_at` at most this often, so a busy GPU does not make every
# poll a change of the listing.
ACTIVITY_STEP_S = 5.0
# (instance id, model, GPU product, peak MiB): one load's footprint, for the footprints store.
SampleSink = Callable[[str, str, str, int], None]
# (instance id, model, GPU product, seconds): how long one load took.
LoadTimeSink = Callable[[str, str, str, float], None]
InstanceListener = Callable[[Instance], None]


class PidNotOnGpu(Exception):
    """The process is not in the device's process list."""


class ProcessesUnknown(Exception):
    """The device's process list cannot be read, so nobody can say where the process is."""


class AlreadyLoaded(Exception):
    """The process already holds a live instance of this model on this device."""

    def __init__(self, existing: Instance) -> None:
        super().__init__(
            f"process {existing.pid} already holds model {existing.model!r} on GPU "
            f"{existing.gpu_uuid}: instance {existing.id}"
        )
        self.existing = existing


@dataclass(slots=True)
class _Live:
    """What the polls have seen of an instance's process."""

    used_mib: int | None = None
    peak_mib: int = 0
    absent_polls: int = 0
    settled: bool = False  # its booking has ended: it holds no pending memory any more
    loaded: bool = False  # its load is known to be done: what it took may teach
    product: str | None = None  # of its device, as last seen
    total_mib: int = 0  # of its device, as last seen
    measured: bool = False  # the driver reported the process's memory at least once
    sampled_mib: int = 0  # the size last given as a sample


@dataclass
class InstanceCounters:
    created: int = 0
    rolled_back: int = 0  # made, then taken back: it could not be recorded
    ended: dict[str, int] = field(default_factory=dict)  # by reason


class InstanceBook:
    def __init__(
        self,
        view: CatalogView,
        reservations: ReservationBook,
        ledger: ReservationLedger,
        *,
        clock: Clock,
        boot_id: str,
        max_open: int = 10_000,
        max_per_owner: int | None = None,
        on_sample: SampleSink | None = None,
        on_load_time: LoadTimeSink | None = None,
    ) -> None:
        self._view = view
        self._reservations = reservations
        self._ledger = ledger
        self._clock = clock
        self.boot_id = boot_id
        self.max_open = max_open
        self.max_per_owner = max_per_owner or max(1, max_open // 4)
        self._open: dict[str, Instance] = {}
        self._by_load: dict[tuple[str, int, str], str] = {}  # (gpu, pid, model) -> its id
        self._by_owner: dict[str, int] = {}  # token hash -> live instances it made
        self._by_model: dict[str, dict[str, None]] = {}  # model name -> its instances' ids
        self._by_device: dict[str, dict[str, None]] = {}  # device uuid -> its instances' ids
        self._live: dict[str, _Live] = {}
        self._by_process: dict[tuple[str, int], int] = {}  # (gpu, pid) -> instances
        self._on_sample = on_sample
        self._on_load_time = on_load_time
        # Taken from every instance, kept until one changes: freeable_mib by device, and the
        # fleet row's room (its JSON, for the settings it was made with).
        self._freeable: dict[str, int] = {}
        self._room_row: tuple[tuple[float, float], str] | None = None
        self._spots: list[dict[str, Any]] | None = None
        self.on_gone: InstanceListener | None = None
        self.on_victim_changed: InstanceListener | None = None
        self.counters = InstanceCounters()

    # -- reading ----------------------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._open)

    def get(self, instance_id: str) -> Instance | None:
        return self._open.get(instance_id)

    def listed(self, model: str | None = None) -> list[Instance]:
        """Live instances, oldest first; of one model when named."""
        if model is None:
            found: Iterable[Instance] = self._open.values()
        else:
            found = (self._open[i] for i in self._by_model.get(model, {}))
        return sorted(found, key=lambda i: (i.loaded_at, i.id))

    def spots(self) -> list[dict[str, Any]]:
        """Per model and device, how many instances: what the fleet row publishes (kept until
        an instance comes or goes)."""
        if self._spots is None:
            self._spots = self._count_spots()
        return self._spots

    def _count_spots(self) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str, int], int] = {}
        for instance in self._open.values():
            if instance.model is not None:
                key = (instance.model, instance.gpu_uuid, instance.gpu_index)
                counts[key] = counts.get(key, 0) + 1
        return [
            {"model": model, "gpu": gpu, "index": index, "count": count}
            for (model, gpu, index), count in sorted(counts.items())
        ]

    def room_row(self, idle_after_s: float, min_residency_s: float) -> str:
        """What the fleet row publishes for other daemons to plan with, as JSON: per process,
        its device and memory, and per instance its model, priority, last activity and from
        when it may be asked to go here (None: not as it stands). Nothing in it moves with the
        clock; it is made again only once an instance changed."""
        settings = (idle_after_s, min_residency_s)
        if self._room_row is not None and self._room_row[0] == settings:
            return self._room_row[1]
        row = json.dumps(self._room_entries(idle_after_s, min_residency_s), separators=(",", ":"))
        self._room_row = (settings, row)
        return row

    def _room_entries(self, idle_after_s: float, min_residency_s: float) -> list[dict[str, Any]]:
        by_process: dict[tuple[str, int], dict[str, Any]] = {}
        for instance in self._open.values():
            key = (instance.gpu_uuid, instance.pid)
            entry = by_process.get(key)
            if entry is None:
                live = self._live[instance.id]
                entry = by_process[key] = {
                    "gpu": instance.gpu_uuid,
                    "index": instance.gpu_index,
                    "pid": instance.pid,
                    "used_mib": live.used_mib or 0,
                    "pending_mib": 0,
                    "instances": [],
                }
            entry["pending_mib"] += self._pending(instance, self._live[instance.id])
            eligible_from = None
            if not instance.pinned and instance.sessions == 0 and instance.evicting is None:
                eligible_from = max(
                    instance.active_at() + timedelta(seconds=idle_after_s),
                    instance.loaded_at + timedelta(seconds=min_residency_s),
                ).isoformat()
            entry["instances"].append(
                {
                    "id": instance.id,
                    "model": instance.model,
                    "priority": instance.priority,
                    "last_active_at": instance.active_at().isoformat(),
                    "eligible_from": eligible_from,
                }
            )
        return sorted(by_process.values(), key=lambda e: (e["gpu"], e["pid"]))

    def longest_idle(self) -> dict[str, float]:
        """Per model, the longest any of its instances has been idle, in seconds."""
        now = self._clock()
        return {
            model: max(self._open[i].idle_s(now) for i in ids)
            for model, ids in self._by_model.items()
        }

    def described(self) -> list[dict[str, object]]:
        """Every live instance as the API shows it, oldest first."""
        return [self.describe(instance) for instance in self.listed()]

    def describe(self, instance: Instance) -> dict[str, object]:
        """The instance as the API shows it (`idle_s` included)."""
        live = self._live[instance.id]
        pending = self._pending(instance, live)
        return instance.to_api(live.used_mib, live.peak_mib, pending, self._clock())

    def freeable_mib(self, device_uuid: str) -> int:
        """The most that unloading every instance on a device could free: its processes'
        memory and what the instances still hold pending (a bound, cheap to take: kept until
        an instance or a poll changes anything)."""
        if (known := self._freeable.get(device_uuid)) is not None:
            return known
        used: dict[int, int] = {}
        pending = 0
        for instance_id in self._by_device.get(device_uuid, {}):
            instance, live = self._open[instance_id], self._live[instance_id]
            used[instance.pid] = live.used_mib or 0
            pending += self._pending(instance, live)
        freeable = self._freeable[device_uuid] = sum(used.values()) + pending
        return freeable

    def loaded_on(
        self, device_uuid: str, reload_s: Callable[[Instance], float], rules: Rules
    ) -> list[Loaded]:
        """The instances on a device as the room plan sees them, but those of processes
        that `rules` hold back whatever the clock says (they could never be victims)."""
        now = self._clock()
        on_device = [self._open[i] for i in self._by_device.get(device_uuid, {})]
        held = {
            i.pid
            for i in on_device
            if held_back(i.pinned, i.sessions, i.priority, i.evicting_for, rules)
        }
        return [
            Loaded(
                instance_id=instance.id,
                pid=instance.pid,
                priority=instance.priority,
                pinned=instance.pinned,
                sessions=instance.sessions,
                idle_s=instance.idle_s(now),
                resident_s=(now - instance.loaded_at).total_seconds(),
                reload_s=reload_s(instance),
                pending_mib=self._pending(instance, self._live[instance.id]),
                evicting_for=instance.evicting_for,
            )
            for instance in on_device
            if instance.pid not in held
        ]

    # -- changing ---------------------------------------------------------------------------

    def load(self, instances: list[Instance]) -> None:
        """Take over what the journal held at start-up (this boot's only). Nobody saw what
        they did while the daemon was down: each counts as active until now."""
        now = self._clock()
        restored = [replace(i, last_active_at=max(i.active_at(), now)) for i in instances]
        for instance in restored:
            self._index(instance)
            self._live[instance.id] = _Live(loaded=instance.ready_at is not None)
        self._ledger.track_instances(lambda: list(self._open.values()), lambda: len(self._open))
        self._show(restored)

    def bind(
        self,
        reservation: Reservation,
        pid: int,
        device: GpuDevice,
        owner: str | None = None,
        *,
        sessions: int = 0,
        pinned: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> Instance:
        """Turn an open reservation into an instance of `pid`, in one step (one journal line)."""
        owner = owner if owner is not None else reservation.owner
        self._admit(device, pid, reservation.model, owner)
        baseline, teaches = self._baseline(reservation, pid, device)
        if self._reservations.take(reservation.id) is None:
            raise NotFound(f"no open reservation {reservation.id!r}")
        instance = Instance(
            id=str(uuid.uuid4()),
            model=reservation.model,
            gpu_uuid=reservation.gpu_uuid,
            gpu_index=reservation.gpu_index,
            pid=pid,
            loaded_at=self._clock(),
            boot_id=self.boot_id,
            holder=reservation.holder,
            reservation=reservation.id,
            booked_mib=reservation.vram_mib,
            booked_until=reservation.expires_at,
            owner=owner,
            baseline_mib=baseline,
            teaches=teaches,
            sessions=sessions,
            pinned=pinned,
            priority=priority,
            load_started_at=self._reservations.load_started_at(reservation),
        )
        self._ledger.bind(reservation.id, instance)
        self._start(instance, device)
        return instance

    def adopt(
        self,
        model: str,
        device: GpuDevice,
        pid: int,
        holder: str | None,
        owner: str | None = None,
        *,
        teaches: bool = False,
        sessions: int = 0,
        pinned: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> Instance:
        """An instance of a model that is already loaded: it books nothing. It teaches the
        model's footprint (its process's peak) only when `teaches`: adopted by an admin."""
        self._admit(device, pid, model, owner)
        now = self._clock()
        instance = Instance(
            id=str(uuid.uuid4()),
            model=model,
            gpu_uuid=device.uuid,
            gpu_index=device.index,
            pid=pid,
            loaded_at=now,
            boot_id=self.boot_id,
            holder=holder,
            owner=owner,
            teaches=teaches,
            sessions=sessions,
            pinned=pinned,
            priority=priority,
            ready_at=now,
        )
        self._ledger.put_instance(instance)
        self._start(instance, device)
        return instance

    def undo(self, instance: Instance, reservation: Reservation | None) -> None:
        """Take back an instance that could not be recorded (and give back its reservation)."""
        self._drop(instance)
        self._ledger.end_instance(instance.id)
        self.counters.rolled_back += 1
        if reservation is not None:
            self._reservations.restore(reservation)

    def change(
        self,
        instance: Instance,
        *,
        sessions: int | None = None,
        pinned: bool | None = None,
        priority: int | None = None,
        ready: bool = False,
    ) -> Instance:
        """What its owner says of it now (PATCH): sessions, pin, priority, or that its load is
        done. A change to a victim is told to the claims: it may take it back."""
        now = self._clock()
        updates: dict[str, Any] = {}
        if sessions is not None:
            updates["sessions"] = sessions
            if sessions > 0 or instance.sessions > 0:
                updates["last_active_at"] = now  # in use until now, or from now
        if pinned is not None:
            updates["pinned"] = pinned
        if priority is not None:
            updates["priority"] = priority
        if ready and instance.ready_at is None:
            updates["ready_at"] = now
        if not updates:
            return instance
        changed = replace(instance, **updates)
        self._replace(changed)
        self._ledger.put_instance(changed)
        if "ready_at" in updates:
            self._load_done(changed)
        self._show([changed], changed=[changed])
        if changed.evicting is not None and self.on_victim_changed is not None:
            self.on_victim_changed(changed)
        return self._open[changed.id]

    def mark_evicting(self, instance_ids: Iterable[str], reservation_id: str | None) -> None:
        """A claim waits for these instances to go (None: it no longer does)."""
        now = self._clock()
        mark = None if reservation_id is None else Evicting(reservation_id, now)
        changed = []
        for instance_id in instance_ids:
            instance = self._open.get(instance_id)
            if instance is None:
                continue
            if instance.evicting_for == reservation_id:
                continue  # already so (a replanned claim keeps the victims it had, and since)
            updated = replace(instance, evicting=mark)
            self._replace(updated)
            self._ledger.put_instance(updated)
            changed.append(updated)
        if changed:
            self._show(changed, changed=changed)

    def end(self, instance_id: str, reason: str) -> Instance | None:
        """End an instance: its process left the GPU (`process_exited`), or its owner reported
        the unload (`unloaded`: an orderly end, so its load was done)."""
        instance = self._open.get(instance_id)
        if instance is None:
            return None
        live = self._live[instance_id]
        if reason == "unloaded":
            live.loaded = True
        if live.loaded:
            self._sample(instance, live)
        self._drop(instance)
        self._ledger.end_instance(instance_id)
        self.counters.ended[reason] = self.counters.ended.get(reason, 0) + 1
        log.info(
            "instance ended",
            instance=instance.id,
            model=instance.model,
            gpu=instance.gpu_uuid,
            pid=instance.pid,
            holder=instance.holder,
            reason=reason,
        )
        self._reservations.persist_soon()
        if self.on_gone is not None:
            self.on_gone(instance)
        return instance

    def on_poll(self, snapshot: GpuSnapshot) -> None:
        """After every successful poll: follow each process, end those that left."""
        if not snapshot.known or not self._open:
            return
        # Per device, once per poll: its product and total, what each instance's live keeps.
        devices = {d.uuid: (product(d), d.total_mib) for d in snapshot.devices}
        # Each device's processes by pid, once per poll: a lookup per instance, not a scan.
        listed = {
            device.uuid: {process.pid: process for process in device.processes}
            for device in snapshot.devices
            if device.processes_known
        }
        now = self._clock()
        gone: list[str] = []
        holds: list[tuple[str, str, int]] = []
        changed: list[Instance] = []
        used_moved = False
        for instance in list(self._open.values()):
            live = self._live[instance.id]
            processes = listed.get(instance.gpu_uuid)
            if processes is None:
                # Cannot tell: nothing ends on a device we cannot see into, but what its
                # reservation booked is held only until that reservation's expiry.
                if not live.settled and instance.booking_over(now):
                    live.settled = True
                    holds.append(self._hold(instance, live))
                continue
            process = processes.get(instance.pid)
            if process is None:
                live.absent_polls += 1
                if live.absent_polls >= ABSENT_POLLS_TO_END:
                    gone.append(instance.id)
                continue
            live.absent_polls = 0
            used_before = live.used_mib
            self._observe(live, devices[instance.gpu_uuid], process.used_bytes)
            used_moved = used_moved or live.used_mib != used_before
            if (followed := self._follow(instance, live, process.sm_util, now)) is not instance:
                changed.append(followed)
                instance = followed
            if not live.loaded and (now - instance.loaded_at).total_seconds() >= SAMPLE_AFTER_S:
                live.loaded = True
            if live.loaded:
                self._sample(instance, live)
            if not live.settled:
                if self._grown_to_booking(instance, live) or instance.booking_over(now):
                    live.settled = True
                holds.append(self._hold(instance, live))
        if holds or used_moved:
            self._changed()  # what instances use or hold pending moved
        if changed:
            self._show(changed, holds, changed=changed)
        elif holds:
            self._view.hold(holds)
        for instance_id in gone:
            self.end(instance_id, "process_exited")

    # -- internals --------------------------------------------------------------------------

    def _admit(self, device: GpuDevice, pid: int, model: str | None, owner: str | None) -> None:
        if len(self._open) >= self.max_open:
            raise TooMany(
                f"{len(self._open)} instances are open, the most this daemon takes "
                "(MODEL_REGISTRY_MAX_INSTANCES)"
            )
        if owner is not None and self._by_owner.get(owner, 0) >= self.max_per_owner:
            raise TooMany(
                f"this token has {self._by_owner[owner]} live instances, the most one token "
                "may have (MODEL_REGISTRY_MAX_INSTANCES_PER_TOKEN)"
            )
        if model is not None and (existing := self._by_load.get((device.uuid, pid, model))):
            raise AlreadyLoaded(self._open[existing])
        if not device.processes_known:
            raise ProcessesUnknown(
                f"the process list of GPU {device.uuid} cannot be read (permissions, MIG or "
                "container setup), so no process can be placed on it"
            )
        if not device.has_process(pid):
            raise PidNotOnGpu(
                f"process {pid} is not on GPU {device.uuid}: it shows once it has a CUDA "
                "context there (pids are the host's, not a container's)"
            )

    def _baseline(self, reservation: Reservation, pid: int, device: GpuDevice) -> tuple[int, bool]:
        """What `pid` held before this load, and whether that is known well enough to learn
        from: its memory in the reading current when the reservation was made (or rebased
        since), else (a restart in between) its memory now, which teaches nothing."""
        reading = self._reservations.reading_of(reservation.id)
        now_mib = device.process_used_mib(pid) or 0
        if reading is None or not reading.processes_known:
            return now_mib, False
        baseline = reading.process_used_mib(pid) or 0
        if self._by_process.get((device.uuid, pid)):
            # The process holds another instance: what it holds now is that one's too.
            baseline = max(baseline, now_mib)
        return baseline, True

    def _follow(
        self, instance: Instance, live: _Live, sm_util: int | None, now: datetime
    ) -> Instance:
        """What a poll says of it: busy on the GPU (activity), or grown by all it booked (its
        load is done). The instance as it is now (the same object when nothing changed)."""
        updates: dict[str, Any] = {}
        busy = sm_util is not None and sm_util > 0
        if busy and (now - instance.active_at()).total_seconds() >= ACTIVITY_STEP_S:
            updates["last_active_at"] = now
        if instance.ready_at is None and self._grown_to_booking(instance, live):
            updates["ready_at"] = now
        if not updates:
            return instance
        changed = replace(instance, **updates)
        self._replace(changed)
        if "ready_at" in updates:
            # Activity alone is not journaled: after a restart every instance counts as active.
            self._ledger.put_instance(changed)
            self._load_done(changed)
        return changed

    def _load_done(self, instance: Instance) -> None:
        """Its load is done: what it took may teach from now, and how long it took, now."""
        live = self._live[instance.id]
        live.loaded = True
        started, ready = instance.load_started_at, instance.ready_at
        if (
            self._on_load_time is None
            or started is None
            or ready is None
            or instance.model is None
            or live.product is None
        ):
            return
        self._on_load_time(
            instance.id, instance.model, live.product, max(0.0, (ready - started).total_seconds())
        )

    def _replace(self, instance: Instance) -> None:
        """Keep `instance` as the new state of the live instance with its id."""
        self._open[instance.id] = instance
        self._changed()

    def _changed(self) -> None:
        """Something of an instance changed: what was derived from them all is taken again."""
        self._freeable.clear()
        self._room_row = None

    def _observe(self, live: _Live, device: tuple[str, int], used_bytes: int | None) -> None:
        """What a reading says of the process: its memory; its device's (product, total)."""
        live.used_mib = None if used_bytes is None else used_bytes // MIB
        live.peak_mib = max(live.peak_mib, live.used_mib or 0)
        live.measured = live.measured or live.used_mib is not None
        live.product, live.total_mib = device

    @staticmethod
    def _grown_to_booking(instance: Instance, live: _Live) -> bool:
        return live.peak_mib - instance.baseline_mib >= instance.booked_mib

    def _sample(self, instance: Instance, live: _Live) -> None:
        """Give what the instance's load took as a footprint sample, when it is one: a load
        that may teach, measured, of a model that learns, and larger than the last one given."""
        if self._on_sample is None or instance.model is None or live.product is None:
            return
        if not instance.teaches or not live.measured:
            return
        size = min(live.peak_mib - instance.baseline_mib, live.total_mib)
        if size < MIN_SAMPLE_MIB or size <= live.sampled_mib:
            return
        model = self._view.model_by_name(instance.model)
        if model is None or not model.learn:
            return
        # The process holds another instance, or a reservation still names it: what it holds
        # cannot be told apart, so it teaches nothing.
        key = (instance.gpu_uuid, instance.pid)
        if self._by_process.get(key, 0) > 1 or self._view.bookings.naming(*key):
            return
        live.sampled_mib = size
        self._on_sample(instance.id, instance.model, live.product, size)

    def _start(self, instance: Instance, device: GpuDevice) -> None:
        live = _Live()
        process = next((p for p in device.processes if p.pid == instance.pid), None)
        self._observe(
            live,
            (product(device), device.total_mib),
            None if process is None else process.used_bytes,
        )
        live.settled = self._grown_to_booking(instance, live)
        # An adoption is of a model loaded before: its load is done.
        live.loaded = instance.reservation is None
        self._index(instance)
        self._live[instance.id] = live
        self.counters.created += 1
        self._show([instance], holds=[self._hold(instance, live)], changed=[instance])

    def _index(self, instance: Instance) -> None:
        self._changed()
        self._spots = None
        self._open[instance.id] = instance
        key = (instance.gpu_uuid, instance.pid)
        self._by_process[key] = self._by_process.get(key, 0) + 1
        if instance.owner is not None:
            self._by_owner[instance.owner] = self._by_owner.get(instance.owner, 0) + 1
        self._by_device.setdefault(instance.gpu_uuid, {})[instance.id] = None
        if instance.model is not None:
            self._by_model.setdefault(instance.model, {})[instance.id] = None
            self._by_load.setdefault((*key, instance.model), instance.id)

    def _drop(self, instance: Instance) -> None:
        self._changed()
        self._spots = None
        del self._open[instance.id]
        del self._live[instance.id]
        key = (instance.gpu_uuid, instance.pid)
        if self._by_process[key] > 1:
            self._by_process[key] -= 1
        else:
            del self._by_process[key]
        if instance.owner is not None:
            if self._by_owner[instance.owner] > 1:
                self._by_owner[instance.owner] -= 1
            else:
                del self._by_owner[instance.owner]
        on_device = self._by_device[instance.gpu_uuid]
        del on_device[instance.id]
        if not on_device:
            del self._by_device[instance.gpu_uuid]
        if instance.model is not None:
            if self._by_load.get((*key, instance.model)) == instance.id:
                del self._by_load[(*key, instance.model)]
            of_model = self._by_model[instance.model]
            del of_model[instance.id]
            if not of_model:
                del self._by_model[instance.model]
        self._show([instance], holds=[(_hold_key(instance), instance.gpu_uuid, 0)], ended=True)

    def _hold(self, instance: Instance, live: _Live) -> tuple[str, str, int]:
        return (_hold_key(instance), instance.gpu_uuid, self._pending(instance, live))

    def _pending(self, instance: Instance, live: _Live) -> int:
        if live.settled:
            return 0
        used = live.used_mib if live.used_mib is not None else instance.baseline_mib
        return max(0, instance.booked_mib - max(0, used - instance.baseline_mib))

    def _show(
        self,
        instances: Iterable[Instance],
        holds: Iterable[tuple[str, str, int]] = (),
        *,
        changed: list[Instance] | None = None,
        ended: bool = False,
    ) -> None:
        """Tell the view where the instances' models are loaded now and how they stand;
        `changed` (made or changed) and `ended` go to the event streams."""
        instances = list(instances)
        placed: list[tuple[str, str, dict[str, Any]]] = []
        gone: list[tuple[str, str]] = []
        for instance in instances:
            if instance.model is None:
                continue
            if ended:
                gone.append((instance.model, instance.id))
            else:
                placed.append((instance.model, instance.id, resident(instance)))
        holds = list(holds)
        if not holds:
            holds = [self._hold(i, self._live[i.id]) for i in instances if i.id in self._live]
        self._view.place_instances(
            placed,
            gone,
            holds,
            made=[self.describe(i) for i in changed or ()],
            ended=[i.id for i in instances] if ended else [],
        )


def resident(instance: Instance) -> dict[str, Any]:
    """An instance as a model's `instances` in /models and the fleet show it: no `idle_s`,
    which moves with the clock (a page or an ETag must not)."""
    return {
        "id": instance.id,
        "gpu": instance.gpu_uuid,
        "index": instance.gpu_index,
        **instance.standing(),
    }


def _hold_key(instance: Instance) -> str:
    return f"instance:{instance.id}"
