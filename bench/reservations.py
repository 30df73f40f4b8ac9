"""Benchmark reserve-and-release pairs: POST /reservations then DELETE it, 64 clients at once.

Starts `model-registry serve` (simulated backend, one 140 GiB device, embedded PostgreSQL,
default settings: the access log records every reservation) and runs 64 concurrent clients,
each reserving 1,000 MiB and releasing it. Two runs:

- saturation: every client starts its next pair as soon as the last one ends (closed loop), so
  the daemon is always busy: the most pairs per second it can do. Latency here is mostly
  queueing (64 requests in flight at once);
- paced: the clients together start `--rate` pairs per second on a fixed schedule (open loop),
  and each latency is counted from when its pair was due, so a daemon that falls behind shows it.

Prints pairs per second, p50 and p99 of each request and of a whole pair, and the daemon's CPU.
Every grant is written to disk (fsync) before its 201, so the disk's sync latency is included.

    python bench/reservations.py [--duration 10] [--clients 64] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Iterator

import aiohttp
from common import cpu_seconds, fetch, percentile, rss_mib, simulated_daemon

TOKEN = "bench-scheduler-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def client_loop(
    session: aiohttp.ClientSession,
    base: str,
    stop_at: float,
    latencies: dict[str, list[float]],
    refused: list[int],
    due: Iterator[float] | None,
) -> int:
    pairs = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        if due is not None:
            started = next(due)
            if started > stop_at:
                break
            if (wait := started - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
        async with session.post(
            f"{base}/reservations", json={"vram_mib": 1000, "holder": "bench"}, headers=HEADERS
        ) as response:
            body = await response.read()
            if response.status != 201:
                refused.append(response.status)
                continue
        reserved = time.perf_counter()
        reservation_id = json.loads(body)["id"]
        async with session.delete(
            f"{base}/reservations/{reservation_id}", headers=HEADERS
        ) as response:
            await response.read()
            assert response.status == 204, response.status
        done = time.perf_counter()
        latencies["reserve"].append(reserved - started)
        latencies["release"].append(done - reserved)
        latencies["pair"].append(done - started)
        pairs += 1
    return pairs


async def run_load(
    base: str, clients: int, duration: float, rate: float | None = None
) -> tuple[int, dict[str, list[float]]]:
    latencies: dict[str, list[float]] = {"reserve": [], "release": [], "pair": []}
    refused: list[int] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        begin = time.perf_counter()
        stop_at = begin + duration

        def schedule(client: int) -> Iterator[float] | None:
            if rate is None:
                return None
            # Client i starts pairs i, i + clients, i + 2 * clients, ... of one even schedule.
            return (begin + (k * clients + client) / rate for k in itertools.count())

        counts = await asyncio.gather(
            *(
                client_loop(session, base, stop_at, latencies, refused, schedule(i))
                for i in range(clients)
            )
        )
    if refused:
        raise SystemExit(f"{len(refused)} reservations refused: {set(refused)}")
    return sum(counts), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0, help="pairs/s of the paced run")
    parser.add_argument("--access-log", default="default", choices=["default", "all", "off"])
    parser.add_argument("--paced-only", action="store_true", help="skip the saturation run")
    args = parser.parse_args()

    devices = [{"uuid": "GPU-sim-0", "total_mib": 143360, "free_mib": 143000}]
    env = {"MODEL_REGISTRY_SCHEDULER_TOKEN": TOKEN, "MODEL_REGISTRY_ACCESS_LOG": args.access_log}
    with simulated_daemon(devices, **env) as daemon:
        base = daemon.base
        asyncio.run(run_load(base, args.clients, 1.0))  # warm up
        runs = [("saturation", None), (f"paced at {args.rate:g} pairs/s", args.rate)]
        for label, rate in runs[1:] if args.paced_only else runs:
            cpu_before, wall_before = cpu_seconds(daemon.pid), time.perf_counter()
            pairs, latencies = asyncio.run(run_load(base, args.clients, args.duration, rate))
            wall = time.perf_counter() - wall_before
            cpu = (cpu_seconds(daemon.pid) - cpu_before) / wall * 100
            print(
                f"\n{label}: {args.clients} clients, {args.duration:g} s, access log "
                f"{args.access_log}: {pairs / args.duration:.0f} reserve-and-release pairs/s"
            )
            print(f"  {'':8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
            for kind, values in latencies.items():
                print(
                    f"  {kind:8} {percentile(values, 50) * 1000:>8.2f}"
                    f" {percentile(values, 99) * 1000:>8.2f}"
                    f" {statistics.fmean(values) * 1000:>8.2f}"
                )
            print(f"  daemon CPU {cpu:.0f} % of a core, RSS {rss_mib(daemon.pid):.1f} MiB")
        assert json.loads(fetch(f"{base}/reservations"))["data"] == [], "all were released"


if __name__ == "__main__":
    main()
