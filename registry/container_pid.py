"""A process inside a container, found as the host sees it.

NVML lists host pids; a worker in a container knows its own pid only (1, 7, 42...). Given that
pid and its container's id (or its pod's UID, from the Downward API, where a container cannot
see its own id), the host pid is the process whose `NSpid` (in /proc/PID/status) ends in that
pid and whose cgroup path names the container or the pod. The daemon must see the host's
processes for this: on Kubernetes `hostPID: true`; under systemd no `ProtectProc=invisible`.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

from aiohttp import web

from registry import keys

CONTAINER_ID_PATTERN = r"^[0-9a-f]{12,64}$"
POD_UID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class Unresolved(Exception):
    """No single host process matches: the message says why."""


def _namespace_pids(status: str) -> list[int]:
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return [int(part) for part in line.split()[1:]]
    return []


def _names(cgroup: str, container: str | None, pod_uid: str | None) -> bool:
    """Whether a /proc/PID/cgroup text names the container, or the pod (kubelet writes the
    UID with dashes under cgroupfs, with underscores under the systemd driver)."""
    if container is not None:
        return container in cgroup
    assert pod_uid is not None
    uid = pod_uid.lower()
    return f"pod{uid}" in cgroup or f"pod{uid.replace('-', '_')}" in cgroup


def host_pid(
    container_pid: int,
    *,
    container: str | None = None,
    pod_uid: str | None = None,
    proc: Path = Path("/proc"),
) -> int:
    """The host pid of `container_pid` in the container (or pod) named; Unresolved if none, or
    more than one, matches."""
    where = f"container {container}" if container is not None else f"pod {pod_uid}"
    try:
        entries = [entry for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError as exc:
        raise Unresolved(f"cannot read {proc}: {exc.strerror or exc}") from None
    found: list[int] = []
    others_seen = False
    own_uid = os.geteuid()
    for entry in entries:
        try:
            others_seen = others_seen or entry.stat().st_uid != own_uid
            pids = _namespace_pids((Path(entry.path) / "status").read_text())
            if len(pids) < 2 or pids[-1] != container_pid:
                continue  # not in a child pid namespace, or another pid there
            if _names((Path(entry.path) / "cgroup").read_text(), container, pod_uid):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listed = ", ".join(str(pid) for pid in sorted(found)[:5])
        raise Unresolved(f"pid {container_pid} of {where} matches several host processes: {listed}")
    if not others_seen and own_uid != 0:
        raise Unresolved(
            f"no process with pid {container_pid} in {where}: this daemon cannot see other "
            f"users' processes in {proc} (under systemd, ProtectProc=invisible hides them; on "
            "Kubernetes the pod needs hostPID: true)"
        )
    raise Unresolved(f"no process with pid {container_pid} in {where} on this host")


class NamesContainerPid(Protocol):
    container_pid: int | None
    container: str | None
    pod_uid: str | None


async def in_host_terms(request: web.Request, body: NamesContainerPid) -> int | None:
    """The host pid of a request body's `container_pid` (None when it gave none), looked up
    in a thread: a scan of the host's processes."""
    if body.container_pid is None:
        return None
    proc = request.app[keys.SETTINGS].current.proc_root
    return await asyncio.to_thread(
        host_pid, body.container_pid, container=body.container, pod_uid=body.pod_uid, proc=proc
    )
