"""The OCI image (Containerfile), built and run with podman on a Debian base made here with
debootstrap: it serves the seed catalog on the simulated backend, runs as its own non-root user,
stops cleanly on `podman stop`, and keeps its reservations on its volume; a worker in a
container binds by its own pid. Marked `container`: outside the suite's time budget, run by
.ci/run (`pytest -m container`); each test skips, saying why, where podman cannot run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import SCHEDULER_TOKEN, SpawnDaemon
from tests.waiting import until

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MODEL_REGISTRY_TEST_IMAGE_CACHE", "/var/cache/model-registry-ci"))
BASE = "localhost/model-registry-base:bookworm"
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
DEVICE = {"uuid": "GPU-sim-0", "name": "Simulated GPU", "total_mib": 81920, "free_mib": 60000}


def _podman(*args: str, timeout: float = 600, check: bool = True) -> str:
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done.stdout.strip()


def _base_image() -> None:
    """A Debian bookworm base with Python, made with debootstrap once per machine (cached), with
    this machine's CA bundle and a pip.conf naming it: package registries are reached through
    a TLS proxy whose CA only the host's bundle has."""
    if subprocess.run([*PODMAN, "image", "exists", BASE], check=False).returncode == 0:
        return
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        if shutil.which("debootstrap") is None:
            pytest.skip("debootstrap is not installed (Debian: apt-get install debootstrap)")
        shutil.rmtree(rootfs, ignore_errors=True)
        made = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                "bookworm",
                str(rootfs),
                "http://deb.debian.org/debian",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if made.returncode != 0:
            pytest.skip(f"debootstrap could not make a base: {made.stdout[-500:]}")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copy(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
        (rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {bundle}\n")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [*PODMAN, "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=600
    )
    tar.wait()
    assert imported.returncode == 0, imported.stderr


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("podman runs images here as root only")
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install {tool})")
    info = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    _base_image()
    tag = f"localhost/model-registry:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    _podman(
        "build",
        "--network",
        "host",
        *LIMITS,
        "--format",
        "docker",  # podman keeps HEALTHCHECK only in this format
        "--build-arg",
        f"BASE={BASE}",
        "-t",
        tag,
        str(ROOT),
    )
    size_mib = int(_podman("image", "inspect", "--format", "{{.Size}}", tag)) / 2**20
    base_mib = int(_podman("image", "inspect", "--format", "{{.Size}}", BASE)) / 2**20
    print(
        f"\nimage built in {time.monotonic() - started:.1f} s: {size_mib:.0f} MiB "
        f"({size_mib - base_mib:.0f} MiB over its {base_mib:.0f} MiB base)"
    )
    yield tag
    _podman("rmi", "-f", tag, check=False)


def _in_container(name: str, path: str, method: str = "GET", body: Any = None) -> Any:
    """Ask the daemon in the container (run without a network) from inside it."""
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        f"request = urllib.request.Request('http://127.0.0.1:8700{path}', method={method!r},"
        f" data={json.dumps(body).encode() if body is not None else None!r},"
        f" headers={{'Authorization': 'Bearer {SCHEDULER_TOKEN}',"
        " 'Content-Type': 'application/json'})\n"
        "try:\n    answer = urllib.request.urlopen(request, timeout=5)\n"
        "except urllib.error.HTTPError as error:\n    answer = error\n"
        "print(json.dumps({'status': answer.status, 'body': json.loads(answer.read() or 'null')}))"
    )
    return json.loads(_podman("exec", name, "python3", "-c", script, timeout=30))


def _answers_readyz(name: str) -> bool:
    """Whether the daemon in the container answers /readyz with 200 (asked from inside it)."""
    asked = subprocess.run(
        [*PODMAN, "exec", name, "python3", "-c",
         "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8700/readyz')"],
        capture_output=True,
        check=False,
    )  # fmt: skip
    return asked.returncode == 0


def _wait_ready(name: str, timeout_s: float) -> None:
    try:
        until(lambda: _answers_readyz(name), timeout_s=timeout_s)
    except AssertionError:
        logs = _podman("logs", name, check=False)
        raise AssertionError(f"not ready in {timeout_s} s:\n{logs}") from None


