"""Watching: blocking GETs that answer on change or after their wait, and the /events stream."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from registry import keys
from registry.watch.feed import STREAM_BACKLOG, Batch
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, LogLines, SpawnDaemon
from tests.scrape import scrape_url
from tests.sse import EventReader
from tests.waiting import eventually


@pytest.fixture
async def client(start_app: AppClient) -> Any:
    return await start_app(admin_token=ADMIN_TOKEN, events_keepalive=0.2)


async def _change_gpus(client: Any, gpu_file: Callable[..., Path], free: int) -> None:
    gpu_file(("GPU-sim-0", 24576, free))
    client.app[keys.POLLER].poll_now()


# -- blocking GETs ------------------------------------------------------------------------


async def test_a_blocking_get_answers_as_soon_as_the_answer_changes(
    client: Any, gpu_file: Callable[..., Path]
) -> None:
    first = await client.get("/models")
    etag = first.headers["ETag"]
    headers = {"If-None-Match": etag, "Prefer": "wait=20"}
    waiting = asyncio.create_task(client.get("/models", headers=headers))
    feed = client.app[keys.FEED]
    await eventually(lambda: feed.waiting == 1)
    assert not waiting.done(), "it waits while nothing changes"
    await _change_gpus(client, gpu_file, 9000)
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.status == 200
    assert answer.headers["Preference-Applied"] == "wait=20"
    assert answer.headers["ETag"] != etag
    body = await answer.json()
    assert {m["name"]: m["active"] for m in body["data"]}["large-v3"] is False


async def test_a_blocking_get_with_nothing_new_is_304_after_its_wait(
    client: Any, json_lines: LogLines
) -> None:
    etag = (await client.get("/gpus")).headers["ETag"]
    assert etag.startswith('W/"')
    started = time.monotonic()
    answer = await client.get("/gpus", headers={"If-None-Match": etag, "Prefer": "wait=1"})
    waited = time.monotonic() - started
    assert answer.status == 304 and 0.9 < waited < 3
    assert answer.headers["ETag"] == etag
    assert answer.headers["Preference-Applied"] == "wait=1"
    # Polls came and went meanwhile (last_poll_at moved): the weak ETag did not.
    assert (await client.get("/gpus")).headers["ETag"] == etag
    # Waiting by request is not a slow request.
    assert not [x for x in json_lines() if x.get("event") == "request" and x["status"] == 304]


async def test_one_model_and_gpus_answer_on_their_own_changes(client: Any) -> None:
    one = await client.get("/models/2")
    waiting = asyncio.create_task(
        client.get("/models/2", headers={"If-None-Match": one.headers["ETag"], "Prefer": "wait=20"})
    )
    gpus = await client.get("/gpus")
    gpus_waiting = asyncio.create_task(
        client.get("/gpus", headers={"If-None-Match": gpus.headers["ETag"], "Prefer": "wait=20"})
    )
    feed = client.app[keys.FEED]
    await eventually(lambda: feed.waiting == 2)
    # Another model's change moves the generation but not this answer: it keeps waiting.
    assert (await client.patch("/models/3", json={"vram": 4000}, headers=AS_ADMIN)).status == 200
    await eventually(lambda: feed.waiting == 2)  # both looked, and went back to waiting
    assert not waiting.done()
    assert (await client.patch("/models/2", json={"vram": 2600}, headers=AS_ADMIN)).status == 200
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.status == 200 and (await answer.json())["vram"] == 2600
    # A reservation changes the books, so /gpus answers.
    created = await client.post("/reservations", json={"vram_mib": 100}, headers=AS_ADMIN)
    assert created.status == 201
    gpus_answer = await asyncio.wait_for(gpus_waiting, 5)
    assert gpus_answer.status == 200
    assert (await gpus_answer.json())["devices"][0]["pending_mib"] == 100
    # A model deleted while watched is 404.
    last = await client.get("/models/5")
    gone = asyncio.create_task(
        client.get(
            "/models/5", headers={"If-None-Match": last.headers["ETag"], "Prefer": "wait=20"}
        )
    )
    await eventually(lambda: feed.waiting == 1)
    assert (await client.delete("/models/5", headers=AS_ADMIN)).status == 204
    assert (await asyncio.wait_for(gone, 5)).status == 404


@pytest.mark.parametrize(
    ("prefer", "waits"),
    [
        (None, False),
        ("wait=0", False),
        ("wait=-3", False),
        ("wait=soon", False),
        ("respond-async", False),
        ("respond-async, wait=1", True),
        ('wait="1"; foo=bar', True),
    ],
)
async def test_the_wait_preference_is_read_as_rfc_7240_says(
    client: Any, prefer: str | None, waits: bool
) -> None:
    etag = (await client.get("/models")).headers["ETag"]
    headers = {"If-None-Match": etag} | ({"Prefer": prefer} if prefer else {})
    started = time.monotonic()
    answer = await client.get("/models", headers=headers)
    assert answer.status == 304
    assert (time.monotonic() - started > 0.9) is waits
    assert ("Preference-Applied" in answer.headers) is waits


async def test_a_long_wait_is_capped_at_300_seconds(client: Any) -> None:
    etag = (await client.get("/models")).headers["ETag"]
    waiting = asyncio.create_task(
        client.get("/models", headers={"If-None-Match": etag, "Prefer": "wait=100000"})
    )
    await eventually(lambda: client.app[keys.FEED].waiting == 1)
    await client.patch("/models/1", json={"vram": 700}, headers=AS_ADMIN)
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.headers["Preference-Applied"] == "wait=300"


async def test_a_stale_etag_answers_at_once(client: Any) -> None:
    answer = await client.get("/models", headers={"If-None-Match": '"old"', "Prefer": "wait=30"})
    assert answer.status == 200 and "Preference-Applied" not in answer.headers


# -- /events ------------------------------------------------------------------------------


async def _open(client: Any, query: str = "", **headers: str) -> EventReader:
    response = await client.get(f"/events{query}", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return EventReader(response)


async def test_a_stream_starts_with_a_snapshot_then_sends_what_changes(
    client: Any, gpu_file: Callable[..., Path]
) -> None:
    events = await _open(client)
    snapshot = await events.next()
    assert snapshot.event == "snapshot"
    state = snapshot.data
    assert snapshot.id == str(state["generation"])
    assert [m["name"] for m in state["models"]] == [
        "tiny",
        "medium",
        "large_v1",
        "large_v2",
        "large-v3",
    ]
    listing = await (await client.get("/models")).json()
    assert state["models"] == listing["data"] and state["capacity"] == listing["capacity"]
    assert state["gpus"]["devices"][0]["uuid"] == "GPU-sim-0"
    assert state["reservations"] == []

    # A catalog write: exactly the model that changed.
    await client.patch("/models/2", json={"vram": 2600}, headers=AS_ADMIN)
    models = await events.next_named("models")
    assert [m["name"] for m in models.data["models"]] == ["medium"]
    assert models.data["models"][0]["vram"] == 2600 and models.data["deleted"] == []
    assert int(models.id or 0) > int(snapshot.id or 0)

    # A GPU change: the devices, and the models whose objects moved with them.
    await _change_gpus(client, gpu_file, 9000)
    models = await events.next_named("models")
    gpus = await events.next_named("gpus")
    assert gpus.data["devices"][0]["free_mib"] == 9000
    assert models.id == gpus.id  # one generation, one id
    large = next(m for m in models.data["models"] if m["name"] == "large-v3")
    assert large["active"] is False and large["reason"] == "insufficient_vram"

    # Reservations: created, renewed, ended; each event carries only what changed.
    other = await client.post("/reservations", json={"vram_mib": 50}, headers=AS_ADMIN)
    assert [r["id"] for r in (await events.next_named("reservations")).data["reservations"]] == [
        (await other.json())["id"]
    ]
    created = await client.post("/reservations", json={"vram_mib": 100}, headers=AS_ADMIN)
    reserved = await events.next_named("reservations")
    assert [r["id"] for r in reserved.data["reservations"]] == [(await created.json())["id"]]
    assert reserved.data["ended"] == []
    await client.patch(created.headers["Location"], json={"ttl_s": 600}, headers=AS_ADMIN)
    renewed = await events.next_named("reservations")
    assert [r["id"] for r in renewed.data["reservations"]] == [(await created.json())["id"]]
    assert (
        renewed.data["reservations"][0]["expires_at"]
        != reserved.data["reservations"][0]["expires_at"]
    )
    await client.delete(created.headers["Location"], headers=AS_ADMIN)
    ended = await events.next_named("reservations")
    assert ended.data == {"reservations": [], "ended": [(await created.json())["id"]]}

    await client.delete("/models/4", headers=AS_ADMIN)
    deleted = await events.next_named("models")
    assert deleted.data == {"models": [], "deleted": [4]}


async def test_the_name_filter_limits_model_objects(client: Any) -> None:
    events = await _open(client, "?name=tiny,large-v3")
    snapshot = await events.next()
    assert [m["name"] for m in snapshot.data["models"]] == ["tiny", "large-v3"]
    await client.patch("/models/2", json={"vram": 2600}, headers=AS_ADMIN)  # medium: filtered out
    await client.patch("/models/1", json={"vram": 600}, headers=AS_ADMIN)
    models = await events.next_named("models")
    assert [m["name"] for m in models.data["models"]] == ["tiny"]
    await client.delete("/models/2", headers=AS_ADMIN)  # filtered out
    await client.delete("/models/1", headers=AS_ADMIN)
    deleted = await events.next_named("models")
    assert deleted.data == {"models": [], "deleted": [1]}


@pytest.mark.parametrize(
    "query",
    ["?name=bad%20name", "?name=" + "x" * 200, "?name=a,,-b", "?name=tiny,", "?name=a,%20b"],
)
async def test_a_bad_name_filter_is_422(client: Any, query: str) -> None:
    answer = await client.get(f"/events{query}")
    assert answer.status == 422
    assert (await answer.json())["detail"][0]["loc"][:2] == ["query", "name"]


async def test_resuming_at_the_current_generation_replays_nothing(client: Any) -> None:
    first = await _open(client)
    snapshot = await first.next()
    first.response.close()

    resumed = await _open(client, **{"Last-Event-ID": snapshot.id or ""})
    await client.patch("/models/1", json={"vram": 700}, headers=AS_ADMIN)
    event = await resumed.next_named("models")  # no snapshot came first
    assert [m["name"] for m in event.data["models"]] == ["tiny"]
    resumed.response.close()

    behind = await _open(client, **{"Last-Event-ID": snapshot.id or ""})
    again = await behind.next()
    assert again.event == "snapshot" and int(again.id or 0) > int(snapshot.id or 0)
    unknown = await _open(client, **{"Last-Event-ID": "not-a-generation"})
    assert (await unknown.next()).event == "snapshot"


async def test_an_idle_stream_gets_keep_alive_comments(client: Any) -> None:
    events = await _open(client)
    await events.next()
    comment = await events.next(timeout_s=2)
    assert comment.event == ":"


async def test_a_stream_that_falls_behind_gets_a_fresh_snapshot(client: Any) -> None:
    events = await _open(client)
    await events.next()
    # More changes than the stream's backlog, while it is not read.
    feed = client.app[keys.FEED]
    [subscription] = feed._subscriptions
    for i in range(STREAM_BACKLOG + 5):
        subscription.offer(Batch(10**18 + i))
    assert subscription.overflowed
    relisted = await events.next_named("snapshot")
    assert len(relisted.data["models"]) == 5
    # Then it carries on with changes as usual.
    await client.patch("/models/1", json={"vram": 700}, headers=AS_ADMIN)
    models = await events.next_named("models")
    assert [m["vram"] for m in models.data["models"]] == [700]


# -- shutdown -----------------------------------------------------------------------------


async def test_sigterm_ends_streams_and_answers_waiting_gets_at_once(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon()
    await daemon.wait_ready()
    async with aiohttp.ClientSession(daemon.url) as http:
        streams = [await http.get("/events") for _ in range(3)]
        for stream in streams:
            assert (await EventReader(stream).next()).event == "snapshot"
        etag = (await http.get("/models")).headers["ETag"]
        waiting = [
            asyncio.create_task(
                http.get("/models", headers={"If-None-Match": etag, "Prefer": "wait=300"})
            )
            for _ in range(3)
        ]
        await eventually(lambda: _watchers(daemon) == {"waiting": 3, "stream": 3})
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert [a.status for a in answers] == [304, 304, 304]
        for stream in streams:
            with pytest.raises(EOFError):  # ended cleanly: the chunked body finished
                while True:
                    await EventReader(stream).next(timeout_s=5)
        assert await asyncio.to_thread(daemon.wait_exit, 10) == 0
        assert time.monotonic() - started < 10
    assert "Traceback" not in daemon.log()


def _watchers(daemon: Any) -> dict[str, float]:
    samples = scrape_url(f"{daemon.url}/metrics")
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in samples.items()
        if name == "model_registry_watchers"
    }


async def test_streams_end_when_the_client_goes(client: Any) -> None:
    events = await _open(client)
    await events.next()
    feed = client.app[keys.FEED]
    assert len(feed._subscriptions) == 1
    events.response.close()
    # The keep-alive write finds the connection gone; the subscription is dropped.
    await eventually(lambda: len(feed._subscriptions), lambda n: n == 0)
