"""The book of open reservations: admission (check and book in one step), renewal, release and
expiry. Every change goes straight into the capacity view, so the listing shows it at once.

Admission is atomic because it never awaits between reading the usable memory and booking it:
the event loop runs one admission at a time, however many requests arrive together.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gpu import GpuDevice, GpuState
from registry.admission.claims import Claims
from registry.admission.ledger import ReservationLedger
from registry.capacity import Reason, UsableDevice, best_fit
from registry.logs import get_logger
from registry.model import CatalogModel
from registry.reservation import Reservation
from registry.room import Plan
from registry.view import CatalogView

log = get_logger("registry.admission")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ReservationRequest:
    vram_mib: int | None = None
    model: str | None = None
    ttl_s: int = 120
    holder: str | None = None
    gpu: str | None = None
    pid: int | None = None
    owner: str | None = None
    make_room: bool = False  # when it does not fit now: a claim on idle instances' memory
    priority: int = 50  # a claim may take instances of this priority or below


class Refused(Exception):
    """Admission said no; `reason` is one of the listing's reasons."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Trial:
    """What a request would get now (a dry run): the device, and the victims if it must wait."""

    reservation_vram: int
    gpu: str
    index: int
    plan: Plan | None


class NotFound(Exception):
    """The request names a model or a GPU this host does not have."""


class TooMany(Exception):
    """As many reservations are open as the daemon takes (MODEL_REGISTRY_MAX_RESERVATIONS)."""


@dataclass
class BookCounters:
    created: int = 0
    released: int = 0
    expired: int = 0
    rolled_back: int = 0  # granted, then dropped: the grant could not be recorded
    bound: int = 0  # ended by becoming an instance
    rejected: dict[str, int] = field(default_factory=dict)  # by reason

    def reject(self, reason: Reason) -> None:
        self.rejected[reason.value] = self.rejected.get(reason.value, 0) + 1


