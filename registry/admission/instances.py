"""The instances of this host: models loaded by a process on a GPU, bound from a reservation or
adopted, and ended when their process leaves the GPU (absent from two polls in a row) or when
the scheduler reports an unload.

An instance bound before its load showed keeps what its reservation still booked as pending
memory (`max(0, booked - used)`) until the process uses that much or the reservation's expiry
passes; after that it holds nothing: its memory is real use, in NVML's used figure. Nothing
ends while the GPU state is unknown or the device's process list cannot be read.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpu import MIB, GpuDevice, GpuSnapshot
from registry.admission.book import Clock, NotFound, ReservationBook, TooMany
from registry.admission.ledger import ReservationLedger
from registry.footprint import product
from registry.instance import Instance
from registry.logs import get_logger
from registry.reservation import Reservation
from registry.view import CatalogView

log = get_logger("registry.admission.instances")

ABSENT_POLLS_TO_END = 2
SAMPLE_AFTER_S = 60.0  # a live instance gives its first sample after this long
# (instance id, model, GPU product, peak MiB): one load's footprint, for the footprints store.
SampleSink = Callable[[str, str, str, int], None]


class PidNotOnGpu(Exception):
    """The process is not in the device's process list."""


class ProcessesUnknown(Exception):
    """The device's process list cannot be read, so nobody can say where the process is."""


