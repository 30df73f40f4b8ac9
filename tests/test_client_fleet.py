"""A fleet through the client, on two real daemons sharing one PostgreSQL: the first entry URL
is down and the next answers; one merged watch tags each host's events; a placed lease is
renewed from the moment it is granted; a bind shows as warm at once; route() sends a session
where the model is warm, else books a load; a claim placed with make_room asks an idle
instance to go, and one fleet-wide eviction watch tells its owner."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from model_registry_client import Fleet, InstancesEvent, Registry, Route

from tests.conftest import ADMIN_TOKEN, SCHEDULER_TOKEN, SpawnDaemon
from tests.daemon import Daemon, free_port
from tests.waiting import until

WORKER, IDLE = 4242, 5555


def _gpus(path: Path, processes: list[dict[str, int]]) -> str:
    device = {"uuid": f"GPU-{path.stem}", "name": "Simulated GPU", "total_mib": 81920}
    free = 81920 - sum(p["used_mib"] for p in processes)
    path.write_text(json.dumps({"devices": [{**device, "free_mib": free, "processes": processes}]}))
    return str(path)


def _host(spawn_daemon: SpawnDaemon, tmp_path: Path, name: str, processes: Any) -> Daemon:
    port = free_port()
    return spawn_daemon(
        port=port,
        MODEL_REGISTRY_HOST_ID=name,
        MODEL_REGISTRY_ADVERTISE_URL=f"http://127.0.0.1:{port}",
        MODEL_REGISTRY_GPU_SIMULATED_FILE=_gpus(tmp_path / f"{name}.json", processes),
        MODEL_REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN,
        MODEL_REGISTRY_SCHEDULER_TOKEN=SCHEDULER_TOKEN,
        MODEL_REGISTRY_HEARTBEAT_INTERVAL="0.5",
        MODEL_REGISTRY_POLL_INTERVAL="0.2",
        MODEL_REGISTRY_IDLE_AFTER_S="0",
        MODEL_REGISTRY_MIN_RESIDENCY_S="0",
    )


async def test_a_fleet_fails_over_watches_every_host_and_routes_to_warm_instances(
    spawn_daemon: SpawnDaemon, tmp_path: Path
) -> None:
    a = _host(spawn_daemon, tmp_path, "host-a", [{"pid": IDLE, "used_mib": 75000}])
    b = _host(spawn_daemon, tmp_path, "host-b", [{"pid": WORKER, "used_mib": 900}])
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    down = f"http://127.0.0.1:{free_port()}"

    def schedule() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Fleet([down, a.url], SCHEDULER_TOKEN) as fleet:
            until(
                lambda: {h.host for h in fleet.hosts() if h.state == "ok"} == {"host-a", "host-b"}
            )
            with fleet.watch() as events:
                snapshots = set()
                while snapshots != {"host-a", "host-b"}:
                    event = next(events)
                    if event.event == "snapshot":
                        snapshots.add(event.host)
                seen["cold"] = fleet.route("tiny", host="host-b", ttl_s=1)
                lease = seen["cold"].lease
                until(lambda: lease.renewals >= 1)  # renewed before any with block
                instance = lease.bind(WORKER)
                seen["warm_at_once"] = [(s.host, s.instances) for s in fleet.warm("tiny")]
                seen["routed"] = fleet.route("tiny")
                event = next(events)
                while not (isinstance(event, InstancesEvent) and event.instances):
                    event = next(events)
                seen["event"] = (event.host, [i.id for i in event.instances], instance.id)
            with Registry(a.url, SCHEDULER_TOKEN) as host_a:
                idle = host_a.adopt("medium", "GPU-host-a", IDLE, holder="workers")
            evictions = fleet.watch_evictions(holder="workers")
            claim = fleet.place("large-v3", make_room=True, exclude=["host-b"], ttl_s=30)
            seen["claim"] = (claim.host, [i.id for i in claim.awaiting.unload], idle.id)
            asked = next(evictions)
            evictions.close()
            seen["asked"] = (asked.host, asked.url, asked.instance.id)
            claim.release()
        return seen

    seen = await asyncio.wait_for(asyncio.to_thread(schedule), 60)
    cold: Route = seen["cold"]
    assert cold.instance is None and cold.lease.host == "host-b"
    assert seen["warm_at_once"] == [("host-b", 1)]
    routed: Route = seen["routed"]
    assert routed.lease is None and routed.instance is not None
    assert (routed.instance.host, routed.instance.url) == ("host-b", b.url)
    host, ids, bound = seen["event"]
    assert host == "host-b" and ids == [bound]
    host, victims, idle = seen["claim"]
    assert host == "host-a" and victims == [idle]
    assert seen["asked"] == ("host-a", a.url, idle)
