"""A GPU call that never returns (a wedged driver): the watchdog pings stop once it outlasts
the hang limit, so systemd restarts the daemon; shorter hangs pass; and it never holds up a stop.

A FIFO stands in for the simulated GPU file: reading it blocks until the test writes to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import SpawnDaemon
from tests.daemon import NotifyListener
from tests.waiting import eventually

HANG_LIMIT_S = 1.5


class WedgedFile:
    """Swaps a FIFO in for the GPU file; the daemon's next read hangs until `release()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.content = path.read_bytes()
        self._writer: int | None = None

    def wedge(self) -> None:
        fifo = self.path.with_name("wedged.fifo")
        os.mkfifo(fifo)
        os.replace(fifo, self.path)

    def reader_blocked(self) -> bool:
        """Whether the daemon has opened the FIFO and waits for data (the writer is kept)."""
        if self._writer is None:
            try:
                self._writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
        return self._writer is not None

    def release(self) -> None:
        """Put the plain file back for the next reads, then let the hung read return."""
        plain = self.path.with_name("plain.json")
        plain.write_bytes(self.content)
        os.replace(plain, self.path)
        if self._writer is not None:
            os.write(self._writer, self.content)
            os.close(self._writer)
            self._writer = None


@pytest.fixture
def wedged(gpu_file: Callable[..., Path]) -> Iterator[WedgedFile]:
    wedged = WedgedFile(gpu_file())
    yield wedged
    with contextlib.suppress(OSError):
        wedged.release()


def _pings(notify: NotifyListener, within_s: float) -> int:
    """WATCHDOG=1 pings received within `within_s` seconds from now (not those sent before,
    still queued in the socket)."""
    notify.drain()
    seen = len(notify.messages)
    with contextlib.suppress(AssertionError):
        notify.wait_for("never sent", timeout_s=within_s)
    return notify.messages[seen:].count("WATCHDOG=1")


async def test_pings_stop_when_a_gpu_call_outlasts_the_hang_limit(
    spawn_daemon: SpawnDaemon, wedged: WedgedFile, tmp_path: Path
) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = spawn_daemon(
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="600000",  # a ping every 0.3 s
        MODEL_REGISTRY_GPU_SIMULATED_FILE=str(wedged.path),
        MODEL_REGISTRY_GPU_HANG_LIMIT=str(HANG_LIMIT_S),
        MODEL_REGISTRY_POLL_INTERVAL="0.1",
    )
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")

        # A hang shorter than the limit: the pings go on through it.
        wedged.wedge()
        await eventually(wedged.reader_blocked, step_s=0.02)
        hang_started = time.monotonic()
        assert _pings(notify, within_s=HANG_LIMIT_S / 2) >= 1
        assert time.monotonic() - hang_started < HANG_LIMIT_S
        wedged.release()

        # One that outlasts it: no ping from then on, and the log says why, once.
        wedged.wedge()
        await eventually(wedged.reader_blocked, step_s=0.02)
        await eventually(lambda: "a GPU call has not returned" in daemon.log(), timeout_s=5)
        assert _pings(notify, within_s=1.5) == 0
        assert daemon.log().count("a GPU call has not returned") == 1
        wedged.release()
        notify.wait_for("WATCHDOG=1", timeout_s=5)  # it returned: the pings come back
    finally:
        notify.close()


async def test_without_a_watchdog_a_hang_is_said_once_and_stale_readings_served(
    spawn_daemon: SpawnDaemon, wedged: WedgedFile
) -> None:
    daemon = spawn_daemon(
        MODEL_REGISTRY_GPU_SIMULATED_FILE=str(wedged.path),
        MODEL_REGISTRY_GPU_HANG_LIMIT="0.5",
        MODEL_REGISTRY_POLL_INTERVAL="0.1",
    )
    await daemon.wait_ready()
    wedged.wedge()
    await eventually(wedged.reader_blocked, step_s=0.02)
    await eventually(lambda: "a GPU call has not returned" in daemon.log(), timeout_s=10)
    line = next(
        json.loads(x) for x in daemon.log().splitlines() if "a GPU call has not returned" in x
    )
    assert "readings stay stale" in line["event"] and line["limit_s"] == 0.5


async def test_a_stop_with_a_gpu_call_hung_is_quick_clean_and_marks_the_host_offline(
    spawn_daemon: SpawnDaemon, wedged: WedgedFile, database_url: str
) -> None:
    daemon = spawn_daemon(
        MODEL_REGISTRY_GPU_SIMULATED_FILE=str(wedged.path), MODEL_REGISTRY_POLL_INTERVAL="0.1"
    )
    await daemon.wait_ready()
    wedged.wedge()
    await eventually(wedged.reader_blocked, step_s=0.02)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout_s=10) == 0
    assert time.monotonic() - started < 2.0
    lines = [json.loads(x) for x in daemon.log().splitlines()]
    stopping = next(i for i, line in enumerate(lines) if line["event"] == "stopping")
    assert [line["level"] for line in lines[stopping:]] == ["info"] * (len(lines) - stopping)
    connection = await asyncpg.connect(database_url)
    try:
        stopped_at = await connection.fetchval(
            "SELECT stopped_at FROM fleet_hosts WHERE host = $1", "daemon-0"
        )
    finally:
        await connection.close()
    assert stopped_at is not None
