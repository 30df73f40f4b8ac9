"""The fleet at 10, 100 and 1,000 hosts: what a query costs, and what the hosts' writes cost.

Starts `model-registry serve` (simulated backend, embedded PostgreSQL) and simulates the other
hosts by writing their rows directly: each host has 8 GPUs and changes every second (its rows
rewritten in ten slices, one every 100 ms), as a busy fleet would. For each size it measures,
with wrk at 32 connections, `GET /fleet/models?name=large-v3`: requests/s and p50/p99; and the
CPU of the daemon and of all PostgreSQL processes while both the writes and the queries run,
and the daemon's CPU over 3 s while the hosts write and nobody asks ("unasked").

    python bench/fleet.py [--hosts 10,100,1000] [--duration 10]

Needs `wrk` (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from pathlib import Path

import asyncpg
from common import cpu_seconds, fetch, simulated_daemon, wrk

GPUS_PER_HOST = 8


def devices(host: int, tick: int) -> str:
    rng = random.Random(host * 1_000_003 + tick)
    return json.dumps(
        [
            {
                "uuid": f"GPU-h{host}-{i}",
                "index": i,
                "name": "NVIDIA H200",
                "total_mib": 143771,
                "free_mib": (free := rng.randrange(0, 143000)),
                "usable_mib": free - 1024,
                "pending_mib": 0,
                "healthy": True,
            }
            for i in range(GPUS_PER_HOST)
        ]
    )


async def add_hosts(conn: asyncpg.Connection, count: int) -> None:
    await conn.execute("DELETE FROM fleet_hosts WHERE host LIKE 'sim-%'")
    await conn.executemany(
        """
        INSERT INTO fleet_hosts (host, url, version, gpu_state, devices, reservations,
                                 heartbeat_interval_s)
        VALUES ($1, $2, 'bench', 'ok', $3::jsonb, '[]'::jsonb, 5)
        """,
        [(f"sim-{h:04d}", f"http://sim-{h:04d}:8700", devices(h, 0)) for h in range(count)],
    )


async def write_hosts(dsn: str, count: int, stop: threading.Event) -> int:
    """Rewrite every host's row once a second, in ten slices; return the rows written."""
    conn = await asyncpg.connect(dsn)
    written, tick = 0, 0
    try:
        while not stop.is_set():
            tick += 1
            started = time.monotonic()
            hosts = [h for h in range(count) if h % 10 == tick % 10]
            await conn.execute(
                """
                UPDATE fleet_hosts AS f SET devices = u.devices::jsonb, heartbeat_at = now()
                  FROM unnest($1::text[], $2::text[]) AS u(host, devices)
                 WHERE f.host = u.host
                """,
                [f"sim-{h:04d}" for h in hosts],
                [devices(h, tick) for h in hosts],
            )
            written += len(hosts)
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    finally:
        await conn.close()
    return written


def postgres_pids(data_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"postgres" in cmdline and (
                    str(data_dir).encode() in cmdline or _parent_is_postmaster(entry, data_dir)
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _parent_is_postmaster(entry: Path, data_dir: Path) -> bool:
    ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
    try:
        return str(data_dir).encode() in Path(f"/proc/{ppid}/cmdline").read_bytes()
    except OSError:
        return False


def total_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def measure(dsn: str, base: str, daemon_pid: int, pg_dir: Path, hosts: int, seconds: int) -> None:
    async def prepare() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await add_hosts(conn, hosts)
        finally:
            await conn.close()

    asyncio.run(prepare())
    stop = threading.Event()
    result: list[int] = []
    writer = threading.Thread(
        target=lambda: result.append(asyncio.run(write_hosts(dsn, hosts, stop)))
    )
    writer.start()
    url = f"{base}/fleet/models?name=large-v3"
    try:
        time.sleep(1.5)
        body = json.loads(fetch(url))
        assert body["data"][0]["hosts_total"] >= 1, body
        pids = postgres_pids(pg_dir)
        # The hosts' writes alone, nobody asking: the daemon should not notice them.
        quiet_before, quiet_wall = cpu_seconds(daemon_pid), time.monotonic()
        time.sleep(3)
        quiet = (cpu_seconds(daemon_pid) - quiet_before) / (time.monotonic() - quiet_wall) * 100
        pg_before, daemon_before = total_cpu(pids), cpu_seconds(daemon_pid)
        wall = time.monotonic()
        stats = wrk(url, seconds)
        wall = time.monotonic() - wall
        pg = (total_cpu(pids) - pg_before) / wall * 100
        daemon = (cpu_seconds(daemon_pid) - daemon_before) / wall * 100
    finally:
        stop.set()
        writer.join()
    print(
        f"{hosts:>6} {hosts * GPUS_PER_HOST:>6} {stats['rps']:>9.0f} {stats['p50_ms']:>7.2f}"
        f" {stats['p99_ms']:>7.2f} {daemon:>9.0f}% {pg:>9.0f}% {quiet:>10.1f}%"
        f" {result[0] / (seconds + 3):>8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hosts", type=lambda t: [int(x) for x in t.split(",")], default=[10, 100, 1000]
    )
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    with simulated_daemon([{"uuid": "GPU-sim-0", "total_mib": 81920, "free_mib": 40000}]) as daemon:
        print(
            f"{'hosts':>6} {'GPUs':>6} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
            f" {'daemon CPU':>10} {'PG CPU':>10} {'unasked':>11} {'rows/s':>8}"
        )
        for hosts in args.hosts:
            pg_dir = daemon.work / "state" / "postgres"
            measure(daemon.embedded_dsn(), daemon.base, daemon.pid, pg_dir, hosts, args.duration)


if __name__ == "__main__":
    main()
