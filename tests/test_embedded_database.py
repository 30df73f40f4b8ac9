"""The default: an embedded PostgreSQL in the state directory, kept across restarts."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from registry import keys
from registry.app import create_app
from registry.config import SYSTEM_STATE_DIR, Settings, default_state_dir
from registry.embedded import SYSTEM_USER, EmbeddedPostgres, install_dir, recorded_server
from tests.daemon import Daemon


def _settings(state_dir: Path, **overrides: Any) -> Settings:
    return Settings(state_dir=state_dir, gpu_backend="none", log_format="json", **overrides)


async def _names(client: Any) -> list[str]:
    body = await (await client.get("/models")).json()
    return [m["name"] for m in body["data"]]


async def test_restart_on_the_same_state_dir_keeps_the_data(
    embedded_state_dir: Path, aiohttp_client: Any
) -> None:
    state_dir = embedded_state_dir
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


async def test_default_catalog_can_be_switched_off(
    embedded_state_dir: Path, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(create_app(_settings(embedded_state_dir, seed_catalog=False)))
    assert await _names(client) == []


async def test_an_emptied_catalog_stays_empty(
    embedded_state_dir: Path, aiohttp_client: Any
) -> None:
    state_dir = embedded_state_dir
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
        "import asyncio; from pathlib import Path; from registry.embedded import EmbeddedPostgres\n"
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


def _modes_on_the_way(*paths: Path) -> dict[Path, int]:
    """The mode of every directory from / down to each path."""
    return {d: d.stat().st_mode for path in paths for d in (*path.parents, path)}


def _modes_within(*directories: Path) -> dict[Path, int]:
    return {child: child.stat().st_mode for d in directories for child in d.iterdir()}


async def test_the_server_is_private_and_nothing_outside_the_state_dir_is_opened(
    embedded_state_dir: Path, aiohttp_client: Any
) -> None:
    # (Not the other entries beside the state dir: other workers' servers are starting there.)
    binaries = (install_dir() / "bin", install_dir() / "lib")
    before = _modes_on_the_way(embedded_state_dir.parent, *binaries), _modes_within(*binaries)
    client = await aiohttp_client(create_app(_settings(embedded_state_dir)))
    after = _modes_on_the_way(embedded_state_dir.parent, *binaries), _modes_within(*binaries)
    assert after == before
    dsn = client.app[keys.DATABASE].dsn
    _assert_owner_only(embedded_state_dir, Path(parse_qs(urlsplit(dsn).query)["host"][0]))
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SHOW listen_addresses") == ""  # the socket only
        assert await connection.fetchval("SHOW unix_socket_permissions") == "0700"
        methods = await connection.fetch("SELECT DISTINCT auth_method FROM pg_hba_file_rules")
        assert [m["auth_method"] for m in methods] == ["peer"]  # no trust, for anyone
    finally:
        await connection.close()
    await client.close()


def _assert_owner_only(state_dir: Path, socket_dir: Path) -> None:
    root = os.geteuid() == 0
    assert stat.S_IMODE(state_dir.stat().st_mode) == (0o711 if root else 0o700)
    data = state_dir / "postgres"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert data.stat().st_uid == (pwd.getpwnam(SYSTEM_USER).pw_uid if root else os.geteuid())
    assert stat.S_IMODE((socket_dir / ".s.PGSQL.5432").stat().st_mode) == 0o700


def test_a_state_dir_too_deep_for_a_socket_path_gets_an_unguessable_recorded_socket_dir(
    embedded_state_dir: Path,
) -> None:
    deep = embedded_state_dir / ("d" * 60) / ("e" * 60)
    deep.parent.mkdir(parents=True, mode=0o711)
    server = EmbeddedPostgres(deep / "postgres")
    first = server.start_blocking()
    try:
        socket_dir = Path(parse_qs(urlsplit(first).query)["host"][0])
        assert socket_dir != deep / "postgres" and len(str(socket_dir)) < 60
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        # Clients (a command beside the daemon) find it through the state directory.
        assert recorded_server(deep) == first
        server.stop_blocking()
        assert not socket_dir.exists() and recorded_server(deep) is None
        # Nobody can make the next one first: its name is not derived from the path.
        second = server.start_blocking()
        assert second != first and recorded_server(deep) == second
    finally:
        server.stop_blocking()


def test_as_root_a_state_dir_its_server_cannot_reach_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    daemon = Daemon(
        {
            "MODEL_REGISTRY_STATE_DIR": str(closed / "state"),
            "MODEL_REGISTRY_GPU_BACKEND": "none",
        },
        log_path=tmp_path / "daemon.log",
    )
    try:
        assert daemon.wait_exit(timeout_s=60) == 1
    finally:
        daemon.stop()
    said = daemon.log_path.read_text()
    assert f"{SYSTEM_USER}, which cannot reach the state directory {closed / 'state'}" in said
    assert str(SYSTEM_STATE_DIR) in said and "MODEL_REGISTRY_DATABASE_URL" in said
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # left as it was


def test_root_keeps_its_state_where_a_system_daemon_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    legacy, system = tmp_path / "data" / "model-registry", tmp_path / "var-lib"
    assert default_state_dir(euid=1000, system_dir=system) == legacy
    assert default_state_dir(euid=0, system_dir=system) == system
    assert default_state_dir(euid=0) == SYSTEM_STATE_DIR
    # An older root install with data in the per-user place keeps it there...
    (legacy / "postgres").mkdir(parents=True)
    (legacy / "postgres" / "PG_VERSION").write_text("18\n")
    assert default_state_dir(euid=0, system_dir=system) == legacy
    # ... unless the system place has data too.
    system.mkdir()
    (system / "reservations.jsonl").write_text('{"format":2}\n')
    assert default_state_dir(euid=0, system_dir=system) == system
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/from-systemd")
    assert default_state_dir(euid=0, system_dir=system) == Path("/var/lib/from-systemd")


def test_files_are_given_to_the_servers_user_by_descriptor_never_through_a_link(
    tmp_path: Path,
) -> None:
    from registry.embedded import embedded_account

    if os.geteuid() != 0:
        pytest.skip("only root gives files to the server's own user")
    account = embedded_account()
    mine = tmp_path / "mine"
    mine.write_text("")
    account.take(mine)
    assert mine.stat().st_uid == account.uid
    # A path swapped for a link to something else gives nothing away.
    precious = tmp_path / "precious"
    precious.write_text("root's\n")
    swapped = tmp_path / "swapped"
    swapped.symlink_to(precious)
    with pytest.raises(OSError):
        account.take(swapped)
    assert precious.stat().st_uid == 0


def test_data_of_another_postgresql_major_is_refused_with_the_way_out(
    embedded_state_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from registry.embedded import embedded_account

    data = embedded_state_dir / "postgres"
    data.mkdir(parents=True, mode=0o700)
    (data / "PG_VERSION").write_text("17\n")
    account = embedded_account()
    for path in (data, data / "PG_VERSION"):
        account.take(path)
    result = subprocess.run(
        [sys.executable, "-m", "registry", "serve", "--port", "0"],
        env={
            **os.environ,
            "MODEL_REGISTRY_STATE_DIR": str(embedded_state_dir),
            "MODEL_REGISTRY_GPU_BACKEND": "none",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3  # not restarted in a loop by the unit
    assert "is of PostgreSQL 17, but this model-registry runs PostgreSQL 18" in result.stderr
    assert "pg_upgrade" in result.stderr and "Traceback" not in result.stderr
    assert (data / "PG_VERSION").read_text() == "17\n"  # left as it was
    assert sorted(p.name for p in data.iterdir()) == ["PG_VERSION"]
