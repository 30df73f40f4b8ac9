"""Benchmark what a reservation costs as the book grows: a reserve-and-release pair with none
open, then with `--open` (10,000) open, in one run of one daemon.

Starts `model-registry serve` (simulated backend, one 140 GiB device, embedded PostgreSQL, the
cap raised to fit), measures `--pairs` sequential reserve-and-release pairs with an empty book,
opens `--open` reservations of 1 MiB (with an `/events` stream attached, so every change is
also encoded for a watcher), measures the same pairs again, and prints p50 and p99 of both and
their ratio, and the daemon's RSS at each point. The target: p99 with 10,000 open at most 1.5x
p99 with none.

    python bench/open_reservations.py [--open 10000] [--pairs 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from common import fetch, percentile, rss_mib, simulated_daemon

TOKEN = "bench-scheduler-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def pairs(
    session: aiohttp.ClientSession, base: str, count: int, headers: dict[str, str] = HEADERS
) -> list[float]:
    """Sequential reserve-and-release pairs: each one's latency, in seconds."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(
            f"{base}/reservations", json={"vram_mib": 1000}, headers=headers
        ) as response:
            body = await response.read()
            assert response.status == 201, (response.status, body)
        reservation_id = json.loads(body)["id"]
        async with session.delete(
            f"{base}/reservations/{reservation_id}", headers=headers
        ) as response:
            await response.read()
            assert response.status == 204, response.status
        latencies.append(time.perf_counter() - started)
    return latencies


async def open_many(session: aiohttp.ClientSession, base: str, count: int) -> None:
    semaphore = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with (
            semaphore,
            session.post(
                f"{base}/reservations",
                json={"vram_mib": 1, "ttl_s": 3600, "holder": f"held-{i}"},
                headers=HEADERS,
            ) as response,
        ):
            assert response.status == 201, response.status

    await asyncio.gather(*(one(i) for i in range(count)))


async def drain(stream: aiohttp.ClientResponse) -> None:
    while await stream.content.readany():
        pass


async def run(base: str, pid: int, open_count: int, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        stream = await session.get(f"{base}/events")
        reader = asyncio.ensure_future(drain(stream))
        await pairs(session, base, 200)  # warm up
        rss_empty = rss_mib(pid)
        empty = await pairs(session, base, count)
        opened = time.perf_counter()
        await open_many(session, base, open_count)
        opened = time.perf_counter() - opened
        rss_full = rss_mib(pid)
        full = await pairs(session, base, count)
        reader.cancel()
        stream.close()
    print(f"{count} sequential reserve-and-release pairs, an /events stream attached")
    print(f"  {'open':>8} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
    for label, values, rss in (("0", empty, rss_empty), (f"{open_count:,}", full, rss_full)):
        p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
        print(f"  {label:>8} {p50:>8.2f} {p99:>8.2f} {rss:>8.1f}")
    ratio = percentile(full, 99) / percentile(empty, 99)
    print(f"  p99 with {open_count:,} open / p99 with none: {ratio:.2f} (target <= 1.5)")
    print(f"  opening {open_count:,} took {opened:.1f} s ({open_count / opened:.0f}/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open", type=int, default=10_000, dest="open_count")
    parser.add_argument("--pairs", type=int, default=2000)
    args = parser.parse_args()
    devices = [{"uuid": "GPU-sim-0", "total_mib": 143360, "free_mib": 143000}]
    env = {
        "MODEL_REGISTRY_SCHEDULER_TOKEN": TOKEN,
        "MODEL_REGISTRY_MAX_RESERVATIONS": str(args.open_count + 100),
    }
    with simulated_daemon(devices, **env) as daemon:
        asyncio.run(run(daemon.base, daemon.pid, args.open_count, args.pairs))
        listed = json.loads(fetch(f"{daemon.base}/reservations"))["data"]
        assert len(listed) == args.open_count, len(listed)


if __name__ == "__main__":
    main()
