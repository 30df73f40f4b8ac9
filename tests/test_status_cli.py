"""`model-registry status`: the registry in a terminal, once or redrawn on every event."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from registry import keys
from registry.cli import main
from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, AppClient
from tests.waiting import eventually


async def test_status_shows_gpus_models_and_reservations(
    start_app: AppClient, gpu_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_file(("GPU-sim-0", 24576, 11000))
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    await client.post(
        "/reservations",
        json={"vram_mib": 1500, "holder": "job-77"},
        headers=AS_SCHEDULER,
    )
    url = str(client.make_url("")).rstrip("/")
    await eventually(lambda: client.app[keys.CATALOG_SYNC].listening.is_set(), bool)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "backend simulated · ok" in out
    assert "Simulated GPU" in out and "13,576" in out and "9,500" in out  # used, usable
    assert "Models · 4 of 5 active" in out
    large = next(line for line in out.splitlines() if "large-v3" in line)
    assert "no" in large and "insufficient_vram" in large
    assert "job-77" in out and "1,500" in out
    assert "120 s" in out or "119 s" in out  # expires in


def test_status_says_when_the_daemon_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.daemon import free_port

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the daemon" in err and "Traceback" not in err


async def test_watch_redraws_when_something_changes(
    start_app: AppClient, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    client = await start_app(poll_interval=0.1)
    url = str(client.make_url("")).rstrip("/")
    screen = tmp_path / "screen.txt"
    with screen.open("wb") as out:
        watch = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "registry", "status", "--watch", "--url", url),
            # A terminal as far as rich is concerned, so that it redraws in place.
            env={**os.environ, "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1", "COLUMNS": "140"},
            stdout=out,
            stderr=asyncio.subprocess.PIPE,
        )
    try:
        await eventually(lambda: screen.read_text(), lambda s: "20,000" in s)
        gpu_file(("GPU-sim-0", 24576, 3000))
        client.app[keys.POLLER].poll_now()
        await eventually(lambda: screen.read_text(), lambda s: "3,000" in s)
        await client.server.close()  # the daemon goes away: the watch says so and ends
        assert await asyncio.wait_for(watch.wait(), 15) == 1
        assert watch.stderr is not None and b"daemon" in await watch.stderr.read()
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()


async def test_text_from_clients_is_shown_as_written_never_as_markup(
    start_app: AppClient, gpu_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    for holder in ("job-[/]", "[b]x[/b]"):
        made = await client.post(
            "/reservations", json={"vram_mib": 10, "holder": holder}, headers=AS_SCHEDULER
        )
        assert made.status == 201
    for holder in ("csi-\u009b31m", "evil-\u202egnp.exe", "tab\there"):
        refused = await client.post(
            "/reservations", json={"vram_mib": 10, "holder": holder}, headers=AS_SCHEDULER
        )
        assert refused.status == 422, holder
    url = str(client.make_url("")).rstrip("/")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "job-[/]" in out and "[b]x[/b]" in out
