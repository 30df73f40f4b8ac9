"""Benchmark instances: the CPU one GPU poll costs with 1,000 of them, the daemon's RSS with
10,000, and what a reservation's renewal costs with 10,000 live (the journal is compacted by
what is open, instances included, so a renewal must not rewrite them all).

Starts `model-registry serve` (simulated backend: one device whose process list holds every
worker, embedded PostgreSQL, polls every 250 ms), measures CPU per poll and renewals with no
instance, adopts `--poll-instances` (1,000) instances, measures again, then adopts up to
`--instances` (10,000) and reports RSS and renewals. CPU per poll is the daemon's CPU time over
the polls it made (the `model_registry_gpu_poll_duration_seconds` count), so it includes reading
the simulated file. A renewal is a PATCH acknowledged once its journal line is on disk.

    python bench/instances.py [--instances 10000] [--poll-instances 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp
from common import cpu_seconds, fetch, rss_mib, simulated_daemon

TOKEN = "bench-scheduler-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
FIRST_PID = 100_000


def polls(base: str) -> float:
    for line in fetch(f"{base}/metrics").decode().splitlines():
        if line.startswith("model_registry_gpu_poll_duration_seconds_count"):
            return float(line.split()[-1])
    raise SystemExit("no poll count in /metrics")


def cpu_per_poll_ms(base: str, pid: int, seconds: float) -> float:
    cpu, count = cpu_seconds(pid), polls(base)
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu) / (polls(base) - count) * 1000


async def adopt(base: str, pids: range) -> None:
    semaphore = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as session:

        async def one(pid: int) -> None:
            body = {"model": "tiny", "gpu": "GPU-sim-0", "pid": pid}
            async with (
                semaphore,
                session.post(f"{base}/instances", json=body, headers=HEADERS) as answer,
            ):
                assert answer.status == 201, (answer.status, await answer.text())

        await asyncio.gather(*(one(pid) for pid in pids))


async def renewals_ms(base: str, count: int) -> tuple[float, float]:
    """p50 and p99 of `count` renewals of one reservation, one after another."""
    async with aiohttp.ClientSession() as session:
        body = {"vram_mib": 1, "ttl_s": 600}
        async with session.post(f"{base}/reservations", json=body, headers=HEADERS) as answer:
            assert answer.status == 201, await answer.text()
            reservation = (await answer.json())["id"]
        took = []
        for _ in range(count):
            started = time.perf_counter()
            async with session.patch(
                f"{base}/reservations/{reservation}", json={"ttl_s": 600}, headers=HEADERS
            ) as answer:
                assert answer.status == 200, await answer.text()
            took.append((time.perf_counter() - started) * 1000)
        async with session.delete(f"{base}/reservations/{reservation}", headers=HEADERS):
            pass
    took.sort()
    return statistics.median(took), took[int(0.99 * (len(took) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--poll-instances", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--renewals", type=int, default=300)
    args = parser.parse_args()
    processes = [
        {"pid": pid, "used_mib": 1} for pid in range(FIRST_PID, FIRST_PID + args.instances)
    ]
    devices = [
        {
            "uuid": "GPU-sim-0",
            "total_mib": 143360,
            "free_mib": 143360 - args.instances,
            "processes": processes,
        }
    ]
    env = {
        "MODEL_REGISTRY_SCHEDULER_TOKEN": TOKEN,
        "MODEL_REGISTRY_POLL_INTERVAL": "0.25",
        "MODEL_REGISTRY_MAX_INSTANCES": str(args.instances),
        "MODEL_REGISTRY_MAX_INSTANCES_PER_TOKEN": str(args.instances),
    }
    with simulated_daemon(devices, **env) as daemon:
        base, pid = daemon.base, daemon.pid
        idle = cpu_per_poll_ms(base, pid, args.seconds)
        rss_none = rss_mib(pid)
        renew_none = asyncio.run(renewals_ms(base, args.renewals))
        asyncio.run(adopt(base, range(FIRST_PID, FIRST_PID + args.poll_instances)))
        busy = cpu_per_poll_ms(base, pid, args.seconds)
        started = time.perf_counter()
        asyncio.run(adopt(base, range(FIRST_PID + args.poll_instances, FIRST_PID + args.instances)))
        adopted_s = time.perf_counter() - started
        rss_full = rss_mib(pid)
        renew_full = asyncio.run(renewals_ms(base, args.renewals))
        listed = json.loads(fetch(f"{base}/instances?limit=1"))["pagination"]["total_items"]
        assert listed == args.instances, listed
    print(f"a device listing {args.instances:,} processes, polled every 250 ms")
    print(f"  CPU per poll, no instance:          {idle:.2f} ms")
    print(f"  CPU per poll, {args.poll_instances:,} instances:      {busy:.2f} ms")
    print(f"  of which the instances:             {busy - idle:.2f} ms")
    print(f"  RSS with no instance:               {rss_none:.1f} MiB")
    print(f"  RSS with {args.instances:,} instances:        {rss_full:.1f} MiB")
    rest = args.instances - args.poll_instances
    print(f"  adopting {rest:,} took {adopted_s:.1f} s ({rest / adopted_s:.0f}/s)")
    for label, (p50, p99) in (
        ("renewal, no instance:              ", renew_none),
        (f"renewal, {args.instances:,} instances:       ", renew_full),
    ):
        print(f"  {label} p50 {p50:.2f} ms, p99 {p99:.2f} ms")


if __name__ == "__main__":
    main()
