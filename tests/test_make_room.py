"""Making room through the real app on the simulated backend: a make_room reservation that does
not fit claims the memory of idle instances (202), holds it while they go, never shares a
victim, never takes a pinned, busy, just-loaded or more important one, is replanned or
withdrawn when an owner takes a victim back (or an admin raises it above the claim) or the
room timeout passes, and survives a
restart; too_large is told apart from insufficient_vram."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import keys
from tests.clock import ManualClock
from tests.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    AS_SCHEDULER,
    ONE_GPU,
    ONE_GPU_TOTAL_MIB,
    SCHEDULER_TOKEN,
    AppClient,
)
from tests.scrape import scrape
from tests.sse import EventReader
from tests.waiting import eventually

GPU = ONE_GPU
TOTAL = ONE_GPU_TOTAL_MIB
IDLE = {101: 25000, 102: 25000, 103: 25000}  # three idle workers fill most of the GPU


async def _json(response: Any) -> Any:
    return json.loads(await response.read())


async def _poll(client: Any) -> None:
    await client.app[keys.POLLER].poll_and_wait(5)


async def _gpu(client: Any) -> dict[str, Any]:
    device: dict[str, Any] = (await _json(await client.get("/gpus")))["devices"][0]
    return device


async def _instance(client: Any, instance_id: str) -> dict[str, Any]:
    found: dict[str, Any] = await _json(await client.get(f"/instances/{instance_id}"))
    return found


class Host:
    """A daemon whose GPU is full of idle workers, and a clock the test moves."""

    def __init__(self, client: Any, clock: ManualClock, gpus: Callable[..., Path]) -> None:
        self.client, self.clock, self.gpus = client, clock, gpus
        self.processes = dict(IDLE)
        self.instances: dict[int, str] = {}  # pid -> instance id

    async def load(self, model: str, pid: int, used: int, **attributes: Any) -> str:
        self.processes[pid] = used
        self.gpus(self.processes)
        await _poll(self.client)
        answer = await self.client.post(
            "/instances",
            json={"model": model, "gpu": GPU, "pid": pid, **attributes},
            headers=AS_SCHEDULER,
        )
        assert answer.status == 201, await answer.text()
        instance_id: str = (await _json(answer))["id"]
        self.instances[pid] = instance_id
        return instance_id

    async def exit(self, pid: int) -> None:
        """The worker unloads and exits: gone from the GPU for two polls."""
        del self.processes[pid]
        self.gpus(self.processes)
        await _poll(self.client)
        await _poll(self.client)

    async def reserve(self, headers: dict[str, str] = AS_SCHEDULER, **body: Any) -> Any:
        return await self.client.post("/reservations", json=body, headers=headers)


@pytest.fixture
async def host(start_app: AppClient, gpus: Callable[..., Path]) -> Host:
    clock = ManualClock()
    client = await start_app(
        admin_token=ADMIN_TOKEN,
        scheduler_token=SCHEDULER_TOKEN,
        poll_interval=60,
        clock=clock,
    )
    created = await client.post("/models", json={"name": "big", "vram": 20000}, headers=AS_ADMIN)
    assert created.status == 201
    made = Host(client, clock, gpus)
    made.processes = {}
    for pid, used in IDLE.items():
        await made.load("medium", pid, used)
    clock.advance(300)  # loaded long enough, idle long enough
    return made


async def test_a_claim_holds_the_freed_memory_and_becomes_an_ordinary_reservation(
    host: Host,
) -> None:
    client = host.client
    assert (await _gpu(client))["usable_mib"] == TOTAL - 75000
    refused = await host.reserve(model="big")
    assert refused.status == 409 and (await _json(refused))["reason"] == "insufficient_vram"
    stream = await client.get("/events")
    events = EventReader(stream)
    assert (await events.next()).event == "snapshot"
    claimed = await host.reserve(model="big", make_room=True)
    assert claimed.status == 202, await claimed.text()
    claim = await _json(claimed)
    assert claimed.headers["Location"] == f"/reservations/{claim['id']}"
    [victim] = claim["awaiting"]["unload"]
    assert claim["awaiting"]["frees_mib"] == 25000 and claim["vram_mib"] == 20000
    assert victim["evicting"]["reservation"] == claim["id"]
    # Booked in full at once: the device shows what is still to be freed as negative.
    device = await _gpu(client)
    assert (device["pending_mib"], device["usable_mib"]) == (20000, TOTAL - 75000 - 20000)
    # The owner hears of it: an instances event with the mark.
    marked = await events.next_named("instances")
    assert [(i["id"], i["evicting"]["reservation"]) for i in marked.data["instances"]] == [
        (victim["id"], claim["id"])
    ]
    # Nobody else is promised that memory: another claim takes other victims, or none.
    second = await _json(await host.reserve(model="big", make_room=True))
    assert {i["id"] for i in second["awaiting"]["unload"]}.isdisjoint({victim["id"]})
    pid = next(p for p, i in host.instances.items() if i == victim["id"])
    await host.exit(pid)
    done = await events.next_named("reservations")
    while not any(r["id"] == claim["id"] for r in done.data["reservations"]):
        done = await events.next_named("reservations")
    [now] = [r for r in done.data["reservations"] if r["id"] == claim["id"]]
    assert now["awaiting"] is None and now["pending_mib"] == 20000
    shown = await _json(await client.get(f"/reservations/{claim['id']}"))
    assert shown["awaiting"] is None
    # Once the second claim's victim has gone too, nothing is promised twice.
    for other in second["awaiting"]["unload"]:
        await host.exit(next(p for p, i in host.instances.items() if i == other["id"]))
    device = await _gpu(client)
    assert device["pending_mib"] == 40000 and device["usable_mib"] >= 0
    assert device["usable_mib"] == device["free_mib"] - 40000
    stream.close()


async def test_pinned_busy_just_loaded_and_more_important_instances_never_go(
    host: Host,
) -> None:
    client = host.client
    # Make every idle worker one that may not go, in each of the ways there are.
    one, two, three = (host.instances[pid] for pid in IDLE)
    for instance_id, change in ((one, {"pinned": True}), (two, {"sessions": 2})):
        answer = await client.patch(f"/instances/{instance_id}", json=change, headers=AS_SCHEDULER)
        assert answer.status == 200, await answer.text()
    raised = await client.patch(f"/instances/{three}", json={"priority": 90}, headers=AS_SCHEDULER)
    assert raised.status == 403  # above 50: an admin's call
    raised = await client.patch(f"/instances/{three}", json={"priority": 90}, headers=AS_ADMIN)
    assert raised.status == 200 and (await _json(raised))["priority"] == 90
    await host.load("tiny", 104, 5000)  # just loaded
    refused = await host.reserve(model="big", make_room=True)
    assert refused.status == 409 and (await _json(refused))["reason"] == "insufficient_vram"
    assert "no idle instances free enough" in (await _json(refused))["detail"]
    # An admin's claim of a higher priority may take the important one.
    claimed = await host.reserve(AS_ADMIN, model="big", make_room=True, priority=95)
    assert claimed.status == 202
    assert [i["id"] for i in (await _json(claimed))["awaiting"]["unload"]] == [three]
    assert (await host.reserve(model="tiny", priority=60)).status == 403


async def test_a_victim_taken_back_is_replaced_or_the_claim_is_withdrawn(host: Host) -> None:
    client = host.client
    claim = await _json(await host.reserve(model="big", make_room=True))
    [first] = claim["awaiting"]["unload"]
    # Its owner gives it work: another idle worker is asked instead.
    taken = await client.patch(
        f"/instances/{first['id']}", json={"sessions": 1}, headers=AS_SCHEDULER
    )
    assert taken.status == 200 and (await _json(taken))["evicting"] is None
    again = await _json(await client.get(f"/reservations/{claim['id']}"))
    [second] = again["awaiting"]["unload"]
    assert second["id"] != first["id"] and second["evicting"]["reservation"] == claim["id"]
    # Pin every other one: nothing is left to make room with, the claim ends, and says why.
    stream = await client.get("/events")
    events = EventReader(stream)
    await events.next()
    for instance_id in host.instances.values():
        if instance_id != first["id"]:
            await client.patch(
                f"/instances/{instance_id}", json={"pinned": True}, headers=AS_SCHEDULER
            )
    assert (await client.get(f"/reservations/{claim['id']}")).status == 404
    ended = await events.next_named("reservations")
    while claim["id"] not in ended.data["ended"]:
        ended = await events.next_named("reservations")
    assert ended.data["reasons"] == {claim["id"]: "room_withdrawn"}
    for instance_id in host.instances.values():
        assert (await _instance(client, instance_id))["evicting"] is None
    assert (await _gpu(client))["pending_mib"] == 0
    stream.close()


async def test_a_victim_raised_above_the_claims_priority_is_replaced(host: Host) -> None:
    client = host.client
    claim = await _json(await host.reserve(model="big", make_room=True))
    [first] = claim["awaiting"]["unload"]
    # Work on it, ended at once, changes nothing: it is still idle enough to go.
    same = await client.patch(f"/instances/{first['id']}", json={"ready": True}, headers=AS_ADMIN)
    assert (await _json(same))["evicting"]["reservation"] == claim["id"]
    raised = await client.patch(
        f"/instances/{first['id']}", json={"priority": 90}, headers=AS_ADMIN
    )
    assert raised.status == 200 and (await _json(raised))["evicting"] is None
    again = await _json(await client.get(f"/reservations/{claim['id']}"))
    [second] = again["awaiting"]["unload"]
    assert second["id"] != first["id"] and second["evicting"]["reservation"] == claim["id"]


async def test_a_claim_whose_room_does_not_come_in_time_is_withdrawn(host: Host) -> None:
    client = host.client
    claim = await _json(await host.reserve(model="big", make_room=True, ttl_s=3600))
    [victim] = claim["awaiting"]["unload"]
    # Renewing the lease does not extend the wait for the room.
    host.clock.advance(100)
    renewed = await client.patch(
        f"/reservations/{claim['id']}", json={"ttl_s": 3600}, headers=AS_SCHEDULER
    )
    assert renewed.status == 200
    host.clock.advance(30)  # 130 s: past the 120 s room timeout
    client.app[keys.BOOK].wake()
    await eventually(lambda: client.get(f"/reservations/{claim['id']}"), lambda r: r.status == 404)
    assert (await _instance(client, victim["id"]))["evicting"] is None


async def test_a_released_claim_frees_its_victims_and_a_dry_run_books_nothing(
    host: Host,
) -> None:
    client = host.client
    tried = await client.post(
        "/reservations?dry_run=true", json={"model": "big", "make_room": True}, headers=AS_SCHEDULER
    )
    assert tried.status == 200
    trial = await _json(tried)
    assert (trial["fits"], trial["gpu"]["uuid"], trial["frees_mib"]) == (False, GPU, 25000)
    [would_go] = trial["unload"]
    assert would_go["evicting"] is None  # nothing was marked
    assert (await _json(await client.get("/reservations")))["data"] == []
    small = await client.post(
        "/reservations?dry_run=true", json={"model": "tiny"}, headers=AS_SCHEDULER
    )
    assert (await _json(small))["fits"] is True and (await _json(small))["unload"] == []
    for hostile in ("maybe", "%00", "1" * 300):  # asked twice: a refused target is not kept
        for _ in range(2):
            refused = await client.post(
                f"/reservations?dry_run={hostile}", json={"model": "tiny"}, headers=AS_SCHEDULER
            )
            assert refused.status == 422 and "dry_run" in await refused.text()
    assert (await _json(await client.get("/reservations")))["data"] == []
    never = await client.post(
        "/reservations?dry_run=true", json={"vram_mib": TOTAL + 1}, headers=AS_SCHEDULER
    )
    assert never.status == 409 and (await _json(never))["reason"] == "too_large"
    claim = await _json(await host.reserve(model="big", make_room=True))
    [victim] = claim["awaiting"]["unload"]
    assert (await client.delete(f"/reservations/{claim['id']}", headers=AS_SCHEDULER)).status == 204
    assert (await _instance(client, victim["id"]))["evicting"] is None
    # A claim whose lease runs out frees its victims too.
    short = await _json(await host.reserve(model="big", make_room=True, ttl_s=30))
    [victim] = short["awaiting"]["unload"]
    host.clock.advance(31)
    client.app[keys.BOOK].wake()
    await eventually(lambda: client.get(f"/reservations/{short['id']}"), lambda r: r.status == 404)
    assert (await _instance(client, victim["id"]))["evicting"] is None
    samples = await scrape(client)
    for outcome, count in (("released", 1), ("expired", 1), ("completed", 0)):
        assert samples[("model_registry_claims_total", (("outcome", outcome),))] == count


async def test_a_model_no_gpu_here_could_hold_is_too_large_at_once(host: Host) -> None:
    client = host.client
    created = await client.post(
        "/models", json={"name": "huge", "vram": TOTAL + 1000}, headers=AS_ADMIN
    )
    assert created.status == 201
    huge = (await _json(await client.get("/models?name=huge")))["data"][0]
    big = (await _json(await client.get("/models?name=big")))["data"][0]
    assert (huge["reason"], big["reason"]) == ("too_large", "insufficient_vram")
    refused = await host.reserve(model="huge", make_room=True)
    assert refused.status == 409 and "Retry-After" not in refused.headers
    assert (await _json(refused))["reason"] == "too_large"


async def test_claims_and_their_marks_survive_a_restart(
    start_app: AppClient, gpus: Callable[..., Path], tmp_path: Path
) -> None:
    clock = ManualClock()
    state = tmp_path / "kept"
    settings = {
        "admin_token": ADMIN_TOKEN,
        "scheduler_token": SCHEDULER_TOKEN,
        "poll_interval": 60,
        "state_dir": state,
        "clock": clock,
    }
    first = await start_app(**settings)
    host = Host(first, clock, gpus)
    host.processes = {}
    for pid, used in IDLE.items():
        await host.load("medium", pid, used)
    clock.advance(300)
    claim = await _json(await host.reserve(vram_mib=20000, make_room=True))
    [victim] = claim["awaiting"]["unload"]
    await first.close()
    again = await start_app(**settings)
    restored = await _json(await again.get(f"/reservations/{claim['id']}"))
    assert [i["id"] for i in restored["awaiting"]["unload"]] == [victim["id"]]
    assert (await _instance(again, victim["id"]))["evicting"]["reservation"] == claim["id"]
    # Once restarted nobody knows what the others did meanwhile: they count as active now,
    # so no new claim can take them yet.
    refused = await again.post(
        "/reservations", json={"vram_mib": 20000, "make_room": True}, headers=AS_SCHEDULER
    )
    assert refused.status == 409


async def test_load_times_are_learned_and_shown(host: Host) -> None:
    client = host.client
    claim = await _json(await host.reserve(model="big", make_room=True))
    [victim] = claim["awaiting"]["unload"]
    await host.exit(next(p for p, i in host.instances.items() if i == victim["id"]))
    host.clock.advance(5)  # the new worker starts once the room is free
    host.processes[200] = 600
    host.gpus(host.processes)
    await _poll(client)
    bound = await client.post(
        "/instances", json={"reservation": claim["id"], "pid": 200}, headers=AS_SCHEDULER
    )
    assert bound.status == 201, await bound.text()
    instance = await _json(bound)
    big = (await _json(await client.get("/models?name=big")))["data"][0]
    assert (big["reload_s"], big["reload_estimated"]) == (19.531, True)  # 20,000 MiB at 1 s/GiB
    host.clock.advance(42)
    ready = await client.patch(
        f"/instances/{instance['id']}", json={"ready": True}, headers=AS_SCHEDULER
    )
    assert (await _json(ready))["ready"] is True

    async def footprint_now() -> dict[str, Any]:
        found: dict[str, Any] = await _json(await client.get(f"/models/{big['id']}/footprint"))
        return found

    footprint = await eventually(footprint_now, lambda f: not f["reload_estimated"])
    assert footprint["reload_s"] == 47.0  # from the room being free to ready: 5 + 42 s
    big = (await _json(await client.get("/models?name=big")))["data"][0]
    assert (big["reload_s"], big["reload_estimated"]) == (47.0, False)
    samples = await scrape(client)
    assert samples[("model_registry_claims_total", (("outcome", "completed"),))] == 1
    assert samples[("model_registry_claims_total", (("outcome", "withdrawn"),))] == 0
    assert samples[("model_registry_claim_victims_evicted_total", ())] == 1
    reload_labels = (("gpu_name", "Simulated GPU"), ("model", "big"))
    assert samples[("model_registry_model_reload_seconds", reload_labels)] == 47.0
    assert samples[("model_registry_instance_idle_seconds", (("model", "medium"),))] >= 300


async def test_the_fleet_says_where_a_model_would_fit_after_unloading(
    host: Host, start_app: AppClient
) -> None:
    asking = await start_app(heartbeat_interval=0.5)
    here = host.client.app[keys.SETTINGS].current

    async def big_in_fleet() -> dict[str, Any]:
        body = await _json(await asking.get("/fleet/models?name=big"))
        found: dict[str, Any] = body["data"][0]
        return found

    host.clock.advance(1)  # a change: the row is published again, with what may go now
    await _poll(host.client)
    big = await eventually(big_in_fleet, lambda m: m["room"], timeout_s=10)
    assert (big["hosts_total"], big["hosts"]) == (0, [])  # nowhere now ...
    assert big["room"] == [  # ... but here, once one idle medium (2,500 MiB: ~2.4 s) goes
        {
            "host": here.host_id,
            "url": here.advertised_url(),
            "gpu": GPU,
            "index": 0,
            "unload_mib": 25000,
            "reload_s": 2.441,
            "victims": 1,
        }
    ]
    # Pinned, they offer nothing.
    for instance_id in host.instances.values():
        await host.client.patch(
            f"/instances/{instance_id}", json={"pinned": True}, headers=AS_SCHEDULER
        )
    big = await eventually(big_in_fleet, lambda m: not m["room"], timeout_s=10)
    assert big["room"] == []


async def test_operators_see_claims_and_evictions_on_the_page_and_the_command_line(
    host: Host, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from registry.cli import main

    client = host.client
    claim = await _json(await host.reserve(model="big", make_room=True, holder="job-77"))
    [victim] = claim["awaiting"]["unload"]
    page = await (await client.get("/")).text()
    assert "waits for 1 to unload" in page and "asked to unload" in page
    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", SCHEDULER_TOKEN)
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: no cell wrapped
    url = str(client.make_url("")).rstrip("/")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    status = capsys.readouterr().out
    assert "waits for 1 to unload" in status and "asked to unload" in status
    assert await asyncio.to_thread(main, ["instances", "list", "--url", url]) == 0
    listed = capsys.readouterr().out
    assert "asked to unload" in listed and "SESSIONS" in listed
    # An operator pins it: the claim looks elsewhere.
    pin = ["instances", "set", victim["id"], "--pin", "--url", url]
    assert await asyncio.to_thread(main, pin) == 0
    assert "pinned" in capsys.readouterr().out
    again = await _json(await client.get(f"/reservations/{claim['id']}"))
    assert [i["id"] for i in again["awaiting"]["unload"]] != [victim["id"]]


async def test_gpu_activity_keeps_an_instance_busy_but_does_not_change_the_listing_each_poll(
    host: Host,
) -> None:
    client = host.client
    busy_pid, idle_pid = list(IDLE)[:2]
    listing_before = (await client.get("/models?name=medium")).headers["ETag"]

    def activity(sm_util: dict[int, int]) -> None:
        listed = [
            {"pid": pid, "used_mib": used, **({"sm_util": sm_util[pid]} if pid in sm_util else {})}
            for pid, used in host.processes.items()
        ]
        device = {
            "uuid": GPU,
            "name": "Simulated GPU",
            "total_mib": TOTAL,
            "free_mib": TOTAL - sum(host.processes.values()),
            "processes": listed,
        }
        path = host.gpus(host.processes)  # where the simulated backend reads, rewritten
        path.write_text(json.dumps({"devices": [device]}))

    activity({busy_pid: 60})
    await _poll(client)
    busy = await _instance(client, host.instances[busy_pid])
    assert busy["idle_s"] == 0  # busy on the GPU just now
    listing_after = (await client.get("/models?name=medium")).headers["ETag"]
    assert listing_after != listing_before  # its last_active_at moved once ...
    await _poll(client)  # ... and another busy poll within 5 s moves nothing
    assert (await client.get("/models?name=medium")).headers["ETag"] == listing_after
    # Pin the third: only the idle one may go, not the one the GPU says is busy.
    third = list(IDLE)[2]
    await client.patch(
        f"/instances/{host.instances[third]}", json={"pinned": True}, headers=AS_SCHEDULER
    )
    claim = await _json(await host.reserve(model="big", make_room=True))
    assert [i["id"] for i in claim["awaiting"]["unload"]] == [host.instances[idle_pid]]
