"""The clients of bench/budget.py, each in a process of its own so that their work is not on
the daemon's event loop. Each prints one JSON object on stdout.

    python bench/budget_clients.py pairs BASE TOKEN --pairs N --open N
    python bench/budget_clients.py writes BASE TOKEN --writes N
    python bench/budget_clients.py watch BASE GPU_FILE --watchers N --changes N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from common import percentile
from open_reservations import drain
from open_reservations import pairs as timed_pairs

DEVICE = {"uuid": "GPU-sim-0", "total_mib": 143360}


async def _open(http: aiohttp.ClientSession, base: str, headers: Any, count: int) -> list[str]:
    semaphore = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        body = {"vram_mib": 1, "ttl_s": 3600, "holder": f"held-{i}"}
        async with semaphore, http.post(f"{base}/reservations", json=body, headers=headers) as r:
            if r.status != 201:
                raise SystemExit(f"opening reservations: {r.status} {await r.text()}")
            reservation_id: str = (await r.json())["id"]
            return reservation_id

    return await asyncio.gather(*(one(i) for i in range(count)))


async def _close(http: aiohttp.ClientSession, base: str, headers: Any, ids: list[str]) -> None:
    semaphore = asyncio.Semaphore(32)

    async def one(reservation_id: str) -> None:
        async with semaphore, http.delete(f"{base}/reservations/{reservation_id}", headers=headers):
            pass

    await asyncio.gather(*(one(i) for i in ids))


async def pairs(args: argparse.Namespace) -> dict[str, Any]:
    """Sequential reserve+release pairs with none open, then with --open open (an /events
    stream attached, so every change is also encoded for a watcher); p99 of each."""
    headers = {"Authorization": f"Bearer {args.token}"}
    async with aiohttp.ClientSession() as http:
        stream = await http.get(f"{args.base}/events")
        reader = asyncio.ensure_future(drain(stream))
        await timed_pairs(http, args.base, 200, headers)  # warm up
        empty = await timed_pairs(http, args.base, args.pairs, headers)
        held = await _open(http, args.base, headers, args.open)
        full = await timed_pairs(http, args.base, args.pairs, headers)
        await _close(http, args.base, headers, held)
        reader.cancel()
        stream.close()
    return {
        "empty_p50_ms": percentile(empty, 50) * 1000,
        "empty_p99_ms": percentile(empty, 99) * 1000,
        "full_p50_ms": percentile(full, 50) * 1000,
        "full_p99_ms": percentile(full, 99) * 1000,
    }


async def writes(args: argparse.Namespace) -> dict[str, Any]:
    """Sequential catalog writes (PATCH of one model's size): writes per second."""
    headers = {"Authorization": f"Bearer {args.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{args.base}/models?name=tiny") as response:
            model_id = (await response.json())["data"][0]["id"]
        started = time.perf_counter()
        for i in range(args.writes):
            body = {"vram": 500 + i % 2}
            async with http.patch(
                f"{args.base}/models/{model_id}", json=body, headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"a catalog write was answered {response.status}")
        elapsed = time.perf_counter() - started
    return {"writes_per_s": args.writes / elapsed}


def write_gpus(path: Path, free_mib: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": [{**DEVICE, "free_mib": free_mib}]}))
    tmp.replace(path)


async def watch(args: argparse.Namespace) -> dict[str, Any]:
    """--watchers event streams; the GPU file changed --changes times: how long each change
    took, from the poller's publication (`as_of`) to each stream's reading of it."""
    seen: list[list[float]] = [[] for _ in range(args.changes)]
    ready = 0

    async def stream(http: aiohttp.ClientSession) -> None:
        nonlocal ready
        # One model's objects in the snapshot: the GPU events are what is measured.
        async with http.get(f"{args.base}/events?name=tiny") as response:
            if response.status != 200:
                raise SystemExit(f"a stream was answered {response.status}: raise its limits")
            change = -1
            async for line in response.content:
                if line.startswith(b"event: snapshot"):
                    ready += 1
                elif line.startswith(b"event: gpus") and change + 1 < args.changes:
                    change += 1
                    seen[change].append(time.time())

    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks: list[asyncio.Future[None]] = []
        deadline = time.monotonic() + 60
        # In waves the daemon's listen backlog holds: a thousand SYNs at once would overflow
        # it, and the kernel's retries (1, 2, 4, ... s) are not what is measured here.
        while len(tasks) < args.watchers or ready < args.watchers:
            if len(tasks) < args.watchers and ready >= len(tasks) - 50:
                wave = min(100, args.watchers - len(tasks))
                tasks += [asyncio.ensure_future(stream(http)) for _ in range(wave)]
            failed = [t for t in tasks if t.done()]
            if failed:
                await failed[0]
                raise SystemExit("a stream ended before its snapshot")
            if time.monotonic() > deadline:
                raise SystemExit(f"only {ready} of {args.watchers} streams opened in 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # let the connection burst settle
        for change in range(args.changes):
            write_gpus(Path(args.gpu_file), 40000 + change * 100)
            deadline = time.monotonic() + 10
            while len(seen[change]) < args.watchers:
                if time.monotonic() > deadline:
                    raise SystemExit(f"change {change}: {len(seen[change])} streams saw it")
                await asyncio.sleep(0.01)
            async with http.get(f"{args.base}/gpus") as response:
                as_of = datetime.fromisoformat((await response.json())["as_of"]).timestamp()
            latencies.extend(t - as_of for t in seen[change])
            await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"p99_ms": percentile(latencies, 99) * 1000, "p50_ms": percentile(latencies, 50) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["pairs", "writes", "watch"])
    parser.add_argument("base")
    parser.add_argument("token_or_file")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--open", type=int, default=10_000)
    parser.add_argument("--writes", type=int, default=600)
    parser.add_argument("--watchers", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=3)
    args = parser.parse_args()
    args.token = args.gpu_file = args.token_or_file
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run = {"pairs": pairs, "writes": writes, "watch": watch}[args.what]
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
