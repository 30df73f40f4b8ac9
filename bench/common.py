"""What the bench scripts share: a daemon child process on the simulated backend, waiting for
HTTP, wrk, and reading a process's CPU time and memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_daemon(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`model-registry serve` on `port`, its log in `log_path`."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def wait_http(
    url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer") from None
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    port: int
    work: Path  # its state directory, log and GPU file live here
    gpus: Path  # the simulated backend's file

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_lines(self) -> list[str]:
        return (self.work / "daemon.log").read_text().splitlines()

    def embedded_dsn(self) -> str:
        """The URL of the embedded PostgreSQL the daemon started."""
        return next(
            json.loads(line)["dsn"]
            for line in self.log_lines()
            if "embedded postgresql running" in line
        )


@contextlib.contextmanager
def simulated_daemon(devices: list[dict[str, Any]], **env: str) -> Iterator[RunningDaemon]:
    """`model-registry serve` on the simulated backend with `devices`, its embedded PostgreSQL
    and everything else in a temporary directory; stopped (SIGTERM) and removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="mr-bench-"))
    work.chmod(0o711)  # run by root, the embedded server's own user must reach its state
    gpus = work / "gpus.json"
    gpus.write_text(json.dumps({"devices": devices}))
    port = free_port()
    full_env = {
        **os.environ,
        "MODEL_REGISTRY_STATE_DIR": str(work / "state"),
        "MODEL_REGISTRY_GPU_BACKEND": "simulated",
        "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpus),
        "MODEL_REGISTRY_LOG_FORMAT": "json",
        **env,
    }
    process = start_daemon(full_env, port, work / "daemon.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process)
        yield RunningDaemon(process, base, port, work, gpus)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def wrk(url: str, duration_s: int, connections: int = 64) -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) of `url` under wrk; any non-2xx answer ends the bench."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
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
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    return {"rps": rps, "p50_ms": latencies["50"], "p99_ms": latencies["99"]}


async def add_models(dsn: str, count: int) -> None:
    """`count` models named bench-1, bench-2, ... straight into the catalog table."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO models (name, vram) SELECT 'bench-' || g, 1 + (g * 7919) % 150000"
            " FROM generate_series(1, $1) AS g",
            count,
        )
        # As a catalog is after its load: without this, autovacuum analyses the table during
        # whatever is measured next.
        await conn.execute("VACUUM ANALYZE models")
    finally:
        await conn.close()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]
