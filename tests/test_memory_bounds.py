"""What a client can make the daemon hold: its caches stay within their byte budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from registry import keys
from registry.page_cache import ENTRY_OVERHEAD_BYTES, CachedBody, PageCache
from tests.conftest import AppClient, SpawnDaemon
from tests.daemon import Daemon

PADDING = 30 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def _get_all(daemon: Daemon, targets: list[str], parallel: int = 8) -> set[int]:
    statuses: set[int] = set()
    queue = list(reversed(targets))

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue:
            async with http.get(daemon.url + queue.pop()) as answer:
                await answer.read()
                statuses.add(answer.status)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(parallel)))
    return statuses


async def test_1500_distinct_30kb_queries_grow_rss_by_less_than_40_mib(
    spawn_daemon: SpawnDaemon,
) -> None:
    daemon = spawn_daemon()
    await daemon.wait_ready()
    warm_up = [f"/models?skip={i}&limit=1" for i in range(20)]
    await _get_all(daemon, warm_up + [f"/fleet/models?skip={i}&limit=1" for i in range(20)])
    before = rss_mib(daemon.process.pid)

    # Distinct request targets, each padded with a parameter the listing ignores.
    flood = [
        f"/{path}?skip={i % 7}&limit=1&padding={i:05d}{'x' * PADDING}"
        for i in range(1500)
        for path in (("models", "fleet/models")[i % 2],)
    ]
    assert await _get_all(daemon, flood) == {200}
    grown = rss_mib(daemon.process.pid) - before
    assert grown < 40, f"RSS grew by {grown:.1f} MiB"


def _page(size: int) -> CachedBody:
    return CachedBody(b"x" * size, '"etag"')


def test_the_page_cache_keeps_within_its_budget_least_recently_used_out_first() -> None:
    cache = PageCache(budget_bytes=10 * (1000 + ENTRY_OVERHEAD_BYTES + 20))
    for number in range(10):
        cache.put(("models", number), _page(1000))
    assert len(cache) == 10
    assert cache.get(("models", 0)) is not None  # now the most recently used
    cache.put(("models", 10), _page(1000))
    assert cache.get(("models", 1)) is None, "the least recently used made room"
    assert cache.get(("models", 0)) is not None
    assert cache.used_bytes <= cache.budget_bytes
    cache.put(("models", "huge"), _page(cache.budget_bytes))  # answered, never kept
    assert cache.get(("models", "huge")) is None and len(cache) == 10
    assert PageCache(budget_bytes=0).put("k", _page(1)) == _page(1)


async def test_parameters_a_listing_ignores_make_no_new_entries(start_app: AppClient) -> None:
    client = await start_app()
    view = client.app[keys.VIEW]
    assert (await client.get("/models?limit=2")).status == 200
    kept = len(view.pages)
    for padding in range(50):
        answer = await client.get(f"/models?limit=2&padding={padding}&limit=2")
        assert answer.status == 200
        answer = await client.get(f"/fleet/models?hosts_limit=3&padding={padding}")
        assert answer.status == 200
    assert len(view.pages) == kept + 1  # the one /fleet/models page