def _run(image: str, name: str, volume: str, gpus: Path) -> float:
    """Start the image as a daemon (simulated GPU, no network); seconds from `podman run`
    until ready."""
    started = time.monotonic()
    _podman(
        "run", "-d", "--name", name, "--network", "none", *LIMITS,
        "-v", f"{volume}:/var/lib/model-registry",
        "-v", f"{gpus}:/etc/model-registry/gpus.json:ro",
        "-e", "MODEL_REGISTRY_GPU_BACKEND=simulated",
        "-e", "MODEL_REGISTRY_GPU_SIMULATED_FILE=/etc/model-registry/gpus.json",
        "-e", f"MODEL_REGISTRY_SCHEDULER_TOKEN={SCHEDULER_TOKEN}",
        image,
    )  # fmt: skip
    _wait_ready(name, 60)
    return time.monotonic() - started


@pytest.fixture
def gpus(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"devices": [DEVICE]}))
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return path


def test_the_image_serves_stops_cleanly_and_keeps_its_reservations(image: str, gpus: Path) -> None:
    [inspected] = json.loads(_podman("image", "inspect", image))
    config = inspected["Config"]
    assert config["User"] == "model-registry" and config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"][:2] == ["tini", "--"] and "8700/tcp" in config["ExposedPorts"]
    assert "/var/lib/model-registry" in config["Volumes"]
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MODEL_REGISTRY_HOST"] == "0.0.0.0"
    assert env["MODEL_REGISTRY_STATE_DIR"] == "/var/lib/model-registry"
    assert (env["NVIDIA_VISIBLE_DEVICES"], env["NVIDIA_DRIVER_CAPABILITIES"]) == ("all", "utility")

    name, volume = f"mr-test-{uuid.uuid4().hex[:8]}", f"mr-state-{uuid.uuid4().hex[:8]}"
    try:
        ready_s = _run(image, name, volume, gpus)
        print(f"\npodman run to ready: {ready_s:.2f} s")
        assert _podman("exec", name, "id", "-un") == "model-registry"
        listing = _in_container(name, "/models")
        assert [m["name"] for m in listing["body"]["data"]] == [
            "tiny", "medium", "large_v1", "large_v2", "large-v3",
        ]  # fmt: skip
        reserved = _in_container(name, "/reservations", "POST", {"model": "tiny", "ttl_s": 3600})
        assert reserved["status"] == 201, reserved
        _podman("stop", "-t", "20", name)
        assert _podman("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
        logs = _podman("logs", name)
        assert '"embedded postgresql stopped"' in logs and '"stopped"' in logs
        _podman("rm", name)
        _run(image, name, volume, gpus)  # the same volume: the journal and the database
        kept = _in_container(name, "/reservations")
        assert [r["id"] for r in kept["body"]["data"]] == [reserved["body"]["id"]]
    finally:
        _podman("rm", "-f", "-v", name, check=False)
        _podman("volume", "rm", "-f", volume, check=False)


async def test_a_worker_in_a_container_binds_by_its_own_pid(
    image: str, spawn_daemon: SpawnDaemon, gpu_file: Callable[..., Path]
) -> None:
    container = _podman("run", "-d", "--network", "none", *LIMITS, "--entrypoint", "sleep",
                        image, "600")  # fmt: skip
    try:
        host_pid = int(_podman("inspect", "--format", "{{.State.Pid}}", container))
        gpu_file({**DEVICE, "processes": [{"pid": host_pid, "used_mib": 0}]})
        daemon = spawn_daemon(MODEL_REGISTRY_SCHEDULER_TOKEN=SCHEDULER_TOKEN)
        await daemon.wait_ready()
        headers = {"Authorization": f"Bearer {SCHEDULER_TOKEN}"}
        body = {"model": "tiny", "gpu": DEVICE["uuid"], "container_pid": 1}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(
                f"{daemon.url}/instances", json={**body, "container": "0" * 64}
            ) as wrong:
                assert wrong.status == 422
                assert (await wrong.json())["reason"] == "pid_unresolved"
            async with http.post(
                f"{daemon.url}/instances", json={**body, "container": container}
            ) as bound:
                assert bound.status == 201, await bound.text()
                assert (await bound.json())["pid"] == host_pid
    finally:
        await asyncio.to_thread(_podman, "rm", "-f", "-v", container, check=False)
