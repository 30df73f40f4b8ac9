"""How the daemon's cost grows with the catalog: 100, 1,000, 10,000 and 100,000 models.

Starts `model-registry serve` (simulated backend with 2 devices, embedded PostgreSQL, default
settings) and, for each size:

- applies a catalog of that size with `PUT /models?prune=true` and times it until the listing
  shows it;
- makes `--writes` sequential API writes (half POST /models, half PATCH /models/{id}), one
  client, each waiting for its answer: writes per second;
- changes the simulated GPUs' free memory every 100 ms for `--seconds` (the poller reads every
  50 ms) while nothing asks for a page, and counts the daemon's CPU time against the same time
  with the file unchanged: CPU per GPU change. The change moves free memory by 64 MiB, so a few
  models flip (and are logged) each time, as on a busy GPU;
- reads the daemon's RSS.

    python bench/catalog_scale.py [--sizes 100,1000,10000,100000] [--writes 400] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import cpu_seconds, rss_mib, simulated_daemon

TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.05


def gpu_devices(free_mib: int) -> list[dict[str, Any]]:
    return [
        {"uuid": f"GPU-sim-{i}", "total_mib": 143360, "free_mib": free_mib - i * 20000}
        for i in range(2)
    ]


def write_gpus(path: Path, free_mib: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": gpu_devices(free_mib)}))
    tmp.replace(path)


async def apply_catalog(http: aiohttp.ClientSession, size: int) -> float:
    models = [{"name": f"m-{i:06d}", "vram": 1 + (i * 7919) % 140_000} for i in range(size)]
    started = time.perf_counter()
    async with http.put("/models?prune=true", json={"models": models}, headers=AUTH) as answer:
        assert answer.status == 200, await answer.text()
    async with http.get("/models?limit=1") as listing:
        assert (await listing.json())["pagination"]["total_items"] == size
    return time.perf_counter() - started


async def sequential_writes(http: aiohttp.ClientSession, count: int) -> float:
    ids = []
    started = time.perf_counter()
    for i in range(count // 2):
        body = {"name": f"w-{time.monotonic_ns()}-{i}", "vram": 1000 + i}
        async with http.post("/models", json=body, headers=AUTH) as answer:
            assert answer.status == 201, await answer.text()
            ids.append((await answer.json())["id"])
    for model_id in ids:
        async with http.patch(f"/models/{model_id}", json={"vram": 2000}, headers=AUTH) as answer:
            assert answer.status == 200, await answer.text()
    return 2 * len(ids) / (time.perf_counter() - started)


def cpu_over(pid: int, seconds: float, gpus: Path | None, base_free: int) -> tuple[float, int]:
    """Daemon CPU seconds over `seconds`; with `gpus`, change that file every 100 ms."""
    changes = 0
    before = cpu_seconds(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gpus is not None:
            changes += 1
            write_gpus(gpus, base_free + (changes % 2) * 64)
        time.sleep(2 * POLL_S)
    return cpu_seconds(pid) - before, changes


async def measure(base: str, pid: int, gpus: Path, args: argparse.Namespace) -> None:
    print(
        f"{'models':>8} {'apply s':>8} {'writes/s':>9} {'CPU/GPU change':>15} {'idle CPU':>9}"
        f" {'RSS MiB':>8}"
    )
    async with aiohttp.ClientSession(base) as http:
        for size in args.sizes:
            apply_s = await apply_catalog(http, size)
            writes = await sequential_writes(http, args.writes)
            # Start from a reading the poller has already published.
            write_gpus(gpus, 100_000)
            await asyncio.sleep(0.5)
            idle_cpu, _ = await asyncio.to_thread(cpu_over, pid, args.seconds, None, 100_000)
            busy_cpu, changes = await asyncio.to_thread(cpu_over, pid, args.seconds, gpus, 100_000)
            per_change_ms = (busy_cpu - idle_cpu) / changes * 1000
            print(
                f"{size:>8} {apply_s:>8.2f} {writes:>9.0f} {per_change_ms:>12.2f} ms"
                f" {idle_cpu / args.seconds * 100:>8.1f}% {rss_mib(pid):>8.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[100, 1_000, 10_000, 100_000],
    )
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    env = {
        "MODEL_REGISTRY_POLL_INTERVAL": str(POLL_S),
        "MODEL_REGISTRY_ADMIN_TOKEN": TOKEN,
        "MODEL_REGISTRY_SEED_CATALOG": "false",
    }
    with simulated_daemon(gpu_devices(100_000), **env) as daemon:
        asyncio.run(measure(daemon.base, daemon.pid, daemon.gpus, args))
        flips = sum(1 for line in daemon.log_lines() if "model availability changed" in line)
        print(f"\nmodel availability changes logged in all: {flips}")


if __name__ == "__main__":
    main()
