"""What watchers cost: idle event streams and blocking GETs, and how fast a change reaches them.

Starts `model-registry serve` (simulated backend, embedded PostgreSQL, default settings), then:

1. measures the idle daemon's CPU and RSS for `--seconds`;
2. opens `--streams` GET /events streams and `--waiters` blocking GET /models
   (If-None-Match + Prefer: wait=300), and measures CPU and RSS again, idle;
3. changes the simulated GPU's free memory `--changes` times and records when each stream saw
   the `gpus` event and each blocking GET its 200, against the change's `as_of` (when the
   poller published it): latency per watcher, p50/p99/max.

The clients run in this process, on the same machine, and their own work is in the latencies;
a blocking GET that got its answer asks again half a second later, so that the next round of
requests does not compete, in this one client process, with reading the current answers.

    python bench/watch.py [--streams 1000] [--waiters 1000] [--seconds 20] [--changes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import time
from datetime import datetime
from pathlib import Path

import aiohttp
from common import cpu_seconds, percentile, rss_mib, simulated_daemon

DEVICE = {"uuid": "GPU-sim-0", "total_mib": 81920}


def write_gpus(path: Path, free_mib: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": [{**DEVICE, "free_mib": free_mib}]}))
    tmp.replace(path)


class Watchers:
    def __init__(self, base: str) -> None:
        self.base = base
        self.seen: list[list[float]] = []  # per change: the wall time each watcher saw it
        self.ready = 0
        self.tasks: list[asyncio.Task[None]] = []

    def all_saw(self, change: int, total: int) -> bool:
        return len(self.seen) > change and len(self.seen[change]) >= total

    def _saw(self, change: int) -> None:
        while len(self.seen) <= change:
            self.seen.append([])
        self.seen[change].append(time.time())

    async def stream(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"{self.base}/events") as response:
            refused(response, "an event stream")
            change = -1
            async for line in response.content:
                if line.startswith(b"event: snapshot"):
                    self.ready += 1
                elif line.startswith(b"event: gpus"):
                    change += 1
                    self._saw(change)

    async def waiter(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"{self.base}/models") as response:
            refused(response, "a listing")
            etag = response.headers["ETag"]
            await response.read()
        self.ready += 1
        change = -1
        while True:
            headers = {"If-None-Match": etag, "Prefer": "wait=300"}
            async with http.get(f"{self.base}/models", headers=headers) as response:
                await response.read()
                if response.status not in (200, 304):
                    refused(response, "a waiting GET")
                if response.status == 200:
                    change += 1
                    self._saw(change)
                    etag = response.headers["ETag"]
            if response.status == 200:
                # Ask again a little later: a thousand clients on other machines would, but
                # here their requests would compete with this one loop's reading of answers.
                await asyncio.sleep(0.5)


class Refused(Exception):
    """The daemon would not take a watcher: the bench stops and says so instead of waiting."""


def refused(response: aiohttp.ClientResponse, what: str) -> None:
    if response.status != 200:
        raise Refused(
            f"{what} was answered {response.status} (Retry-After "
            f"{response.headers.get('Retry-After')}): raise the daemon's stream limits"
        )


def watcher_limits(watchers: int) -> dict[str, str]:
    """The daemon's limits for `watchers` streams and waiting GETs, all from this one address."""
    total = str(watchers + 64)
    return {"MODEL_REGISTRY_MAX_STREAMS": total, "MODEL_REGISTRY_MAX_STREAMS_PER_CLIENT": total}


async def wait_ready(watchers: Watchers, total: int, timeout_s: float = 60.0) -> None:
    """Until every watcher has its first answer; the first refusal or the timeout ends it."""
    deadline = time.monotonic() + timeout_s
    while watchers.ready < total:
        for task in watchers.tasks:
            if task.done() and task.exception() is not None:
                raise SystemExit(f"a watcher failed: {task.exception()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"only {watchers.ready} of {total} watchers started in {timeout_s} s")
        await asyncio.sleep(0.1)


async def idle_cost(pid: int, seconds: float) -> tuple[float, float]:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds * 100, rss_mib(pid)


async def run(base: str, pid: int, gpus: Path, args: argparse.Namespace) -> None:
    idle_cpu, idle_rss = await idle_cost(pid, args.seconds)
    print(f"idle daemon:             CPU {idle_cpu:5.2f} % of a core, RSS {idle_rss:6.1f} MiB")

    watchers = Watchers(base)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(args.streams):
            watchers.tasks.append(asyncio.create_task(watchers.stream(http)))
        for _ in range(args.waiters):
            watchers.tasks.append(asyncio.create_task(watchers.waiter(http)))
        total = args.streams + args.waiters
        await wait_ready(watchers, total)
        await asyncio.sleep(2)  # let the connection burst settle
        busy_cpu, busy_rss = await idle_cost(pid, args.seconds)
        print(
            f"with {args.streams} streams + {args.waiters} waiting GETs:"
            f" CPU {busy_cpu:5.2f} % of a core, RSS {busy_rss:6.1f} MiB"
            f"  (+{busy_cpu - idle_cpu:.2f} %, +{busy_rss - idle_rss:.1f} MiB)"
        )

        latencies: list[float] = []
        for change in range(args.changes):
            write_gpus(gpus, 40000 + change * 100)
            deadline = time.monotonic() + 10
            while not watchers.all_saw(change, total) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            async with http.get(f"{base}/gpus") as response:
                as_of = datetime.fromisoformat((await response.json())["as_of"]).timestamp()
            seen = watchers.seen[change]
            if len(seen) < total:
                raise SystemExit(f"change {change}: only {len(seen)} of {total} watchers saw it")
            latencies.extend(t - as_of for t in seen)
            await asyncio.sleep(1)
        ms = [x * 1000 for x in latencies]
        print(
            f"a GPU change reaching all {total} watchers ({args.changes} changes):"
            f" p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms,"
            f" max {max(ms):.0f} ms"
        )
        for task in watchers.tasks:
            task.cancel()
        await asyncio.gather(*watchers.tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 client sockets here

    limits = watcher_limits(args.streams + args.waiters)
    with simulated_daemon([{**DEVICE, "free_mib": 30000}], **limits) as daemon:
        time.sleep(2)
        asyncio.run(run(daemon.base, daemon.pid, daemon.gpus, args))
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(timeout=30)
        print(f"SIGTERM to exit: {time.monotonic() - started:.2f} s")


if __name__ == "__main__":
    main()
