"""The capacity rule: a pure function of catalog, GPU snapshot, margins and pending bookings.

usable(d) = free(d) - margin_mib - margin_percent * total(d) - pending(d) for each healthy
device d, pending(d) being what open reservations still hold on it. A model fits when one single
device has usable(d) >= vram; it is never split across devices.

`Capacity` applies the rule once per change of its inputs and is what every reader of
per-device memory reads: its `budgets` (one per device: usable, pending, margin) feed /gpus, the
fleet row, the status page and the metrics; its best fit feeds admission.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpu import GpuDevice, GpuSnapshot, GpuState
from registry.bookings import Bookings
from registry.footprint import Footprints, product, reload_estimate
from registry.model import CatalogModel
from registry.reservation import Reservation


class Reason(enum.StrEnum):
    DISABLED = "disabled"
    INSUFFICIENT_VRAM = "insufficient_vram"  # not now: memory may free up
    TOO_LARGE = "too_large"  # never here: no device could hold it with nothing else on it
    GPU_STATE_UNKNOWN = "gpu_state_unknown"


@dataclass(frozen=True, slots=True)
class Margins:
    mib: int = 0
    percent: float = 0.0

    def for_device(self, device: GpuDevice) -> int:
        return self.mib + math.ceil(device.total_mib * self.percent / 100)


@dataclass(frozen=True, slots=True)
class Placement:
    gpu: str
    index: int
    free_mib: int


@dataclass(frozen=True, slots=True)
class Assessment:
    active: bool
    fits: bool | None
    reason: Reason | None
    placement: Placement | None
    headroom_mib: int | None


@dataclass(frozen=True, slots=True)
class Sizes:
    observed: int | None  # vram_observed
    effective: int  # vram_effective: what admission books
    reload_s: float  # how long a load takes: learned, else 1 s per GiB booked
    reload_estimated: bool


@dataclass(frozen=True, slots=True)
class UsableDevice:
    device: GpuDevice
    usable_mib: int


@dataclass(frozen=True, slots=True)
class DeviceBudget:
    """One device's memory as the rule sees it. `usable_mib` is None for an unhealthy device."""

    device: GpuDevice
    usable_mib: int | None
    pending_mib: int
    margin_mib: int


def usable_devices(
    snapshot: GpuSnapshot, margins: Margins, pending: Mapping[str, int] | None = None
) -> list[UsableDevice]:
    """Healthy devices with their usable memory, least usable first (for best fit)."""
    pending = pending or {}
    usable = [
        UsableDevice(
            device, device.free_mib - margins.for_device(device) - pending.get(device.uuid, 0)
        )
        for device in snapshot.devices
        if device.healthy
    ]
    usable.sort(key=lambda u: (u.usable_mib, u.device.index, u.device.uuid))
    return usable


def best_fit(devices: Sequence[UsableDevice], vram: int) -> UsableDevice | None:
    """The device with the least usable memory that still holds `vram` (devices sorted)."""
    position = bisect.bisect_left(devices, vram, key=lambda u: u.usable_mib)
    return devices[position] if position < len(devices) else None


