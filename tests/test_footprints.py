"""Footprints learned from real loads, through the real app on the simulated backend (and the
fake pynvml): samples from instances, the observed size in /models, admission booking it, the
policies, opting out, sharing between daemons, and what gives no sample."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu import MIB
from gpu.nvml import NvmlBackend
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
from tests.db import StoppableServer, fetch
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.scrape import scrape
from tests.waiting import eventually

GPU = ONE_GPU
TOTAL = ONE_GPU_TOTAL_MIB


async def _json(response: Any) -> Any:
    return json.loads(await response.read())


async def _model(client: Any, name: str) -> dict[str, Any]:
    body = await _json(await client.get(f"/models?name={name}"))
    found: dict[str, Any] = body["data"][0]
    return found


async def _poll(client: Any) -> None:
    await client.app[keys.POLLER].poll_and_wait(5)


async def _load_and_exit(
    client: Any, gpus: Callable[..., Path], model: str, pid: int, used: int | None
) -> None:
    """A worker reserves `model`, starts, loads it (bound to the reservation), reports the
    unload and exits: one load watched to its end, one sample, what it took."""
    gpus()
    await _poll(client)
    reserved = await client.post("/reservations", json={"model": model}, headers=AS_SCHEDULER)
    assert reserved.status == 201, await reserved.text()
    gpus({pid: used})
    await _poll(client)
    bound = await client.post(
        "/instances",
        json={"reservation": (await _json(reserved))["id"], "pid": pid},
        headers=AS_SCHEDULER,
    )
    assert bound.status == 201, await bound.text()
    instance = await _json(bound)
    unloaded = await client.delete(f"/instances/{instance['id']}", headers=AS_SCHEDULER)
    assert unloaded.status == 204
    gpus()
    await _poll(client)
    assert (await _json(await client.get("/instances")))["data"] == []


async def _learn(client: Any, gpus: Callable[..., Path], model: str, used: int, loads: int = 3):  # type: ignore[no-untyped-def]
    for pid in range(5000, 5000 + loads):
        await _load_and_exit(client, gpus, model, pid, used)


@pytest.fixture
async def client(start_app: AppClient, gpus: Callable[..., Path]) -> Any:
    return await start_app(
        admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN, poll_interval=60
    )


async def test_learned_sizes_move_a_model_to_insufficient_vram_and_reservations_book_them(
    client: Any, gpus: Callable[..., Path]
) -> None:
    before = await _model(client, "medium")
    assert (before["vram_observed"], before["vram_effective"], before["learn"]) == (
        None,
        2500,
        True,
    )
    await _learn(client, gpus, "medium", 6000, loads=2)
    # Two samples, three needed: not observed yet.
    assert (await _model(client, "medium"))["vram_observed"] is None
    await _learn(client, gpus, "medium", 6000, loads=1)
    medium = await eventually(lambda: _model(client, "medium"), lambda m: m["vram_observed"])
    assert (medium["vram_observed"], medium["vram_effective"]) == (6000, 6000)

    # 5,000 MiB usable: the declared 2,500 would fit, what loads really take does not.
    gpus(free=5000)
    await _poll(client)
    medium = await _model(client, "medium")
    assert (medium["active"], medium["reason"]) == (False, "insufficient_vram")
    assert medium["headroom_mib"] == 5000 - 6000
    refused = await client.post("/reservations", json={"model": "medium"}, headers=AS_SCHEDULER)
    assert refused.status == 409
    gpus()
    await _poll(client)
    granted = await client.post("/reservations", json={"model": "medium"}, headers=AS_SCHEDULER)
    assert (await _json(granted))["vram_mib"] == 6000

    footprint = await _json(await client.get(f"/models/{medium['id']}/footprint"))
    assert footprint["declared_mib"] == 2500 and footprint["effective_mib"] == 6000
    assert footprint["source"] == "max"
    [observed] = footprint["observed"]
    assert (observed["gpu_name"], observed["samples"], observed["peak_mib"]) == (
        "Simulated GPU",
        3,
        6000,
    )
    assert observed["p95_mib"] == 6000
    # The serving setup changed: the samples go, the declared size is back.
    assert (await client.delete(f"/models/{medium['id']}/footprint")).status == 401
    gone = await client.delete(f"/models/{medium['id']}/footprint", headers=AS_ADMIN)
    assert gone.status == 204
    medium = await _model(client, "medium")
    assert (medium["vram_observed"], medium["vram_effective"]) == (None, 2500)


async def test_the_observed_policy_books_less_than_declared_and_max_never_does(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    observed = await start_app(
        admin_token=ADMIN_TOKEN,
        scheduler_token=SCHEDULER_TOKEN,
        poll_interval=60,
        vram_source="observed",
    )
    await _learn(observed, gpus, "large-v3", 7000)
    large = await eventually(lambda: _model(observed, "large-v3"), lambda m: m["vram_observed"])
    assert (large["vram"], large["vram_observed"], large["vram_effective"]) == (10000, 7000, 7000)
    booked = await observed.post("/reservations", json={"model": "large-v3"}, headers=AS_SCHEDULER)
    assert (await _json(booked))["vram_mib"] == 7000
    # Another daemon on the same samples with the default policy: the declared size is a floor.
    default = await start_app(poll_interval=60)
    large = await eventually(lambda: _model(default, "large-v3"), lambda m: m["vram_observed"])
    assert (large["vram_observed"], large["vram_effective"]) == (7000, 10000)
    # Asked for the fleet, a daemon books as each host would, by that host's own policy.
    hosts = {
        observed.app[keys.SETTINGS].current.host_id: 7000,
        default.app[keys.SETTINGS].current.host_id: 10000,
    }

    async def fleet_large() -> dict[str, int]:
        body = await _json(await default.get("/fleet/models?name=large-v3"))
        return {h["host"]: h["usable_mib"] - h["headroom_mib"] for h in body["data"][0]["hosts"]}

    assert await eventually(fleet_large, lambda found: found == hosts) == hosts


async def test_a_model_that_opts_out_teaches_nothing_and_books_what_it_declares(
    client: Any, gpus: Callable[..., Path], database_url: str
) -> None:
    tiny = await _model(client, "tiny")
    patched = await client.patch(f"/models/{tiny['id']}", json={"learn": False}, headers=AS_ADMIN)
    assert patched.status == 200 and (await _json(patched))["learn"] is False
    await _learn(client, gpus, "tiny", 40000)
    await _control_sample(client, gpus, database_url)
    tiny = await _model(client, "tiny")
    assert (tiny["vram_observed"], tiny["vram_effective"]) == (None, 625)
    # The switch travels with the catalog file too.
    document = {"models": [{"name": "tiny", "vram": 625, "learn": True}]}
    applied = await _json(await client.put("/models", json=document, headers=AS_ADMIN))
    assert applied["updated"] == ["tiny"]
    assert (await _model(client, "tiny"))["learn"] is True


async def _control_sample(client: Any, gpus: Callable[..., Path], database_url: str) -> None:
    """A load that does teach, then wait until it is written: every sample given before it has
    been written too, so what is not in the table was never given."""
    await _load_and_exit(client, gpus, "large_v1", 9999, 5100)
    rows = await eventually(
        lambda: fetch(database_url, "SELECT model, peak_mib FROM footprint_samples"), bool
    )
    assert [(r["model"], r["peak_mib"]) for r in rows] == [("large_v1", 5100)]


async def test_samples_are_shared_by_the_daemons_of_one_database(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    here = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60)
    there = await start_app(poll_interval=60)
    await eventually(lambda: there.app[keys.FOOTPRINTS].listening.is_set())
    await _learn(here, gpus, "medium", 3000)
    medium = await eventually(
        lambda: _model(there, "medium"), lambda m: m["vram_observed"] == 3000, timeout_s=2
    )
    assert medium["vram_effective"] == 3000


async def test_a_process_that_holds_a_reservation_or_unreported_memory_gives_no_sample(
    client: Any, gpus: Callable[..., Path], start_app: AppClient, database_url: str
) -> None:
    # The worker still named by an open reservation: what it holds is not one model's.
    gpus({7001: 4000})
    await _poll(client)
    held = await client.post(
        "/reservations", json={"vram_mib": 1000, "pid": 7001}, headers=AS_SCHEDULER
    )
    assert held.status == 201
    adopted = await client.post(
        "/instances", json={"model": "medium", "gpu": GPU, "pid": 7001}, headers=AS_SCHEDULER
    )
    assert adopted.status == 201
    gpus()
    await _poll(client)
    await _poll(client)
    # A driver that reports no per-process memory (the fake pynvml's None).
    fake = FakeNvml([FakeGpu(uuid="GPU-nvml-0", compute_processes=[(7002, None)])])
    nvml = await start_app(
        backend=NvmlBackend(fake), gpu_backend="nvml", scheduler_token=SCHEDULER_TOKEN
    )
    adopted = await nvml.post(
        "/instances",
        json={"model": "medium", "gpu": "GPU-nvml-0", "pid": 7002},
        headers=AS_SCHEDULER,
    )
    assert adopted.status == 201, await adopted.text()
    instance = await _json(adopted)
    assert instance["used_mib"] is None
    gone = await nvml.delete(f"/instances/{instance['id']}", headers=AS_SCHEDULER)
    assert gone.status == 204
    assert nvml.app[keys.FOOTPRINTS].waiting == 0  # nothing given: nothing waits to be written
    await _control_sample(client, gpus, database_url)


async def test_a_finished_load_does_not_shrink_a_sibling_reservation(
    client: Any, gpus: Callable[..., Path]
) -> None:
    worker = 7100
    gpus({worker: 500})
    await _poll(client)

    async def reserve() -> dict[str, Any]:
        answer = await client.post(
            "/reservations", json={"vram_mib": 4000, "pid": worker}, headers=AS_SCHEDULER
        )
        reservation: dict[str, Any] = await _json(answer)
        return reservation

    first, second = await reserve(), await reserve()
    gpus({worker: 4500})  # the first load is done: 4,000 MiB more
    await _poll(client)
    assert (await client.delete(f"/reservations/{first['id']}", headers=AS_SCHEDULER)).status == 204
    # The second has loaded nothing yet: it still holds all it booked.
    sibling = await _json(await client.get(f"/reservations/{second['id']}"))
    assert sibling["pending_mib"] == 4000


async def test_operators_see_the_drift_in_metrics_a_log_line_and_an_export(
    client: Any,
    gpus: Callable[..., Path],
    json_lines: LogLines,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    database_url: str,
) -> None:
    from registry.cli import main

    samples = await scrape(client)
    assert not [key for key in samples if key[0] == "model_registry_model_vram_bytes"]
    await _learn(client, gpus, "medium", 6000)
    await eventually(lambda: _model(client, "medium"), lambda m: m["vram_observed"])
    await _learn(client, gpus, "medium", 6000)  # more loads: still one log line
    samples = await scrape(client)
    labels = {"model": "medium", "gpu_name": "Simulated GPU"}
    vram = {
        dict(key[1])["kind"]: value / MIB
        for key, value in samples.items()
        if key[0] == "model_registry_model_vram_bytes" and labels.items() <= dict(key[1]).items()
    }
    assert vram == {"declared": 2500, "observed": 6000, "effective": 6000}
    drift = [x for x in json_lines() if x["event"] == "a model's loads take more than it declares"]
    assert [(x["model"], x["declared_mib"], x["observed_mib"]) for x in drift] == [
        ("medium", 2500, 6000)
    ]
    monkeypatch.setenv("MODEL_REGISTRY_DATABASE_URL", database_url)
    capsys.readouterr()
    assert (
        await asyncio.to_thread(main, ["models", "export", "--observed", "--format", "json"]) == 0
    )
    exported = {m["name"]: m["vram"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert (exported["medium"], exported["tiny"]) == (6000, 625)
    other_gpu = ["models", "export", "--observed", "--format", "json", "--gpu-name", "H100"]
    assert await asyncio.to_thread(main, other_gpu) == 0
    assert json.loads(capsys.readouterr().out)["models"][1]["vram"] == 2500


async def test_samples_wait_in_memory_while_the_database_is_down(
    start_app: AppClient, gpus: Callable[..., Path], own_server: StoppableServer
) -> None:
    dsn = own_server.start()
    client = await start_app(database_url=dsn, scheduler_token=SCHEDULER_TOKEN, poll_interval=60)
    recorder = client.app[keys.FOOTPRINTS]
    await eventually(lambda: recorder.listening.is_set())
    await asyncio.to_thread(own_server.stop)
    await _learn(client, gpus, "medium", 4000, loads=3)  # instances need no database
    assert recorder.waiting >= 1
    await asyncio.to_thread(own_server.start)
    rows = await eventually(
        lambda: fetch(dsn, "SELECT peak_mib FROM footprint_samples"),
        lambda found: len(found) == 3,
        timeout_s=15,
    )
    assert [r["peak_mib"] for r in rows] == [4000, 4000, 4000]
    medium = await eventually(lambda: _model(client, "medium"), lambda m: m["vram_observed"])
    assert medium["vram_observed"] == 4000
