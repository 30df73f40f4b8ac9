"""Instances through the real app on the simulated backend: bind a reservation to the process
that loads it (its pending memory carried over until the load shows), adopt a loaded model,
end with the process, survive a restart but not another boot, and show where models are warm."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import keys
from tests.clock import ManualClock
from tests.conftest import (
    ADMIN_TOKEN,
    AS_SCHEDULER,
    ONE_GPU,
    ONE_GPU_TOTAL_MIB,
    SCHEDULER_TOKEN,
    AppClient,
    LogLines,
)
from tests.scrape import scrape
from tests.sse import EventReader
from tests.waiting import eventually

GPU = ONE_GPU
TOTAL = ONE_GPU_TOTAL_MIB
WORKER = 4242
OTHER_SCHEDULER = "another-scheduler-token-51d0"


async def _poll(client: Any) -> None:
    await client.app[keys.POLLER].poll_and_wait(5)


async def _json(response: Any) -> Any:
    return json.loads(await response.read())


async def _reserve(client: Any, **body: Any) -> dict[str, Any]:
    answer = await client.post("/reservations", json=body, headers=AS_SCHEDULER)
    assert answer.status == 201, await answer.text()
    reservation: dict[str, Any] = await _json(answer)
    return reservation


async def _bind(client: Any, **body: Any) -> Any:
    return await client.post("/instances", json=body, headers=AS_SCHEDULER)


async def _pending(client: Any) -> int:
    device = (await _json(await client.get("/gpus")))["devices"][0]
    pending: int = device["pending_mib"]
    return pending


async def _large(client: Any) -> dict[str, Any]:
    body = await _json(await client.get("/models?name=large-v3"))
    model: dict[str, Any] = body["data"][0]
    return model


@pytest.fixture
async def client(start_app: AppClient, gpus: Callable[..., Path]) -> Any:
    # A poll a minute: every poll in these tests is one the test asked for.
    return await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60)


async def test_a_bind_right_after_the_worker_starts_carries_the_booking_until_the_load_shows(
    client: Any, gpus: Callable[..., Path]
) -> None:
    reservation = await _reserve(client, model="large-v3", holder="session-1")
    assert await _pending(client) == 10000
    # The worker has its CUDA context (500 MiB), not the model yet.
    gpus({WORKER: 500})
    await _poll(client)
    answer = await _bind(client, reservation=reservation["id"], pid=WORKER)
    assert answer.status == 201, await answer.text()
    instance = await _json(answer)
    assert answer.headers["Location"] == f"/instances/{instance['id']}"
    assert instance["model"] == "large-v3" and instance["gpu"] == {"uuid": GPU, "index": 0}
    assert (instance["pid"], instance["holder"]) == (WORKER, "session-1")
    assert instance["reservation"] == reservation["id"]
    assert (instance["used_mib"], instance["pending_mib"]) == (500, 9500)
    assert (await client.get(f"/reservations/{reservation['id']}")).status == 404
    assert await _pending(client) == 9500  # what the reservation still booked lives on
    [resident] = (await _large(client))["instances"]
    assert resident == {
        "id": instance["id"],
        "gpu": GPU,
        "index": 0,
        "sessions": 0,
        "pinned": False,
        "priority": 50,
        "ready": False,
        "last_active_at": instance["loaded_at"],
        "evicting": None,
    }

    gpus({WORKER: 6000})  # loading
    await _poll(client)
    assert await _pending(client) == 4000
    gpus({WORKER: 10500})  # loaded: its memory is in NVML's used figure now
    await _poll(client)
    assert await _pending(client) == 0
    shown = await _json(await client.get(f"/instances/{instance['id']}"))
    assert (shown["used_mib"], shown["peak_mib"], shown["pending_mib"]) == (10500, 10500, 0)
    listed = await _json(await client.get("/instances?model=large-v3"))
    assert [i["id"] for i in listed["data"]] == [instance["id"]]
    assert (await _json(await client.get("/instances?model=tiny")))["data"] == []


async def test_an_instance_ends_when_its_process_leaves_the_gpu_for_two_polls(
    client: Any, gpus: Callable[..., Path], json_lines: LogLines
) -> None:
    gpus({WORKER: 3000})
    await _poll(client)
    answer = await _bind(client, model="medium", gpu=GPU, pid=WORKER, holder="job-7")
    assert answer.status == 201, await answer.text()
    instance = await _json(answer)
    assert instance["reservation"] is None and instance["pending_mib"] == 0
    gpus()  # the process exited
    await _poll(client)
    assert (await client.get(f"/instances/{instance['id']}")).status == 200  # one poll: not yet
    gpus(free=TOTAL, known=False)  # a poll that cannot see the processes ends nothing
    await _poll(client)
    assert (await client.get(f"/instances/{instance['id']}")).status == 200
    gpus()
    await _poll(client)
    assert (await client.get(f"/instances/{instance['id']}")).status == 404
    ended = [x for x in json_lines() if x["event"] == "instance ended"]
    assert [(x["instance"], x["reason"], x["holder"]) for x in ended] == [
        (instance["id"], "process_exited", "job-7")
    ]
    samples = await scrape(client)
    ended_total = "model_registry_instances_ended_total"
    assert samples[(ended_total, (("reason", "process_exited"),))] == 1
    assert samples[("model_registry_instances_open", ())] == 0
    assert (await _json(await client.get("/models?name=medium")))["data"][0]["instances"] == []


async def test_adoption_needs_the_pid_on_the_gpu_and_a_readable_process_list(
    client: Any, gpus: Callable[..., Path]
) -> None:
    # It started after the last poll: the daemon polls again before it says no.
    gpus({WORKER: 700})
    accepted = await _bind(client, model="tiny", gpu=GPU, pid=WORKER)
    assert accepted.status == 201, await accepted.text()
    # Many asking for processes that are not there share that one poll: within a poll
    # interval (here a minute) no request makes the daemon poll again.
    poller = client.app[keys.POLLER]
    polls = poller.polls
    refused = await asyncio.gather(
        *(_bind(client, model="tiny", gpu=GPU, pid=WORKER + n) for n in range(1, 21))
    )
    assert {answer.status for answer in refused} == {409}
    assert {(await _json(answer))["reason"] for answer in refused} == {"pid_not_on_gpu"}
    assert poller.polls == polls
    gpus(free=TOTAL - 700, known=False)
    await _poll(client)
    unknown = await _bind(client, model="medium", gpu=GPU, pid=WORKER)
    assert unknown.status == 503 and unknown.headers["Retry-After"]
    assert (await _json(unknown))["reason"] == "processes_unknown"


async def test_bad_binds_and_adoptions_are_refused_and_change_nothing(
    client: Any, gpus: Callable[..., Path]
) -> None:
    gpus({WORKER: 700})
    await _poll(client)
    reservation = await _reserve(client, vram_mib=1000)
    no_pid = await _bind(client, reservation=reservation["id"])
    assert no_pid.status == 422 and (await _json(no_pid))["detail"][0]["loc"] == ["body", "pid"]
    for body, status in (
        ({"reservation": "no-such"}, 404),
        ({"model": "no-such", "gpu": GPU, "pid": WORKER}, 404),
        ({"model": "tiny", "gpu": "GPU-nope", "pid": WORKER}, 404),
        ({"model": "tiny", "pid": WORKER}, 422),
        ({"reservation": reservation["id"], "model": "tiny", "pid": WORKER}, 422),
        ({"model": "tiny", "gpu": GPU, "pid": 0}, 422),
        ({"model": "tiny", "gpu": GPU, "pid": WORKER, "holder": "a\nb"}, 422),
    ):
        answer = await _bind(client, **body)
        assert answer.status == status, (body, await answer.text())
    assert (
        await client.post("/instances", json={"model": "tiny", "gpu": GPU, "pid": 1})
    ).status == 401
    assert (await client.get(f"/reservations/{reservation['id']}")).status == 200
    assert (await _json(await client.get("/instances")))["data"] == []
    assert (await client.delete("/instances/nope", headers=AS_SCHEDULER)).status == 404


async def test_a_reported_unload_ends_it_and_the_cap_holds(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60, max_instances=1)
    gpus({WORKER: 700, WORKER + 1: 700}, free=TOTAL - 700)
    await _poll(client)
    first = await _json(await _bind(client, model="tiny", gpu=GPU, pid=WORKER))
    too_many = await _bind(client, model="tiny", gpu=GPU, pid=WORKER + 1)
    assert too_many.status == 429 and (await _json(too_many))["reason"] == "too_many"
    gone = await client.delete(f"/instances/{first['id']}", headers=AS_SCHEDULER)
    assert gone.status == 204
    assert (await _bind(client, model="tiny", gpu=GPU, pid=WORKER + 1)).status == 201


async def test_events_tell_of_instances_made_and_ended(
    client: Any, gpus: Callable[..., Path]
) -> None:
    gpus({WORKER: 700})
    await _poll(client)
    response = await client.get("/events")
    events = EventReader(response)
    snapshot = await events.next()
    assert snapshot.event == "snapshot" and snapshot.data["instances"] == []
    made = await _json(await _bind(client, model="tiny", gpu=GPU, pid=WORKER))
    event = await events.next_named("instances")
    assert [i["id"] for i in event.data["instances"]] == [made["id"]] and event.data["ended"] == []
    await client.delete(f"/instances/{made['id']}", headers=AS_SCHEDULER)
    event = await events.next_named("instances")
    assert event.data == {"instances": [], "ended": [made["id"]]}
    response.close()


async def test_instances_survive_a_restart_but_not_another_boot(
    start_app: AppClient, gpus: Callable[..., Path], tmp_path: Path
) -> None:
    state = tmp_path / "kept-state"
    gpus({WORKER: 700})
    first = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60, state_dir=state)
    await _poll(first)
    made = await _json(await _bind(first, model="tiny", gpu=GPU, pid=WORKER))
    reservation = await _reserve(first, model="medium")
    bound = await _json(await _bind(first, reservation=reservation["id"], pid=WORKER))
    await first.close()

    again = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60, state_dir=state)
    restored = (await _json(await again.get("/instances")))["data"]
    assert [i["id"] for i in restored] == [made["id"], bound["id"]]
    # The bind was one step on disk: the reservation stayed ended, its booking with the instance.
    assert (await _json(await again.get("/reservations")))["data"] == []
    assert restored[1]["reservation"] == reservation["id"]
    tiny = (await _json(await again.get("/models?name=tiny")))["data"][0]
    assert [i["id"] for i in tiny["instances"]] == [made["id"]]
    await again.close()

    # The same journal read after a reboot: its pids mean nothing now.
    journal = state / "reservations.jsonl"
    journal.write_text(journal.read_text().replace(again.app[keys.INSTANCES].boot_id, "another"))
    rebooted = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60, state_dir=state)
    assert (await _json(await rebooted.get("/instances")))["data"] == []


def test_a_daemon_that_reads_only_the_old_journal_format_says_why(tmp_path: Path) -> None:
    from registry.admission.ledger import LedgerError, ReservationLedger

    (tmp_path / "reservations.jsonl").write_text('{"format":3}\n')
    with pytest.raises(LedgerError, match=r"format 3.*newer model-registry"):
        ReservationLedger(tmp_path).open(list)


async def test_the_command_line_status_and_page_show_instances(
    client: Any,
    gpus: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from registry.cli import main

    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", SCHEDULER_TOKEN)
    gpus({WORKER: 3000})
    await _poll(client)
    url = str(client.make_url("")).rstrip("/")
    capsys.readouterr()
    adopt = ["instances", "add", "medium", "--gpu", GPU, "--pid", str(WORKER), "--url", url]
    assert await asyncio.to_thread(main, [*adopt, "--holder", "job-<9>"]) == 0
    added = capsys.readouterr().out
    assert "medium" in added and str(WORKER) in added and "3000" in added
    [instance] = (await _json(await client.get("/instances")))["data"]
    assert await asyncio.to_thread(main, ["instances", "list", "--url", url]) == 0
    assert instance["id"] in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    status = capsys.readouterr().out
    assert "Instances · 1 loaded" in status and "job-<9>" in status and "3,000" in status
    page = await (await client.get("/")).text()
    assert "Instances <span" in page and "job-&lt;9&gt;" in page and "3,000" in page
    gone = ["instances", "remove", instance["id"], "--url", url]
    assert await asyncio.to_thread(main, gone) == 0
    assert (await _json(await client.get("/instances")))["data"] == []


async def test_the_fleet_says_where_a_model_is_warm(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    gpus({WORKER: 700})
    here = await start_app(
        scheduler_token=SCHEDULER_TOKEN, poll_interval=60, heartbeat_interval=0.5
    )
    there = await start_app(heartbeat_interval=0.5)
    await _poll(here)
    made = await _bind(here, model="tiny", gpu=GPU, pid=WORKER)
    assert made.status == 201

    async def tiny_in_fleet() -> dict[str, Any]:
        body = await _json(await there.get("/fleet/models?name=tiny"))
        model: dict[str, Any] = body["data"][0]
        return model

    tiny = await eventually(tiny_in_fleet, lambda m: m["warm_total"] == 1)
    assert tiny["warm"] == [
        {
            "host": here.app[keys.SETTINGS].current.host_id,
            "url": here.app[keys.SETTINGS].current.advertised_url(),
            "gpu": GPU,
            "index": 0,
            "instances": 1,
        }
    ]
    assert (await tiny_in_fleet()) == tiny
    medium = (await _json(await there.get("/fleet/models?name=medium")))["data"][0]
    assert (medium["warm_total"], medium["warm"]) == (0, [])


async def test_one_live_instance_per_process_and_model_and_a_cap_per_token(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    client = await start_app(
        admin_token=ADMIN_TOKEN,
        scheduler_token=f"{SCHEDULER_TOKEN},{OTHER_SCHEDULER}",
        poll_interval=60,
        max_instances_per_token=2,
    )
    gpus({WORKER: 700, WORKER + 1: 700, WORKER + 2: 700})
    await _poll(client)
    first = await _json(await _bind(client, model="tiny", gpu=GPU, pid=WORKER))
    again = await _bind(client, model="tiny", gpu=GPU, pid=WORKER)
    assert again.status == 409
    refusal = await _json(again)
    assert (refusal["reason"], refusal["instance"]) == ("already_loaded", first["id"])
    # A bind of a reservation into a process that already holds the model: the same answer,
    # and the reservation stays open.
    reservation = await _reserve(client, model="tiny")
    bound = await _bind(client, reservation=reservation["id"], pid=WORKER)
    assert bound.status == 409 and (await _json(bound))["instance"] == first["id"]
    assert (await client.get(f"/reservations/{reservation['id']}")).status == 200
    # Another model in the same process is another load.
    assert (await _bind(client, model="medium", gpu=GPU, pid=WORKER)).status == 201
    capped = await _bind(client, model="tiny", gpu=GPU, pid=WORKER + 1)
    assert capped.status == 429 and (await _json(capped))["reason"] == "too_many"
    assert "MODEL_REGISTRY_MAX_INSTANCES_PER_TOKEN" in (await _json(capped))["detail"]
    # Another token has its own share.
    other = {"Authorization": f"Bearer {OTHER_SCHEDULER}"}
    answer = await client.post(
        "/instances", json={"model": "tiny", "gpu": GPU, "pid": WORKER + 1}, headers=other
    )
    assert answer.status == 201
    # Once one ends, the token may have another.
    assert (await client.delete(f"/instances/{first['id']}", headers=AS_SCHEDULER)).status == 204
    assert (await _bind(client, model="tiny", gpu=GPU, pid=WORKER + 2)).status == 201


async def test_instances_are_listed_page_by_page_and_a_model_shows_its_newest(
    client: Any, gpus: Callable[..., Path], json_lines: LogLines
) -> None:
    pids = list(range(10_000, 10_105))
    gpus(dict.fromkeys(pids, 10), free=TOTAL - 105 * 10)
    await _poll(client)
    made = []
    for pid in pids:
        answer = await _bind(client, model="tiny", gpu=GPU, pid=pid)
        assert answer.status == 201, await answer.text()
        made.append((await _json(answer))["id"])
    page = await _json(await client.get("/instances?skip=100&limit=50"))
    assert [i["id"] for i in page["data"]] == made[100:]
    assert page["pagination"] == {
        "total_items": 105,
        "total_pages": 3,
        "current_page": 3,
        "per_page": 50,
    }
    assert (await _json(await client.get("/instances?model=medium")))["pagination"][
        "total_items"
    ] == 0
    for query in ("skip=-1", "limit=0", "limit=1001", "skip=abc", "limit=1e9"):
        answer = await client.get(f"/instances?{query}")
        assert answer.status == 422, query
        assert (await _json(answer))["detail"][0]["loc"][0] == "query"
    tiny = await _json(await client.get("/models?name=tiny"))
    shown = tiny["data"][0]
    assert shown["instances_total"] == 105
    assert [i["id"] for i in shown["instances"]] == made[5:]  # the newest 100, oldest first
    # All of them end at once (their processes left): the log says so in a few lines.
    json_lines()
    gpus()
    await _poll(client)
    await _poll(client)
    ended = [x for x in json_lines() if x["event"] == "instance ended"]
    assert 1 <= len(ended) < 5 and {x["reason"] for x in ended} == {"process_exited"}
    assert (await _json(await client.get("/instances")))["pagination"]["total_items"] == 0


async def test_a_booking_ends_at_its_expiry_while_the_process_list_cannot_be_read(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    clock = ManualClock()
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60, clock=clock)
    gpus({WORKER: 500})
    await _poll(client)
    reservation = await _reserve(client, model="large-v3", ttl_s=60)
    bound = await _bind(client, reservation=reservation["id"], pid=WORKER)
    assert bound.status == 201 and await _pending(client) == 10000
    gpus(free=TOTAL - 500, known=False)  # the driver stops listing processes
    await _poll(client)
    assert await _pending(client) == 10000
    clock.advance(61)
    await _poll(client)
    assert await _pending(client) == 0
