"""GET /models follows free VRAM: a real H200 recording, and the simulated backend over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu.nvml import NvmlBackend
from registry import keys
from tests.conftest import AppClient
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.waiting import eventually

TRACE = Path(__file__).parent / "fixtures" / "h200_alloc_trace.json"
MIB = 1024**2


async def _listing(client: Any, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/models{query}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


def _active(body: dict[str, Any]) -> dict[str, bool]:
    return {m["name"]: m["active"] for m in body["data"]}


async def test_replaying_the_h200_trace_turns_large_models_off_and_on(
    start_app: AppClient,
) -> None:
    trace = json.loads(TRACE.read_text())
    device = trace["device"]
    first = trace["samples"][0]
    gpu = FakeGpu(
        device["uuid"],
        name=device["name"],
        total=first["total"],
        free=first["free"],
        reserved=first["reserved"],
        used=first["used"],
    )
    fake = FakeNvml([gpu])
    client = await start_app(backend=NvmlBackend(fake), gpu_backend="nvml", seed_catalog=False)
    store = client.app[keys.CATALOG_STORE]
    await store.create("whisper-small", 2000)
    await store.create("llm-40g", 40000)
    await store.create("llm-100g", 100000)
    await eventually(lambda: _listing(client), lambda b: len(b["data"]) == 3)
    poller = client.app[keys.POLLER]

    history: list[dict[str, bool]] = []
    for sample in trace["samples"]:
        gpu.free, gpu.used, gpu.reserved = sample["free"], sample["used"], sample["reserved"]
        poller.poll_now()
        free_mib = sample["free"] // MIB
        body = await eventually(
            lambda: _listing(client),
            lambda b, free=free_mib: (
                b["capacity"]["state"] == "ok"
                and b["data"][0]["placement"] is not None
                and b["data"][0]["placement"]["free_mib"] == free
            ),
        )
        for model in body["data"]:
            assert model["fits"] is (model["vram"] <= free_mib), (sample, model)
            assert model["headroom_mib"] == free_mib - model["vram"]
            if model["fits"]:
                assert model["placement"]["gpu"] == device["uuid"]
        if not history or history[-1] != _active(body):
            history.append(_active(body))

    # All fit; the 40 GiB step turns off the 100 GB model; the 60 GiB step the 40 GB one too;
    # freeing 60 GiB brings the 40 GB model back; freeing everything brings back the rest.
    assert [(h["llm-40g"], h["llm-100g"]) for h in history] == [
        (True, True),
        (True, False),
        (False, False),
        (True, False),
        (True, True),
    ]
    assert all(h["whisper-small"] for h in history)


async def test_simulated_file_change_shows_within_one_poll_interval(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    interval = 0.5
    client = await start_app(poll_interval=interval)
    body = await _listing(client)
    assert body["capacity"] == {**body["capacity"], "state": "ok", "backend": "simulated"}
    assert all(_active(body).values())

    gpu_file(("GPU-sim-0", 24576, 4000))  # something took 16 GB
    changed_at = time.monotonic()
    body = await eventually(
        lambda: _listing(client), lambda b: not _active(b)["large-v3"], timeout_s=3 * interval
    )
    # One poll interval, with room for a loaded two-core machine.
    assert time.monotonic() - changed_at <= interval + 0.5
    assert _active(body) == {
        "tiny": True,
        "medium": True,
        "large_v1": False,
        "large_v2": False,
        "large-v3": False,
    }
    large = body["data"][4]
    assert large["reason"] == "insufficient_vram" and large["fits"] is False
    assert large["placement"] is None and large["headroom_mib"] == 4000 - 10000


async def test_active_filter_counts_the_filtered_set(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 24576, 3000))
    client = await start_app()
    active = await _listing(client, "?active=true")
    assert [m["name"] for m in active["data"]] == ["tiny", "medium"]
    assert active["pagination"]["total_items"] == 2
    inactive = await _listing(client, "?active=false&limit=2&skip=2")
    assert [m["name"] for m in inactive["data"]] == ["large-v3"]
    assert inactive["pagination"] == {
        "total_items": 3,
        "total_pages": 2,
        "current_page": 2,
        "per_page": 2,
    }


async def test_models_go_to_the_best_fitting_of_several_devices(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-big", 81920, 70000), ("GPU-small", 24576, 6000))
    client = await start_app()
    placements = {m["name"]: m["placement"]["gpu"] for m in (await _listing(client))["data"]}
    assert placements["tiny"] == "GPU-small" and placements["large_v1"] == "GPU-small"
    assert placements["large-v3"] == "GPU-big"


async def test_margins_apply_to_every_device(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 20000, 12000))
    client = await start_app(vram_margin_mib=1000, vram_margin_percent=5)  # 1000 + 1000 MiB
    body = await _listing(client)
    assert _active(body)["large-v3"] is True  # 12000 - 2000 = 10000, exactly enough
    assert body["data"][4]["headroom_mib"] == 0
    gpus = await (await client.get("/gpus")).json()
    assert gpus["devices"][0]["usable_mib"] == 10000
    assert (gpus["margin_mib"], gpus["margin_percent"]) == (1000, 5.0)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        ("{not json", "invalid simulated file"),
        ('{"devices": []}', "lists no devices"),
        ('{"devices": [{"uuid": "x", "total_mib": -1, "free_mib": 1}]}', "devices.0.total_mib"),
    ],
)
async def test_a_bad_simulated_file_is_unavailable_with_the_reason_then_recovers(
    start_app: AppClient, gpu_file: Callable[..., Path], content: str | None, reason: str
) -> None:
    path = gpu_file()
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    client = await start_app(poll_interval=0.05)
    gpus = await (await client.get("/gpus")).json()
    assert gpus["state"] == "unavailable"
    assert reason in gpus["last_error"]
    body = await _listing(client)
    assert {m["reason"] for m in body["data"]} == {"gpu_state_unknown"}
    assert {m["fits"] for m in body["data"]} == {None}

    gpu_file(("GPU-sim-0", 24576, 20000))
    client.app[keys.POLLER].poll_now()
    body = await eventually(lambda: _listing(client), lambda b: b["capacity"]["state"] == "ok")
    assert all(_active(body).values())


async def test_gpus_endpoint_describes_devices(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 24576, 20000))
    client = await start_app()
    body = await (await client.get("/gpus")).json()
    assert body["backend"] == "simulated" and body["state"] == "ok"
    assert body["poll_interval_s"] == 0.2 and body["last_error"] is None
    [device] = body["devices"]
    assert device == {
        "uuid": "GPU-sim-0",
        "index": 0,
        "name": "Simulated GPU",
        "total_mib": 24576,
        "free_mib": 20000,
        "healthy": True,
        "usable_mib": 20000,
        "pending_mib": 0,
        "processes": [],
    }
    assert body["as_of"].endswith("+00:00")


async def test_backend_none_reports_disabled(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    body = await (await client.get("/gpus")).json()
    assert body["state"] == "disabled" and body["devices"] == []