class ReservationBook:
    def __init__(
        self,
        view: CatalogView,
        ledger: ReservationLedger,
        *,
        clock: Clock = utc_now,
        max_sleep_s: float = 1.0,
        max_open: int = 10_000,
    ) -> None:
        self._view = view
        self._ledger = ledger
        self._clock = clock
        # Expiry is timed by the wall clock (expiries survive restarts); a bounded sleep keeps
        # a clock step from delaying it.
        self.max_sleep_s = max_sleep_s
        self.max_open = max_open
        self._open: dict[str, Reservation] = {}
        # (expires_at, id) of every lease term granted; an entry whose reservation has ended
        # or been renewed since is skipped when it comes up.
        self._expiries: list[tuple[datetime, str]] = []
        # The device as read when each reservation was made (or when a finished load of the
        # process it names rebased it): what a process held before its load, for the bind.
        # Kept in memory only: after a restart the reading is no longer known.
        self._readings: dict[str, GpuDevice] = {}
        self._waiting: set[str] = set()  # the ids of claims still waiting for their victims
        self._wake = asyncio.Event()
        self._background_save: asyncio.Task[None] | None = None
        self.claims: Claims | None = None
        self.counters = BookCounters()

    # -- reading -------------------------------------------------------------------------

    def open(self) -> list[Reservation]:
        """Open reservations, oldest first."""
        return sorted(self._open.values(), key=lambda r: (r.created_at, r.id))

    @property
    def open_count(self) -> int:
        return len(self._open)

    def get(self, reservation_id: str) -> Reservation | None:
        return self._open.get(reservation_id)

    def describe(self, reservation: Reservation) -> dict[str, object]:
        unload = None
        if reservation.awaiting is not None and self.claims is not None:
            unload = self.claims.unload(reservation)
        return reservation.to_api(self._view.capacity.pending_of(reservation), unload)

    def waiting_claims(self) -> list[Reservation]:
        """The claims whose victims have not all gone yet (kept apart: the expiry loop asks
        at every change, and must not walk every open reservation to answer)."""
        return [self._open[i] for i in self._waiting]

    @staticmethod
    def load_started_at(reservation: Reservation) -> datetime:
        """When the load it books began: when it was made, or when a claim's room was freed."""
        return reservation.room_freed_at or reservation.created_at

    def reading_of(self, reservation_id: str) -> GpuDevice | None:
        """Its device as read when it was made; None when that is no longer known."""
        return self._readings.get(reservation_id)

    # -- changing ------------------------------------------------------------------------

    def load(self, reservations: list[Reservation]) -> None:
        """Take over what the ledger held at start-up; what expired meanwhile ends now."""
        self._open = {r.id: r for r in reservations}
        self._waiting = {r.id for r in reservations if r.awaiting is not None}
        self._expiries = [(r.expires_at, r.id) for r in reservations]
        heapq.heapify(self._expiries)
        self._view.set_reservations(self.open())
        self._wake.set()
        self.expire_due()

    def reserve(self, request: ReservationRequest) -> Reservation:
        """Check and book in one step; raise Refused, NotFound or TooMany. A claim (a
        `make_room` request that must wait for victims) comes back with `awaiting` set."""
        if len(self._open) >= self.max_open:
            self.counters.rejected["too_many"] = self.counters.rejected.get("too_many", 0) + 1
            raise TooMany(
                f"{len(self._open)} reservations are open, the most this daemon takes "
                "(MODEL_REGISTRY_MAX_RESERVATIONS)"
            )
        try:
            return self._reserve(request)
        except Refused as refusal:
            self.counters.reject(refusal.reason)
            raise

    def _reserve(self, request: ReservationRequest) -> Reservation:
        trial = self.trial(request)
        device = next(d for d in self._view.snapshot.devices if d.uuid == trial.gpu)
        if trial.plan is None or not trial.plan.victims:
            return self._record(request, trial.reservation_vram, device)
        claim = self._record(request, trial.reservation_vram, device, trial.plan)
        assert self.claims is not None
        self.claims.started(claim)
        return claim

    def trial(self, request: ReservationRequest) -> Trial:
        """Where the request would be booked now, and after unloading whom when it must make
        room; raise Refused (too_large, insufficient_vram, ...) or NotFound as `reserve` would."""
        model = self._model_asked(request)
        self._check_gpu_state()
        candidates = self._candidates(request.gpu)
        capacity = self._view.capacity
        if model is None:
            assert request.vram_mib is not None  # the schema asks for one of the two
            vram = request.vram_mib
            chosen = best_fit(candidates, vram)
        else:
            # By name: what its loads really took on each device's product, when learned.
            chosen = capacity.place(model, request.gpu)
            roomiest = chosen or (candidates[-1] if candidates else None)
            vram = model.vram if roomiest is None else capacity.need(model, roomiest.device)
        if chosen is not None:
            return Trial(vram, chosen.device.uuid, chosen.device.index, None)
        never = (
            capacity.never_holds(vram, request.gpu)
            if model is None
            else capacity.too_large(model, request.gpu)
        )
        if never:
            where = f"GPU {request.gpu}" if request.gpu else "any GPU here"
            raise Refused(
                Reason.TOO_LARGE,
                f"{vram} MiB asked, more than {where} could ever hold (its total less the margin)",
            )
        if request.make_room and self.claims is not None:
            planned = self.claims.plan(model, vram, request.gpu, request.priority)
            if planned is not None:
                return Trial(planned.need_mib, planned.gpu, planned.index, planned)
        best = candidates[-1].usable_mib if candidates else 0
        where = f"GPU {request.gpu} has" if request.gpu else "the roomiest GPU has"
        detail = f"{vram} MiB asked, but {where} {best} MiB usable"
        if request.make_room:
            detail += ", and no idle instances free enough"
        raise Refused(Reason.INSUFFICIENT_VRAM, detail)

    def _model_asked(self, request: ReservationRequest) -> CatalogModel | None:
        """The catalog model asked for by name (None when a figure was given)."""
        if request.model is None:
            return None
        model = self._view.model_by_name(request.model)
        if model is None:
            raise NotFound(f"no model named {request.model!r} in the catalog")
        if not model.enabled:
            raise Refused(Reason.DISABLED, f"model {model.name!r} is disabled")
        return model

    def _check_gpu_state(self) -> None:
        """Refuse unless the GPUs have been measured: there is nothing to promise otherwise."""
        snapshot = self._view.snapshot
        if snapshot.state is GpuState.DISABLED:
            raise Refused(
                Reason.GPU_STATE_UNKNOWN,
                "GPU awareness is off (backend none): there is no measured memory to reserve",
            )
        if not snapshot.known:
            raise Refused(
                Reason.GPU_STATE_UNKNOWN,
                f"GPU state is {snapshot.state.value}: {snapshot.error or 'no reading'}",
            )

    def _candidates(self, gpu: str | None) -> list[UsableDevice]:
        """The healthy devices the request may use, least usable first."""
        capacity = self._view.capacity
        if gpu is None:
            return capacity.healthy_devices()
        if all(device.uuid != gpu for device in capacity.snapshot.devices):
            raise NotFound(f"no GPU with uuid {gpu!r} on this host")
        candidates = capacity.healthy_devices(gpu)
        if not candidates:
            raise Refused(Reason.INSUFFICIENT_VRAM, f"GPU {gpu} is not healthy")
        return candidates

    def _record(
        self,
        request: ReservationRequest,
        vram: int,
        device: GpuDevice,
        claimed: Plan | None = None,
    ) -> Reservation:
        """Book `vram` on `device`: into the book, the journal and the view (a claim in full
        at once, with what it waits for)."""
        now = self._clock()
        baseline = 0
        if request.pid is not None:
            baseline = device.process_used_mib(request.pid) or 0
        reservation = Reservation(
            id=str(uuid.uuid4()),
            vram_mib=vram,
            gpu_uuid=device.uuid,
            gpu_index=device.index,
            created_at=now,
            expires_at=now + timedelta(seconds=request.ttl_s),
            model=request.model,
            holder=request.holder,
            pid=request.pid,
            pid_baseline_mib=baseline,
            owner=request.owner,
            priority=request.priority,
            awaiting=None if claimed is None else claimed.instance_ids,
            awaiting_since=None if claimed is None else now,
            frees_mib=0 if claimed is None else claimed.frees_mib,
        )
        self._keep(reservation)
        self._readings[reservation.id] = device
        self.counters.created += 1
        return reservation

    def renew(
        self, reservation_id: str, *, ttl_s: int | None = None, pid: int | None = None
    ) -> Reservation | None:
        """Extend the lease to `ttl_s` from now and/or name the loading process."""
        reservation = self._open.get(reservation_id)
        if reservation is None:
            return None
        if ttl_s is not None:
            reservation = reservation.renewed(self._clock() + timedelta(seconds=ttl_s))
        if pid is not None and pid != reservation.pid:
            device = next(
                (d for d in self._view.snapshot.devices if d.uuid == reservation.gpu_uuid), None
            )
            baseline = (device.process_used_mib(pid) if device else None) or 0
            reservation = reservation.with_pid(pid, baseline)
        self._keep(reservation)
        return reservation

    def restore(self, reservation: Reservation) -> None:
        """Put back a reservation as it was (a change that could not be recorded)."""
        self._keep(reservation)

    def discard(self, reservation_id: str) -> None:
        """Drop a booking that was never acknowledged (counted as rolled back, never uncounted:
        Prometheus reads a counter that goes down as a reset)."""
        if self._open.pop(reservation_id, None) is not None:
            self._ledger.end(reservation_id)
            self.counters.rolled_back += 1
            self._ended([reservation_id])

    def take(self, reservation_id: str) -> Reservation | None:
        """End a reservation because it became an instance; the caller journals the bind."""
        reservation = self._open.pop(reservation_id, None)
        if reservation is not None:
            self.counters.bound += 1
            self._ended([reservation_id])
            self._rebase_siblings(reservation)
            self._claim_ended(reservation, "released")
        return reservation

    def release(self, reservation_id: str) -> Reservation | None:
        reservation = self._open.pop(reservation_id, None)
        if reservation is not None:
            self._ledger.end(reservation_id)
            self.counters.released += 1
            self._ended([reservation_id])
            self._rebase_siblings(reservation)
            self._claim_ended(reservation, "released")
        return reservation

    def end_claim(self, reservation_id: str, reason: str) -> Reservation | None:
        """End a claim whose room will not come (its victims were told already); the event
        that ends it says why."""
        reservation = self._open.pop(reservation_id, None)
        if reservation is not None:
            self._ledger.end(reservation_id)
            self._ended([reservation_id], reason)
            self.persist_soon()
        return reservation

    def expire_due(self) -> list[Reservation]:
        now = self._clock()
        expired = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, reservation_id = heapq.heappop(self._expiries)
            reservation = self._open.get(reservation_id)
            if reservation is None or reservation.expires_at != expires_at:
                continue  # ended, or renewed since: a later entry stands for it
            expired.append(reservation)
            del self._open[reservation.id]
            self._ledger.end(reservation.id)
            self.counters.expired += 1
            log.warning(
                "reservation expired",
                reservation=reservation.id,
                holder=reservation.holder,
                model=reservation.model,
                vram_mib=reservation.vram_mib,
                gpu=reservation.gpu_uuid,
                age_s=self._age_s(reservation),
            )
        if expired:
            self._ended([r.id for r in expired])
            for reservation in expired:
                self._rebase_siblings(reservation)
                self._claim_ended(reservation, "expired")
        if self.claims is not None:
            self.claims.expire_due(now)
        return expired

    async def persist(self) -> None:
        """Return once the book as it is now is on disk."""
        await self._ledger.flush()

    def persist_soon(self) -> None:
        """Write the book in the background, for changes that may be lost in a crash without
        harm: a release or an expiry that is forgotten only holds memory until its expiry."""
        if self._background_save is None or self._background_save.done():
            self._background_save = asyncio.create_task(self._save_logged())

    async def _save_logged(self) -> None:
        try:
            await self.persist()
        except OSError as exc:
            log.error("could not record ended reservations on disk", error=str(exc))

    def wake(self) -> None:
        """Check expiries now (tests advance their clock, then call this)."""
        self._wake.set()

    async def run_expiry(self) -> None:
        """End reservations as they expire, until cancelled."""
        while True:
            self._wake.clear()
            if self.expire_due():
                self.persist_soon()
            upcoming = self._next_expiry()
            sleep_s = self.max_sleep_s
            if upcoming is not None:
                until = (upcoming - self._clock()).total_seconds()
                sleep_s = min(sleep_s, max(until, 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep_s)

    # -- internals -----------------------------------------------------------------------

    def _keep(self, reservation: Reservation) -> None:
        """Hold `reservation` as it now is: in the book, the journal, the view."""
        self._open[reservation.id] = reservation
        if reservation.awaiting is None:
            self._waiting.discard(reservation.id)
        else:
            self._waiting.add(reservation.id)
        heapq.heappush(self._expiries, (reservation.expires_at, reservation.id))
        if len(self._expiries) > 2 * len(self._open) + 1024:  # renewals left stale entries
            self._expiries = [(r.expires_at, r.id) for r in self._open.values()]
            heapq.heapify(self._expiries)
        self._ledger.put(reservation)
        self._view.book_reservations([reservation])
        self._wake.set()

    def _ended(self, reservation_ids: list[str], reason: str | None = None) -> None:
        for reservation_id in reservation_ids:
            self._readings.pop(reservation_id, None)
            self._waiting.discard(reservation_id)
        reasons = None if reason is None else dict.fromkeys(reservation_ids, reason)
        self._view.book_reservations([], reservation_ids, reasons)
        self._wake.set()

    def _claim_ended(self, reservation: Reservation, outcome: str) -> None:
        if reservation.awaiting is not None and self.claims is not None:
            self.claims.ended(reservation, outcome)

    def _rebase_siblings(self, ended: Reservation) -> None:
        """A reservation naming a process ended (or became an instance): what that process
        holds now is a load that is done, so the others naming it count only what it takes
        from here on. Otherwise a sibling would be credited with the finished model."""
        if ended.pid is None:
            return
        device = next((d for d in self._view.snapshot.devices if d.uuid == ended.gpu_uuid), None)
        used = None if device is None else device.process_used_mib(ended.pid)
        if used is None:
            return
        assert device is not None
        for sibling in self._view.bookings.naming(ended.gpu_uuid, ended.pid):
            if sibling.pid_baseline_mib < used:
                self._keep(sibling.with_pid(ended.pid, used))
                self._readings[sibling.id] = device

    def _next_expiry(self) -> datetime | None:
        expiries = self._expiries
        while expiries:
            expires_at, reservation_id = expiries[0]
            reservation = self._open.get(reservation_id)
            if reservation is not None and reservation.expires_at == expires_at:
                return expires_at
            heapq.heappop(expiries)  # ended or renewed: drop the stale entry
        return None

    def _age_s(self, reservation: Reservation) -> float:
        return round((self._clock() - reservation.created_at).total_seconds(), 3)
