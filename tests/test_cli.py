"""The command line: configuration precedence, help, and the catalog commands."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from registry.config import ConfigError, load_settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "registry.toml"
    config.write_text('port = 9100\nhost = "0.0.0.0"\npoll_interval = 2.5\n')
    assert load_settings().port == 8700
    assert load_settings(config).port == 9100
    monkeypatch.setenv("MODEL_REGISTRY_PORT", "9200")
    settings = load_settings(config)
    assert (settings.port, settings.host, settings.poll_interval) == (9200, "0.0.0.0", 2.5)
    assert load_settings(config, port=9300, host=None).port == 9300


def test_state_dir_defaults_to_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/model-registry")
    assert load_settings().state_dir == Path("/var/lib/model-registry")


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("pol_interval = 1\n")
    result = run_cli("migrate", "--config", str(bad))
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "pol_interval" in result.stderr
    result = run_cli("migrate", env={"MODEL_REGISTRY_POLL_INTERVAL": "0.001"})
    assert result.returncode == 2 and "poll_interval" in result.stderr
    secret_url = "mysql://app:hunter2-secret@localhost/x"
    result = run_cli("migrate", env={"MODEL_REGISTRY_DATABASE_URL": secret_url})
    assert result.returncode == 2 and "postgresql://" in result.stderr
    assert "hunter2" not in result.stderr  # values never echo: they reach the journal
    result = run_cli("migrate", env={"MODEL_REGISTRY_DATABASE_URL": "postgresql://u@h:port/x"})
    assert result.returncode == 2 and "database_url" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args", [[], ["serve"], ["migrate"], ["models"], ["models", "list"], ["models", "add"]]
)
def test_every_command_has_help(args: list[str]) -> None:
    result = run_cli(*args, "--help")
    assert result.returncode == 0
    assert "usage: model-registry" in result.stdout


def test_models_commands_change_the_catalog(database_url: str) -> None:
    env = {"MODEL_REGISTRY_DATABASE_URL": database_url}
    listed = run_cli("models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == [
        "ID",
        "NAME",
        "VRAM_MIB",
        "ENABLED",
        "CREATED_AT",
        "UPDATED_AT",
    ]
    assert "(no models)" in listed.stdout

    assert run_cli("models", "add", "whisper-xl", "12000", env=env).returncode == 0
    duplicate = run_cli("models", "add", "whisper-xl", "1", env=env)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad = run_cli("models", "add", "bad name!", "0", env=env)
    assert bad.returncode == 1 and "name" in bad.stderr and "vram" in bad.stderr

    changed = run_cli("models", "set", "whisper-xl", "--vram", "11000", "--disable", env=env)
    assert changed.returncode == 0, changed.stderr
    row = changed.stdout.splitlines()[1].split()
    assert row[1:4] == ["whisper-xl", "11000", "no"] and row[5] != "-"

    assert run_cli("models", "remove", "whisper-xl", env=env).returncode == 0
    missing = run_cli("models", "remove", "whisper-xl", env=env)
    assert missing.returncode == 1 and "no model" in missing.stderr


def test_unreachable_database_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"postgresql://nobody@/db?host={tmp_path}&port=1"
    result = run_cli("models", "list", env={"MODEL_REGISTRY_DATABASE_URL": url})
    assert result.returncode == 1
    assert "database unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_a_one_line_error(database_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--port",
            str(port),
            env={"MODEL_REGISTRY_DATABASE_URL": database_url, "MODEL_REGISTRY_GPU_BACKEND": "none"},
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr + result.stdout


def test_database_passwords_are_redacted_in_the_user_info_and_the_query() -> None:
    from registry.database import redact_dsn

    assert redact_dsn("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    redacted = redact_dsn("postgresql://u@h/db?sslmode=require&password=s3cret&PassWord=x")
    assert "s3cret" not in redacted and "=x" not in redacted
    assert redacted.startswith("postgresql://u@h/db?sslmode=require&password=***")


async def test_the_command_line_never_follows_a_redirect_with_its_token(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import web

    from registry.cli import main

    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"data": []})

    collector = web.Application()
    collector.router.add_get("/{tail:.*}", elsewhere)
    target = await aiohttp_server(collector)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(target.make_url(request.path_qs)))

    redirecting = web.Application()
    redirecting.router.add_route("*", "/{tail:.*}", redirect)
    server = await aiohttp_server(redirecting)
    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", "scheduler-token-not-to-leak")
    url = str(server.make_url("")).rstrip("/")
    for command in (
        ["reservations", "list"],
        ["instances", "list"],
        ["reservations", "add", "tiny"],
    ):
        code = await asyncio.to_thread(main, [*command, "--url", url])
        assert code == 1, command
        err = capsys.readouterr().err
        assert "redirect" in err and "not followed" in err and "Traceback" not in err
    assert seen == []
