"""The loop that polls a backend and publishes snapshots when something changes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from gpu.backend import GpuBackend, GpuUnavailable
from gpu.snapshot import GpuDevice, GpuSnapshot, GpuState
from gpu.worker import DeadlineWorker, WorkerBusy

log = structlog.get_logger("gpu.poller")

MAX_BACKOFF_S = 60.0

Subscriber = Callable[[GpuSnapshot], None]


class GpuPoller:
    """Polls `backend` every `interval_s` from one worker thread.

    Readings older than three intervals plus the call deadline are published as `stale`.
    After a failure the backend is retried with exponential backoff (up to a minute), but the
    loop itself keeps ticking every interval, so `last_tick` shows a live loop to the watchdog.
    """

    def __init__(
        self,
        backend: GpuBackend,
        *,
        interval_s: float = 1.0,
        deadline_s: float = 2.0,
        on_poll: Callable[[float, bool], None] | None = None,
    ) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self._on_poll = on_poll
        self._worker = DeadlineWorker(f"gpu-{backend.name}")
        self._subscribers: list[Subscriber] = []
        # Called after every successful poll, published or not (a reading that changed nothing
        # is not published): what counts polls, such as "absent from two polls in a row".
        self._poll_listeners: list[Subscriber] = []
        self._polled = asyncio.Event()  # set whenever a poll ends
        self._polls_started = 0
        self._last_poll_ended = 0  # the number of the last poll that ended
        self._poll_now = asyncio.Event()
        self._first = asyncio.Event()
        self._snapshot = GpuSnapshot(
            backend=backend.name,
            state=GpuState.UNAVAILABLE,
            error="no reading yet",
        )
        self._last_good: float | None = None  # monotonic time of the last successful read
        self._failures = 0
        self._next_attempt = 0.0
        self._last_problem: str | None = None  # a slow or hung call, logged once
        self.last_tick = time.monotonic()
        self.last_success_wall: datetime | None = None
        self.polls = 0
        # The poll a request last asked for (its number, and when): requests share it.
        self._asked: tuple[int, float] = (0, float("-inf"))

    @property
    def snapshot(self) -> GpuSnapshot:
        return self._snapshot

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def on_each_poll(self, listener: Subscriber) -> None:
        """Call `listener` with the snapshot after every successful poll."""
        self._poll_listeners.append(listener)

    async def poll_and_wait(self, timeout_s: float) -> GpuSnapshot:
        """Ask for a poll now and return the snapshot once one has ended (or at the timeout)."""
        wanted = self._polls_started + 1  # one that starts after this call, not one in flight
        self.poll_now()
        return await self._until_polled(wanted, timeout_s)

    async def recent_poll(self, timeout_s: float) -> GpuSnapshot:
        """A reading taken since a request last asked for one, at most one poll interval ago:
        requests share one poll per interval, however many ask (a client cannot make the
        daemon poll faster than its interval)."""
        number, asked_at = self._asked
        if time.monotonic() - asked_at >= self.interval_s:
            number = self._polls_started + 1
            self._asked = (number, time.monotonic())
            self.poll_now()
        return await self._until_polled(number, timeout_s)

    async def _until_polled(self, number: int, timeout_s: float) -> GpuSnapshot:
        """The snapshot once poll `number` has ended (or at the timeout)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._last_poll_ended < number:
                    self._polled.clear()
                    await self._polled.wait()
        return self._snapshot

    def poll_now(self) -> None:
        """Wake the loop for an immediate poll, ignoring any backoff."""
        self._next_attempt = 0.0
        self._poll_now.set()

    async def wait_first(self, timeout_s: float) -> GpuSnapshot:
        """Wait until the first poll has finished, successful or not."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._first.wait()
        except TimeoutError:
            pass
        return self._snapshot

    def hung_for_s(self) -> float:
        """How long the GPU call in flight has been running (0 when none is): a driver call
        that never returns shows here, while the loop itself keeps ticking."""
        return self._worker.busy_for_s()

    def stale_after_s(self) -> float:
        return 3 * self.interval_s + self.deadline_s

    async def run(self) -> None:
        """Poll until cancelled."""
        try:
            while True:
                # Cleared before the poll: a request made while it runs gets a poll of its own.
                self._poll_now.clear()
                try:
                    await self.poll_once()
                except Exception:
                    log.exception("gpu poll failed unexpectedly")
                self.last_tick = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poll_now.wait(), self.interval_s)
        finally:
            await self.aclose()

    async def poll_once(self) -> GpuSnapshot:
        self._polls_started += 1
        number = self._polls_started
        now = time.monotonic()
        if now >= self._next_attempt:
            await self._attempt()
        else:
            self._check_stale(now)
        self._first.set()
        self._last_poll_ended = number
        self._polled.set()
        return self._snapshot

    async def _attempt(self) -> None:
        started = time.perf_counter()
        try:
            devices = await self._worker.call(self.backend.read, self.deadline_s)
        except GpuUnavailable as exc:
            self._record_unavailable(str(exc), started)
        except WorkerBusy as exc:
            self._record_slow(str(exc), started)
        except TimeoutError:
            self._record_slow(f"GPU call did not return within {self.deadline_s:g} s", started)
        except Exception as exc:
            self._record_unavailable(f"{type(exc).__name__}: {exc}", started)
        else:
            self._record_success(devices, started)

    def _record_success(self, devices: list[GpuDevice], started: float) -> None:
        self.polls += 1
        self._last_problem = None
        self._failures = 0
        self._next_attempt = 0.0
        self._last_good = time.monotonic()
        self.last_success_wall = datetime.now(UTC)
        self._report(started, ok=True)
        reading = self._publish(GpuState.OK, tuple(devices), error=None)
        for listener in self._poll_listeners:
            listener(reading)

    def _record_unavailable(self, error: str, started: float) -> None:
        """The GPUs cannot be read (no library, no driver, device lost): retry with backoff."""
        self.polls += 1
        self._report(started, ok=False)
        delay = min(self.interval_s * 2**self._failures, MAX_BACKOFF_S)
        self._failures += 1
        self._next_attempt = time.monotonic() + delay
        self._publish(GpuState.UNAVAILABLE, (), error=error)

    def _record_slow(self, error: str, started: float) -> None:
        """The driver is slow or hung: keep the last readings until they go stale."""
        self.polls += 1
        self._report(started, ok=False)
        if not self._check_stale(time.monotonic(), error=error) and error != self._last_problem:
            log.warning("gpu call problem", backend=self.backend.name, error=error)
        self._last_problem = error

    def _check_stale(self, now: float, error: str | None = None) -> bool:
        current = self._snapshot
        if current.state is not GpuState.OK or self._last_good is None:
            return False
        if now - self._last_good <= self.stale_after_s():
            return False
        reason = error or f"no reading for {now - self._last_good:.1f} s"
        self._publish(GpuState.STALE, current.devices, error=reason, keep_as_of=True)
        return True

    def _report(self, started: float, *, ok: bool) -> None:
        if self._on_poll is not None:
            self._on_poll(time.perf_counter() - started, ok)

    def _publish(
        self,
        state: GpuState,
        devices: tuple[GpuDevice, ...],
        *,
        error: str | None,
        keep_as_of: bool = False,
    ) -> GpuSnapshot:
        """Publish the reading when it differs from the last one; return it either way."""
        previous = self._snapshot
        candidate = GpuSnapshot(
            backend=self.backend.name,
            state=state,
            devices=devices,
            as_of=previous.as_of if keep_as_of else datetime.now(UTC),
            error=error,
        )
        if candidate.same_readings(previous):
            return candidate
        if candidate.state is not previous.state or candidate.error != previous.error:
            log.info(
                "gpu state changed",
                backend=self.backend.name,
                previous=previous.state.value,
                state=state.value,
                error=error,
                devices=len(devices),
            )
        self._snapshot = candidate
        for subscriber in self._subscribers:
            subscriber(candidate)
        return candidate

    async def aclose(self) -> None:
        if not self._worker.busy:
            try:
                await self._worker.call(self.backend.close, self.deadline_s)
            except Exception:
                log.warning("gpu backend did not close cleanly", backend=self.backend.name)
        self._worker.close()
