"""What the daemon learns and books can be trusted: footprints come only from loads it watched
to their end (growth above the process's baseline), adoptions teach only when an admin makes
them, samples are bounded, a size learned far below the declared one is told and floored, and
a bind to a process that already holds memory keeps its booking."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import keys
from tests.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    AS_SCHEDULER,
    ONE_GPU,
    ONE_GPU_TOTAL_MIB,
    SCHEDULER_TOKEN,
    AppClient,
    LogLines,
)
from tests.db import fetch
from tests.waiting import eventually

GPU = ONE_GPU
TOTAL = ONE_GPU_TOTAL_MIB


async def _json(response: Any) -> Any:
    return json.loads(await response.read())


async def _poll(client: Any) -> None:
    await client.app[keys.POLLER].poll_and_wait(5)


async def _samples(database_url: str) -> list[tuple[str, int]]:
    rows = await fetch(database_url, "SELECT model, peak_mib FROM footprint_samples ORDER BY 1, 2")
    return [(r["model"], r["peak_mib"]) for r in rows]


async def _control(client: Any, gpus: Callable[..., Path], database_url: str) -> None:
    """An honest load that teaches, written to the database: every sample given before it has
    been written by then, so what is not in the table was never given."""
    await _reserve_bind_unload(client, gpus, "large_v1", pid=9999, used=5100)
    await eventually(lambda: _samples(database_url), lambda found: ("large_v1", 5100) in found)


async def _reserve_bind_unload(
    client: Any, gpus: Callable[..., Path], model: str, *, pid: int, used: int
) -> dict[str, Any]:
    """A worker reserves `model`, starts, loads `used` MiB, reports the unload and exits."""
    gpus()
    await _poll(client)
    reservation = await _json(
        await client.post("/reservations", json={"model": model}, headers=AS_SCHEDULER)
    )
    gpus({pid: used})
    await _poll(client)
    bound = await client.post(
        "/instances", json={"reservation": reservation["id"], "pid": pid}, headers=AS_SCHEDULER
    )
    assert bound.status == 201, await bound.text()
    instance: dict[str, Any] = await _json(bound)
    gone = await client.delete(f"/instances/{instance['id']}", headers=AS_SCHEDULER)
    assert gone.status == 204
    gpus()
    await _poll(client)
    return instance


async def _model(client: Any, name: str) -> dict[str, Any]:
    found: dict[str, Any] = (await _json(await client.get(f"/models?name={name}")))["data"][0]
    return found


@pytest.fixture
async def client(start_app: AppClient, gpus: Callable[..., Path]) -> Any:
    return await start_app(
        admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN, poll_interval=60
    )


async def test_adopting_and_ending_processes_with_a_scheduler_token_teaches_nothing(
    client: Any, gpus: Callable[..., Path], start_app: AppClient, database_url: str
) -> None:
    # Another host of the same GPU product, trusting what loads take.
    other = await start_app(poll_interval=60, vram_source="observed")
    # Twenty adopt+DELETE pairs of a 300 MiB process as large-v3 ...
    gpus({4100: 300})
    await _poll(client)
    for _ in range(20):
        adopted = await client.post(
            "/instances", json={"model": "large-v3", "gpu": GPU, "pid": 4100}, headers=AS_SCHEDULER
        )
        assert adopted.status == 201, await adopted.text()
        instance = await _json(adopted)
        assert (
            await client.delete(f"/instances/{instance['id']}", headers=AS_SCHEDULER)
        ).status == 204
    # ... and a 75,000 MiB process adopted as tiny, which then exits.
    gpus({4200: 75000})
    await _poll(client)
    adopted = await client.post(
        "/instances", json={"model": "tiny", "gpu": GPU, "pid": 4200}, headers=AS_SCHEDULER
    )
    assert adopted.status == 201
    gpus()
    await _poll(client)
    await _poll(client)
    await _control(client, gpus, database_url)
    assert await _samples(database_url) == [("large_v1", 5100)]
    large, tiny = await _model(other, "large-v3"), await _model(other, "tiny")
    assert (large["vram_observed"], large["vram_effective"]) == (None, 10000)
    assert (tiny["vram_effective"], tiny["active"]) == (625, True)


async def test_an_admin_adoption_teaches_the_process_peak(
    client: Any, gpus: Callable[..., Path], database_url: str
) -> None:
    gpus({4300: 6000})
    await _poll(client)
    adopted = await client.post(
        "/instances", json={"model": "medium", "gpu": GPU, "pid": 4300}, headers=AS_ADMIN
    )
    assert adopted.status == 201
    gpus()
    await _poll(client)
    await _poll(client)  # its process left: ended, and (a load done before) it teaches
    await _control(client, gpus, database_url)
    assert await _samples(database_url) == [("large_v1", 5100), ("medium", 6000)]


async def test_a_worker_that_dies_while_loading_teaches_nothing_one_that_loaded_does(
    client: Any, gpus: Callable[..., Path], database_url: str
) -> None:
    async def load_then_die(pid: int, reached: int) -> None:
        gpus()
        await _poll(client)
        reservation = await _json(
            await client.post("/reservations", json={"model": "large-v3"}, headers=AS_SCHEDULER)
        )
        gpus({pid: 500})
        await _poll(client)
        bound = await client.post(
            "/instances", json={"reservation": reservation["id"], "pid": pid}, headers=AS_SCHEDULER
        )
        assert bound.status == 201
        gpus({pid: reached})
        await _poll(client)
        gpus()  # it crashed
        await _poll(client)
        await _poll(client)
        assert (await _json(await client.get("/instances")))["data"] == []

    await load_then_die(4400, 4000)  # 4,000 of the 10,000 booked: not loaded yet
    await load_then_die(4401, 10500)  # grew by all it booked: the load was done
    await _control(client, gpus, database_url)
    assert await _samples(database_url) == [("large-v3", 10500), ("large_v1", 5100)]


async def test_a_bind_to_a_process_that_already_holds_memory_keeps_its_booking_and_learns_growth(
    client: Any, gpus: Callable[..., Path], database_url: str
) -> None:
    created = await client.post(
        "/models", json={"name": "worker-model", "vram": 5000}, headers=AS_ADMIN
    )
    assert created.status == 201
    # Process 7777 (a multi-model server) already holds 12,000 MiB; 30,000 MiB are free.
    gpus({7777: 12000}, free=30000)
    await _poll(client)

    async def books() -> tuple[int, int]:
        device = (await _json(await client.get("/gpus")))["devices"][0]
        return device["usable_mib"], device["pending_mib"]

    reservation = await _json(
        await client.post(
            "/reservations", json={"model": "worker-model", "pid": 7777}, headers=AS_SCHEDULER
        )
    )
    assert await books() == (25000, 5000)
    bound = await client.post(
        "/instances", json={"reservation": reservation["id"]}, headers=AS_SCHEDULER
    )
    assert bound.status == 201, await bound.text()
    instance = await _json(bound)
    assert (instance["baseline_mib"], instance["pending_mib"]) == (12000, 5000)
    assert await books() == (25000, 5000)  # nothing loaded yet: still booked
    gpus({7777: 15000}, free=27000)  # loading
    await _poll(client)
    assert await books() == (25000, 2000)
    gpus({7777: 17000}, free=25000)  # loaded: its memory is in NVML's used figure now
    await _poll(client)
    assert await books() == (25000, 0)
    assert (await client.delete(f"/instances/{instance['id']}", headers=AS_SCHEDULER)).status == 204
    await _control(client, gpus, database_url)
    # What this load took, not what the process held before it.
    assert ("worker-model", 5000) in await _samples(database_url)


async def test_samples_are_capped_at_the_device_and_a_context_alone_is_no_sample(
    client: Any, gpus: Callable[..., Path], database_url: str
) -> None:
    # A driver that reports more than the device holds (a unified-memory oversubscription).
    await _reserve_bind_unload(client, gpus, "medium", pid=4500, used=TOTAL + 50000)
    await _reserve_bind_unload(client, gpus, "tiny", pid=4501, used=40)
    await _control(client, gpus, database_url)
    assert await _samples(database_url) == [("large_v1", 5100), ("medium", TOTAL)]


async def test_a_size_learned_far_below_the_declared_one_is_told_and_floored(
    start_app: AppClient, gpus: Callable[..., Path], json_lines: LogLines
) -> None:
    trusting = await start_app(
        admin_token=ADMIN_TOKEN,
        scheduler_token=SCHEDULER_TOKEN,
        poll_interval=60,
        vram_source="observed",
        heartbeat_interval=0.5,
    )
    other = await start_app(poll_interval=60, heartbeat_interval=0.5)
    for pid in (4600, 4601, 4602, 4603):
        await _reserve_bind_unload(trusting, gpus, "large-v3", pid=pid, used=3000)
    large = await eventually(
        lambda: _model(trusting, "large-v3"), lambda m: m["vram_observed"] == 3000
    )
    # Never below declared x (1 - 0.5), whatever the samples say.
    assert large["vram_effective"] == 5000
    footprint = await _json(await trusting.get(f"/models/{large['id']}/footprint"))
    assert footprint["floor_mib"] == 5000 and footprint["effective_mib"] == 5000
    assert [p["below_declared"] for p in footprint["observed"]] == [True]
    told = [
        (x["model"], x["observed_mib"], x["effective_mib"])
        for x in json_lines()
        if x["event"] == "a model's loads take much less than it declares"
    ]
    # Said once (both daemons of this test log through one process, which folds repeats).
    assert [t[:2] for t in told] == [("large-v3", 3000)]
    # Another daemon asked for the fleet books as the trusting host would: with its floor.
    host = trusting.app[keys.SETTINGS].current.host_id

    async def booked_there() -> int | None:
        body = await _json(await other.get("/fleet/models?name=large-v3"))
        for found in body["data"][0]["hosts"]:
            if found["host"] == host:
                booked: int = found["usable_mib"] - found["headroom_mib"]
                return booked
        return None

    assert await eventually(booked_there, lambda booked: booked == 5000) == 5000
