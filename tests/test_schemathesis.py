"""Property-based testing of the live daemon against its own OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.daemon import Daemon

# Bounded so the whole suite stays within a few minutes on two cores.
BUDGET_S = 20


async def test_schemathesis_finds_no_server_error_or_schema_violation(
    database_url: str, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    daemon = Daemon(
        {
            "MODEL_REGISTRY_DATABASE_URL": database_url,
            "MODEL_REGISTRY_GPU_BACKEND": "simulated",
            "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpu_file()),
            "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
            "MODEL_REGISTRY_ACCESS_LOG": "all",
        },
        log_path=tmp_path / "daemon.log",
    )
    try:
        await daemon.wait_ready()
        result = await asyncio.to_thread(
            subprocess.run,
            [
                st,
                # An event stream never ends: each call reads its first event (the snapshot).
                "--config-file",
                str(_config(tmp_path)),
                "run",
                f"{daemon.url}/openapi.json?version=3.2",
                "--header",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "--checks",
                "all",
                # DELETE /models/{id}/footprint discards samples; the footprint stays (declared
                # size, no samples), so a GET after it is rightly 200. (Its operation-level
                # switch does not reach the stateful phase.) Ended reservations, instances and
                # models are 404 afterwards: test_reservations, test_instances, test_writes.
                "--exclude-checks",
                "use_after_free",
                "--max-time",
                str(BUDGET_S),
                # One worker: CPython 3.11 before 3.11.8 tracks the ast module's recursion depth
                # per process, so schemathesis in two threads can fail with "AST constructor
                # recursion depth mismatch" (python/cpython#106905).
                "--workers",
                "1",
                "--seed",
                "20261128",
                "--request-timeout",
                "10",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=BUDGET_S + 60,
            cwd=tmp_path,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                "PYTHONPATH": str(Path(__file__).parent),
            },
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        log = daemon.log()
        assert "Traceback" not in log
        answered = {
            line["path"]
            for line in map(json.loads, log.splitlines())
            if line.get("event") == "request" and line["status"] == 200
        }
        # Their answers were checked against the document: /events event by event.
        assert {"/events", "/fleet/models"} <= answered
    finally:
        daemon.stop()


# A request that names a process by its pid in a container validates, and may still name no
# process this host has: 422 pid_unresolved, as documented, is a right answer to it.
_RESOLVING = "\n".join(
    f"""
[[operations]]
include-operation-id = "{operation}"
checks.positive_data_acceptance.expected-statuses = [
    "2XX", "3XX", 401, 403, 404, 409, 422, 429, "5XX",
]
"""
    for operation in ("create_reservation", "create_instance")
)


def _config(directory: Path) -> Path:
    path = directory / "schemathesis.toml"
    path.write_text("max-stream-events = 1\n" + _RESOLVING)
    return path
