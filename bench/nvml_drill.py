"""Drill on a real GPU: the listing must follow VRAM that another process takes and gives back.

Starts `model-registry serve` with the nvml backend (embedded PostgreSQL in a temporary state
directory), registers models sized against device 0's free memory, then has a second process
allocate and free VRAM with torch, and checks after each step that GET /models follows within
one poll interval. Prints what it saw; exits non-zero if the listing did not follow.

    python bench/nvml_drill.py [--poll-interval 0.2]

Needs an NVIDIA GPU, its driver, and torch with CUDA in the same Python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import free_port, start_daemon, wait_http

TOKEN = "drill-token"
GIB_MIB = 1024

ALLOCATOR = r"""
import sys, torch
blocks = []
print("ready", flush=True)
for line in sys.stdin:
    command, _, size = line.strip().partition(" ")
    if command == "alloc":
        blocks.append(torch.empty(int(size) * 2**20, dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()
    elif command == "free":
        blocks.clear()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    print("ok", flush=True)
"""


def call(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def active(base: str) -> dict[str, Any]:
    return {m["name"]: m for m in call(f"{base}/models?limit=1000")["data"]}


def wait_until(base: str, expected: dict[str, bool], timeout_s: float) -> tuple[float, dict]:
    started = time.monotonic()
    while True:
        models = active(base)
        if all(models[name]["active"] is want for name, want in expected.items()):
            return time.monotonic() - started, models
        if time.monotonic() - started > timeout_s:
            raise SystemExit(
                f"listing did not follow within {timeout_s} s: {expected} vs "
                f"{ {n: models[n]['active'] for n in expected} }"
            )
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-interval", type=float, default=0.2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mr-drill-"))
    work.chmod(0o711)  # run by root, the embedded server's own user must reach its state
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MODEL_REGISTRY_STATE_DIR": str(work / "state"),
        "MODEL_REGISTRY_GPU_BACKEND": "nvml",
        "MODEL_REGISTRY_POLL_INTERVAL": str(args.poll_interval),
        "MODEL_REGISTRY_ADMIN_TOKEN": TOKEN,
        "MODEL_REGISTRY_SEED_CATALOG": "false",
        "MODEL_REGISTRY_LOG_FORMAT": "json",
    }
    log_path = work / "daemon.log"
    daemon = start_daemon(env, port, log_path)
    allocator = None
    try:
        wait_http(f"{base}/healthz", daemon)

        gpus = call(f"{base}/gpus")
        print("GET /gpus at start:")
        print(json.dumps(gpus, indent=1))
        if gpus["state"] != "ok":
            raise SystemExit("NVML is not usable here")
        device = gpus["devices"][0]
        free = device["usable_mib"]
        plan = {"small-1g": 1 * GIB_MIB, "half": free // 2, "most": free - 8 * GIB_MIB}
        for name, vram in plan.items():
            call(f"{base}/models", "POST", {"name": name, "vram": vram})
        print(f"\nmodels registered against {free} MiB usable on {device['uuid']}: {plan}")

        wait_until(base, dict.fromkeys(plan, True), 5)
        allocator = subprocess.Popen(
            [sys.executable, "-c", ALLOCATOR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert allocator.stdin is not None and allocator.stdout is not None
        assert allocator.stdout.readline().strip() == "ready"

        def step(command: str, expected: dict[str, bool]) -> None:
            assert allocator is not None and allocator.stdin and allocator.stdout
            allocator.stdin.write(command + "\n")
            allocator.stdin.flush()
            assert allocator.stdout.readline().strip() == "ok"
            took, models = wait_until(base, expected, timeout_s=10)
            gpu = call(f"{base}/gpus")["devices"][0]
            print(
                f"{command:>12}: free {gpu['free_mib']:>7} MiB, listing followed in "
                f"{took * 1000:6.1f} ms (poll interval {args.poll_interval * 1000:.0f} ms): "
                + ", ".join(
                    f"{n}={'on' if m['active'] else 'off'}({m['headroom_mib']})"
                    for n, m in models.items()
                )
            )

        print()
        step("alloc 16384", {"small-1g": True, "half": True, "most": False})
        remaining_for_half = free - 16 * GIB_MIB - plan["half"]
        step(
            f"alloc {remaining_for_half + 4 * GIB_MIB}",
            {"small-1g": True, "half": False, "most": False},
        )
        step("free", {"small-1g": True, "half": True, "most": True})

        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        print("\nselected metrics:")
        for line in metrics.splitlines():
            if line.startswith(
                (
                    "model_registry_gpu_memory",
                    "model_registry_gpu_usable",
                    "model_registry_gpu_poll_duration_seconds_sum",
                    "model_registry_gpu_poll_duration_seconds_count",
                    "model_registry_models",
                )
            ):
                print(" ", line)
        flips = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if "model availability changed" in line
        ]
        print(f"\n{len(flips)} 'model availability changed' log lines, e.g.:")
        for line in flips[:2]:
            print(" ", json.dumps(line))
        print("\nDRILL PASSED")
    finally:
        if allocator is not None and allocator.poll() is None:
            allocator.kill()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=20)
        print(f"daemon exited with {code} after SIGTERM")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
