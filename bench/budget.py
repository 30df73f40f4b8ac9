"""Per-request budgets, each measured against a reference taken in the same run.

Runs the daemon in this process (simulated backend, one 140 GiB device, embedded PostgreSQL)
and, on the same event loop, an aiohttp app that serves the listing's bytes statically; the
clients run in processes of their own (wrk, bench/budget_clients.py). Budgets:

- reads: GET /models (5 models) and GET /models?limit=100 (10,000 models), requests/s as a
  ratio to the static app's, alternating A B A B; higher is better. Above 1: a rendered page is
  answered from the connection (registry.hot_reads), where the static app goes through all of
  aiohttp's request machinery;
- a reserve+release pair: its p99 with 10,000 reservations open as a ratio to its p99 with none
  (an /events stream attached); lower is better;
- catalog writes: sequential writes/s at 10,000 models, three runs, each as a ratio to the
  median of three runs at 10 models (O(changed), not O(catalog)); higher is better; writes/s is
  printed beside it;
- a GPU change reaching 2,000 event streams (10 models): p99 in ms; lower is better.

Each prints the median of its rounds and every round, against its budget (what CI holds the
code to: today's level) and its target (where the product means to be). A median beyond its
budget is "over"; beyond it by more than 25% a "breach", which no noise of this machine
explains: the exit status is 1 only then. `--short` is the form `.ci/run` runs.

    python bench/budget.py [--short] [--loop uvloop|asyncio]

Needs `wrk` (Debian package `wrk`): without it, the read budgets are skipped and say why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import add_models, free_port  # noqa: E402

from registry import keys  # noqa: E402
from registry.config import load_settings  # noqa: E402
from registry.logs import configure_logging  # noqa: E402
from registry.service import Service  # noqa: E402

ADMIN, SCHEDULER = "bench-admin-token", "bench-scheduler-token"
NOISE = 0.25  # how far beyond its budget a median must be to fail the run


@dataclass
class Budget:
    """What CI holds the code to (`limit`: today's level, so that a change that costs more shows
    in its own run), and where the product means to be (`target`)."""

    name: str
    limit: float
    higher_is_better: bool
    target: float | None = None
    unit: str = ""
    rounds: list[float] = field(default_factory=list)
    note: str = ""
    skipped: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def verdict(self) -> str:
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        if not self.rounds:
            return "no rounds"
        median, limit = self.median, self.limit
        if self.higher_is_better:
            if median >= limit:
                return "ok"
            return "BREACH" if median < limit * (1 - NOISE) else "over (within noise)"
        if median <= limit:
            return "ok"
        return "BREACH" if median > limit * (1 + NOISE) else "over (within noise)"

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        if self.skipped is not None or not self.rounds:
            return f"{self.name:<44} {sign} {self.limit:<6g}{self.unit:<4} {self.verdict()}"
        rounds = " ".join(f"{r:.2f}" for r in self.rounds)
        target = ""
        if self.target is not None:
            if self.higher_is_better:
                met = self.median >= self.target
            else:
                met = self.median <= self.target
            target = f"  target {sign} {self.target:g}: {'met' if met else 'not yet'}"
        return (
            f"{self.name:<44} {sign} {self.limit:<6g}{self.unit:<4} median {self.median:7.2f}"
            f"  [{rounds}]  {self.verdict()}{target}{'  ' + self.note if self.note else ''}"
        )


# -- the servers ------------------------------------------------------------------------------


async def start_static(body: bytes, port: int) -> web.AppRunner:
    """The reference: aiohttp serving `body` at /models, on this process's event loop."""
    response_headers = {"Content-Type": "application/json; charset=utf-8"}

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, headers=response_headers)

    app = web.Application()
    app.router.add_get("/models", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def fetch(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as response:
        response.raise_for_status()
        return await response.read()


async def wait_http(http: aiohttp.ClientSession, url: str, serving: asyncio.Task[Any]) -> None:
    for _ in range(600):
        if serving.done():
            raise SystemExit(f"the daemon stopped during start-up: {serving.result()}")
        try:
            await fetch(http, url)
            return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not answer within a minute")


# -- the load ---------------------------------------------------------------------------------


async def wrk(url: str, duration_s: float, connections: int = 64) -> float:
    """Requests/s of `url` under wrk (a process of its own); any error answer ends the run."""
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await process.communicate())[0].decode()
    if process.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk failed against {url}:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert found is not None, out
    return float(found.group(1))


async def client(*args: str) -> dict[str, Any]:
    """bench/budget_clients.py, in a process of its own: its JSON answer."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("budget_clients.py")),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    out = (await process.communicate())[0].decode()
    if process.returncode != 0:
        raise SystemExit(f"budget_clients.py {args[0]} failed ({process.returncode}): {out}")
    answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return answer


async def read_ratio(budget: Budget, daemon: str, static: str, rounds: int, secs: float) -> None:
    await wrk(daemon, 1)  # warm both up
    await wrk(static, 1)
    for _ in range(rounds):
        ours, reference = await wrk(daemon, secs), await wrk(static, secs)
        budget.rounds.append(ours / reference)
        budget.note = f"last: {ours:.0f} vs {reference:.0f} req/s"


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int  # reads: A B pairs
    seconds: float  # each wrk run
    pair_runs: int
    pairs: int
    write_runs: int
    writes: int
    watchers: int
    changes: int


FULL = Plan(
    rounds=5,
    seconds=5,
    pair_runs=3,
    pairs=2000,
    write_runs=3,
    writes=600,
    watchers=2000,
    changes=3,
)
SHORT = Plan(
    rounds=3,
    seconds=2,
    pair_runs=3,
    pairs=500,
    write_runs=3,
    writes=300,
    watchers=1000,
    changes=2,
)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{what}: not within {timeout_s} s")


async def measure(plan: Plan, work: Path) -> list[Budget]:
    port, static_port = free_port(), free_port()
    gpus = work / "gpus.json"
    gpus.write_text(
        json.dumps({"devices": [{"uuid": "GPU-sim-0", "total_mib": 143360, "free_mib": 143000}]})
    )
    limit = str(plan.watchers + 64)
    os.environ.update(
        {
            "MODEL_REGISTRY_STATE_DIR": str(work / "state"),
            "MODEL_REGISTRY_GPU_BACKEND": "simulated",
            "MODEL_REGISTRY_GPU_SIMULATED_FILE": str(gpus),
            "MODEL_REGISTRY_ADMIN_TOKEN": ADMIN,
            "MODEL_REGISTRY_SCHEDULER_TOKEN": SCHEDULER,
            "MODEL_REGISTRY_MAX_RESERVATIONS": "10100",
            "MODEL_REGISTRY_MAX_STREAMS": limit,
            "MODEL_REGISTRY_MAX_STREAMS_PER_CLIENT": limit,
        }
    )
    settings = load_settings(host="127.0.0.1", port=port)
    configure_logging(settings.log_format, "warning", stream=sys.stderr)
    service = Service(settings, None, {})
    serving = asyncio.create_task(service.run())
    base = f"http://127.0.0.1:{port}"
    has_wrk = shutil.which("wrk") is not None
    no_wrk = "wrk is not installed (apt-get install wrk)"
    reads_5 = Budget("reads, 5 models (x static aiohttp)", 1.5, True, target=0.90)
    reads_10k = Budget("reads, 10,000 models, limit=100 (x static)", 1.5, True, target=0.85)
    pair = Budget("reserve+release p99, 10,000 open (x none)", 1.5, False, target=1.5)
    writes = Budget("catalog writes at 10,000 models (x at 10)", 0.7, True, target=0.8)
    watch = Budget(f"GPU change to {plan.watchers:,} streams, p99", 250, False, 250, "ms")
    runners: list[web.AppRunner] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_http(http, f"{base}/readyz", serving)
            if has_wrk:
                runners.append(await start_static(await fetch(http, f"{base}/models"), static_port))
                await read_ratio(
                    reads_5,
                    f"{base}/models",
                    f"http://127.0.0.1:{static_port}/models",
                    plan.rounds,
                    plan.seconds,
                )
                await runners.pop().cleanup()
            else:
                reads_5.skipped = reads_10k.skipped = no_wrk
            for i in range(5):  # ten models
                body = {"name": f"small-{i}", "vram": 100 + i}
                async with http.post(
                    f"{base}/models", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
                ) as answer:
                    assert answer.status == 201, await answer.text()
            few = statistics.median(
                [
                    (await client("writes", base, ADMIN, f"--writes={plan.writes}"))["writes_per_s"]
                    for _ in range(plan.write_runs)
                ]
            )
            for _ in range(plan.pair_runs):
                answer = await client("pairs", base, SCHEDULER, f"--pairs={plan.pairs}")
                pair.rounds.append(answer["full_p99_ms"] / answer["empty_p99_ms"])
                pair.note = (
                    f"last: p99 {answer['full_p99_ms']:.2f} vs "
                    f"{answer['empty_p99_ms']:.2f} ms, p50 {answer['full_p50_ms']:.2f}"
                )
            answer = await client(
                "watch",
                base,
                str(gpus),
                f"--watchers={plan.watchers}",
                f"--changes={plan.changes}",
            )
            watch.rounds.append(answer["p99_ms"])
            watch.note = f"p50 {answer['p50_ms']:.0f} ms"
            await add_models(service.app[keys.DATABASE].dsn, 10_000)
            view = service.app[keys.VIEW]
            await until(lambda: view.model_count >= 10_010, "the 10,000 models")
            for _ in range(plan.write_runs):
                answer = await client("writes", base, ADMIN, f"--writes={plan.writes}")
                many = answer["writes_per_s"]
                writes.rounds.append(many / few)
            writes.note = f"last: {many:.0f} writes/s at 10,000, median {few:.0f} at 10"
            if has_wrk:
                page = f"{base}/models?limit=100"
                runners.append(await start_static(await fetch(http, page), static_port))
                await read_ratio(
                    reads_10k,
                    page,
                    f"http://127.0.0.1:{static_port}/models",
                    plan.rounds,
                    plan.seconds,
                )
                await runners.pop().cleanup()
    finally:
        for runner in runners:
            await runner.cleanup()
        service._stop.set()  # as SIGTERM would
        await serving
    return [reads_5, reads_10k, pair, writes, watch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="fewer, shorter rounds (CI)")
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default=os.environ.get("MODEL_REGISTRY_EVENT_LOOP", "uvloop"),
    )
    args = parser.parse_args()
    plan = SHORT if args.short else FULL
    work = Path(tempfile.mkdtemp(prefix="mr-budget-"))
    work.chmod(0o711)  # run by root, the embedded server's own user must reach its state
    try:
        runner = asyncio.run
        if args.loop == "uvloop":
            import uvloop

            runner = uvloop.run
        budgets = runner(measure(plan, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"per-request budgets ({'short' if args.short else 'full'} form, loop {args.loop}):")
    for budget in budgets:
        print("  " + budget.line())
    breaches = [b.name for b in budgets if b.verdict() == "BREACH"]
    if breaches:
        print(f"breached by more than {NOISE:.0%}: {', '.join(breaches)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
