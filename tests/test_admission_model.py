"""A stateful property test of admission against a model of one GPU.

Schedulers reserve, load (under their pid or not), renew, release or die; other processes
allocate only memory the daemon showed as usable, and free it. Whatever the interleaving, the
memory in use plus what admitted holders may still load never exceeds the device (less the
margin), and the daemon's usable figure is exactly what the model expects.

The daemon runs on the test's event loop; the state machine runs in a worker thread and talks to
it over real HTTP, as schedulers would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from registry import keys
from tests.clock import ManualClock
from tests.conftest import SCHEDULER_TOKEN, AppClient
from tests.waiting import eventually

TOTAL_MIB = 81920
MARGIN_MIB = 1024
UUID = "GPU-model-0"
T = TypeVar("T")


@dataclass
class Holder:
    id: str
    vram: int
    pid: int | None
    expires_at: datetime
    process: int  # the loading process, named to the daemon or not
    loaded: int = 0


class Harness:
    """What the state machine needs of the daemon, callable from its thread."""

    def __init__(
        self, client: Any, loop: asyncio.AbstractEventLoop, gpu_file: Path, clock: ManualClock
    ) -> None:
        self.base = str(client.make_url("")).rstrip("/")
        self.app = client.app
        self.loop = loop
        self.gpu_file = gpu_file
        self.clock = clock

    def on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=20)

    def http(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {SCHEDULER_TOKEN}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def show_gpu(self, free_mib: int, processes: dict[int, int]) -> None:
        """Write the device's state and wait until the daemon has read it."""
        device = {
            "uuid": UUID,
            "total_mib": TOTAL_MIB,
            "free_mib": free_mib,
            "processes": [{"pid": pid, "used_mib": mib} for pid, mib in processes.items()],
        }
        tmp = self.gpu_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"devices": [device]}))
        tmp.replace(self.gpu_file)
        expected = {pid: mib for pid, mib in processes.items()}

        def shown() -> bool:
            [seen] = self.app[keys.VIEW].snapshot.devices
            procs = {p.pid: (p.used_bytes or 0) // 2**20 for p in seen.processes}
            return seen.free_mib == free_mib and procs == expected

        async def wait() -> None:
            self.app[keys.POLLER].poll_now()
            await eventually(lambda: shown(), bool)

        self.on_loop(wait())

    def expire_due(self, expected_open: set[str]) -> None:
        async def wait() -> None:
            book = self.app[keys.BOOK]
            book.wake()
            await eventually(
                lambda: {r.id for r in book.open()},
                lambda ids: ids == expected_open,
            )

        self.on_loop(wait())


class AdmissionModel(RuleBasedStateMachine):
    harness: Harness
    holders = Bundle("holders")
    others = Bundle("others")
    pids = itertools.count(10_000)

    def __init__(self) -> None:
        super().__init__()
        h = self.harness
        for reservation in h.http("GET", "/reservations")[1]["data"]:
            h.http("DELETE", f"/reservations/{reservation['id']}")
        self.live: dict[str, Holder] = {}
        self.other_mib: dict[int, int] = {}  # other processes, and finished loads
        self._show()

    # -- the world --------------------------------------------------------------------------

    def _used(self) -> int:
        return sum(self.other_mib.values()) + sum(h.loaded for h in self.live.values())

    def _processes(self) -> dict[int, int]:
        processes = dict(self.other_mib)
        for holder in self.live.values():
            if holder.loaded:
                processes[holder.process] = holder.loaded
        return processes

    def _show(self) -> None:
        self.harness.show_gpu(TOTAL_MIB - self._used(), self._processes())

    def _expected_usable(self) -> int:
        pending = sum(h.vram - (h.loaded if h.pid else 0) for h in self.live.values())
        return TOTAL_MIB - self._used() - MARGIN_MIB - pending

    def _daemon_usable(self) -> int:
        _, gpus = self.harness.http("GET", "/gpus")
        usable: int = gpus["devices"][0]["usable_mib"]
        return usable

    # -- schedulers ---------------------------------------------------------------------------

    @rule(
        target=holders,
        vram=st.integers(1, 40_000),
        named=st.booleans(),
        ttl=st.integers(10, 600),
    )
    def reserve(self, vram: int, named: bool, ttl: int) -> Any:
        process = next(self.pids)
        pid = process if named else None
        expected = vram <= self._expected_usable()
        status, body = self.harness.http(
            "POST", "/reservations", {"vram_mib": vram, "ttl_s": ttl, "pid": pid}
        )
        assert status == (201 if expected else 409), (status, body, self._expected_usable())
        if status != 201:
            return multiple()
        holder = Holder(
            body["id"], vram, pid, self.harness.clock.now + timedelta(seconds=ttl), process
        )
        self.live[holder.id] = holder
        return holder

    @rule(holder=holders, fraction=st.floats(0.05, 1.0))
    def load(self, holder: Holder, fraction: float) -> None:
        if holder.id not in self.live:
            return
        # A holder loads at most what it reserved.
        holder.loaded = min(holder.vram, holder.loaded + max(1, int(holder.vram * fraction)))
        self._show()

    @rule(holder=consumes(holders), finished=st.booleans())
    def release(self, holder: Holder, finished: bool) -> None:
        if holder.id not in self.live:
            return
        status, _ = self.harness.http("DELETE", f"/reservations/{holder.id}")
        assert status == 204
        del self.live[holder.id]
        if finished and holder.loaded:
            self.other_mib[holder.process] = holder.loaded  # the model stays loaded
        self._show()

    @rule(holder=holders, ttl=st.integers(10, 600))
    def renew(self, holder: Holder, ttl: int) -> None:
        if holder.id not in self.live:
            return
        status, _ = self.harness.http("PATCH", f"/reservations/{holder.id}", {"ttl_s": ttl})
        assert status == 200
        holder.expires_at = self.harness.clock.now + timedelta(seconds=ttl)

    @rule(seconds=st.integers(1, 700))
    def time_passes(self, seconds: int) -> None:
        """Holders whose lease ran out died: their memory comes back."""
        self.harness.clock.advance(seconds)
        now = self.harness.clock.now
        for holder in [h for h in self.live.values() if h.expires_at <= now]:
            del self.live[holder.id]
        self.harness.expire_due(set(self.live))
        self._show()

    # -- other processes ----------------------------------------------------------------------

    @rule(target=others, fraction=st.floats(0.0, 1.0))
    def other_allocates(self, fraction: float) -> Any:
        # Only what the daemon says is usable.
        usable = self._daemon_usable()
        amount = int(usable * fraction)
        if amount <= 0:
            return multiple()
        pid = next(self.pids)
        self.other_mib[pid] = amount
        self._show()
        return pid

    @rule(pid=consumes(others))
    def other_frees(self, pid: int) -> None:
        if self.other_mib.pop(pid, None) is not None:
            self._show()

    # -- what must hold -----------------------------------------------------------------------

    @invariant()
    def never_over_committed(self) -> None:
        still_to_load = sum(h.vram - h.loaded for h in self.live.values())
        assert self._used() + still_to_load <= TOTAL_MIB - MARGIN_MIB

    @invariant()
    def the_books_match(self) -> None:
        assert self._daemon_usable() == self._expected_usable()


async def test_admitted_loads_never_exceed_the_device(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    clock = ManualClock()
    path = gpu_file((UUID, TOTAL_MIB, TOTAL_MIB))
    client = await start_app(
        scheduler_token=SCHEDULER_TOKEN, clock=clock, poll_interval=60, vram_margin_mib=MARGIN_MIB
    )
    AdmissionModel.harness = Harness(client, asyncio.get_running_loop(), path, clock)
    await asyncio.to_thread(
        run_state_machine_as_test,
        AdmissionModel,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            derandomize=True,
        ),
    )
