"""The poller over the NVML backend: deadlines, staleness, backoff and recovery, over HTTP."""

from __future__ import annotations

import time
from typing import Any

from gpu import GpuPoller, GpuState
from gpu.nvml import NvmlBackend
from registry import keys
from tests.conftest import AppClient
from tests.fake_nvml import GIB, FakeGpu, FakeNvml
from tests.waiting import eventually


async def _listing(client: Any) -> dict[str, Any]:
    response = await client.get("/models")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_a_hung_driver_call_goes_stale_without_blocking_the_loop(
    start_app: AppClient,
) -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    client = await start_app(
        backend=NvmlBackend(fake), gpu_backend="nvml", poll_interval=0.05, gpu_call_timeout=0.1
    )
    poller = client.app[keys.POLLER]
    assert (await _listing(client))["capacity"]["state"] == "ok"

    fake.hang.set()
    try:
        calls_before = fake.calls_started
        poller.poll_now()
        stale = await eventually(
            lambda: _listing(client), lambda b: b["capacity"]["state"] == "stale", timeout_s=3
        )
        assert all(m["fits"] is None and m["reason"] == "gpu_state_unknown" for m in stale["data"])
        # The event loop kept answering while the driver call hung...
        started = time.perf_counter()
        assert (await client.get("/healthz")).status == 200
        assert time.perf_counter() - started < 0.5
        gpus = await (await client.get("/gpus")).json()
        assert gpus["state"] == "stale"
        assert "did not return" in gpus["last_error"] or "has not returned" in gpus["last_error"]
        # ...and no second call was queued behind the stuck one.
        assert fake.calls_started == calls_before + 1
    finally:
        fake.hang.clear()
        fake.release.set()
    await eventually(lambda: _listing(client), lambda b: b["capacity"]["state"] == "ok")


async def test_lost_gpu_is_reported_in_gpus(start_app: AppClient) -> None:
    gpus = [FakeGpu("GPU-0", free=50 * GIB), FakeGpu("GPU-1", free=120 * GIB)]
    fake = FakeNvml(gpus)
    client = await start_app(backend=NvmlBackend(fake), gpu_backend="nvml")
    gpus[1].lost = True
    client.app[keys.POLLER].poll_now()
    body = await eventually(
        lambda: _gpus(client), lambda b: any(not d["healthy"] for d in b["devices"])
    )
    lost = next(d for d in body["devices"] if d["uuid"] == "GPU-1")
    assert "GpuIsLost" in lost["error"]
    assert lost["usable_mib"] is None
    assert body["state"] == "ok"


async def _gpus(client: Any) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/gpus")).json()
    return body


async def test_poller_publishes_only_on_change() -> None:
    fake = FakeNvml([FakeGpu("GPU-0", free=100 * GIB)])
    poller = GpuPoller(NvmlBackend(fake), interval_s=1.0)
    seen: list[Any] = []
    poller.subscribe(seen.append)
    await poller.poll_once()
    await poller.poll_once()
    assert len(seen) == 1 and seen[0].state is GpuState.OK
    fake.gpus[0].free = 90 * GIB
    await poller.poll_once()
    assert len(seen) == 2 and seen[1].devices[0].free_bytes == 90 * GIB
    await poller.aclose()


async def test_init_failure_backs_off_then_recovers() -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    fake.init_error = fake.NVMLError_DriverNotLoaded()
    poller = GpuPoller(NvmlBackend(fake), interval_s=0.5)
    snapshot = await poller.poll_once()
    assert snapshot.state is GpuState.UNAVAILABLE
    assert snapshot.error is not None and "Driver Not Loaded" in snapshot.error
    await poller.poll_once()  # within the backoff: no new attempt
    assert fake.init_calls == 1
    fake.init_error = None
    poller.poll_now()  # skips the backoff
    assert (await poller.poll_once()).state is GpuState.OK
    assert fake.init_calls == 2
    await poller.aclose()


async def test_backoff_doubles_up_to_a_minute() -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    fake.init_error = fake.NVMLError_LibraryNotFound()
    poller = GpuPoller(NvmlBackend(fake), interval_s=1.0)
    delays = []
    for _ in range(9):
        poller.poll_now()
        await poller.poll_once()
        delays.append(round(poller._next_attempt - time.monotonic()))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    await poller.aclose()


async def test_a_poll_asked_for_during_a_poll_is_not_lost() -> None:
    import asyncio

    fake = FakeNvml([FakeGpu("GPU-0", free=100 * GIB)])
    poller = GpuPoller(NvmlBackend(fake), interval_s=60.0, deadline_s=5.0)
    fake.hang.set()
    task = asyncio.create_task(poller.run())
    try:
        await eventually(lambda: fake.calls_started, lambda n: n == 1)
        poller.poll_now()  # while the first read is still in the driver
        fake.hang.clear()
        fake.release.set()
        # A second read follows at once, not an interval (a minute) later.
        await eventually(lambda: fake.calls_started, lambda n: n == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