@dataclass(slots=True)
class _Live:
    """What the polls have seen of an instance's process."""

    used_mib: int | None = None
    peak_mib: int = 0
    absent_polls: int = 0
    settled: bool = False  # its booking has ended: it holds no pending memory any more
    product: str | None = None  # of its device, as last seen
    measured: bool = False  # the driver reported the process's memory at least once
    sampled_mib: int = 0  # the peak last given as a sample


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
        on_sample: SampleSink | None = None,
    ) -> None:
        self._view = view
        self._reservations = reservations
        self._ledger = ledger
        self._clock = clock
        self.boot_id = boot_id
        self.max_open = max_open
        self._open: dict[str, Instance] = {}
        self._by_model: dict[str, dict[str, Instance]] = {}  # model name -> its instances
        self._live: dict[str, _Live] = {}
        self._by_process: dict[tuple[str, int], int] = {}  # (gpu, pid) -> instances
        self._on_sample = on_sample
        self.counters = InstanceCounters()

    # -- reading ----------------------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._open)

    def get(self, instance_id: str) -> Instance | None:
        return self._open.get(instance_id)

    def listed(self, model: str | None = None) -> list[Instance]:
        """Live instances, oldest first; of one model when named."""
        found = self._open if model is None else self._by_model.get(model, {})
        return sorted(found.values(), key=lambda i: (i.loaded_at, i.id))

    def spots(self) -> list[dict[str, Any]]:
        """Per model and device, how many instances: what the fleet row publishes."""
        counts: dict[tuple[str, str, int], int] = {}
        for instance in self._open.values():
            if instance.model is not None:
                key = (instance.model, instance.gpu_uuid, instance.gpu_index)
                counts[key] = counts.get(key, 0) + 1
        return [
            {"model": model, "gpu": gpu, "index": index, "count": count}
            for (model, gpu, index), count in sorted(counts.items())
        ]

    def described(self) -> list[dict[str, object]]:
        """Every live instance as the API shows it, oldest first."""
        return [self.describe(instance) for instance in self.listed()]

    def describe(self, instance: Instance) -> dict[str, object]:
        live = self._live[instance.id]
        return instance.to_api(live.used_mib, live.peak_mib, self._pending(instance, live))

    # -- changing ---------------------------------------------------------------------------

    def load(self, instances: list[Instance]) -> None:
        """Take over what the journal held at start-up (this boot's only)."""
        for instance in instances:
            self._index(instance)
            self._live[instance.id] = _Live()
        self._ledger.track_instances(lambda: list(self._open.values()))
        self._show(instances)

    def bind(
        self, reservation: Reservation, pid: int, device: GpuDevice, owner: str | None = None
    ) -> Instance:
        """Turn an open reservation into an instance of `pid`, in one step (one journal line)."""
        self._admit(device, pid)
        if self._reservations.take(reservation.id) is None:
            raise NotFound(f"no open reservation {reservation.id!r}")
        now = self._clock()
        instance = Instance(
            id=str(uuid.uuid4()),
            model=reservation.model,
            gpu_uuid=reservation.gpu_uuid,
            gpu_index=reservation.gpu_index,
            pid=pid,
            loaded_at=now,
            boot_id=self.boot_id,
            holder=reservation.holder,
            reservation=reservation.id,
            booked_mib=reservation.vram_mib,
            booked_until=reservation.expires_at,
            owner=owner if owner is not None else reservation.owner,
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
    ) -> Instance:
        """An instance of a model that is already loaded: it books nothing."""
        self._admit(device, pid)
        instance = Instance(
            id=str(uuid.uuid4()),
            model=model,
            gpu_uuid=device.uuid,
            gpu_index=device.index,
            pid=pid,
            loaded_at=self._clock(),
            boot_id=self.boot_id,
            holder=holder,
            owner=owner,
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

    def end(self, instance_id: str, reason: str) -> Instance | None:
        instance = self._open.get(instance_id)
        if instance is None:
            return None
        self._sample(instance, self._live[instance_id])
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
        return instance

    def on_poll(self, snapshot: GpuSnapshot) -> None:
        """After every successful poll: follow each process, end those that left."""
        if not snapshot.known or not self._open:
            return
        devices = {device.uuid: device for device in snapshot.devices}
        # Each device's processes by pid, once per poll: a lookup per instance, not a scan.
        listed = {
            device.uuid: {process.pid: process for process in device.processes}
            for device in snapshot.devices
            if device.processes_known
        }
        now = self._clock()
        gone: list[str] = []
        holds: list[tuple[str, str, int]] = []
        for instance in self._open.values():
            processes = listed.get(instance.gpu_uuid)
            if processes is None:
                continue  # cannot tell: nothing ends on a device we cannot see into
            live = self._live[instance.id]
            process = processes.get(instance.pid)
            if process is None:
                live.absent_polls += 1
                if live.absent_polls >= ABSENT_POLLS_TO_END:
                    gone.append(instance.id)
                continue
            live.absent_polls = 0
            self._observe(live, devices[instance.gpu_uuid], process.used_bytes)
            if (now - instance.loaded_at).total_seconds() >= SAMPLE_AFTER_S:
                self._sample(instance, live)
            if not live.settled:
                if live.peak_mib >= instance.booked_mib or instance.booking_over(now):
                    live.settled = True
                holds.append(self._hold(instance, live))
        for instance_id in gone:
            self.end(instance_id, "process_exited")
        if holds:
            self._view.hold(holds)

    # -- internals --------------------------------------------------------------------------

    def _admit(self, device: GpuDevice, pid: int) -> None:
        if len(self._open) >= self.max_open:
            raise TooMany(
                f"{len(self._open)} instances are open, the most this daemon takes "
                "(MODEL_REGISTRY_MAX_INSTANCES)"
            )
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

    def _observe(self, live: _Live, device: GpuDevice, used_bytes: int | None) -> None:
        live.used_mib = None if used_bytes is None else used_bytes // MIB
        live.peak_mib = max(live.peak_mib, live.used_mib or 0)
        live.measured = live.measured or live.used_mib is not None
        live.product = product(device)

    def _sample(self, instance: Instance, live: _Live) -> None:
        """Give the instance's peak as a footprint sample, when it is one: what its own load
        took, measured, of a model that learns, and larger than the last one given."""
        if self._on_sample is None or instance.model is None or live.product is None:
            return
        if not live.measured or live.peak_mib <= live.sampled_mib:
            return
        model = self._view.model_by_name(instance.model)
        if model is None or not model.learn:
            return
        # The process holds another instance, or a reservation still names it: what it holds
        # cannot be told apart, so it teaches nothing.
        key = (instance.gpu_uuid, instance.pid)
        if self._by_process.get(key, 0) > 1 or self._view.bookings.naming(*key):
            return
        live.sampled_mib = live.peak_mib
        self._on_sample(instance.id, instance.model, live.product, live.peak_mib)

    def _start(self, instance: Instance, device: GpuDevice) -> None:
        live = _Live()
        process = next((p for p in device.processes if p.pid == instance.pid), None)
        self._observe(live, device, None if process is None else process.used_bytes)
        live.settled = live.peak_mib >= instance.booked_mib
        self._index(instance)
        self._live[instance.id] = live
        self.counters.created += 1
        self._show([instance], holds=[self._hold(instance, live)], made=[instance])

    def _index(self, instance: Instance) -> None:
        self._open[instance.id] = instance
        key = (instance.gpu_uuid, instance.pid)
        self._by_process[key] = self._by_process.get(key, 0) + 1
        if instance.model is not None:
            self._by_model.setdefault(instance.model, {})[instance.id] = instance

    def _drop(self, instance: Instance) -> None:
        del self._open[instance.id]
        del self._live[instance.id]
        key = (instance.gpu_uuid, instance.pid)
        if self._by_process[key] > 1:
            self._by_process[key] -= 1
        else:
            del self._by_process[key]
        if instance.model is not None:
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
        return max(0, instance.booked_mib - (live.used_mib or 0))

    def _show(
        self,
        changed: Iterable[Instance],
        holds: Iterable[tuple[str, str, int]] = (),
        *,
        made: list[Instance] | None = None,
        ended: bool = False,
    ) -> None:
        """Tell the view where the changed instances' models are loaded now."""
        changed = list(changed)
        placed: list[tuple[str, str, str, int]] = []
        gone: list[tuple[str, str]] = []
        for instance in changed:
            if instance.model is None:
                continue
            if ended:
                gone.append((instance.model, instance.id))
            else:
                placed.append((instance.model, instance.id, instance.gpu_uuid, instance.gpu_index))
        holds = list(holds)
        if not holds:
            holds = [self._hold(i, self._live[i.id]) for i in changed if i.id in self._live]
        self._view.place_instances(
            placed,
            gone,
            holds,
            made=[self.describe(i) for i in made or ()],
            ended=[i.id for i in changed] if ended else [],
        )


def _hold_key(instance: Instance) -> str:
    return f"instance:{instance.id}"
