"""What a token books is that token's: another scheduler token gets 403 renewing, binding or
releasing it; an admin token may; bookings from before owners were kept are anyone's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import keys
from registry.auth import owner_of
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient

ONE = "scheduler-token-one-0123456789"
TWO = "scheduler-token-two-0123456789"
AS_ONE = {"Authorization": f"Bearer {ONE}"}
AS_TWO = {"Authorization": f"Bearer {TWO}"}
GPU = "GPU-sim-0"
WORKER = 4242


@pytest.fixture
async def client(start_app: AppClient, gpu_file: Callable[..., Path]) -> Any:
    gpu_file({"uuid": GPU, "total_mib": 81920, "free_mib": 80000, "processes": [{"pid": WORKER}]})
    return await start_app(
        scheduler_token=f"{ONE},{TWO}", admin_token=ADMIN_TOKEN, poll_interval=60
    )


async def _created(answer: Any) -> dict[str, Any]:
    assert answer.status == 201, await answer.text()
    body: dict[str, Any] = json.loads(await answer.read())
    return body


async def _forbidden(answer: Any) -> None:
    assert answer.status == 403
    assert "another token" in (await answer.json())["detail"]


async def test_only_the_token_that_reserved_or_an_admin_may_change_a_reservation(
    client: Any,
) -> None:
    reservation = await _created(
        await client.post("/reservations", json={"model": "tiny"}, headers=AS_ONE)
    )
    path = f"/reservations/{reservation['id']}"
    await _forbidden(await client.patch(path, json={"ttl_s": 600}, headers=AS_TWO))
    await _forbidden(await client.delete(path, headers=AS_TWO))
    bind = {"reservation": reservation["id"], "pid": WORKER}
    await _forbidden(await client.post("/instances", json=bind, headers=AS_TWO))
    unchanged = json.loads(await (await client.get(path)).read())
    assert unchanged["expires_at"] == reservation["expires_at"]

    assert (await client.patch(path, json={"ttl_s": 600}, headers=AS_ONE)).status == 200
    assert (await client.delete(path, headers=AS_ADMIN)).status == 204
    # The owner is kept as a hash, never the token itself.
    journal = (client.app[keys.SETTINGS].current.state_dir / "reservations.jsonl").read_text()
    assert ONE not in journal and owner_of(ONE.encode()) in journal


async def test_only_the_token_that_made_an_instance_or_an_admin_may_end_it(
    client: Any,
) -> None:
    reservation = await _created(
        await client.post("/reservations", json={"model": "tiny"}, headers=AS_ONE)
    )
    bind = {"reservation": reservation["id"], "pid": WORKER}
    bound = await _created(await client.post("/instances", json=bind, headers=AS_ONE))
    await _forbidden(await client.delete(f"/instances/{bound['id']}", headers=AS_TWO))
    assert (await client.delete(f"/instances/{bound['id']}", headers=AS_ONE)).status == 204

    adopt = {"model": "medium", "gpu": GPU, "pid": WORKER}
    adopted = await _created(await client.post("/instances", json=adopt, headers=AS_TWO))
    await _forbidden(await client.delete(f"/instances/{adopted['id']}", headers=AS_ONE))
    assert (await client.delete(f"/instances/{adopted['id']}", headers=AS_ADMIN)).status == 204


async def test_a_reservation_from_before_owners_were_kept_is_anyones(
    start_app: AppClient, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    gpu_file({"uuid": GPU, "total_mib": 81920, "free_mib": 80000})
    state = tmp_path / "legacy-state"
    state.mkdir(mode=0o700)
    legacy = {
        "id": "legacy-1",
        "vram_mib": 1000,
        "gpu_uuid": GPU,
        "gpu_index": 0,
        "created_at": "2026-12-01T00:00:00+00:00",
        "expires_at": "2099-12-01T00:00:00+00:00",
    }
    (state / "reservations.jsonl").write_text('{"format":2}\n' + json.dumps({"put": legacy}) + "\n")
    client = await start_app(state_dir=state, scheduler_token=f"{ONE},{TWO}", poll_interval=60)
    assert (await client.get("/reservations/legacy-1")).status == 200
    path = "/reservations/legacy-1"
    assert (await client.patch(path, json={"ttl_s": 60}, headers=AS_ONE)).status == 200
    assert (await client.delete(path, headers=AS_TWO)).status == 204
