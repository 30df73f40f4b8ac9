"""The fleet: real daemons with their own host ids and simulated GPUs, on one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
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
    SpawnDaemon,
)
from tests.daemon import Daemon
from tests.db import StoppableServer
from tests.waiting import eventually

WORKER, IDLE = 4242, 4343
HEARTBEAT_S = 0.5  # stale after 1.5 s: long enough for a loaded CI machine


def _gpus(path: Path, *free: int, total: int = 81920) -> Path:
    devices = [
        {"uuid": f"GPU-{path.stem}-{i}", "total_mib": total, "free_mib": f}
        for i, f in enumerate(free)
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": devices}))
    tmp.replace(path)
    return path


@pytest.fixture
def hosts(spawn_daemon: SpawnDaemon, tmp_path: Path) -> SpawnDaemon:
    """A daemon per host: its own id, advertised URL and simulated GPUs."""

    def start(host_id: str, *free: int, **env: str) -> Daemon:
        return spawn_daemon(
            MODEL_REGISTRY_HOST_ID=host_id,
            MODEL_REGISTRY_ADVERTISE_URL=f"http://{host_id}.example:8700",
            MODEL_REGISTRY_HEARTBEAT_INTERVAL=str(HEARTBEAT_S),
            MODEL_REGISTRY_GPU_SIMULATED_FILE=str(_gpus(tmp_path / f"{host_id}.json", *free)),
            MODEL_REGISTRY_POLL_INTERVAL="0.1",
            MODEL_REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN,
            **env,
        )

    return start


async def _get(daemon: Daemon, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(daemon.url + path) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


def _states(body: Any) -> dict[str, str]:
    return {h["host"]: h["state"] for h in body["data"]}


def _placements(body: Any) -> list[tuple[str, str, int]]:
    [model] = body["data"]
    return [(h["host"], h["gpu"], h["usable_mib"]) for h in model["hosts"]]


async def test_a_fleet_of_three_publishes_and_places_models_best_fit_first(
    hosts: Callable[..., Daemon], tmp_path: Path
) -> None:
    a = hosts("host-a", 20000)
    b = hosts("host-b", 60000)
    c = hosts("host-c", 16000, 12000)
    for daemon in (a, b, c):
        await daemon.wait_ready()
    body = await eventually(lambda: _get(a, "/fleet"), lambda b: len(b["data"]) == 3)
    assert body["fleet_state"] == "ok"
    assert _states(body) == {"host-a": "ok", "host-b": "ok", "host-c": "ok"}
    host_c = next(h for h in body["data"] if h["host"] == "host-c")
    assert host_c["url"] == "http://host-c.example:8700" and host_c["gpu_state"] == "ok"
    assert [(d["uuid"], d["usable_mib"], d["pending_mib"]) for d in host_c["devices"]] == [
        ("GPU-host-c-0", 16000, 0),
        ("GPU-host-c-1", 12000, 0),
    ]
    assert host_c["reservations"] == []
    assert {d["free_mib"] for d in host_c["devices"]} == {16000, 12000}

    placed = await _get(b, "/fleet/models?name=large-v3")
    model = placed["data"][0]
    assert (model["active"], model["hosts_total"], model["reason"]) == (True, 3, None)
    # Best fit first: the least usable memory that still holds 10,000 MiB.
    assert _placements(placed) == [
        ("host-c", "GPU-host-c-1", 12000),
        ("host-a", "GPU-host-a-0", 20000),
        ("host-b", "GPU-host-b-0", 60000),
    ]
    assert model["hosts"][0]["headroom_mib"] == 2000
    assert model["hosts"][0]["url"] == "http://host-c.example:8700"
    assert placed["pagination"] == {
        "total_items": 1,
        "total_pages": 1,
        "current_page": 1,
        "per_page": 100,
    }

    async with aiohttp.ClientSession() as http:
        new = {"name": "llm-50g", "vram": 50000}
        assert (await http.post(a.url + "/models", json=new, headers=AS_ADMIN)).status == 201
    big = await eventually(
        lambda: _get(c, "/fleet/models?name=llm-50g"), lambda b: len(b["data"]) == 1
    )
    assert _placements(big) == [("host-b", "GPU-host-b-0", 60000)]
    only_one = await _get(c, "/fleet/models?hosts_limit=1&active=true")
    assert only_one["pagination"]["total_items"] == 6
    assert all(len(m["hosts"]) == 1 for m in only_one["data"])

    # A change on one host shows on another within a second: GPU memory and reservations.
    _gpus(tmp_path / "host-b.json", 40000)
    body = await eventually(
        lambda: _get(a, "/fleet/models?name=llm-50g"),
        lambda b: b["data"][0]["hosts_total"] == 0,
        timeout_s=1.5,
    )
    assert body["data"][0]["active"] is False
    assert body["data"][0]["reason"] == "insufficient_vram"
    async with aiohttp.ClientSession() as http:
        reserve = {"vram_mib": 5000, "holder": "job-1", "gpu": "GPU-host-c-1"}
        answer = await http.post(c.url + "/reservations", json=reserve, headers=AS_ADMIN)
        assert answer.status == 201
    # 7,000 MiB left on c's smaller device: c's best fit moves to its bigger one.
    await eventually(
        lambda: _get(a, "/fleet/models?name=large-v3"),
        lambda b: _placements(b)[0] == ("host-c", "GPU-host-c-0", 16000),
        timeout_s=1.5,
    )
    fleet = await _get(a, "/fleet")
    host_c = next(h for h in fleet["data"] if h["host"] == "host-c")
    assert (host_c["reservations_total"], host_c["pending_mib"]) == (1, 5000)
    assert host_c["devices"][1]["pending_mib"] == 5000
    # The list of the newest reservations follows within its second.
    fleet = await eventually(
        lambda: _get(a, "/fleet"),
        lambda f: (
            [[r["holder"] for r in h["reservations"]] for h in f["data"] if h["host"] == "host-c"]
            == [["job-1"]]
        ),
        timeout_s=2.5,
    )

    # SIGKILL: stale within three heartbeats; SIGTERM: offline at once. Neither is a candidate.
    c.signal(signal.SIGKILL)
    b.signal(signal.SIGTERM)
    body = await eventually(
        lambda: _get(a, "/fleet"),
        lambda b: _states(b) == {"host-a": "ok", "host-b": "offline", "host-c": "stale"},
        timeout_s=3 * HEARTBEAT_S + 1.5,
    )
    assert await _get(a, "/fleet?state=stale") == {
        "data": [h for h in body["data"] if h["host"] == "host-c"],
        "fleet_state": "ok",
    }
    placed = await _get(a, "/fleet/models?name=large-v3")
    assert _placements(placed) == [("host-a", "GPU-host-a-0", 20000)]


async def test_a_second_daemon_with_the_same_host_id_is_refused(
    hosts: Callable[..., Daemon],
) -> None:
    first = hosts("twin", 20000)
    await first.wait_ready()
    second = hosts("twin", 20000)
    assert await asyncio.to_thread(second.wait_exit, 30) == 1
    log = second.log()
    assert "another model-registry daemon with host id 'twin'" in log
    assert "Traceback" not in log
    # One line says why; the tasks stopped on the way out are not "died".
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "refusing to start" in errors[0], errors
    # A killed daemon does not block its successor.
    first.signal(signal.SIGKILL)
    first.wait_exit()
    third = hosts("twin", 20000)
    await third.wait_ready()
    assert "listening on loopback only while sharing a database" in third.log()


async def test_the_fleet_answers_from_memory_while_the_database_is_down(
    start_app: AppClient, own_server: StoppableServer
) -> None:
    client = await start_app(database_url=own_server.start(), heartbeat_interval=HEARTBEAT_S)
    body = await (await client.get("/fleet")).json()
    assert [h["host"] for h in body["data"]] == ["test-host-0"] and body["fleet_state"] == "ok"
    before = await (await client.get("/fleet/models?name=tiny")).json()
    assert before["data"][0]["hosts_total"] == 1

    await asyncio.to_thread(own_server.stop)
    # Once the last reading is too old to serve, the answer is the last state, marked stale.
    body = await eventually(lambda: _json(client, "/fleet"), lambda b: b["fleet_state"] == "stale")
    assert [h["host"] for h in body["data"]] == ["test-host-0"]
    models = await eventually(
        lambda: _json(client, "/fleet/models?name=tiny"), lambda b: b["fleet_state"] == "stale"
    )
    assert models["data"][0]["hosts_total"] == 1

    await asyncio.to_thread(own_server.start)
    await eventually(
        lambda: _json(client, "/fleet"), lambda b: b["fleet_state"] == "ok", timeout_s=10
    )


async def _json(client: Any, path: str) -> Any:
    return await (await client.get(path)).json()


@pytest.mark.parametrize(
    "path",
    [
        "/fleet?state=gone",
        "/fleet/models?hosts_limit=0",
        "/fleet/models?limit=0",
        "/fleet/models?active=maybe",
    ],
)
async def test_bad_fleet_queries_are_422(start_app: AppClient, path: str) -> None:
    client = await start_app()
    answer = await client.get(path)
    assert answer.status == 422
    assert (await answer.json())["detail"][0]["loc"][0] == "query"


async def test_a_skip_beyond_any_size_is_an_empty_page_as_in_models(start_app: AppClient) -> None:
    client = await start_app()
    huge = "1470478756490654181232201433088"
    for path in ("/models", "/fleet/models"):
        answer = await client.get(f"{path}?skip={huge}")
        assert answer.status == 200, await answer.text()
        body = await answer.json()
        assert body["data"] == [] and body["pagination"]["total_items"] == 5


async def test_the_answering_daemon_shows_its_own_binds_and_bookings_at_once(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    """Its own row comes from memory, not from the fleet table as last read (which is cached
    and written behind): a scheduler that just bound here sees its load as warm, and the room
    an idle instance just adopted here offers."""
    gpus({WORKER: 3000, IDLE: 60000})
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, idle_after_s=0, min_residency_s=0)
    await client.app[keys.POLLER].poll_and_wait(5)
    reader = client.app[keys.FLEET]
    await eventually(lambda: reader.hosts(), lambda h: len(h.hosts) == 1)
    await reader.placements()
    for cached in (reader._hosts, reader._placements):  # hold the last read for the test
        cached.ttl_s = cached.max_age_s = 3600
    bound = await client.post(
        "/instances", json={"model": "tiny", "gpu": ONE_GPU, "pid": WORKER}, headers=AS_SCHEDULER
    )
    assert bound.status == 201
    reserved = await client.post("/reservations", json={"vram_mib": 15000}, headers=AS_SCHEDULER)
    assert reserved.status == 201
    idle = {"model": "medium", "gpu": ONE_GPU, "pid": IDLE}
    assert (await client.post("/instances", json=idle, headers=AS_SCHEDULER)).status == 201
    [large] = (await (await client.get("/fleet/models?name=large-v3")).json())["data"]
    assert [(r["gpu"], r["unload_mib"]) for r in large["room"]] == [(ONE_GPU, 60000)]
    [tiny] = (await (await client.get("/fleet/models?name=tiny")).json())["data"]
    assert [(w["gpu"], w["instances"]) for w in tiny["warm"]] == [(ONE_GPU, 1)]
    [medium] = (await (await client.get("/fleet/models?name=medium")).json())["data"]
    assert medium["hosts"][0]["usable_mib"] == ONE_GPU_TOTAL_MIB - 63000 - 15000
    [row] = (await (await client.get("/fleet")).json())["data"]
    assert (row["reservations_total"], row["pending_mib"]) == (1, 15000)
    assert row["devices"][0]["usable_mib"] == ONE_GPU_TOTAL_MIB - 63000 - 15000


def test_the_rows_newest_reservations_are_encoded_once_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Written up to ten times a second, the row encodes only the reservations that changed."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from gpu import GpuSnapshot, GpuState
    from registry.capacity import Margins
    from registry.fleet.newest import FLEET_ROW_RESERVATIONS, NewestReservations
    from registry.reservation import Reservation
    from registry.view import CatalogView

    start = datetime(2026, 12, 1, tzinfo=UTC)
    view = CatalogView(GpuSnapshot(backend="none", state=GpuState.DISABLED), Margins())
    view.replace_catalog([])
    made = [
        Reservation(f"r{i}", 10 + i, "GPU-0", 0, start + timedelta(seconds=i), start)
        for i in range(150)
    ]
    view.book_reservations(made)
    encoded: list[str] = []
    to_api = Reservation.to_api

    def counted(self: Reservation, *args: Any, **kwargs: Any) -> dict[str, Any]:
        encoded.append(self.id)
        return to_api(self, *args, **kwargs)

    monkeypatch.setattr(Reservation, "to_api", counted)
    newest = NewestReservations(view)

    def expected() -> str:
        listed = view.bookings.newest(FLEET_ROW_RESERVATIONS)
        return json.dumps([to_api(r, view.capacity.pending_of(r)) for r in listed])

    def row(encodes: int) -> tuple[str, int, int]:
        encoded.clear()
        answer = newest()
        assert len(encoded) == encodes, encoded
        assert answer[0] == expected()
        return answer

    assert row(FLEET_ROW_RESERVATIONS)[1:] == (150, sum(r.vram_mib for r in made))
    row(0)  # nothing changed: nothing encoded
    view.book_reservations([Reservation("new", 5, "GPU-0", 0, start, start)])
    assert json.loads(row(1)[0])[0]["id"] == "new"
    view.book_reservations([], ended=["r149"])  # r49 comes into the hundred
    row(1)
    view.book_reservations([replace(made[100], expires_at=start + timedelta(hours=1))])
    row(1)  # renewed: its expiry changed


async def test_the_rows_list_goes_at_most_once_a_second_and_its_counts_with_every_write(
    start_app: AppClient, database_url: str
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    publisher = client.app[keys.FLEET_OWN].own.__self__  # type: ignore[attr-defined]
    writes, lists = publisher.writes, publisher.list_writes
    loop = asyncio.get_running_loop()
    began = loop.time()
    made = 0
    while loop.time() - began < 0.6:  # a burst over several 100 ms writes
        body = {"vram_mib": 1, "holder": f"burst-{made}"}
        answer = await client.post("/reservations", json=body, headers=AS_SCHEDULER)
        assert answer.status == 201
        made += 1
    connection = await asyncpg.connect(database_url)
    try:

        async def row() -> Any:
            return await connection.fetchrow(
                "SELECT reservations_open, reservations->0->>'holder' AS newest"
                " FROM fleet_hosts WHERE host = $1",
                "test-host-0",
            )

        # Everything shows in the end, the list within its second.
        await eventually(
            row,
            lambda r: (r["reservations_open"], r["newest"]) == (made, f"burst-{made - 1}"),
            timeout_s=3,
        )
    finally:
        await connection.close()
    assert publisher.writes - writes >= 4  # the counts went with each write
    assert publisher.list_writes - lists <= 2  # the list: once in the burst's second, once after
