"""For a worker inside a container: its container's id, where the container can see it, to bind
by its own pid (`lease.bind(container_pid=os.getpid(), container=own_container_id())`). Under
cgroup v2 a container often sees only `0::/`: pass the pod's UID from the Downward API
(`pod_uid=`) instead."""

from __future__ import annotations

import re
from pathlib import Path

_ID = re.compile(r"([0-9a-f]{64})")


def own_container_id(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The 64-hex-digit id in this process's cgroup path (docker, podman, containerd, CRI-O),
    or None where the path does not show one."""
    try:
        text = cgroup_file.read_text()
    except OSError:
        return None
    found = _ID.findall(text)
    return found[-1] if found else None
