"""The open reservations and what each still holds, kept up to date change by change.

A reservation holds its `vram_mib` in full, less what its named process (`pid`) has loaded on
its device beyond its baseline. A process is credited only with memory NVML shows it holding on
that device, and the credit is shared out oldest reservation first among the reservations
naming the same (device, pid), so several of them never shrink by more than it actually took.

A reservation change costs O(1) plus its own (device, pid) group; a new GPU snapshot costs the
reservations that name a pid. Nothing here walks every open reservation per change, so
reserving costs the same with 10,000 open as with none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from gpu import GpuSnapshot
from registry.reservation import Reservation

GroupKey = tuple[str, int]  # (device uuid, pid)


class Bookings:
    def __init__(self, snapshot: GpuSnapshot | None = None) -> None:
        self._open: dict[str, Reservation] = {}  # in the order they were first booked
        self._total_by_device: dict[str, int] = {}  # the full vram of every reservation
        self._groups: dict[GroupKey, dict[str, Reservation]] = {}
        self._credit: dict[str, int] = {}  # MiB a pid has loaded, by reservation id
        self._credit_by_device: dict[str, int] = {}
        # Memory held by other promises than reservations: an instance bound before its load
        # showed keeps what its reservation still booked. key -> (device uuid, MiB).
        self._holds: dict[str, tuple[str, int]] = {}
        self._snapshot = snapshot

    @classmethod
    def of(cls, reservations: Iterable[Reservation], snapshot: GpuSnapshot) -> Bookings:
        bookings = cls(snapshot)
        for reservation in reservations:
            bookings.put(reservation)
        return bookings

    # -- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._open)

    def get(self, reservation_id: str) -> Reservation | None:
        return self._open.get(reservation_id)

    def newest(self, count: int) -> list[Reservation]:
        """The `count` most recently booked, newest first."""
        found: list[Reservation] = []
        for reservation_id in reversed(self._open):
            if len(found) == count:
                break
            found.append(self._open[reservation_id])
        return found

    def ordered(self) -> list[Reservation]:
        """Every open reservation, oldest first (costs a sort: for listings, not per change)."""
        return sorted(self._open.values(), key=_age_order)

    def __iter__(self) -> Iterator[Reservation]:
        return iter(self._open.values())

    def naming(self, uuid: str, pid: int) -> list[Reservation]:
        """The open reservations that name process `pid` on device `uuid`."""
        return list(self._groups.get((uuid, pid), {}).values())

    def pending_of(self, reservation: Reservation) -> int:
        """MiB the reservation still holds (in full when it is not booked here)."""
        return reservation.vram_mib - self._credit.get(reservation.id, 0)

    def pending_by_device(self) -> dict[str, int]:
        credit = self._credit_by_device
        return {uuid: total - credit.get(uuid, 0) for uuid, total in self._total_by_device.items()}

    # -- changing ---------------------------------------------------------------------------

    def put(self, reservation: Reservation) -> None:
        """Book a reservation, or take its new state (renewed, given a pid)."""
        old = self._open.get(reservation.id)
        if old is not None:
            self._unindex(old)
        self._open[reservation.id] = reservation
        self._add_total(reservation.gpu_uuid, reservation.vram_mib)
        if (key := _group_key(reservation)) is not None:
            self._groups.setdefault(key, {})[reservation.id] = reservation
            self._credit_group(key)
        if old is not None and (old_key := _group_key(old)) not in (None, _group_key(reservation)):
            assert old_key is not None
            self._credit_group(old_key)

    def remove(self, reservation_id: str) -> Reservation | None:
        reservation = self._open.pop(reservation_id, None)
        if reservation is not None:
            self._unindex(reservation)
            if (key := _group_key(reservation)) is not None:
                self._credit_group(key)
        return reservation

    def hold(self, key: str, uuid: str, mib: int) -> bool:
        """Hold `mib` on device `uuid` under `key` (0 lets go); True when that changed it."""
        old = self._holds.get(key)
        if old == ((uuid, mib) if mib else None):
            return False
        if old is not None:
            self._add_total(old[0], -old[1])
            del self._holds[key]
        if mib:
            self._holds[key] = (uuid, mib)
            self._add_total(uuid, mib)
        return True

    def clear(self) -> None:
        self._open.clear()
        self._total_by_device.clear()
        self._groups.clear()
        self._credit.clear()
        self._credit_by_device.clear()
        for uuid, mib in self._holds.values():
            self._add_total(uuid, mib)

    def set_snapshot(self, snapshot: GpuSnapshot) -> list[Reservation]:
        """Take new GPU readings; returns the reservations whose pending memory changed."""
        self._snapshot = snapshot
        before = dict(self._credit)
        for key in self._groups:
            self._credit_group(key)
        return [
            self._open[rid]
            for rid in self._credit.keys() | before.keys()
            if rid in self._open and self._credit.get(rid, 0) != before.get(rid, 0)
        ]

    # -- internals --------------------------------------------------------------------------

    def _add_total(self, uuid: str, mib: int) -> None:
        total = self._total_by_device.get(uuid, 0) + mib
        if total:
            self._total_by_device[uuid] = total
        else:
            self._total_by_device.pop(uuid, None)

    def _unindex(self, reservation: Reservation) -> None:
        self._add_total(reservation.gpu_uuid, -reservation.vram_mib)
        key = _group_key(reservation)
        if key is not None:
            group = self._groups[key]
            del group[reservation.id]
            if not group:
                del self._groups[key]
        self._set_credit(reservation, 0)

    def _set_credit(self, reservation: Reservation, mib: int) -> None:
        old = self._credit.pop(reservation.id, 0)
        if mib:
            self._credit[reservation.id] = mib
        if old != mib:
            device = reservation.gpu_uuid
            total = self._credit_by_device.get(device, 0) - old + mib
            if total:
                self._credit_by_device[device] = total
            else:
                self._credit_by_device.pop(device, None)

    def _credit_group(self, key: GroupKey) -> None:
        """Share what the group's process has loaded among its reservations, oldest first."""
        group = self._groups.get(key)
        if not group:
            return
        used = self._process_used_mib(key)
        members = sorted(group.values(), key=_age_order)
        credit = 0
        if used is not None:
            credit = max(max(0, used - r.pid_baseline_mib) for r in members)
        for reservation in members:
            loaded = min(reservation.vram_mib, credit)
            credit -= loaded
            self._set_credit(reservation, loaded)

    def _process_used_mib(self, key: GroupKey) -> int | None:
        if self._snapshot is None:
            return None
        uuid, pid = key
        for device in self._snapshot.devices:
            if device.uuid == uuid:
                return device.process_used_mib(pid)
        return None


def _group_key(reservation: Reservation) -> GroupKey | None:
    return None if reservation.pid is None else (reservation.gpu_uuid, reservation.pid)


def _age_order(reservation: Reservation) -> tuple[object, str]:
    return (reservation.created_at, reservation.id)