class Capacity:
    """The GPU side of the rule at one moment, computed once per change of its inputs.

    Whether a model is active depends only on its switch and on whether its vram is at most
    `threshold`: the most usable memory of one device (+inf without GPU awareness, -inf while
    the GPU state is unknown). Work per change is therefore per device, never per model.
    """

    def __init__(
        self,
        snapshot: GpuSnapshot,
        margins: Margins,
        bookings: Bookings | None = None,
        footprints: Footprints | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.footprints = footprints if footprints is not None else Footprints()
        self.disabled = snapshot.state is GpuState.DISABLED
        self.known = snapshot.known
        self._bookings = bookings if bookings is not None else Bookings(snapshot)
        pending = self._bookings.pending_by_device()
        self.pending_total_mib = sum(pending.values())
        self._ranked = usable_devices(snapshot, margins, pending)
        usable = {u.device.uuid: u.usable_mib for u in self._ranked}
        self.budgets: tuple[DeviceBudget, ...] = tuple(
            DeviceBudget(
                device=device,
                usable_mib=usable.get(device.uuid),
                pending_mib=pending.get(device.uuid, 0),
                margin_mib=margins.for_device(device),
            )
            for device in snapshot.devices
        )
        self.best: int | None = self._ranked[-1].usable_mib if self._ranked else None
        # What each healthy device could ever hold (its total less the margin), the largest.
        self._capacity = {
            u.device.uuid: u.device.total_mib - margins.for_device(u.device) for u in self._ranked
        }
        self.largest: int | None = max(self._capacity.values(), default=None)
        self.threshold: float
        if self.disabled:
            self.threshold = math.inf
        elif not self.known or self.best is None:
            self.threshold = -math.inf
        else:
            self.threshold = self.best

    def pending_of(self, reservation: Reservation) -> int:
        """MiB the reservation still holds (in full when it is not booked)."""
        return self._bookings.pending_of(reservation)

    def healthy_devices(self, gpu: str | None = None) -> list[UsableDevice]:
        """Healthy devices (only `gpu`, when given) with their usable memory, least first."""
        if gpu is None:
            return list(self._ranked)
        return [u for u in self._ranked if u.device.uuid == gpu]

    def capacity_of(self, device: GpuDevice) -> int:
        """What a healthy device could ever hold: its total less the margin."""
        return self._capacity.get(device.uuid, 0)

    def too_large(self, model: CatalogModel, gpu: str | None = None) -> bool:
        """No healthy device (only `gpu`, when given) could hold the model even with nothing
        else on it."""
        if not self.footprints.learned(model):
            return self.never_holds(model.vram, gpu)
        devices = self.healthy_devices(gpu)
        return bool(devices) and all(
            self.need(model, u.device) > self.capacity_of(u.device) for u in devices
        )

    def never_holds(self, vram_mib: int, gpu: str | None = None) -> bool:
        """No healthy device (only `gpu`, when given) could hold `vram_mib` even with nothing
        else on it (no device: nothing to say)."""
        if gpu is None:
            return self.largest is not None and vram_mib > self.largest
        devices = self.healthy_devices(gpu)
        return bool(devices) and all(vram_mib > self.capacity_of(u.device) for u in devices)

    def need(self, model: CatalogModel, device: GpuDevice) -> int:
        """What admission books for `model` on `device`: its effective size there."""
        return self.footprints.effective(model, product(device))

    def is_active(self, model: CatalogModel) -> bool:
        if not model.enabled:
            return False
        if not self.footprints.learned(model) or self.disabled or not self.known:
            return model.vram <= self.threshold
        return self.place(model) is not None

    def place(self, model: CatalogModel, gpu: str | None = None) -> UsableDevice | None:
        """The healthy device with the least usable memory that still holds the model's
        effective size there (only `gpu`, when given)."""
        candidates = self.healthy_devices(gpu)
        if not self.footprints.learned(model):
            return best_fit(candidates, model.vram)
        return next((u for u in candidates if u.usable_mib >= self.need(model, u.device)), None)

    def sizes(self, model: CatalogModel, assessment: Assessment) -> Sizes:
        """What the listing says of its sizes and load time: on the placement's device, else
        the roomiest (with no device, nothing learned applies)."""
        device = None
        if assessment.placement is not None:
            device = next(
                u.device for u in self._ranked if u.device.uuid == assessment.placement.gpu
            )
        elif self._ranked:
            device = self._ranked[-1].device
        if device is None:
            return Sizes(None, model.vram, reload_estimate(model.vram), True)
        gpu_product = product(device)
        effective = self.footprints.effective(model, gpu_product)
        reload_s, estimated = self._reload_s(model.name, gpu_product, effective)
        return Sizes(
            observed=self.footprints.observed(model.name, gpu_product),
            effective=effective,
            reload_s=reload_s,
            reload_estimated=estimated,
        )

    def reload_s(self, model: CatalogModel, device: GpuDevice) -> tuple[float, bool]:
        """How long `model` takes to load on `device`, and whether that is an estimate."""
        gpu_product = product(device)
        return self._reload_s(
            model.name, gpu_product, self.footprints.effective(model, gpu_product)
        )

    def _reload_s(self, name: str, gpu_product: str, effective_mib: int) -> tuple[float, bool]:
        """Learned from the model's loads on that GPU product, or (True: an estimate) 1 s per
        GiB of what it books there."""
        learned = self.footprints.reload_s(name, gpu_product)
        if learned is not None:
            return round(learned, 3), False
        return reload_estimate(effective_mib), True

    def assess(self, model: CatalogModel) -> Assessment:
        if self.disabled:
            return _without_gpu(model)
        if not self.known:
            return _unknown(model)
        if self.footprints.learned(model):
            return self._assess_learned(model)
        return _assess(model, self._ranked, self.best, self.largest)

    def _assess_learned(self, model: CatalogModel) -> Assessment:
        """A model whose effective size differs by product: device by device."""
        chosen = self.place(model)
        headroom = max(
            (u.usable_mib - self.need(model, u.device) for u in self._ranked), default=None
        )
        return _verdict(model, chosen, headroom, never=self.too_large(model))


def assess_all(
    models: Iterable[CatalogModel],
    snapshot: GpuSnapshot,
    margins: Margins,
    reservations: Iterable[Reservation] = (),
    footprints: Footprints | None = None,
) -> dict[int, Assessment]:
    """The rule applied model by model: the reference every faster path must agree with."""
    capacity = Capacity(snapshot, margins, Bookings.of(reservations, snapshot), footprints)
    return {m.id: capacity.assess(m) for m in models}


def _assess(
    model: CatalogModel, devices: Sequence[UsableDevice], best: int | None, largest: int | None
) -> Assessment:
    chosen = best_fit(devices, model.vram)
    never = largest is not None and model.vram > largest
    return _verdict(model, chosen, None if best is None else best - model.vram, never=never)


def _verdict(
    model: CatalogModel, chosen: UsableDevice | None, headroom: int | None, *, never: bool
) -> Assessment:
    placement = None
    if chosen is not None:
        placement = Placement(chosen.device.uuid, chosen.device.index, chosen.device.free_mib)
    fits = placement is not None
    if not model.enabled:
        reason: Reason | None = Reason.DISABLED
    elif not fits:
        reason = Reason.TOO_LARGE if never else Reason.INSUFFICIENT_VRAM
    else:
        reason = None
    return Assessment(
        active=model.enabled and fits,
        fits=fits,
        reason=reason,
        placement=placement,
        headroom_mib=headroom,
    )


def _without_gpu(model: CatalogModel) -> Assessment:
    return Assessment(
        active=model.enabled,
        fits=None,
        reason=None if model.enabled else Reason.DISABLED,
        placement=None,
        headroom_mib=None,
    )


def _unknown(model: CatalogModel) -> Assessment:
    return Assessment(
        active=False,
        fits=None,
        reason=Reason.GPU_STATE_UNKNOWN if model.enabled else Reason.DISABLED,
        placement=None,
        headroom_mib=None,
    )
