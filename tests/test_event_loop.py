"""The daemon's event loop: uvloop by default, asyncio's own when asked, and said at start."""

from __future__ import annotations

import asyncio
import json

import pytest

from registry.config import EventLoop, load_settings
from registry.event_loop import loop_name, run_on
from tests.conftest import SpawnDaemon


async def _which() -> str:
    await asyncio.sleep(0)
    return loop_name()


def test_uvloop_is_the_default_and_asyncio_can_be_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MODEL_REGISTRY_EVENT_LOOP", raising=False)
    assert load_settings().event_loop is EventLoop.UVLOOP
    assert run_on(EventLoop.UVLOOP, _which()) == "uvloop"
    assert run_on(EventLoop.ASYNCIO, _which()) == "asyncio"
    monkeypatch.setenv("MODEL_REGISTRY_EVENT_LOOP", "asyncio")
    assert load_settings().event_loop is EventLoop.ASYNCIO
    monkeypatch.setenv("MODEL_REGISTRY_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        load_settings()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_the_daemon_says_which_loop_it_runs_on(spawn_daemon: SpawnDaemon, loop: str) -> None:
    daemon = spawn_daemon(MODEL_REGISTRY_EVENT_LOOP=loop)
    await daemon.wait_ready()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    [limits] = [line for line in lines if line.get("event") == "limits"]
    assert limits["event_loop"] == loop
