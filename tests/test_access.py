"""Who may reach the daemon: the Host names a loopback daemon answers to (DNS rebinding), the
optional read token, its cookie for the status page, tokens rotated on SIGHUP, and which token
the commands send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from registry import keys
from registry.access import host_name
from registry.cli import main
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, SCHEDULER_TOKEN, AppClient, SpawnDaemon
from tests.daemon import NotifyListener, reload_with

READ_TOKEN = "read-token-0123456789abcdef"
AS_READER = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8700", "localhost"),
        ("LOCALHOST.", "localhost"),
        ("[::1]:8700", "[::1]"),
        ("127.0.0.1", "127.0.0.1"),
        ("evil.example:80", "evil.example"),
        ("::1", "::1"),
        ("[::1]evil.com", "[::1]evil.com"),
        ("[::1]:80x", "[::1]:80x"),
        ("[::1", "[::1"),
    ],
)
def test_host_names_are_read_without_port_or_trailing_dot(header: str, name: str) -> None:
    assert host_name(header) == name


async def test_a_loopback_daemon_answers_only_to_loopback_host_names(
    start_app: AppClient,
) -> None:
    client = await start_app(allowed_hosts="registry.internal")
    for allowed in ("localhost:8700", "127.0.0.1", "[::1]:1234", "Registry.Internal:8700"):
        answer = await client.get("/models", headers={"Host": allowed})
        assert answer.status == 200, allowed
    for foreign in (
        "evil.example",
        "evil.example:8700",
        "127.0.0.1.nip.io",
        "[::2]",
        "[::1]evil.com",
        "[::1]evil.com:8700",
    ):
        for method, path in (("GET", "/models"), ("POST", "/reservations"), ("GET", "/")):
            answer = await client.request(method, path, headers={"Host": foreign})
            assert answer.status == 403, (foreign, path)
            assert "loopback" in (await answer.json())["detail"]


async def test_a_daemon_on_every_address_answers_any_host(start_app: AppClient) -> None:
    client = await start_app(host="0.0.0.0")
    assert (await client.get("/models", headers={"Host": "registry.example"})).status == 200


async def test_with_a_read_token_every_get_but_health_needs_a_token(
    start_app: AppClient,
) -> None:
    client = await start_app(
        read_token=READ_TOKEN, scheduler_token=SCHEDULER_TOKEN, admin_token=ADMIN_TOKEN
    )
    for path in ("/models", "/models/1", "/gpus", "/metrics", "/reservations", "/events", "/"):
        answer = await client.get(path)
        assert answer.status == 401, path
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "read" in (await answer.json())["detail"]
        wrong = await client.get(path, headers={"Authorization": "Bearer wrong-token-xxxxxxx"})
        assert wrong.status == 401, path
    for token in (READ_TOKEN, SCHEDULER_TOKEN, ADMIN_TOKEN):
        answer = await client.get("/models", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 200
    assert (await client.get("/metrics", headers=AS_READER)).status == 200
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status == 200, path
    # A read token reads; it does not reserve.
    answer = await client.post("/reservations", json={"vram_mib": 100}, headers=AS_READER)
    assert answer.status == 401


async def test_the_status_page_trades_token_for_a_strict_http_only_cookie(
    start_app: AppClient,
) -> None:
    client = await start_app(read_token=READ_TOKEN)
    assert (await client.get("/?token=wrong-token-xxxxxxxxx", allow_redirects=False)).status == 401
    answer = await client.get(f"/?token={READ_TOKEN}", allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    value = answer.cookies["model_registry_token"].value
    # Not the token, nor anything a token can be read back from.
    assert value and READ_TOKEN not in value and READ_TOKEN not in cookie
    jar = {"model_registry_token": value}
    assert (await client.get("/", cookies=jar)).status == 200
    events = await client.get("/events", cookies=jar)
    assert events.status == 200
    events.close()
    # The raw token is no cookie.
    assert (await client.get("/", cookies={"model_registry_token": READ_TOKEN})).status == 401
    # The cookie is for the page and its stream only: the API wants the bearer token.
    assert (await client.get("/models", cookies=jar)).status == 401
    # Offered an admin token, the page still gives a cookie that only reads.
    admin_page = await start_app(read_token=READ_TOKEN, admin_token=ADMIN_TOKEN)
    answer = await admin_page.get(f"/?token={ADMIN_TOKEN}", allow_redirects=False)
    admin_jar = {"model_registry_token": answer.cookies["model_registry_token"].value}
    assert ADMIN_TOKEN not in admin_jar["model_registry_token"]
    assert (await admin_page.get("/", cookies=admin_jar)).status == 200
    write = await admin_page.post("/models", json={"name": "x", "vram": 1}, cookies=admin_jar)
    assert write.status == 401
    # A reload that keeps the tokens keeps the cookie; one that rotates them ends it.
    live = client.app[keys.SETTINGS]
    live.reload(live.current.model_copy())
    assert (await client.get("/", cookies=jar)).status == 200
    live.reload(
        live.current.model_copy(update={"read_token": SecretStr("rotated-read-token-0000")})
    )
    assert (await client.get("/", cookies=jar)).status == 401


async def test_the_commands_send_the_token_each_action_needs(
    start_app: AppClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = "scheduler-token-other-0123456789"
    client = await start_app(
        read_token=READ_TOKEN,
        scheduler_token=f"{SCHEDULER_TOKEN},{other}",
        admin_token=ADMIN_TOKEN,
    )
    url = str(client.make_url("")).rstrip("/")
    made = await client.post(
        "/reservations", json={"vram_mib": 100}, headers={"Authorization": f"Bearer {other}"}
    )
    reservation = json.loads(await made.read())
    monkeypatch.setenv("MODEL_REGISTRY_READ_TOKEN", READ_TOKEN)
    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", SCHEDULER_TOKEN)
    monkeypatch.setenv("MODEL_REGISTRY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert await asyncio.to_thread(main, ["status", "--url", url]) == 0
    assert await asyncio.to_thread(main, ["reservations", "list", "--url", url]) == 0
    assert reservation["id"] in capsys.readouterr().out
    # Made with another scheduler token: removing it takes the admin token, tried first.
    gone = ["reservations", "remove", reservation["id"], "--url", url]
    assert await asyncio.to_thread(main, gone) == 0
    assert (await client.get("/reservations", headers=AS_ADMIN)).status == 200
    listed = json.loads(await (await client.get("/reservations", headers=AS_READER)).read())
    assert listed["data"] == []


async def test_tokens_rotate_on_sighup(
    spawn_daemon: SpawnDaemon, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    first, second = "first-scheduler-token-0123456", "second-scheduler-token-012345"
    config = tmp_path / "registry.toml"
    config.write_text(f'scheduler_token = "{first}"\nadmin_token = "{ADMIN_TOKEN}"\n')
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = spawn_daemon("--config", str(config), NOTIFY_SOCKET=str(notify.path))
    try:
        await daemon.wait_ready()
        async with aiohttp.ClientSession(base_url=daemon.url) as http:

            async def reserve(token: str) -> Any:
                async with http.post(
                    "/reservations",
                    json={"vram_mib": 100},
                    headers={"Authorization": f"Bearer {token}"},
                ) as answer:
                    return answer.status, await answer.json()

            status, kept = await reserve(first)
            assert status == 201
            reload_with(
                daemon,
                notify,
                config,
                f'scheduler_token = "{second}"\nadmin_token = "{ADMIN_TOKEN}"\n',
            )
            assert (await reserve(first))[0] == 401
            assert (await reserve(second))[0] == 201
            # The rotated token's lease: an admin may still release it.
            async with http.delete(f"/reservations/{kept['id']}", headers=AS_ADMIN) as answer:
                assert answer.status == 204
    finally:
        notify.close()
    reloaded = next(
        json.loads(x) for x in daemon.log().splitlines() if "configuration reloaded" in x
    )
    assert reloaded["changed"] == {"scheduler_token": {"from": "set", "to": "set"}}
    assert first not in daemon.log() and second not in daemon.log()
