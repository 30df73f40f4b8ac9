"""The in-memory view: conditional GETs, several daemons on one database, a database outage."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from registry import keys
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, LogLines
from tests.db import StoppableServer, execute
from tests.waiting import eventually


async def _listing(client: Any, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/models{query}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_etags_and_if_none_match(start_app: AppClient) -> None:
    client = await start_app(admin_token=ADMIN_TOKEN)
    first = await client.get("/models")
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = await client.get("/models", headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag
    assert await again.read() == b""
    assert (await client.get("/models", headers={"If-None-Match": f'W/{etag}, "x"'})).status == 304
    assert (await client.get("/models", headers={"If-None-Match": '"other"'})).status == 200
    other_page = await client.get("/models?limit=2")
    assert other_page.headers["ETag"] != etag

    one = await client.get("/models/1")
    assert (
        await client.get("/models/1", headers={"If-None-Match": one.headers["ETag"]})
    ).status == 304

    await client.patch("/models/1", json={"vram": 700}, headers=AS_ADMIN)
    changed = await client.get("/models", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (
        await client.get("/models/1", headers={"If-None-Match": one.headers["ETag"]})
    ).status == 200


async def test_a_write_on_one_daemon_shows_on_another_within_a_second(
    start_app: AppClient,
) -> None:
    writer = await start_app(admin_token=ADMIN_TOKEN)
    reader = await start_app(admin_token=ADMIN_TOKEN)
    await eventually(lambda: _listening(reader), bool)

    response = await writer.post("/models", json={"name": "shared", "vram": 1234}, headers=AS_ADMIN)
    assert response.status == 201
    # Within a second, with room for a loaded two-core machine.
    await eventually(
        lambda: _listing(reader, "?name=shared"), lambda b: len(b["data"]) == 1, timeout_s=2.0
    )

    await writer.patch("/models/1", json={"enabled": False}, headers=AS_ADMIN)
    await eventually(
        lambda: _listing(reader, "?name=tiny"),
        lambda b: b["data"][0]["reason"] == "disabled",
        timeout_s=2.0,
    )
    await writer.delete("/models/2", headers=AS_ADMIN)
    await eventually(lambda: reader.get("/models/2"), lambda r: r.status == 404, timeout_s=1.0)


async def test_changes_made_outside_the_daemon_are_picked_up(
    start_app: AppClient, database_url: str
) -> None:
    client = await start_app()
    await eventually(lambda: _listening(client), bool)
    await execute(database_url, "UPDATE models SET vram = 9999 WHERE name = 'tiny'")
    body = await eventually(
        lambda: _listing(client, "?name=tiny"), lambda b: b["data"][0]["vram"] == 9999
    )
    assert body["data"][0]["updated_at"] is not None


async def test_periodic_reload_covers_a_missed_notification(
    start_app: AppClient, database_url: str, json_lines: LogLines
) -> None:
    client = await start_app(catalog_reload_interval=1.0)
    await eventually(lambda: _listening(client), bool)
    conn = await asyncpg.connect(database_url)
    try:
        # session_replication_role=replica skips triggers: no NOTIFY is sent.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE models SET vram = 4321 WHERE name = 'medium'")
    finally:
        await conn.close()
    await eventually(
        lambda: _listing(client, "?name=medium"),
        lambda b: b["data"][0]["vram"] == 4321,
        timeout_s=3,
    )
    # Said, since nothing announced it (a restore looks the same).
    picked = [x for x in json_lines() if x["event"].startswith("catalog changes no notification")]
    assert [(x["changed"], x["removed"]) for x in picked] == [(1, 0)]


async def _listening(client: Any) -> bool:
    return client.app[keys.CATALOG_SYNC].listening.is_set()


async def test_database_outage_reads_keep_working_and_it_reconnects(
    start_app: AppClient, own_server: StoppableServer
) -> None:
    dsn = own_server.start()
    client = await start_app(database_url=dsn, admin_token=ADMIN_TOKEN)
    await eventually(lambda: _listening(client), bool)
    before = await _listing(client)

    await asyncio.to_thread(own_server.stop)
    during = await _listing(client)
    assert during["data"] == before["data"]
    assert during["capacity"]["state"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "unreachable" in (await ready.json())["problems"][0]
    write = await client.post("/models", json={"name": "during", "vram": 1}, headers=AS_ADMIN)
    assert write.status == 503
    assert "database unavailable" in (await write.json())["detail"]

    await asyncio.to_thread(own_server.start)
    await eventually(lambda: client.get("/readyz"), lambda r: r.status == 200, timeout_s=10)
    write = await client.post("/models", json={"name": "after", "vram": 1}, headers=AS_ADMIN)
    assert write.status == 201
    # The listener came back too: a change made elsewhere reaches this daemon again.
    await eventually(lambda: _listening(client), bool, timeout_s=10)
    await execute(dsn, "UPDATE models SET enabled = false WHERE name = 'tiny'")
    await eventually(
        lambda: _listing(client, "?name=tiny"), lambda b: b["data"][0]["enabled"] is False
    )
