"""Looking after the embedded PostgreSQL while the daemon runs, as a service manager would.

When its postmaster exits (killed, out of memory, crashed) the server is started again: the
first try at once, then after a backoff that doubles up to 30 s, reset once the server has run
for 60 s. The postmaster is not this process's child (pg_ctl starts it detached), so its exit
is seen through a pidfd, at once (its pid is polled where pidfds are not available); it is
reaped here when it is our child after all (the daemon as a container's PID 1). Meanwhile
/readyz says "embedded database restarting", the catalog is served from memory, and the pool,
the LISTEN connections and the fleet publisher reconnect by themselves once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.embedded import EmbeddedDatabaseError, EmbeddedPostgres
from registry.logs import get_logger

log = get_logger("registry.embedded")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_RESET_S = 60.0
_POLL_S = 0.2  # checking the pid where there is no pidfd
RESTARTING = "embedded database restarting"


class EmbeddedSupervisor:
    def __init__(self, server: EmbeddedPostgres) -> None:
        self._server = server
        self.restarts = 0
        self.restarting = False
        self._backoff_s = 0.0

    @property
    def problem(self) -> str | None:
        """What /readyz says while the server is being brought back."""
        return RESTARTING if self.restarting else None

    async def run(self) -> None:
        """Watch the postmaster and start it again whenever it exits, until cancelled."""
        while True:
            pid = self._server.postmaster_pid()
            up_since = time.monotonic()
            if pid is not None:
                await exited(pid)
            if time.monotonic() - up_since >= HEALTHY_RESET_S:
                self._backoff_s = 0.0
            await self._bring_back(pid)

    async def _bring_back(self, pid: int | None) -> None:
        self.restarting = True
        down_at = time.monotonic()
        log.error("the embedded postgresql exited: starting it again", pid=pid)
        attempts = 0
        while True:
            await asyncio.sleep(self._backoff_s)
            self._backoff_s = min(max(2 * self._backoff_s, FIRST_BACKOFF_S), MAX_BACKOFF_S)
            attempts += 1
            try:
                await asyncio.to_thread(self._server.restart_blocking, pid)
            except (EmbeddedDatabaseError, OSError) as exc:
                log.debug("the embedded postgresql did not start yet", error=str(exc))
                continue
            break
        self.restarts += 1
        self.restarting = False
        log.info(
            "the embedded postgresql is back",
            pid=self._server.postmaster_pid(),
            attempts=attempts,
            down_s=round(time.monotonic() - down_at, 3),
        )


async def exited(pid: int) -> None:
    """Return once process `pid` has exited (reaped, if it is our child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _reap(pid)
        return
    except OSError:  # no pidfds here (an old kernel, a filter): look every _POLL_S
        while _alive(pid):  # noqa: ASYNC110 (nothing to wait on but the clock)
            await asyncio.sleep(_POLL_S)
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    _reap(pid)


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class EmbeddedStats(Collector):
    def __init__(self, supervisor: EmbeddedSupervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "model_registry_embedded_postgres_restarts",
            "Times the embedded PostgreSQL was started again after its postmaster exited.",
            self._supervisor.restarts,
        )
