"""Benchmark GET /models against an aiohttp app serving the identical bytes statically.

Starts `model-registry serve` with default settings (metrics, request ids, access log at its
default) on the simulated backend with 8 devices and the embedded PostgreSQL, then loads the
daemon and the static app alternately (A B A B ...) with wrk at 64 connections, and prints
requests/s, p50, p99 and the ratio. Also measures the daemon's idle CPU at the default poll
interval and its RSS (PostgreSQL excluded).

    python bench/listing.py [--duration 5] [--rounds 2]

Needs `wrk` (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import (
    add_models,
    cpu_seconds,
    fetch,
    free_port,
    rss_mib,
    simulated_daemon,
    wait_http,
    wrk,
)

STATIC_APP = """
import sys
from aiohttp import web

body = open(sys.argv[1], "rb").read()
response_headers = {"Content-Type": "application/json; charset=utf-8"}

async def handler(request):
    return web.Response(body=body, headers=response_headers)

app = web.Application()
app.router.add_get("/models", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


def compare(name: str, daemon_url: str, static_url: str, duration: int, rounds: int) -> None:
    body = fetch(daemon_url)
    assert fetch(static_url) == body, "the static app must serve the same bytes"
    results: dict[str, list[dict[str, float]]] = {"daemon": [], "static": []}
    wrk(daemon_url, 1)  # warm both up
    wrk(static_url, 1)
    for _ in range(rounds):
        results["daemon"].append(wrk(daemon_url, duration))
        results["static"].append(wrk(static_url, duration))

    def mean(kind: str, key: str) -> float:
        return sum(r[key] for r in results[kind]) / len(results[kind])

    ratio = mean("daemon", "rps") / mean("static", "rps")
    print(f"\n{name} ({len(body)} bytes per response, {rounds} x {duration} s each, A B A B)")
    print(f"  {'':8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in ("daemon", "static"):
        print(
            f"  {kind:8} {mean(kind, 'rps'):>10.0f} {mean(kind, 'p50_ms'):>8.2f}"
            f" {mean(kind, 'p99_ms'):>8.2f}"
        )
    print(f"  ratio daemon/static: {ratio:.2f}")


@contextlib.contextmanager
def static_app(body: bytes, work: Path) -> Iterator[str]:
    """An aiohttp app serving `body` at /models; yields its base URL."""
    (work / "body.json").write_bytes(body)
    script = work / "static_app.py"
    script.write_text(STATIC_APP)
    port = free_port()
    static = subprocess.Popen([sys.executable, str(script), str(work / "body.json"), str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/models")
        yield base
    finally:
        static.send_signal(signal.SIGINT)
        static.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs per scenario")
    parser.add_argument("--idle-seconds", type=int, default=20)
    args = parser.parse_args()

    devices = [
        {"uuid": f"GPU-sim-{i}", "total_mib": 81920, "free_mib": 40000 + i * 1000} for i in range(8)
    ]
    with simulated_daemon(devices) as daemon:
        base = daemon.base
        time.sleep(2)  # let start-up work settle before measuring idle CPU
        before = cpu_seconds(daemon.pid)
        time.sleep(args.idle_seconds)
        idle = (cpu_seconds(daemon.pid) - before) / args.idle_seconds * 100
        print(
            f"idle CPU at the default poll interval, 8 simulated devices: {idle:.2f} % of a core"
            f" ({args.idle_seconds} s)"
        )
        with static_app(fetch(f"{base}/models"), daemon.work) as static:
            compare("5-model listing", f"{base}/models", f"{static}/models", *_runs(args))

        asyncio.run(add_models(daemon.embedded_dsn(), 10_000))
        deadline = time.monotonic() + 30
        while json.loads(fetch(f"{base}/models?limit=1"))["pagination"]["total_items"] < 10_005:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not pick up the 10,000 models")
            time.sleep(0.1)
        page = f"{base}/models?limit=100"
        with static_app(fetch(page), daemon.work) as static:
            compare("10,000 models, limit=100", page, f"{static}/models", *_runs(args))
        print(f"\ndaemon RSS after the load (PostgreSQL excluded): {rss_mib(daemon.pid):.1f} MiB")


def _runs(args: argparse.Namespace) -> tuple[int, int]:
    return args.duration, args.rounds


if __name__ == "__main__":
    main()
