"""The daemon as a host service: sd_notify, watchdog, signals, reload and supervision."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from registry import keys
from registry.app import spawn
from registry.config import Settings
from registry.sdnotify import Notifier
from registry.service import Service, poller_alive
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AS_SCHEDULER, SCHEDULER_TOKEN
from tests.daemon import Daemon, NotifyListener, get_json, reload_with
from tests.waiting import eventually


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.fixture
def daemon_env(database_url: str, gpu_file: Callable[..., Path]) -> dict[str, str]:
    return {
        "MODEL_REGISTRY_DATABASE_URL": database_url,
        "MODEL_REGISTRY_GPU_BACKEND": "simulated",
        "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpu_file()),
        "MODEL_REGISTRY_POLL_INTERVAL": "0.1",
    }


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(env: dict[str, str], *args: str) -> Daemon:
        daemon = Daemon(env, *args, log_path=tmp_path / f"daemon{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


async def test_notifies_ready_watchdog_and_stopping_in_order(
    daemon_env: dict[str, str], notify: NotifyListener, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(
        {**daemon_env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    )
    notify.wait_for("READY=1")
    # READY comes after the socket listens: the daemon answers at once.
    status, body = await get_json(f"{daemon.url}/models")
    assert status == 200 and body["capacity"]["state"] == "ok"
    notify.wait_for("WATCHDOG=1")
    daemon.signal(signal.SIGTERM)
    messages = notify.wait_for("STOPPING=1")
    assert daemon.wait_exit(timeout_s=10) == 0
    order = [m for m in messages if m in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
    assert order[0] == "READY=1" and order[-1] == "STOPPING=1" and "WATCHDOG=1" in order
    assert any(m.startswith("STATUS=5 models, 5 active, GPU ok") for m in messages), messages


async def test_sigterm_lets_an_in_flight_request_finish(
    daemon_env: dict[str, str],
    database_url: str,
    notify: NotifyListener,
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon(
        {**daemon_env, "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN, "NOTIFY_SOCKET": str(notify.path)}
    )
    await daemon.wait_ready()
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE models IN ACCESS EXCLUSIVE MODE")
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(
                f"{daemon.url}/models",
                json={"name": "slow-one", "vram": 1000},
                headers=AS_ADMIN,
            )
        )
        # The write is now waiting on the lock inside the daemon.
        await eventually(
            lambda: blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ),
            lambda waiting: waiting == 1,
        )
        daemon.signal(signal.SIGTERM)
        await asyncio.to_thread(notify.wait_for, "STOPPING=1")
        assert daemon.process.poll() is None  # shutting down, waiting for the write
        await transaction.commit()
        response = await request
        assert response.status == 201
        assert (await response.json())["name"] == "slow-one"
        response.release()
    await blocker.close()
    assert await asyncio.to_thread(daemon.wait_exit, 10) == 0


async def test_sighup_reloads_live_settings(
    daemon_env: dict[str, str],
    notify: NotifyListener,
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    config = tmp_path / "registry.toml"
    config.write_text("poll_interval = 1.0\n")
    env = {**daemon_env, "NOTIFY_SOCKET": str(notify.path)}
    del env["MODEL_REGISTRY_POLL_INTERVAL"]  # the environment would win over the file
    daemon = start_daemon(env, "--config", str(config))
    notify.wait_for("READY=1")
    messages = reload_with(daemon, notify, config, "poll_interval = 0.5\nvram_margin_mib = 1000\n")
    reloading = messages.index("RELOADING=1")
    assert "READY=1" in messages[reloading:]  # READY=1 again once the reload is done
    status, gpus = await get_json(f"{daemon.url}/gpus")
    assert status == 200
    assert (gpus["poll_interval_s"], gpus["margin_mib"]) == (0.5, 1000)
    reload_lines = [
        json.loads(line) for line in daemon.log().splitlines() if "configuration reloaded" in line
    ]
    assert reload_lines and set(reload_lines[0]["changed"]) == {"poll_interval", "vram_margin_mib"}


async def test_a_reload_says_what_waits_for_a_restart_and_a_bad_file_changes_nothing(
    daemon_env: dict[str, str],
    notify: NotifyListener,
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    config = tmp_path / "registry.toml"
    config.write_text("poll_interval = 1.0\n")
    env = {**daemon_env, "NOTIFY_SOCKET": str(notify.path)}
    # Left in the environment, where a reload cannot reach it: said at start.
    del env["MODEL_REGISTRY_POLL_INTERVAL"]
    env["MODEL_REGISTRY_VRAM_MARGIN_MIB"] = "10"
    daemon = start_daemon(env, "--config", str(config))
    notify.wait_for("READY=1")
    reload_with(daemon, notify, config, "poll_interval = 1.0\nshutdown_timeout = 9.0\n")
    reload_with(daemon, notify, config, "poll_interval = [not toml\n")
    reload_with(
        daemon, notify, config, 'poll_interval = 0.001\nadvertise_url = "ftp://u:hunter2@h/x"\n'
    )
    status, gpus = await get_json(f"{daemon.url}/gpus")
    assert (status, gpus["poll_interval_s"], gpus["margin_mib"]) == (200, 1.0, 10)
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    shadowed = events[
        "reloadable settings are set in the environment, where a reload cannot change them: "
        "move them to the config file"
    ]
    assert shadowed["settings"] == ["MODEL_REGISTRY_VRAM_MARGIN_MIB"]
    waiting = events["reloaded settings that take effect only at a restart"]
    assert waiting["settings"] == ["shutdown_timeout"] and waiting["level"] == "warning"
    failed = [line for line in lines if line["event"].startswith("reload failed")]
    assert len(failed) == 2 and all(line["level"] == "error" for line in failed)
    assert "not valid TOML" in failed[0]["error"]
    assert "poll_interval" in failed[1]["error"] and "advertise_url" in failed[1]["error"]
    assert "hunter2" not in daemon.log() and "Traceback" not in daemon.log()


def test_an_unreadable_or_invalid_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    for config, said in (
        (tmp_path, "cannot read config file"),  # a directory: unreadable as a file
        (tmp_path / "missing.toml", "config file not found"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "registry", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert said in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


async def test_a_reload_reaches_every_reader_retry_after_included(
    daemon_env: dict[str, str],
    notify: NotifyListener,
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    config = tmp_path / "registry.toml"
    config.write_text("poll_interval = 2.0\n")
    env = {
        **daemon_env,
        "NOTIFY_SOCKET": str(notify.path),
        "MODEL_REGISTRY_SCHEDULER_TOKEN": SCHEDULER_TOKEN,
        # No GPU file: the GPU state stays unknown, so a reservation is refused with 503.
        "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(tmp_path / "no-such-gpus.json"),
    }
    del env["MODEL_REGISTRY_POLL_INTERVAL"]  # the environment would win over the file
    daemon = start_daemon(env, "--config", str(config))
    notify.wait_for("READY=1")

    async def retry_after() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{daemon.url}/reservations",
                json={"vram_mib": 100},
                headers=AS_SCHEDULER,
            ) as response,
        ):
            assert response.status == 503
            assert (await response.json())["reason"] == "gpu_state_unknown"
            return response.headers["Retry-After"]

    assert await retry_after() == "2"
    reload_with(daemon, notify, config, "poll_interval = 7.0\n")
    assert await retry_after() == "7"


def test_abstract_notify_socket_addresses_work() -> None:
    name = f"model-registry-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).send("READY=1", "STATUS=ok")
        assert sock.recv(100) == b"READY=1\nSTATUS=ok"
    assert not Notifier("").send("READY=1")  # unset: nothing to do


async def test_watchdog_is_withheld_while_the_poller_is_stuck(start_app: Any) -> None:
    client = await start_app()
    poller = client.app[keys.POLLER]
    assert poller_alive(poller, within_s=1.0)
    poller.last_tick = time.monotonic() - 5  # the loop has not come round for 5 s
    assert not poller_alive(poller, within_s=1.0)


async def test_a_dead_background_task_ends_the_service_non_zero(
    make_settings: Callable[..., Settings],
) -> None:
    from tests.daemon import free_port

    service = Service(make_settings(port=free_port()), None, {})
    running = asyncio.ensure_future(service.run())
    await eventually(lambda: service.app.frozen, lambda frozen: frozen, timeout_s=15)

    async def broken() -> None:
        raise RuntimeError("boom")

    spawn(service.app, broken(), "broken-task")
    assert await asyncio.wait_for(running, timeout=15) == 1


async def test_without_nvidia_drivers_serve_answers_and_says_why(
    database_url: str, start_daemon: Callable[..., Daemon]
) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    daemon = start_daemon(
        {"MODEL_REGISTRY_DATABASE_URL": database_url, "MODEL_REGISTRY_GPU_BACKEND": "nvml"}
    )
    await daemon.wait_ready()
    status, gpus = await get_json(f"{daemon.url}/gpus")
    assert status == 200 and gpus["state"] == "unavailable"
    assert "NVML" in gpus["last_error"]
    status, models = await get_json(f"{daemon.url}/models")
    assert {m["reason"] for m in models["data"]} == {"gpu_state_unknown"}
    assert "gpu_state_unknown until the GPUs can be read" in daemon.log()
    assert gpus["last_error"] in daemon.log()


async def test_sigint_stops_cleanly_too(
    daemon_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(daemon_env)
    await daemon.wait_ready()
    daemon.signal(signal.SIGINT)
    assert await asyncio.to_thread(daemon.wait_exit, 10) == 0
    assert '"event": "stopped"' in daemon.log()


async def test_a_short_token_is_warned_of_by_setting_never_by_value(
    daemon_env: dict[str, str], start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(
        {
            **daemon_env,
            "MODEL_REGISTRY_SCHEDULER_TOKEN": "tiny-tok",
            "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    await daemon.wait_ready()
    warnings = [
        json.loads(line)
        for line in daemon.log().splitlines()
        if "shorter than 16 characters" in line
    ]
    assert [w["setting"] for w in warnings] == ["MODEL_REGISTRY_SCHEDULER_TOKEN"]
    assert "tiny-tok" not in daemon.log()


async def test_a_background_task_that_swallows_a_cancellation_still_stops() -> None:
    """Python 3.11's asyncio.wait_for can swallow a cancellation (CPython gh-86296): the app
    cancels its loops until they end, or stopping would hang."""
    from registry.app import stop_task

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 5)
    assert task.cancelled() and swallowed == 1
