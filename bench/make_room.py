"""Benchmark making room: what a refused make_room reservation costs beside a plain one.

Starts `model-registry serve` (simulated backend: 8 devices, each nearly full, each listing 125
worker processes; embedded PostgreSQL), adopts 1,000 instances (one per process), then sends,
one after another over one connection, `--requests` (10,000) reservations that cannot be
granted: plain ones, then make_room ones. Both are 409s; the make_room one pays for making room
being impossible. Two hosts, one per way it can be:

- "too little": every instance may go (MODEL_REGISTRY_IDLE_AFTER_S and ..._MIN_RESIDENCY_S are
  0), but unloading all of them would not be enough (100 MiB each): the daemon sees it from
  what the instances could free at most, without planning;
- "none may go": unloading them would be enough (600 MiB each), but every one is pinned: the
  daemon plans over all 1,000 instances on the 8 devices, every time, and finds no victim.

Prints p50 and p99 of each and their ratio (the budget: at most 2x).

    python bench/make_room.py [--requests 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from common import percentile, simulated_daemon

TOKEN = "bench-scheduler-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = 8
PER_DEVICE = 125
FIRST_PID = 100_000
TOTAL_MIB = 81920


def devices(used_mib: int) -> list[dict[str, object]]:
    found = []
    for d in range(DEVICES):
        processes = [
            {"pid": FIRST_PID + d * PER_DEVICE + n, "used_mib": used_mib} for n in range(PER_DEVICE)
        ]
        found.append(
            {
                "uuid": f"GPU-sim-{d}",
                "total_mib": TOTAL_MIB,
                "free_mib": 2000,
                "processes": processes,
            }
        )
    return found


async def adopt(base: str, pinned: bool) -> None:
    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(32)

        async def one(pid: int) -> None:
            device = (pid - FIRST_PID) // PER_DEVICE
            body = {"model": "tiny", "gpu": f"GPU-sim-{device}", "pid": pid, "pinned": pinned}
            async with (
                semaphore,
                session.post(f"{base}/instances", json=body, headers=HEADERS) as answer,
            ):
                assert answer.status == 201, (answer.status, await answer.text())

        await asyncio.gather(
            *(one(pid) for pid in range(FIRST_PID, FIRST_PID + DEVICES * PER_DEVICE))
        )


async def refused(base: str, body: dict[str, object], count: int) -> list[float]:
    took = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(f"{base}/reservations", json=body, headers=HEADERS) as answer:
                await answer.read()
                if answer.status != 409:
                    raise SystemExit(f"expected 409, got {answer.status}: {body}")
            took.append(time.perf_counter() - started)
    return took


def scenario(used_mib: int, pinned: bool, requests: int) -> tuple[list[float], list[float]]:
    env = {
        "MODEL_REGISTRY_SCHEDULER_TOKEN": TOKEN,
        "MODEL_REGISTRY_IDLE_AFTER_S": "0",
        "MODEL_REGISTRY_MIN_RESIDENCY_S": "0",
        "MODEL_REGISTRY_MAX_INSTANCES_PER_TOKEN": str(DEVICES * PER_DEVICE),
        "MODEL_REGISTRY_ACCESS_LOG": "off",
    }
    with simulated_daemon(devices(used_mib), **env) as daemon:
        base = daemon.base
        asyncio.run(adopt(base, pinned))
        plain = {"vram_mib": 60000}  # more than any device has, less than it holds
        claim = {**plain, "make_room": True}
        asyncio.run(refused(base, plain, 200))  # warm up
        asyncio.run(refused(base, claim, 200))
        return (
            asyncio.run(refused(base, plain, requests)),
            asyncio.run(refused(base, claim, requests)),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    print(
        f"{DEVICES} devices, {DEVICES * PER_DEVICE:,} instances, {args.requests:,} refused "
        "reservations of each kind, one after another"
    )
    for label, used_mib, pinned in (("too little", 100, False), ("none may go", 600, True)):
        plain_s, claim_s = scenario(used_mib, pinned, args.requests)
        print(f"{label}:")
        print(f"  {'':12} {'p50 ms':>8} {'p99 ms':>8}")
        for kind, values in (("plain", plain_s), ("make_room", claim_s)):
            print(
                f"  {kind:12} {percentile(values, 50) * 1000:>8.3f}"
                f" {percentile(values, 99) * 1000:>8.3f}"
            )
        ratio = percentile(claim_s, 99) / percentile(plain_s, 99)
        print(f"  p99 ratio make_room / plain: {ratio:.2f} (budget: at most 2.0)")


if __name__ == "__main__":
    main()
