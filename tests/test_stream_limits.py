"""Event streams and waiting GETs hold connections for long: they have caps of their own, share
one encoding of each snapshot, and a client that stops reading is cut off."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from registry import keys
from registry.watch import events
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, SpawnDaemon
from tests.daemon import Daemon
from tests.scrape import scrape_url
from tests.test_memory_bounds import rss_mib
from tests.waiting import eventually

WAIT = {"Prefer": "wait=30"}


async def _stream(client: Any) -> Any:
    return await client.get("/events")


async def _waiting_get(client: Any) -> asyncio.Task[Any]:
    etag = (await client.get("/models")).headers["ETag"]
    return asyncio.create_task(client.get("/models", headers={"If-None-Match": etag, **WAIT}))


async def _assert_refused(answer: Any, status: int) -> None:
    assert answer.status == status
    assert int(answer.headers["Retry-After"]) >= 1
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "stream" in (await answer.json())["detail"]


async def test_streams_and_waiting_gets_share_one_cap(start_app: AppClient) -> None:
    client = await start_app(max_streams=3)
    feed = client.app[keys.FEED]
    first, second = await _stream(client), await _stream(client)
    waiting = await _waiting_get(client)
    await eventually(lambda: feed.waiting == 1)
    await _assert_refused(await _stream(client), 503)
    etag = (await client.get("/models")).headers["ETag"]
    await _assert_refused(await client.get("/models", headers={"If-None-Match": etag, **WAIT}), 503)
    # Without waiting, a conditional GET takes no slot.
    assert (await client.get("/models", headers={"If-None-Match": etag})).status == 304

    first.close()
    await eventually(lambda: feed.streams == 1)
    third = await _stream(client)
    assert third.status == 200
    for response in (second, third):
        response.close()
    waiting.cancel()


async def test_one_address_may_hold_only_its_share(start_app: AppClient) -> None:
    client = await start_app(max_streams=10, max_streams_per_client=2)
    streams = [await _stream(client), await _stream(client)]
    await _assert_refused(await _stream(client), 429)
    for response in streams:
        response.close()


async def test_the_cap_in_force_is_at_most_half_the_connection_cap(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon(MODEL_REGISTRY_MAX_CONNECTIONS="10")
    await daemon.wait_ready()
    async with aiohttp.ClientSession() as http:
        streams = [await http.get(daemon.url + "/events") for _ in range(5)]
        assert [s.status for s in streams] == [200] * 5
        refused = await http.get(daemon.url + "/events")
        await _assert_refused(refused, 503)
        for stream in streams:
            stream.close()
    limits = next(json.loads(x) for x in daemon.log().splitlines() if '"limits"' in x)
    assert limits["max_streams"] == 5


def _silent_stream(port: int) -> socket.socket:
    """An /events client that never reads, with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return sock


async def test_300_streams_that_never_read_a_10000_model_snapshot(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon(
        MODEL_REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN,
        MODEL_REGISTRY_SEED_CATALOG="false",
        MODEL_REGISTRY_MAX_STREAMS_PER_CLIENT="1000",
        MODEL_REGISTRY_ACCESS_LOG="off",
    )
    await daemon.wait_ready()
    models = [{"name": f"model-{i:05d}", "vram": 1 + i % 80_000} for i in range(10_000)]
    async with aiohttp.ClientSession() as http:
        async with http.put(
            daemon.url + "/models", json={"models": models}, headers=AS_ADMIN
        ) as applied:
            assert applied.status == 200
        async with http.get(daemon.url + "/events") as one:  # the snapshot, read once
            snapshot = b""
            while not snapshot.endswith(b"\r\n\r\n"):
                snapshot += await one.content.readany()
            assert len(snapshot) > 1_000_000
    before = rss_mib(daemon.process.pid)

    silent = [_silent_stream(daemon.port) for _ in range(300)]
    try:
        await eventually(lambda: _sending(daemon) >= 300)  # with the one read above
        started = time.monotonic()
        async with (
            aiohttp.ClientSession() as http,
            http.get(daemon.url + "/healthz") as health,
        ):
            assert health.status == 200
        assert time.monotonic() - started < 0.1
        grown = rss_mib(daemon.process.pid) - before
        assert grown < 100, f"RSS grew by {grown:.1f} MiB"
    finally:
        for sock in silent:
            sock.close()


def _sending(daemon: Daemon) -> float:
    """Streams open (sending their snapshot), and those cut off for not reading."""
    samples = scrape_url(daemon.url + "/metrics")
    return (
        samples[("model_registry_watchers", (("kind", "stream"),))]
        + samples[("model_registry_streams_cut_off_total", ())]
    )


async def _catalog_of(client: Any, count: int) -> None:
    models = [{"name": f"model-{i:05d}", "vram": 1 + i % 80_000} for i in range(count)]
    assert (await client.put("/models", json={"models": models}, headers=AS_ADMIN)).status == 200


async def _cut_off(sock: socket.socket) -> bool:
    """Whether the daemon closed this never-read stream (read now, all that it holds)."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1 << 20):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("limit", ["stalled", "budget"])
async def test_a_stream_whose_client_does_not_read_is_cut_off(
    start_app: AppClient, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    client = await start_app(admin_token=ADMIN_TOKEN, seed_catalog=False)
    await _catalog_of(client, 10_000)
    slots = client.app[keys.STREAM_SLOTS]
    if limit == "stalled":
        monkeypatch.setattr(events, "STALLED_AFTER_S", 0.3)
    else:
        slots.buffer_budget = 1024  # less than one chunk
    sock = _silent_stream(client.server.port or 0)
    try:
        await eventually(lambda: slots.counters.cut_off == 1)
        async with asyncio.timeout(5):
            assert await _cut_off(sock)
    finally:
        sock.close()
    await eventually(lambda: slots.held == 0 and slots.buffered_bytes == 0)
    reader = await _stream(client)  # others still stream
    assert reader.status == 200
    reader.close()
