"""The client against httpx.MockTransport, for what a daemon cannot easily produce: a stream
of keep-alive comments between events, reasons this client does not know, rogue fleet rows
that advertise other hosts (the token never goes there), an entry daemon that is down, and a
caller's own httpx client."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from model_registry_client import (
    AsyncFleet,
    AsyncRegistry,
    Fleet,
    GpusEvent,
    Invalid,
    ModelsEvent,
    Reason,
    Refused,
    Registry,
    SnapshotEvent,
)
from model_registry_client._protocol import OwnBinds
from model_registry_client.objects import GpuRef, WarmSpot

TOKEN = "secret-token"
NOW = "2026-12-08T00:00:00+00:00"
GPUS = {"backend": "simulated", "state": "ok", "devices": []}

STREAM = (
    f"event: snapshot\nid: 7\ndata: {json.dumps({'models': [], 'gpus': GPUS})}\n\n"
    ": ping\n\n"
    ": ping\n\n"
    f"event: gpus\nid: 8\ndata: {json.dumps(GPUS)}\n\n"
    ": ping\n\n"
    f'event: models\nid: 9\ndata: {{"models": [], "deleted": [3]}}\n\n'
    ": ping\n\n"
)


def _events_handler(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/events"
    return httpx.Response(200, text=STREAM, headers={"Content-Type": "text/event-stream"})


def test_keepalive_comments_never_reach_the_caller_and_events_are_typed() -> None:
    with Registry("http://daemon", transport=httpx.MockTransport(_events_handler)) as reg:
        watch = reg.watch()
        events = [next(watch), next(watch), next(watch)]
        watch.close()
    assert [type(e) for e in events] == [SnapshotEvent, GpusEvent, ModelsEvent]
    assert [e.id for e in events] == ["7", "8", "9"]
    snapshot, gpus, models = events
    assert isinstance(snapshot, SnapshotEvent) and snapshot.gpus is not None
    assert isinstance(gpus, GpusEvent) and gpus.gpus is not None and gpus.gpus.state == "ok"
    assert isinstance(models, ModelsEvent) and models.deleted == [3]
    assert models.event == "models" and models.data == {"models": [], "deleted": [3]}


async def test_the_async_watch_skips_keepalives_too() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return _events_handler(request)

    async with AsyncRegistry("http://daemon", transport=httpx.MockTransport(handler)) as reg:
        watch = reg.watch()
        names = [(await watch.__anext__()).event for _ in range(3)]
        await watch.close()
    assert names == ["snapshot", "gpus", "models"]


def test_reasons_it_does_not_know_stay_strings_and_a_422_lists_the_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/reservations":
            return httpx.Response(409, json={"detail": "not yet", "reason": "cosmic_rays"})
        detail = [{"type": "x", "loc": ["query", "skip"], "msg": "bad skip", "input": "-1"}]
        return httpx.Response(422, json={"detail": detail})

    with Registry("http://daemon", "t", transport=httpx.MockTransport(handler)) as reg:
        with pytest.raises(Refused) as refused:
            reg.reserve("tiny")
        assert refused.value.reason == "cosmic_rays"
        assert not isinstance(refused.value.reason, Reason)
        with pytest.raises(Invalid) as invalid:
            reg.models()
    assert str(invalid.value) == "query.skip: bad skip"
    assert invalid.value.errors[0]["input"] == "-1"


def test_a_callers_own_httpx_client_is_used_and_left_open() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json={"backend": "simulated", "state": "ok"})

    own = httpx.Client(transport=httpx.MockTransport(handler))
    with Registry("http://daemon/", TOKEN, client=own) as reg:
        assert reg.gpus().state == "ok"
    assert not own.is_closed and seen == [f"Bearer {TOKEN}"]
    own.close()


# -- the fleet ----------------------------------------------------------------------------------


def _fleet_model(hosts: list[tuple[str, str]], warm: Sequence[tuple[str, str]] = ()) -> Any:
    return {
        "data": [
            {
                "name": "tiny",
                "hosts": [
                    {"host": h, "url": u, "gpu": "GPU-0", "index": 0, "usable_mib": 9000}
                    for h, u in hosts
                ],
                "warm": [
                    {"host": h, "url": u, "gpu": "GPU-0", "index": 0, "instances": 1}
                    for h, u in warm
                ],
                "room": [],
            }
        ]
    }


def _reservation(gpu: str = "GPU-0") -> dict[str, Any]:
    return {
        "id": "r1",
        "model": "tiny",
        "vram_mib": 500,
        "gpu": {"uuid": gpu, "index": 0},
        "created_at": NOW,
        "expires_at": NOW,
        "pending_mib": 500,
    }


class FakeFleet:
    """Daemons behind one MockTransport: who was asked what, with which Authorization."""

    def __init__(self, hosts: list[tuple[str, str]], down: frozenset[str] = frozenset()):
        self.hosts = hosts
        self.down = down
        self.requests: list[tuple[str, str, str | None]] = []  # (host, path, authorization)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.requests.append((host, request.url.path, request.headers.get("authorization")))
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/fleet/models":
            return httpx.Response(200, json=_fleet_model(self.hosts))
        if request.url.path == "/reservations":
            return httpx.Response(201, json=_reservation())
        return httpx.Response(204)

    def sent_to(self, host: str) -> list[str | None]:
        return [auth for h, _path, auth in self.requests if h == host]


def test_a_rogue_fleet_row_never_sees_the_token() -> None:
    rogue = FakeFleet([("rogue", "http://collector.evil:8700")])
    with (
        Fleet("http://gpu-1.example:8700", TOKEN, transport=httpx.MockTransport(rogue)) as fleet,
        pytest.raises(Refused) as refused,
    ):
        fleet.place("tiny")
    assert rogue.sent_to("collector.evil") == []
    assert "collector.evil" in str(refused.value) and "allowed_hosts" in str(refused.value)
    # Named by the caller, it is trusted; "*" trusts every advertised host.
    for allowed in (["*.evil"], ["*"]):
        trusted = FakeFleet([("rogue", "http://collector.evil:8700")])
        with Fleet(
            "http://gpu-1.example:8700",
            TOKEN,
            allowed_hosts=allowed,
            transport=httpx.MockTransport(trusted),
        ) as fleet:
            lease = fleet.place("tiny")
            lease.release()
        assert trusted.sent_to("collector.evil")[0] == f"Bearer {TOKEN}"


def test_the_token_never_goes_from_https_to_http_and_other_ports_of_an_entry_are_fine() -> None:
    fleet_rows = FakeFleet([("a", "http://gpu-1.example:8700"), ("b", "https://gpu-1.example:9")])
    with Fleet("https://gpu-1.example", TOKEN, transport=httpx.MockTransport(fleet_rows)) as fleet:
        lease = fleet.place("tiny")
        lease.release()
    assert lease.host == "b"
    asked = [(h, p) for h, p, auth in fleet_rows.requests if p == "/reservations"]
    assert asked == [("gpu-1.example", "/reservations")]
    assert all(
        auth == f"Bearer {TOKEN}" for _h, p, auth in fleet_rows.requests if p == "/reservations"
    )


def test_the_fleet_asks_the_next_entry_when_one_is_down() -> None:
    fake = FakeFleet([("b", "http://gpu-2.example")], down=frozenset({"gpu-1.example"}))
    urls = ["http://gpu-1.example", "http://gpu-2.example"]
    with Fleet(urls, TOKEN, transport=httpx.MockTransport(fake)) as fleet:
        assert [c.host for c in fleet.candidates("tiny")] == ["b"]
        assert [c.host for c in fleet.candidates("tiny")] == ["b"]
        with pytest.raises(ValueError, match="host="):
            fleet.place("tiny", gpu="GPU-0")
        lease = fleet.place("tiny", host="b", gpu="GPU-0")
        lease.release()
    # The entry that answered is asked first from then on.
    firsts = [h for h, p, _ in fake.requests if p == "/fleet/models"]
    assert firsts == ["gpu-1.example", "gpu-2.example", "gpu-2.example", "gpu-2.example"]


async def test_the_async_fleet_fails_over_and_guards_the_token_too() -> None:
    fake = FakeFleet(
        [("rogue", "http://collector.evil"), ("b", "http://gpu-2.example")],
        down=frozenset({"gpu-1.example"}),
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return fake(request)

    urls = ["http://gpu-1.example", "http://gpu-2.example"]
    async with AsyncFleet(urls, TOKEN, transport=httpx.MockTransport(handler)) as fleet:
        lease = await fleet.place("tiny")
        await lease.release()
    assert lease.host == "b" and fake.sent_to("collector.evil") == []


def test_own_binds_show_as_warm_until_the_fleet_lists_them() -> None:
    binds = OwnBinds()
    binds.bound("tiny", "b", "http://b", GpuRef("GPU-1", 1))
    binds.bound("tiny", "b", "http://b", GpuRef("GPU-1", 1))
    binds.bound("other", "b", "http://b", GpuRef("GPU-1", 1))
    assert binds.merged("tiny", []) == [WarmSpot("b", "http://b", "GPU-1", 1, 2)]
    shown = [WarmSpot("b", "http://b", "GPU-1", 1, 2)]
    assert binds.merged("tiny", shown) == shown
