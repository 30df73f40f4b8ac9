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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from common import cpu_seconds, fetch, free_port, rss_mib, start_daemon, wait_http

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


def wrk(url: str, duration_s: int, connections: int = 64) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latencies = {}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        latencies[pct] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    return {"rps": rps, "p50_ms": latencies["50"], "p99_ms": latencies["99"]}


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


async def add_models(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO models (name, vram) SELECT 'bench-' || g, 1 + (g * 7919) % 150000"
            " FROM generate_series(1, $1) AS g",
            count,
        )
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs per scenario")
    parser.add_argument("--idle-seconds", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="mr-bench-"))
    gpus = work / "gpus.json"
    gpus.write_text(
        json.dumps(
            {
                "devices": [
                    {"uuid": f"GPU-sim-{i}", "total_mib": 81920, "free_mib": 40000 + i * 1000}
                    for i in range(8)
                ]
            }
        )
    )
    port, static_port = free_port(), free_port()
    env = {
        **os.environ,
        "MODEL_REGISTRY_STATE_DIR": str(work / "state"),
        "MODEL_REGISTRY_GPU_BACKEND": "simulated",
        "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpus),
        "MODEL_REGISTRY_LOG_FORMAT": "json",
    }
    daemon = start_daemon(env, port, work / "daemon.log")
    static = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", daemon)
        time.sleep(2)  # let start-up work settle before measuring idle CPU
        before = cpu_seconds(daemon.pid)
        time.sleep(args.idle_seconds)
        idle = (cpu_seconds(daemon.pid) - before) / args.idle_seconds * 100
        print(
            f"idle CPU at the default poll interval, 8 simulated devices: {idle:.2f} % of a core"
            f" ({args.idle_seconds} s)"
        )

        body_file = work / "body.json"
        body_file.write_bytes(fetch(f"{base}/models"))
        static_script = work / "static_app.py"
        static_script.write_text(STATIC_APP)
        static = subprocess.Popen(
            [sys.executable, str(static_script), str(body_file), str(static_port)]
        )
        static_base = f"http://127.0.0.1:{static_port}"
        wait_http(f"{static_base}/models")
        compare(
            "5-model listing", f"{base}/models", f"{static_base}/models", args.duration, args.rounds
        )

        dsn = next(
            json.loads(line)["dsn"]
            for line in (work / "daemon.log").read_text().splitlines()
            if "embedded postgresql running" in line
        )
        asyncio.run(add_models(dsn, 10_000))
        deadline = time.monotonic() + 30
        while json.loads(fetch(f"{base}/models?limit=1"))["pagination"]["total_items"] < 10_005:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not pick up the 10,000 models")
            time.sleep(0.1)
        static.send_signal(signal.SIGINT)
        static.wait(timeout=10)
        body_file.write_bytes(fetch(f"{base}/models?limit=100"))
        static = subprocess.Popen(
            [sys.executable, str(static_script), str(body_file), str(static_port)]
        )
        wait_http(f"{static_base}/models")
        compare(
            "10,000 models, limit=100",
            f"{base}/models?limit=100",
            f"{static_base}/models",
            args.duration,
            args.rounds,
        )
        print(f"\ndaemon RSS after the load (PostgreSQL excluded): {rss_mib(daemon.pid):.1f} MiB")
    finally:
        if static is not None and static.poll() is None:
            static.send_signal(signal.SIGINT)
            static.wait(timeout=10)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
