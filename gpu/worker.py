"""One dedicated thread for blocking driver calls, awaited with a deadline.

A call that outlives its deadline keeps the thread; until it returns, further calls are refused
rather than queued behind it, so a hung driver never builds a backlog or blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


class WorkerBusy(Exception):
    """The previous call has not returned yet."""


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class DeadlineWorker:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._in_flight: asyncio.Future[Any] | None = None
        self._in_flight_since = 0.0  # monotonic
        # A daemon thread: a call stuck in the driver must not hold the process at exit.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._in_flight is not None and not self._in_flight.done()

    def busy_for_s(self) -> float:
        """How long the call in flight has been running; 0 when none is."""
        return time.monotonic() - self._in_flight_since if self.busy else 0.0

    async def call(self, fn: Callable[[], T], deadline_s: float) -> T:
        """Run `fn` in the worker thread; raise TimeoutError after `deadline_s` seconds."""
        if self.busy:
            raise WorkerBusy("the previous GPU call has not returned")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # A call that outlives its deadline may still fail later, with nobody awaiting it.
        future.add_done_callback(_consume_outcome)
        self._in_flight = future
        self._in_flight_since = time.monotonic()
        self._jobs.put((fn, future, loop))
        async with asyncio.timeout(deadline_s):
            return await asyncio.shield(future)

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future, loop = job
            try:
                result, error = fn(), None
            except BaseException as exc:
                result, error = None, exc
            # RuntimeError: the loop closed while the call was stuck.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)
