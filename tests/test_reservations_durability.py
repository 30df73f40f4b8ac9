"""Reservations are this host's promises: they survive SIGKILL, outlast a database outage, and
the command line and systemd see them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from registry import keys
from registry.admission.ledger import LedgerError
from registry.cli import main
from registry.reservation import Reservation
from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, AppClient, SpawnDaemon
from tests.daemon import Daemon, NotifyListener
from tests.db import StoppableServer
from tests.scrape import scrape
from tests.waiting import eventually


@pytest.fixture
def daemons(
    spawn_daemon: SpawnDaemon, tmp_path: Path, gpu_file: Callable[..., Path]
) -> SpawnDaemon:
    """Daemons of one host, one after the other: the same state directory."""
    gpu_file(("GPU-sim-0", 81920, 81920))

    def start(**env: str) -> Daemon:
        defaults = {
            "MODEL_REGISTRY_POLL_INTERVAL": "0.1",
            "MODEL_REGISTRY_STATE_DIR": str(tmp_path / "state"),
            "MODEL_REGISTRY_SCHEDULER_TOKEN": SCHEDULER_TOKEN,
            "MODEL_REGISTRY_ACCESS_LOG": "all",
        }
        return spawn_daemon(**{**defaults, **env})

    return start


async def _call(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as r:
        return r.status, await r.json(content_type=None)


async def test_a_reservation_survives_sigkill_with_its_expiry(
    daemons: Callable[..., Daemon],
) -> None:
    first = daemons()
    await first.wait_ready()
    status, promised = await _call(
        "POST",
        f"{first.url}/reservations",
        json={"model": "large-v3", "holder": "session-1", "ttl_s": 3600},
        headers=AS_SCHEDULER,
    )
    assert status == 201
    first.signal(signal.SIGKILL)
    first.wait_exit()

    second = daemons()
    await second.wait_ready()
    status, listed = await _call("GET", f"{second.url}/reservations")
    assert listed["data"] == [promised]
    _, gpus = await _call("GET", f"{second.url}/gpus")
    assert gpus["devices"][0]["pending_mib"] == 10000
    _, large = await _call("GET", f"{second.url}/models?name=large-v3")
    assert large["data"][0]["headroom_mib"] == 81920 - 20000
    status, _ = await _call(
        "DELETE", f"{second.url}/reservations/{promised['id']}", headers=AS_SCHEDULER
    )
    assert status == 204
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0

    third = daemons()
    await third.wait_ready()
    assert (await _call("GET", f"{third.url}/reservations"))[1] == {"data": []}
    log = first.log() + second.log() + third.log()
    assert SCHEDULER_TOKEN not in log and "Traceback" not in log


async def test_a_second_daemon_on_the_same_state_directory_is_refused(
    daemons: Callable[..., Daemon],
) -> None:
    first = daemons()
    await first.wait_ready()
    second = daemons()
    assert second.wait_exit() == 1
    assert "another model-registry daemon" in second.log()
    assert "Traceback" not in second.log()


async def test_an_unreadable_journal_stops_start_up_with_the_reason(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "reservations.jsonl").write_text(
        '{"format":1}\n{"put": 5}\n{"end":"x"}\n'
    )
    daemon = daemons()
    assert daemon.wait_exit(timeout_s=30) == 1
    assert "reservations.jsonl line 2 is not a journal line" in daemon.log()
    assert "Traceback" not in daemon.log()


async def test_status_line_shows_a_reservation_at_once(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = daemons(NOTIFY_SOCKET=str(notify.path), MODEL_REGISTRY_POLL_INTERVAL="60")
        notify.wait_for("READY=1")
        status, _ = await _call(
            "POST", f"{daemon.url}/reservations", json={"vram_mib": 4096}, headers=AS_SCHEDULER
        )
        assert status == 201
        status_line = "STATUS=5 models, 5 active, GPU ok, 1 reservation(s) holding 4096 MiB"
        await asyncio.to_thread(notify.wait_for, status_line, 2.0)
    finally:
        notify.close()


async def test_reservations_keep_working_while_the_database_is_down(
    start_app: AppClient, own_server: StoppableServer, gpu_file: Callable[..., Path]
) -> None:
    gpu_file(("GPU-sim-0", 81920, 81920))
    client = await start_app(database_url=own_server.start(), scheduler_token=SCHEDULER_TOKEN)
    await eventually(lambda: client.app[keys.CATALOG_SYNC].listening.is_set(), bool)
    await asyncio.to_thread(own_server.stop)
    assert (await client.get("/readyz")).status == 503

    created = await client.post("/reservations", json={"model": "large-v3"}, headers=AS_SCHEDULER)
    assert created.status == 201
    listing = await (await client.get("/models?name=large-v3")).json()
    assert listing["data"][0]["headroom_mib"] == 81920 - 20000
    renewed = await client.patch(
        created.headers["Location"], json={"ttl_s": 60}, headers=AS_SCHEDULER
    )
    assert renewed.status == 200
    assert (await client.delete(created.headers["Location"], headers=AS_SCHEDULER)).status == 204
    listing = await (await client.get("/models?name=large-v3")).json()
    assert listing["data"][0]["headroom_mib"] == 81920 - 10000


async def test_a_reservation_that_cannot_be_recorded_is_not_granted(
    start_app: AppClient, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    gpu_file(("GPU-sim-0", 81920, 81920))
    state = tmp_path / "failing-disk"
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, state_dir=state)
    kept = await client.post("/reservations", json={"vram_mib": 1000}, headers=AS_SCHEDULER)
    assert kept.status == 201
    ledger = client.app[keys.BOOK]._ledger
    writable = os.dup(ledger._fd)
    # The journal's descriptor now refuses writes, as a failing disk would.
    read_only = os.open(ledger.path, os.O_RDONLY)
    os.dup2(read_only, ledger._fd)
    os.close(read_only)
    try:
        refused = await client.post("/reservations", json={"vram_mib": 2000}, headers=AS_SCHEDULER)
        assert refused.status == 503
        assert "could not be recorded" in (await refused.json())["detail"]
        listed = await (await client.get("/reservations")).json()
        assert [r["id"] for r in listed["data"]] == [(await kept.json())["id"]]
        assert (await client.get("/gpus")).status == 200
        assert (await (await client.get("/gpus")).json())["devices"][0]["pending_mib"] == 1000
        before = await (await client.get(kept.headers["Location"])).json()
        renew = await client.patch(
            kept.headers["Location"], json={"ttl_s": 3600}, headers=AS_SCHEDULER
        )
        assert renew.status == 503
        assert await (await client.get(kept.headers["Location"])).json() == before
    finally:
        os.dup2(writable, ledger._fd)
        os.close(writable)
    granted = await client.post("/reservations", json={"vram_mib": 2000}, headers=AS_SCHEDULER)
    assert granted.status == 201
    # Counters only grow: the grant taken back is counted on its own, not subtracted.
    samples = await scrape(client)
    assert samples[("model_registry_reservations_created_total", ())] == 3
    assert samples[("model_registry_reservations_rolled_back_total", ())] == 1
    # On disk exactly what was granted: the refused ones left nothing behind.
    ledger.close()
    from registry.admission.ledger import ReservationLedger

    reread = ReservationLedger(state)
    ids = {r.id for r in reread.open(list)}
    reread.close()
    assert ids == {(await kept.json())["id"], (await granted.json())["id"]}


def test_the_journal_stays_short_and_replays_to_the_same_book(tmp_path: Path) -> None:
    from registry.admission.ledger import ReservationLedger

    async def scenario() -> list[Reservation]:
        book: dict[str, Reservation] = {}
        ledger = ReservationLedger(tmp_path, compact_after_lines=20)
        ledger.open(lambda: list(book.values()))
        for i in range(200):
            reservation = _reservation(f"r{i}")
            book[reservation.id] = reservation
            ledger.put(reservation)
            if i % 3:
                del book[reservation.id]
                ledger.end(reservation.id)
            await ledger.flush()
        ledger.close()
        return sorted(book.values(), key=lambda r: r.id)

    expected = asyncio.run(scenario())
    # Rewritten once it holds more than twice the open reservations (and more than 20 lines).
    lines = len((tmp_path / "reservations.jsonl").read_text().splitlines())
    assert lines <= 1 + max(20, 2 * len(expected))
    again = ReservationLedger(tmp_path)
    assert sorted(again.open(list), key=lambda r: r.id) == expected
    again.close()


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    from registry.admission.ledger import ReservationLedger

    kept = _reservation("kept")
    journal = tmp_path / "reservations.jsonl"
    journal.write_text(
        '{"format":1}\n'
        + json.dumps({"put": kept.to_record()})
        + "\n"
        + '{"put":{"id":"torn","vram_'
    )
    ledger = ReservationLedger(tmp_path)
    assert ledger.open(list) == [kept]
    ledger.close()


def _reservation(reservation_id: str) -> Reservation:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    return Reservation(
        id=reservation_id,
        vram_mib=100,
        gpu_uuid="GPU-0",
        gpu_index=0,
        created_at=now,
        expires_at=now + timedelta(seconds=60),
        holder="h",
    )


def test_ledger_errors_name_the_file(tmp_path: Path) -> None:
    from registry.admission.ledger import ReservationLedger

    (tmp_path / "reservations.jsonl").write_text('{"format": 99}\n')
    with pytest.raises(LedgerError, match="format 99"):
        ReservationLedger(tmp_path).open(list)
    # The failed open let go of the state directory.
    (tmp_path / "reservations.jsonl").unlink()
    ledger = ReservationLedger(tmp_path)
    assert ledger.open(list) == []
    with pytest.raises(LedgerError, match="another model-registry daemon"):
        ReservationLedger(tmp_path).open(list)
    ledger.close()


# -- the command line ---------------------------------------------------------------------


async def test_cli_adds_lists_and_removes_on_the_running_daemon(
    start_app: AppClient,
    gpu_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gpu_file(("GPU-sim-0", 81920, 81920))
    client = await start_app(scheduler_token=SCHEDULER_TOKEN)
    url = str(client.make_url("")).rstrip("/")
    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", SCHEDULER_TOKEN)
    await eventually(lambda: client.app[keys.CATALOG_SYNC].listening.is_set(), bool)
    capsys.readouterr()  # the daemon's start-up log

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["reservations", *args, "--url", url])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("add", "large-v3", "--holder", "job-9", "--ttl", "600")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "ID",
        "MODEL",
        "VRAM_MIB",
        "PENDING_MIB",
        "GPU",
        "HOLDER",
        "PID",
        "EXPIRES_IN",
    ]
    reservation_id = row.split()[0]
    assert row.split()[1:7] == ["large-v3", "10000", "10000", "0", "GPU-sim-0", "job-9"]
    assert row.split()[-1] in ("600s", "599s")
    code, out, _ = await cli("add", "--vram", "5000", "--pid", "4242")
    assert code == 0 and " 5000 " in out and "4242" in out

    code, out, _ = await cli("list")
    assert code == 0 and reservation_id in out and len(out.splitlines()) == 3

    code, out, _ = await cli("remove", reservation_id)
    assert (code, out.strip()) == (0, f"released {reservation_id}")
    code, _, err = await cli("remove", reservation_id)
    assert code == 1 and "Not Found (HTTP 404)" in err

    code, _, err = await cli("add", "large-v3", "--vram", "5")
    assert code == 1 and "one of the two" in err
    code, _, err = await cli("add", "--vram", "999999")
    assert code == 1 and "too_large" in err and "HTTP 409" in err
    code, _, err = await cli("add", "--vram", "0")
    assert code == 1 and "vram_mib" in err and "HTTP 422" in err
    monkeypatch.setenv("MODEL_REGISTRY_SCHEDULER_TOKEN", "wrong")
    code, _, err = await cli("add", "tiny")
    assert code == 1 and "HTTP 401" in err


def test_cli_says_when_the_daemon_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.daemon import free_port

    assert main(["reservations", "list", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the daemon" in err and "Traceback" not in err


def test_with_many_open_the_journal_is_not_rewritten_at_every_flush(tmp_path: Path) -> None:
    from registry.admission.ledger import ReservationLedger

    rewrites = []

    async def scenario() -> None:
        book: dict[str, Reservation] = {}
        ledger = ReservationLedger(tmp_path, compact_after_lines=20)
        ledger.open(lambda: list(book.values()), lambda: len(book))
        rewrite = ledger._rewrite

        def counted(reservations: list[Reservation]) -> None:
            rewrites.append(len(reservations))
            rewrite(reservations)

        ledger._rewrite = counted  # type: ignore[method-assign]
        for i in range(300):  # every one stays open: the book only grows
            reservation = _reservation(f"r{i}")
            book[reservation.id] = reservation
            ledger.put(reservation)
            await ledger.flush()
        ledger.close()

    asyncio.run(scenario())
    # A rewrite costs O(open): it comes only when the file holds twice the open ones (here
    # never), not at each of the 280 flushes past the first 20 lines.
    assert len(rewrites) <= 6


def test_live_instances_count_when_the_journal_decides_to_compact(tmp_path: Path) -> None:
    from registry.admission.ledger import ReservationLedger
    from registry.instance import Instance

    rewrites = []
    now = datetime(2026, 11, 28, tzinfo=UTC)
    instances = [Instance(f"i{n}", "tiny", "GPU-0", 0, 1000 + n, now, "boot") for n in range(1000)]

    async def scenario() -> None:
        ledger = ReservationLedger(tmp_path, compact_after_lines=20)
        ledger.open(list, lambda: 0)
        ledger.track_instances(lambda: instances, lambda: len(instances))
        for instance in instances:
            ledger.put_instance(instance)
        await ledger.flush()
        rewrite = ledger._rewrite

        def counted(reservations: list[Reservation], live: list[Instance] | None = None) -> None:
            rewrites.append(len(live or ()))
            rewrite(reservations, live)

        ledger._rewrite = counted  # type: ignore[method-assign]
        reservation = _reservation("renewed")
        for _ in range(300):  # a renewal at a time, beside 1,000 live instances
            ledger.put(reservation)
            await ledger.flush()
        ledger.close()

    asyncio.run(scenario())
    # Not one rewrite of the 1,000 instances per renewal: the file may hold twice what is live.
    assert len(rewrites) <= 1


def test_the_state_directory_must_be_this_daemons_alone(tmp_path: Path) -> None:
    from registry.admission.ledger import LedgerError, ReservationLedger

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(LedgerError, match=r"writable by group or others.*chmod go-w"):
        ReservationLedger(shared).open(list)
    shared.chmod(0o700)
    outside = tmp_path / "outside"
    outside.write_text("not the daemon's\n")
    for planted in ("daemon.lock", "reservations.jsonl"):
        link = shared / planted
        link.symlink_to(outside)
        with pytest.raises(LedgerError):
            ReservationLedger(shared).open(list)
        link.unlink()
    (shared / "reservations.jsonl.tmp").symlink_to(outside)  # a planted temp file
    ledger = ReservationLedger(shared)
    assert ledger.open(list) == []
    ledger.close()
    assert outside.read_text() == "not the daemon's\n"  # nothing written through a link
