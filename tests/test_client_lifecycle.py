"""A worker's whole life through the client, against a real daemon: reserve (booked at once,
renewed and released outside a `with` block too), bind, report sessions, pin, ready, adopt,
unload, wait for an instance to end, typed fields; a lease lost (its callback, and a bind that
says LeaseLost); make room (a claim, the eviction it asks for, waiting for the room); errors
typed (Reason, Invalid, status_code). The blocking client runs in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from model_registry_client import (
    AsyncRegistry,
    Invalid,
    LeaseLost,
    Reason,
    Refused,
    Registry,
)

from registry import keys
from tests.clock import ManualClock
from tests.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    ONE_GPU,
    SCHEDULER_TOKEN,
    AppClient,
)
from tests.waiting import eventually, until

WORKER, OTHER = 4242, 4343


def _url(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_a_worker_lives_its_whole_life_through_the_client(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    gpus({WORKER: 3000, OTHER: 500})
    daemon = await start_app(admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN)
    await daemon.app[keys.POLLER].poll_and_wait(5)
    url, book = _url(daemon), daemon.app[keys.BOOK]

    def live() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Registry(url, SCHEDULER_TOKEN) as reg:  # the token, positionally, as before
            lease = reg.reserve("medium", ttl_s=1, holder="session-1")
            seen["booked_at_once"] = [r.id for r in reg.reservations()] == [lease.id]
            until(lambda: lease.renewals >= 2)  # renewed without a with block
            seen["renewed"] = lease.renew(ttl_s=30).expires_at > lease.reservation.created_at
            instance = lease.bind(WORKER, sessions=1)
            seen["bound"] = (instance.model, instance.pid, instance.sessions, instance.ready)
            seen["after_bind"] = (lease.active, [r.id for r in reg.reservations()])
            lease.release()  # bound: nothing left to release, and no error
            seen["sessions"] = reg.set_sessions(instance.id, 0).sessions
            seen["pinned"] = (reg.pin(instance.id).pinned, reg.unpin(instance.id).pinned)
            seen["ready"] = reg.ready(instance.id).ready
            fetched = reg.instance(instance.id)
            seen["fetched"] = (fetched.id, fetched.holder, fetched.idle_s is not None)
            [medium] = reg.models(name="medium")
            seen["model"] = (
                [i.id for i in medium.instances],
                medium.instances_total,
                medium.learn,
                medium.vram_effective,
                medium.reload_s is not None,
                "instances" in medium.extra,
            )
            adopted = reg.adopt("tiny", ONE_GPU, OTHER, holder="ops", pinned=True)
            seen["adopted"] = (adopted.model, adopted.pid, adopted.pinned, adopted.holder)
            reg.unload(adopted.id)
            reg.unload(adopted.id)  # gone already: no error
            seen["gone"] = reg.wait_gone(adopted.id, timeout=5)
            seen["still_there"] = reg.wait_gone(instance.id, timeout=0.3)
            seen["hosts"] = [(h.host, h.state, len(h.devices)) for h in reg.hosts()]
            second = reg.reserve(vram_mib=1000, ttl_s=30)
            second.release()
            second.release()  # once is enough
            seen["released"] = [r.id for r in reg.reservations()]
            with pytest.raises(RuntimeError, match="released"):
                second.bind(WORKER)
        return seen

    seen = await asyncio.to_thread(live)
    assert seen["booked_at_once"] and seen["renewed"]
    assert seen["bound"] == ("medium", WORKER, 1, False)
    assert seen["after_bind"] == (False, [])
    assert seen["sessions"] == 0 and seen["pinned"] == (True, False) and seen["ready"] is True
    assert seen["fetched"][1:] == ("session-1", True)
    instance_id = seen["fetched"][0]
    assert seen["model"] == ([instance_id], 1, True, 2500, True, False)
    assert seen["adopted"] == ("tiny", OTHER, True, "ops")
    assert seen["gone"] is True and seen["still_there"] is False
    assert seen["hosts"] == [(daemon.app[keys.SETTINGS].current.host_id, "ok", 1)]
    assert seen["released"] == [] and book.counters.released == 1


async def test_a_lost_lease_calls_back_and_a_bind_on_it_says_lease_lost(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    gpus({WORKER: 3000})
    daemon = await start_app(admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN)
    await daemon.app[keys.POLLER].poll_and_wait(5)
    url = _url(daemon)

    def lose() -> tuple[list[str], type[BaseException]]:
        told: list[str] = []
        with Registry(url, token=SCHEDULER_TOKEN) as reg:
            lease = reg.reserve("tiny", ttl_s=1, on_lost=lambda lost: told.append(lost.id))
            removed = httpx.delete(f"{url}/reservations/{lease.id}", headers=AS_ADMIN)
            assert removed.status_code == 204
            until(lambda: told)
            with pytest.raises(LeaseLost) as caught:
                lease.bind(WORKER)
            with pytest.raises(LeaseLost):
                lease.renew()
            # A bind racing the loss: the daemon's 404 is LeaseLost too, not NotFound.
            racing = reg.reserve("tiny", ttl_s=30)
            httpx.delete(f"{url}/reservations/{racing.id}", headers=AS_ADMIN)
            with pytest.raises(LeaseLost):
                racing.bind(WORKER)
            racing.release()
            return told, caught.type

    told, raised = await asyncio.to_thread(lose)
    assert len(told) == 1 and raised is LeaseLost

    async with AsyncRegistry(url, token=SCHEDULER_TOKEN) as reg:
        called: list[str] = []
        lease = await reg.reserve("tiny", ttl_s=1, on_lost=lambda lost: called.append(lost.id))
        async with httpx.AsyncClient() as http:
            await http.delete(f"{url}/reservations/{lease.id}", headers=AS_ADMIN)
        await eventually(lambda: called)
        with pytest.raises(LeaseLost):
            await lease.bind(WORKER)
        await lease.release()


async def test_errors_are_typed(start_app: AppClient, gpus: Callable[..., Path]) -> None:
    gpus({}, free=5000)
    daemon = await start_app(admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN)
    await daemon.app[keys.POLLER].poll_and_wait(5)
    await daemon.post("/models", json={"name": "huge", "vram": 900000}, headers=AS_ADMIN)
    url = _url(daemon)

    def ask() -> tuple[Refused, Refused, Invalid]:
        with Registry(url, token=SCHEDULER_TOKEN) as reg:
            with pytest.raises(Refused) as busy:
                reg.reserve("large-v3")
            with pytest.raises(Refused) as never:
                reg.reserve("huge")
            with pytest.raises(Invalid) as invalid:
                reg.reserve("tiny", ttl_s=-5)
            return busy.value, never.value, invalid.value

    busy, never, invalid = await asyncio.to_thread(ask)
    assert busy.reason is Reason.INSUFFICIENT_VRAM and busy.reason == "insufficient_vram"
    assert never.reason is Reason.TOO_LARGE and str(never.reason) == "too_large"
    assert (busy.status_code, busy.status) == (409, 409)
    assert invalid.status_code == 422 and invalid.errors[0]["loc"] == ["body", "ttl_s"]
    assert "ttl_s" in str(invalid)


async def test_a_claim_from_the_client_waits_for_the_room_its_victim_frees(
    start_app: AppClient, gpus: Callable[..., Path]
) -> None:
    clock = ManualClock()
    idle = {101: 25000, 102: 25000, 103: 25000}
    gpus(idle)
    daemon = await start_app(
        admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN, clock=clock, poll_interval=60
    )
    poller = daemon.app[keys.POLLER]
    await poller.poll_and_wait(5)
    await daemon.post("/models", json={"name": "big", "vram": 20000}, headers=AS_ADMIN)
    url = _url(daemon)
    async with AsyncRegistry(url, token=SCHEDULER_TOKEN) as reg:
        for pid in idle:
            await reg.adopt("medium", ONE_GPU, pid, holder="workers")
    clock.advance(300)  # loaded long enough, idle long enough

    def claim() -> tuple[Any, Any, bool]:
        with Registry(url, token=SCHEDULER_TOKEN) as reg:
            evictions = reg.watch_evictions(holder="workers")
            lease = reg.reserve("big", make_room=True, priority=50, ttl_s=60)
            assert lease.awaiting is not None
            [victim] = lease.awaiting.unload
            asked = next(evictions)
            evictions.close()
            reg.unload(asked.id)
            return victim, asked, lease.wait_room(timeout=10)

    victim, asked, roomy = await asyncio.to_thread(claim)
    assert asked.id == victim.id and asked.evicting is not None
    assert roomy is True


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_lease_whose_registry_was_closed_stops_renewing_quietly(
    start_app: AppClient,
) -> None:
    daemon = await start_app(scheduler_token=SCHEDULER_TOKEN)
    url = _url(daemon)

    def abandon() -> Any:
        reg = Registry(url, token=SCHEDULER_TOKEN)
        lease = reg.reserve("tiny", ttl_s=1)
        reg.close()  # the lease was never released nor entered: it lapses at its expiry
        renewer = lease._renewer
        assert renewer is not None
        until(lambda: not renewer.is_alive(), timeout_s=5)
        return lease

    lease = await asyncio.to_thread(abandon)
    assert not lease.lost  # not lost: nobody renews it any more, and it ends at its expiry
