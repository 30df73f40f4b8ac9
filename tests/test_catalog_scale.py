"""A 10,000-model catalog: after a GPU change and after writes, every page the daemon serves is
what the pure capacity rule says, model by model; and only the models that flip are logged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry import keys
from registry.capacity import Margins, assess_all
from registry.model import CatalogModel
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, LogLines
from tests.db import fetch
from tests.reference import model_object
from tests.waiting import eventually

COUNT = 10_000
MARGINS = Margins(mib=512, percent=1.0)


async def _reference(client: Any, database_url: str) -> list[dict[str, Any]]:
    """Every model as the pure rule sees it, from the database's rows and the GPU readings."""
    models = [CatalogModel.from_row(r) for r in await fetch(database_url, "SELECT * FROM models")]
    view = client.app[keys.VIEW]
    verdicts = assess_all(models, view.snapshot, MARGINS, view.reservations)
    return [model_object(m, verdicts[m.id]) for m in sorted(models, key=lambda m: m.id)]


async def _pages(client: Any, query: str, limit: int = 1000) -> tuple[list[Any], int]:
    served: list[Any] = []
    skip, total = 0, None
    while total is None or skip < total:
        body = await (await client.get(f"/models?limit={limit}&skip={skip}{query}")).json()
        total = body["pagination"]["total_items"]
        assert body["pagination"]["total_pages"] == -(-total // limit)
        served.extend(body["data"])
        skip += limit
        if not body["data"]:
            break
    return served, total or 0


async def _assert_every_page_matches(client: Any, database_url: str) -> list[dict[str, Any]]:
    expected = await _reference(client, database_url)
    served, total = await _pages(client, "")
    assert total == len(expected) and served == expected
    for flag in (True, False):
        subset = [m for m in expected if m["active"] is flag]
        served, total = await _pages(client, f"&active={str(flag).lower()}", limit=700)
        assert total == len(subset) and served == subset
    for probe in (expected[0], expected[len(expected) // 2], expected[-1]):
        named = await (await client.get(f"/models?name={probe['name']}")).json()
        assert named["data"] == [probe]
        assert await (await client.get(f"/models/{probe['id']}")).json() == probe
    return expected


def _write_gpus(path: Path, free: tuple[int, int]) -> None:
    devices = [
        {"uuid": f"GPU-{i}", "name": "Simulated GPU", "total_mib": 81920, "free_mib": f}
        for i, f in enumerate(free)
    ]
    path.write_text(json.dumps({"devices": devices}))


async def test_every_page_stays_right_through_gpu_changes_and_writes(
    start_app: AppClient,
    gpu_file: Callable[..., Path],
    database_url: str,
    json_lines: LogLines,
) -> None:
    path = gpu_file()
    _write_gpus(path, (60_000, 20_000))
    client = await start_app(
        admin_token=ADMIN_TOKEN,
        seed_catalog=False,
        poll_interval=60,
        vram_margin_mib=MARGINS.mib,
        vram_margin_percent=MARGINS.percent,
    )
    models = [
        {"name": f"m-{i:05d}", "vram": 1 + (i * 7919) % 90_000, "enabled": i % 7 != 0}
        for i in range(COUNT)
    ]
    applied = await client.put("/models", json={"models": models}, headers=AS_ADMIN)
    assert applied.status == 200
    reserved = await client.post("/reservations", json={"vram_mib": 5000}, headers=AS_ADMIN)
    assert reserved.status == 201
    before = await _assert_every_page_matches(client, database_url)

    json_lines()
    _write_gpus(path, (30_000, 45_000))
    poller = client.app[keys.POLLER]
    poller.poll_now()
    await eventually(lambda: _free(client), lambda free: free == [30_000, 45_000], timeout_s=5)
    after = await _assert_every_page_matches(client, database_url)
    flipped = {b["name"] for b, a in zip(before, after, strict=True) if b["active"] != a["active"]}
    assert flipped, "the change must flip some models for this test to mean anything"
    logged = [x["model"] for x in json_lines() if x["event"] == "model availability changed"]
    assert sorted(logged) == sorted(flipped)

    # Writes: one model bigger, one switched off, one new, one gone.
    view = client.app[keys.VIEW]
    generation = view.generation
    assert (await client.patch("/models/10", json={"vram": 89_999}, headers=AS_ADMIN)).status == 200
    assert (
        await client.patch("/models/20", json={"enabled": False}, headers=AS_ADMIN)
    ).status == 200
    created = await client.post("/models", json={"name": "fresh", "vram": 1}, headers=AS_ADMIN)
    assert created.status == 201
    assert (await client.delete("/models/30", headers=AS_ADMIN)).status == 204
    assert view.generation == generation + 4
    await _assert_every_page_matches(client, database_url)


async def _free(client: Any) -> list[int]:
    body = await (await client.get("/gpus")).json()
    return [d["free_mib"] for d in body["devices"]]
