"""Reservations over HTTP: admission, the books, leases, who may reserve, and bad requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gpu.nvml import NvmlBackend
from registry import keys
from tests.clock import ManualClock
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AS_SCHEDULER, SCHEDULER_TOKEN, AppClient, LogLines
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.scrape import scrape
from tests.waiting import eventually

MIB = 1024**2


async def _json(response: Any) -> Any:
    return json.loads(await response.read())


async def _json_get(client: Any, path: str) -> Any:
    return await _json(await client.get(path))


async def _model(client: Any, name: str) -> dict[str, Any]:
    body = await _json(await client.get("/models", params={"name": name}))
    model: dict[str, Any] = body["data"][0]
    return model


async def _device(client: Any) -> dict[str, Any]:
    body = await _json(await client.get("/gpus"))
    device: dict[str, Any] = body["devices"][0]
    return device


async def _reserve(client: Any, headers: dict[str, str] = AS_SCHEDULER, **body: Any) -> Any:
    return await client.post("/reservations", json=body, headers=headers)


@pytest.fixture
def one_gpu(gpu_file: Callable[..., Path]) -> Callable[..., Path]:
    """One simulated 80 GiB device, completely free."""
    gpu_file(("GPU-sim-0", 81920, 81920))
    return gpu_file


@pytest.fixture
async def client(start_app: AppClient, one_gpu: Callable[..., Path]) -> Any:
    # A poll interval of a minute: anything that changes below did so without a GPU poll.
    return await start_app(
        scheduler_token=SCHEDULER_TOKEN,
        admin_token=ADMIN_TOKEN,
        poll_interval=60,
        vram_margin_mib=0,
    )


async def test_a_stampede_gets_exactly_what_fits(client: Any) -> None:
    answers = await asyncio.gather(
        *(_reserve(client, model="large-v3", holder=f"session-{i}") for i in range(64))
    )
    statuses = [a.status for a in answers]
    assert statuses.count(201) == 8 and statuses.count(409) == 56
    refusals = [await _json(a) for a in answers if a.status == 409]
    assert {r["reason"] for r in refusals} == {"insufficient_vram"}
    assert "10000 MiB asked" in refusals[0]["detail"]

    large = await _model(client, "large-v3")
    assert (large["active"], large["fits"], large["reason"]) == (False, False, "insufficient_vram")
    assert large["headroom_mib"] == 81920 - 80000 - 10000
    assert (await _model(client, "tiny"))["active"] is True
    device = await _device(client)
    assert (device["pending_mib"], device["usable_mib"]) == (80000, 1920)

    granted = next(a for a in answers if a.status == 201)
    released = await client.delete(granted.headers["Location"], headers=AS_SCHEDULER)
    assert released.status == 204
    large = await _model(client, "large-v3")
    assert (large["active"], large["reason"], large["headroom_mib"]) == (True, None, 1920)
    assert (await _reserve(client, model="large-v3")).status == 201


async def test_a_reservation_is_described_located_and_listed(client: Any) -> None:
    first = await _reserve(client, vram_mib=12000, holder="job-7", ttl_s=300, pid=4242)
    assert first.status == 201
    body = await _json(first)
    assert first.headers["Location"] == f"/reservations/{body['id']}"
    assert body["model"] is None and body["vram_mib"] == 12000
    assert body["gpu"] == {"uuid": "GPU-sim-0", "index": 0}
    assert (body["holder"], body["pid"], body["pending_mib"]) == ("job-7", 4242, 12000)
    assert body["created_at"].endswith("+00:00") and body["expires_at"].endswith("+00:00")
    second = await _json(await _reserve(client, model="medium"))
    assert (second["model"], second["vram_mib"], second["holder"]) == ("medium", 2500, None)

    assert await _json(await client.get(first.headers["Location"])) == body
    listed = await _json(await client.get("/reservations"))
    assert [r["id"] for r in listed["data"]] == [body["id"], second["id"]]  # oldest first


async def test_the_best_fitting_device_is_booked_unless_one_is_named(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-big", 81920, 80000), ("GPU-small", 24576, 12000))
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, poll_interval=60)
    body = await _json(await _reserve(client, vram_mib=10000))
    assert body["gpu"] == {"uuid": "GPU-small", "index": 1}
    named = await _json(await _reserve(client, vram_mib=10000, gpu="GPU-big"))
    assert named["gpu"]["uuid"] == "GPU-big"
    # 2000 MiB left on the small one: a named device that cannot hold it is refused.
    refused = await _reserve(client, vram_mib=3000, gpu="GPU-small")
    assert refused.status == 409
    assert (await _json(refused))["reason"] == "insufficient_vram"
    assert "GPU-small has 2000 MiB usable" in (await _json(refused))["detail"]
    unknown = await _reserve(client, vram_mib=1, gpu="GPU-nowhere")
    assert unknown.status == 404 and "GPU-nowhere" in (await _json(unknown))["detail"]


async def test_gpus_metrics_and_listing_show_a_booking_at_once(client: Any) -> None:
    poller = client.app[keys.POLLER]
    polls = poller.polls
    before = await _model(client, "large-v3")
    reservation = await _json(await _reserve(client, vram_mib=30000))
    after = await _model(client, "large-v3")
    assert after["headroom_mib"] == before["headroom_mib"] - 30000
    assert after["placement"]["free_mib"] == 81920  # NVML's free memory is unchanged
    device = await _device(client)
    assert (device["pending_mib"], device["usable_mib"], device["free_mib"]) == (
        30000,
        51920,
        81920,
    )
    samples = await scrape(client)
    labels = (("gpu", "0"), ("name", "Simulated GPU"), ("uuid", "GPU-sim-0"))
    assert samples[("model_registry_gpu_pending_bytes", labels)] == 30000 * MIB
    assert samples[("model_registry_gpu_usable_bytes", labels)] == 51920 * MIB
    assert samples[("model_registry_reservations_open", ())] == 1
    assert samples[("model_registry_reservations_created_total", ())] == 1

    await client.delete(f"/reservations/{reservation['id']}", headers=AS_SCHEDULER)
    assert (await _model(client, "large-v3"))["headroom_mib"] == before["headroom_mib"]
    assert (await _device(client))["pending_mib"] == 0
    samples = await scrape(client)
    assert samples[("model_registry_gpu_pending_bytes", labels)] == 0
    assert samples[("model_registry_reservations_open", ())] == 0
    assert samples[("model_registry_reservations_released_total", ())] == 1
    assert poller.polls == polls, "the changes showed without a GPU poll"


async def test_refusals_are_counted_by_reason(client: Any, one_gpu: Callable[..., Path]) -> None:
    store = client.app[keys.CATALOG_STORE]
    await store.update(1, enabled=False)
    await eventually(lambda: _model(client, "tiny"), lambda m: m["enabled"] is False)
    disabled = await _reserve(client, model="tiny")
    assert disabled.status == 409
    assert (await _json(disabled))["reason"] == "disabled"
    never = await _reserve(client, vram_mib=90000)  # more than the device holds at all
    assert never.status == 409 and "Retry-After" not in never.headers
    assert (await _json(never))["reason"] == "too_large"
    samples = await scrape(client)
    rejected = "model_registry_reservations_rejected_total"
    assert samples[(rejected, (("reason", "disabled"),))] == 1
    assert samples[(rejected, (("reason", "too_large"),))] == 1
    assert samples[(rejected, (("reason", "insufficient_vram"),))] == 0
    assert samples[(rejected, (("reason", "gpu_state_unknown"),))] == 0


async def test_beyond_the_cap_a_reservation_is_429_too_many(
    start_app: AppClient, one_gpu: Callable[..., Path]
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, max_reservations=3)
    granted = [await _reserve(client, vram_mib=10) for _ in range(3)]
    assert [r.status for r in granted] == [201, 201, 201]
    refused = await _reserve(client, vram_mib=10)
    assert refused.status == 429 and "Retry-After" in refused.headers
    body = await _json(refused)
    assert body["reason"] == "too_many" and "MODEL_REGISTRY_MAX_RESERVATIONS" in body["detail"]
    assert len((await _json(await client.get("/reservations")))["data"]) == 3
    samples = await scrape(client)
    assert samples[("model_registry_reservations_rejected_total", (("reason", "too_many"),))] == 1
    location = granted[0].headers["Location"]
    assert (await client.delete(location, headers=AS_SCHEDULER)).status == 204
    assert (await _reserve(client, vram_mib=10)).status == 201  # room again


async def test_an_unknown_gpu_state_fails_closed(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file().write_text("{not json")
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    refused = await _reserve(client, model="tiny")
    assert refused.status == 503
    assert (await _json(refused))["reason"] == "gpu_state_unknown"
    assert refused.headers["Retry-After"] == "1"
    assert await _json(await client.get("/reservations")) == {"data": []}

    gpu_file(("GPU-sim-0", 24576, 20000))
    client.app[keys.POLLER].poll_now()
    await eventually(lambda: _reserve(client, model="tiny"), lambda r: r.status == 201)


async def test_backend_none_cannot_reserve(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none", scheduler_token=SCHEDULER_TOKEN)
    refused = await _reserve(client, vram_mib=1)
    assert refused.status == 503
    body = await _json(refused)
    assert body["reason"] == "gpu_state_unknown" and "backend none" in body["detail"]


async def test_expiry_needs_no_request(start_app: AppClient, one_gpu: Callable[..., Path]) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    book = client.app[keys.BOOK]
    created = await _json(await _reserve(client, model="large-v3", holder="crashed", ttl_s=1))
    assert len(book.open()) == 1
    # Nothing is asked of the daemon until the lease has run out.
    await eventually(lambda: book.open(), lambda open_: not open_, timeout_s=3)
    assert (await client.get(f"/reservations/{created['id']}")).status == 404
    assert (await _device(client))["pending_mib"] == 0
    assert (await scrape(client))[("model_registry_reservations_expired_total", ())] == 1


async def test_expiry_is_logged_once_with_holder_model_and_age(
    start_app: AppClient, one_gpu: Callable[..., Path], json_lines: LogLines
) -> None:
    clock = ManualClock()
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, clock=clock)
    book = client.app[keys.BOOK]
    await _reserve(client, model="large-v3", holder="crashed-7", ttl_s=30)
    clock.advance(31)
    book.wake()
    await eventually(lambda: book.open(), lambda open_: not open_)
    assert book.expire_due() == []  # a second look ends nothing more, and logs nothing
    lines = [line for line in json_lines() if line["event"] == "reservation expired"]
    assert len(lines) == 1
    assert (lines[0]["holder"], lines[0]["model"], lines[0]["age_s"]) == (
        "crashed-7",
        "large-v3",
        31.0,
    )


async def test_renewal_extends_the_lease_from_now(
    start_app: AppClient, one_gpu: Callable[..., Path]
) -> None:
    clock = ManualClock()
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, clock=clock)
    book = client.app[keys.BOOK]
    created = await _json(await _reserve(client, vram_mib=5000, ttl_s=10))
    location = f"/reservations/{created['id']}"
    clock.advance(8)
    renewed = await client.patch(location, json={"ttl_s": 10}, headers=AS_SCHEDULER)
    assert renewed.status == 200
    body = await _json(renewed)
    assert body["expires_at"] == (clock.now + timedelta(seconds=10)).isoformat()
    assert body["created_at"] == created["created_at"]
    clock.advance(5)  # 13 s after creation: the first lease would have ended
    assert book.expire_due() == []
    assert (await client.get(location)).status == 200
    clock.advance(6)
    book.wake()
    await eventually(lambda: client.get(location), lambda r: r.status == 404)
    gone = await client.patch(location, json={"ttl_s": 10}, headers=AS_SCHEDULER)
    assert gone.status == 404
    assert (await client.delete(location, headers=AS_SCHEDULER)).status == 404


async def test_a_named_process_loading_shrinks_its_reservation(start_app: AppClient) -> None:
    gpu = FakeGpu("GPU-h200", total=140 * 1024 * MIB, free=100_000 * MIB, used=0)
    gpu.compute_processes = [(777, 3000 * MIB)]  # already holds 3000 MiB before it reserves
    fake = FakeNvml([gpu])
    client = await start_app(
        backend=NvmlBackend(fake),
        gpu_backend="nvml",
        scheduler_token=SCHEDULER_TOKEN,
        poll_interval=60,
    )
    poller = client.app[keys.POLLER]
    with_pid = await _json(await _reserve(client, vram_mib=10000, pid=777))
    without = await _json(await _reserve(client, vram_mib=10000))
    assert (await _device(client))["usable_mib"] == 80_000

    async def loaded(mib: int, also_graphics: bool = False) -> dict[str, Any]:
        gpu.free = (100_000 - mib) * MIB
        gpu.compute_processes = [(777, (3000 + mib) * MIB), (888, 500 * MIB)]
        gpu.graphics_processes = [(777, (3000 + mib) * MIB)] if also_graphics else []
        polls = poller.polls
        poller.poll_now()
        await eventually(lambda: poller.polls, lambda n: n > polls)
        return await _device(client)

    device = await loaded(4000, also_graphics=True)
    # What the process took shows once, as used memory; the booking shrinks by as much.
    assert device["pending_mib"] == 6000 + 10000
    assert device["usable_mib"] == 80_000
    mine = await _json(await client.get(f"/reservations/{with_pid['id']}"))
    assert mine["pending_mib"] == 6000
    other = await _json(await client.get(f"/reservations/{without['id']}"))
    assert other["pending_mib"] == 10000

    device = await loaded(12000)  # more than it reserved: never below zero
    assert (await _json(await client.get(f"/reservations/{with_pid['id']}")))["pending_mib"] == 0
    assert device["usable_mib"] == 100_000 - 12000 - 10000

    gpu.compute_processes = []  # the process exited and its memory came back
    gpu.free = 100_000 * MIB
    polls = poller.polls
    poller.poll_now()
    await eventually(lambda: poller.polls, lambda n: n > polls)
    assert (await _json(await client.get(f"/reservations/{with_pid['id']}")))[
        "pending_mib"
    ] == 10000


async def test_naming_the_process_later_by_patch(start_app: AppClient) -> None:
    gpu = FakeGpu("GPU-h200", total=140 * 1024 * MIB, free=100_000 * MIB, used=0)
    client = await start_app(
        backend=NvmlBackend(FakeNvml([gpu])),
        gpu_backend="nvml",
        scheduler_token=SCHEDULER_TOKEN,
        poll_interval=60,
    )
    created = await _json(await _reserve(client, vram_mib=10000))
    location = f"/reservations/{created['id']}"
    named = await client.patch(location, json={"pid": 4321}, headers=AS_SCHEDULER)
    assert named.status == 200 and (await _json(named))["pid"] == 4321
    assert (await _json(named))["expires_at"] == created["expires_at"]
    gpu.free, gpu.compute_processes = 96_000 * MIB, [(4321, 4000 * MIB)]
    client.app[keys.POLLER].poll_now()
    await eventually(lambda: client.get(location), lambda r: r.status == 200)
    body = await eventually(lambda: _json_get(client, location), lambda b: b["pending_mib"] == 6000)
    assert body["pid"] == 4321


async def _json_get(client: Any, path: str) -> Any:
    return await _json(await client.get(path))


# -- who may reserve ------------------------------------------------------------------------


async def test_without_any_token_reservations_are_forbidden(
    start_app: AppClient, one_gpu: Callable[..., Path]
) -> None:
    client = await start_app()
    refused = await _reserve(client, model="tiny")
    assert refused.status == 403
    assert "MODEL_REGISTRY_SCHEDULER_TOKEN" in (await _json(refused))["detail"]
    assert (await client.get("/reservations")).status == 200


async def test_scheduler_tokens_reserve_but_do_not_edit_the_catalog(client: Any) -> None:
    created = await _reserve(client, model="tiny")
    assert created.status == 201
    location = created.headers["Location"]
    assert (await client.patch(location, json={"ttl_s": 60}, headers=AS_SCHEDULER)).status == 200
    edit = await client.post("/models", json={"name": "x", "vram": 1}, headers=AS_SCHEDULER)
    assert edit.status == 403
    assert "not change the catalog" in (await _json(edit))["detail"]
    assert (await client.delete("/models/1", headers=AS_SCHEDULER)).status == 403
    # Admin tokens may do both.
    assert (await _reserve(client, headers=AS_ADMIN, model="tiny")).status == 201
    assert (await client.delete(location, headers=AS_ADMIN)).status == 204


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic c2NoZWQ="},
        {"Authorization": "Bearer "},
    ],
)
async def test_missing_or_wrong_tokens_are_401(client: Any, headers: dict[str, str]) -> None:
    created = await _json(await _reserve(client, model="tiny"))
    for response in (
        await _reserve(client, headers=headers, model="tiny"),
        await client.patch(f"/reservations/{created['id']}", json={"ttl_s": 5}, headers=headers),
        await client.delete(f"/reservations/{created['id']}", headers=headers),
    ):
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert len((await _json(await client.get("/reservations")))["data"]) == 1


# -- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body"]),
        ({"model": "tiny", "vram_mib": 5}, ["body"]),
        ({"model": None, "vram_mib": None}, ["body"]),
        ({"vram_mib": 0}, ["body", "vram_mib"]),
        ({"vram_mib": -5}, ["body", "vram_mib"]),
        ({"vram_mib": 2**70}, ["body", "vram_mib"]),
        ({"vram_mib": "100"}, ["body", "vram_mib"]),
        ({"vram_mib": 1.5}, ["body", "vram_mib"]),
        ({"vram_mib": True}, ["body", "vram_mib"]),
        ({"model": ""}, ["body", "model"]),
        ({"model": "../../etc/passwd"}, ["body", "model"]),
        ({"model": 5}, ["body", "model"]),
        ({"vram_mib": 1, "ttl_s": 0}, ["body", "ttl_s"]),
        ({"vram_mib": 1, "ttl_s": 3601}, ["body", "ttl_s"]),
        ({"vram_mib": 1, "ttl_s": "60"}, ["body", "ttl_s"]),
        ({"vram_mib": 1, "ttl_s": None}, ["body", "ttl_s"]),
        ({"vram_mib": 1, "holder": ""}, ["body", "holder"]),
        ({"vram_mib": 1, "holder": "x" * 129}, ["body", "holder"]),
        ({"vram_mib": 1, "holder": "line\nbreak"}, ["body", "holder"]),
        ({"vram_mib": 1, "holder": "nul\u0000"}, ["body", "holder"]),
        ({"vram_mib": 1, "holder": ["a"]}, ["body", "holder"]),
        ({"vram_mib": 1, "pid": 0}, ["body", "pid"]),
        ({"vram_mib": 1, "pid": 2**31}, ["body", "pid"]),
        ({"vram_mib": 1, "pid": "777"}, ["body", "pid"]),
        ({"vram_mib": 1, "gpu": ""}, ["body", "gpu"]),
        ({"vram_mib": 1, "gpu": 0}, ["body", "gpu"]),
        ({"vram_mib": 1, "colour": "red"}, ["body", "colour"]),
        ([{"vram_mib": 1}], ["body"]),
        ("vram_mib=1", ["body"]),
        (None, ["body"]),
    ],
)
async def test_invalid_bodies_are_422_and_book_nothing(
    client: Any, body: Any, loc: list[str]
) -> None:
    response = await client.post("/reservations", data=json.dumps(body), headers=AS_SCHEDULER)
    assert response.status == 422
    issues = (await _json(response))["detail"]
    assert loc in [issue["loc"] for issue in issues], issues
    assert await _json(await client.get("/reservations")) == {"data": []}
    assert (await _device(client))["pending_mib"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\xff\xfe", b'{"vram_mib": 1, "vram_mib": 2}' * 3000, b"[" * 10000],
)
async def test_malformed_bodies_are_json_errors(client: Any, raw: bytes) -> None:
    response = await client.post("/reservations", data=raw, headers=AS_SCHEDULER)
    assert response.status in (413, 422)
    assert response.headers["Content-Type"].startswith("application/json")
    assert await _json(await client.get("/reservations")) == {"data": []}


@pytest.mark.parametrize(
    "body",
    [{}, {"ttl_s": 0}, {"ttl_s": 3601}, {"pid": -1}, {"ttl_s": None, "pid": None}, {"vram_mib": 5}],
)
async def test_invalid_renewals_are_422_and_change_nothing(client: Any, body: Any) -> None:
    created = await _json(await _reserve(client, vram_mib=100))
    location = f"/reservations/{created['id']}"
    response = await client.patch(location, json=body, headers=AS_SCHEDULER)
    assert response.status == 422
    assert await _json(await client.get(location)) == created


async def test_unknown_models_and_ids_are_404(client: Any) -> None:
    unknown = await _reserve(client, model="no-such-model")
    assert unknown.status == 404 and "no-such-model" in (await _json(unknown))["detail"]
    for path in ("/reservations/nope", "/reservations/%00", "/reservations/" + "9" * 300):
        assert (await client.get(path)).status == 404
        assert (await client.delete(path, headers=AS_SCHEDULER)).status == 404
        assert (await client.patch(path, json={"ttl_s": 5}, headers=AS_SCHEDULER)).status == 404
    assert (await client.put("/reservations", headers=AS_SCHEDULER)).status == 405


async def test_the_fleet_row_lists_the_newest_hundred_and_counts_them_all(client: Any) -> None:
    from registry.fleet.newest import FLEET_ROW_RESERVATIONS

    made = [await _json(await _reserve(client, vram_mib=1, holder=f"h{i}")) for i in range(105)]
    # The row is written at most every 100 ms, and read back at most every 0.4 s.
    fleet = await eventually(
        lambda: _json_get(client, "/fleet"), lambda f: f["data"][0]["reservations_total"] == 105
    )
    [host] = fleet["data"]
    assert (host["reservations_total"], host["pending_mib"]) == (105, 105)
    assert len(host["reservations"]) == FLEET_ROW_RESERVATIONS
    assert [r["id"] for r in host["reservations"]] == [r["id"] for r in reversed(made)][:100]


def test_the_schema_pattern_for_free_text_refuses_exactly_what_the_validator_does() -> None:
    import re
    import unicodedata

    from registry.admission.schemas import NOT_SHOWN_AS_WRITTEN

    refused = re.compile(f"[{NOT_SHOWN_AS_WRITTEN}]")
    for code_point in range(0x110000):
        character = chr(code_point)
        expected = unicodedata.category(character) in ("Cc", "Cf")
        assert bool(refused.match(character)) is expected, hex(code_point)
