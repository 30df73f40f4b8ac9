"""Binds from inside containers: a worker names its own pid and its container (or its pod), and
the daemon finds the host pid in /proc by the process's NSpid and cgroup. Here /proc is a
directory written by the test (MODEL_REGISTRY_PROC_ROOT); tests/test_container.py does it with
a real podman container."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import container_pid, keys
from registry.container_pid import Unresolved, host_pid
from tests.conftest import AS_SCHEDULER, ONE_GPU, SCHEDULER_TOKEN, AppClient

CONTAINER = "3f4e5d6c7b8a" + "0" * 52
OTHER_CONTAINER = "aa" * 32
POD = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
WORKER, IN_POD, ELSEWHERE, HOST_ONLY = 4242, 5151, 6000, 100


def _process(proc: Path, pid: int, ns_pids: list[int], cgroup: str) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    ns = "\t".join(str(p) for p in ns_pids)
    (directory / "status").write_text(f"Name:\tpython3\nPid:\t{pid}\nNSpid:\t{ns}\n")
    (directory / "cgroup").write_text(cgroup)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A host's /proc: a host process, a podman container's process, a Kubernetes pod's (the
    systemd cgroup driver), and another container's process with the same pid inside."""
    root = tmp_path / "proc"
    _process(root, HOST_ONLY, [HOST_ONLY], "0::/user.slice/session-1.scope\n")
    _process(root, WORKER, [WORKER, 7], f"0::/machine.slice/libpod-{CONTAINER}.scope/container\n")
    pod = POD.replace("-", "_")
    _process(
        root,
        IN_POD,
        [IN_POD, 1],
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{pod}.slice/cri-containerd-{OTHER_CONTAINER}.scope\n",
    )
    _process(root, ELSEWHERE, [ELSEWHERE, 7], f"0::/system.slice/docker-{OTHER_CONTAINER}.scope\n")
    (root / "self").mkdir()
    return root


def test_a_container_pid_is_found_by_its_container_or_its_pod(proc: Path) -> None:
    assert host_pid(7, container=CONTAINER, proc=proc) == WORKER
    assert host_pid(7, container=CONTAINER[:12], proc=proc) == WORKER  # the short id
    assert host_pid(1, pod_uid=POD, proc=proc) == IN_POD
    assert host_pid(1, pod_uid=POD.upper(), proc=proc) == IN_POD
    with pytest.raises(Unresolved, match="no process with pid 8"):
        host_pid(8, container=CONTAINER, proc=proc)
    with pytest.raises(Unresolved, match="no process with pid 7 in container"):
        host_pid(7, container="ff" * 6, proc=proc)
    _process(proc, 4243, [4243, 7], f"0::/machine.slice/libpod-{CONTAINER}.scope/other\n")
    with pytest.raises(Unresolved, match="several host processes: 4242, 4243"):
        host_pid(7, container=CONTAINER, proc=proc)
    with pytest.raises(Unresolved, match="cannot read"):
        host_pid(7, container=CONTAINER, proc=proc / "missing")


def test_a_daemon_that_sees_only_its_own_processes_says_so(
    proc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under ProtectProc=invisible: every process it can list is its own user's."""
    if os.geteuid() == 0:  # root sees everyone: play an ordinary user owning all it sees
        for entry in proc.iterdir():
            os.chown(entry, 1000, 1000)
        monkeypatch.setattr(container_pid.os, "geteuid", lambda: 1000)
    with pytest.raises(Unresolved, match="cannot see other users' processes"):
        host_pid(7, container="ff" * 6, proc=proc)


async def _json(response: Any) -> Any:
    return await response.json()


async def test_binds_adoptions_and_reservations_name_a_worker_by_its_container_pid(
    start_app: AppClient, gpus: Callable[..., Path], proc: Path
) -> None:
    gpus({WORKER: 500, IN_POD: 700})
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, proc_root=proc)
    await client.app[keys.POLLER].poll_and_wait(5)
    in_container = {"container_pid": 7, "container": CONTAINER}
    reserved = await client.post(
        "/reservations", json={"model": "tiny", **in_container}, headers=AS_SCHEDULER
    )
    assert reserved.status == 201, await reserved.text()
    reservation = await _json(reserved)
    assert reservation["pid"] == WORKER
    bound = await client.post(
        "/instances", json={"reservation": reservation["id"]}, headers=AS_SCHEDULER
    )
    assert bound.status == 201 and (await _json(bound))["pid"] == WORKER
    adopted = await client.post(
        "/instances",
        json={"model": "medium", "gpu": ONE_GPU, "container_pid": 1, "pod_uid": POD},
        headers=AS_SCHEDULER,
    )
    assert adopted.status == 201 and (await _json(adopted))["pid"] == IN_POD

    wrong = await client.post(
        "/instances",
        json={"model": "medium", "gpu": ONE_GPU, "container_pid": 7, "container": "ab" * 6},
        headers=AS_SCHEDULER,
    )
    assert wrong.status == 422
    refusal = await _json(wrong)
    assert refusal["reason"] == "pid_unresolved" and "no process with pid 7" in refusal["detail"]
    for hostile in (
        {"container_pid": 7},  # which container?
        {"container": CONTAINER},  # which pid?
        {"container_pid": 7, "container": CONTAINER, "pod_uid": POD},  # both
        {"container_pid": 7, "container": CONTAINER, "pid": WORKER},  # and a host pid
        {"container_pid": 7, "container": "../../etc"},
        {"container_pid": 7, "container": "Z" * 64},
        {"container_pid": 7, "pod_uid": "not-a-uid"},
        {"container_pid": 0, "container": CONTAINER},
        {"container_pid": "7", "container": CONTAINER},
    ):
        body = {"model": "medium", "gpu": ONE_GPU, **hostile}
        answer = await client.post("/instances", json=body, headers=AS_SCHEDULER)
        assert answer.status == 422, (hostile, await answer.text())
        assert "detail" in await _json(answer)
        reserve = await client.post(
            "/reservations", json={"model": "tiny", **hostile}, headers=AS_SCHEDULER
        )
        assert reserve.status == 422, (hostile, await reserve.text())
    listed = await _json(await client.get("/instances"))
    assert sorted(i["pid"] for i in listed["data"]) == [WORKER, IN_POD]
    assert (await _json(await client.get("/reservations")))["data"] == []


def test_the_client_finds_its_own_container_id_where_the_cgroup_shows_it(tmp_path: Path) -> None:
    from model_registry_client import own_container_id

    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"0::/machine.slice/libpod-{CONTAINER}.scope/container\n")
    assert own_container_id(cgroup) == CONTAINER
    cgroup.write_text("0::/\n")  # cgroup v2 with a private namespace: nothing to see
    assert own_container_id(cgroup) is None
    assert own_container_id(tmp_path / "missing") is None
