"""The default: an embedded PostgreSQL in the state directory, kept across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from registry.app import create_app
from registry.config import Settings


def _settings(state_dir: Path, **overrides: Any) -> Settings:
    return Settings(state_dir=state_dir, gpu_backend="none", log_format="json", **overrides)


async def _names(client: Any) -> list[str]:
    body = await (await client.get("/models")).json()
    return [m["name"] for m in body["data"]]


async def test_restart_on_the_same_state_dir_keeps_the_data(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    state_dir = tmp_path / "state"
    first = await aiohttp_client(create_app(_settings(state_dir)))
    assert await _names(first) == ["tiny", "medium", "large_v1", "large_v2", "large-v3"]
    store = first.app[_catalog_store_key()]
    await store.delete(1)
    await store.create("whisper-xl", 12000)
    await first.close()
    assert (state_dir / "postgres" / "PG_VERSION").exists()
    assert not (state_dir / "postgres" / "postmaster.pid").exists(), "server left running"

    second = await aiohttp_client(create_app(_settings(state_dir)))
    # The operator's deletion sticks: the default catalog is inserted once per database, ever.
    assert await _names(second) == ["medium", "large_v1", "large_v2", "large-v3", "whisper-xl"]
    await second.close()


async def test_default_catalog_can_be_switched_off(tmp_path: Path, aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path / "s", seed_catalog=False)))
    assert await _names(client) == []


async def test_an_emptied_catalog_stays_empty(tmp_path: Path, aiohttp_client: Any) -> None:
    state_dir = tmp_path / "state"
    first = await aiohttp_client(create_app(_settings(state_dir)))
    store = first.app[_catalog_store_key()]
    for model in await store.list_all():
        await store.delete(model.id)
    await first.close()
    second = await aiohttp_client(create_app(_settings(state_dir)))
    assert await _names(second) == []
    await second.close()


def _catalog_store_key() -> Any:
    from registry import keys

    return keys.CATALOG_STORE


def test_embedded_server_runs_as_an_ordinary_user(tmp_path: Path) -> None:
    """As root the suite already covers it; here the server is run by `nobody`."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0:
        pytest.skip("the whole suite already runs the embedded server as an ordinary user")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not available")
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import registry"],
        capture_output=True,
        cwd=tmp_path,
    )
    if probe.returncode != 0:
        pytest.skip("this Python is not readable by an ordinary user (e.g. under /root)")
    home = tmp_path / "home"
    home.mkdir()
    shutil.chown(home, "nobody")
    tmp_path.chmod(0o755)
    script = (
        "import asyncio; from pathlib import Path; from registry.database import EmbeddedPostgres\n"
        "async def main():\n"
        f"    server = EmbeddedPostgres(Path({str(home)!r}) / 'state' / 'postgres')\n"
        "    print(await server.start()); await server.stop()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"HOME={home}", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "postgresql://" in result.stdout
