"""The status page at GET / and who holds the VRAM in /gpus, without a browser."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from registry import keys
from registry.ops_view.page import memory_segments
from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, AppClient
from tests.db import execute


class _Assets(HTMLParser):
    """Every URL the page would fetch by itself, and the text of its tables."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []
        self.links: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img", "iframe") and values.get("src"):
            self.fetched.append(values["src"] or "")
        if tag == "link" and not (values.get("href") or "data:").startswith("data:"):
            self.fetched.append(values["href"] or "")
        if tag == "a":
            self.links.append(values.get("href") or "")
        if tag == "table":
            self._table = values.get("id") or "?"
            self.rows[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


async def _page(client: Any, query: str = "") -> tuple[str, _Assets]:
    answer = await client.get(f"/{query}")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    html = await answer.text()
    parsed = _Assets()
    parsed.feed(html)
    return html, parsed


@pytest.fixture
def busy_gpu(gpu_file: Callable[..., Path]) -> Callable[..., Path]:
    gpu_file(
        {
            "uuid": "GPU-sim-0",
            "name": "Simulated H200",
            "total_mib": 143360,
            "free_mib": 8000,
            "processes": [
                {"pid": 4242, "used_mib": 130000, "name": "vllm"},
                {"pid": 777, "name": None},
            ],
        }
    )
    return gpu_file


async def test_the_page_shows_gpus_models_and_reservations_with_no_outside_assets(
    start_app: AppClient, busy_gpu: Callable[..., Path]
) -> None:
    client = await start_app(scheduler_token=SCHEDULER_TOKEN, vram_margin_mib=1000)
    created = await client.post(
        "/reservations", json={"vram_mib": 2000, "holder": "<b>job</b>"}, headers=AS_SCHEDULER
    )
    assert created.status == 201
    answer = await client.get("/")
    csp = answer.headers["Content-Security-Policy"]
    html = await answer.text()
    page = _Assets()
    page.feed(html)
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in html
    assert "default-src 'none'" in csp
    assert page.fetched == [], "no external asset: it must work on an air-gapped host"

    assert "GPU-sim-0" in html and "Simulated H200" in html
    # The bar's numbers as text: used, pending, margin, usable add up to the total.
    for kind, mib in (("used", "135,360"), ("pending", "2,000"), ("margin", "1,000")):
        assert f'<dd data-kind="{kind}">{mib} MiB</dd>' in html
    assert '<dd data-kind="usable">5,000 MiB</dd>' in html
    assert ["4242", "vllm", "130,000"] in page.rows["?"]
    assert ["777", "—", "—"] in page.rows["?"]

    models = {row[0]: row for row in page.rows["models"][1:]}
    assert models["tiny"][1:] == ["625", "yes", "—", "GPU 0", "4,375"]
    assert models["large-v3"][2:4] == ["no", "insufficient_vram"]
    [reservation] = page.rows["reservations"][1:]
    assert reservation[:5] == ["<b>job</b>", "—", "2,000", "2,000", "GPU 0"]
    assert "&lt;b&gt;job&lt;/b&gt;" in html  # escaped, never markup


async def test_the_active_filter_works_without_javascript(
    start_app: AppClient, busy_gpu: Callable[..., Path]
) -> None:
    client = await start_app()
    _html, page = await _page(client, "?active=false")
    assert [row[0] for row in page.rows["models"][1:]] == ["large-v3"]
    _html, page = await _page(client, "?active=true")
    names = [row[0] for row in page.rows["models"][1:]]
    assert names == ["tiny", "medium", "large_v1", "large_v2"]
    _html, page = await _page(client, "?active=nonsense")
    assert len(page.rows["models"]) == 6


async def test_the_page_says_why_there_is_no_reading(
    start_app: AppClient, gpu_file: Callable[..., Path]
) -> None:
    gpu_file().write_text("{broken")
    client = await start_app()
    html, _page_rows = await _page(client)
    assert "unavailable" in html and "invalid simulated file" in html
    assert "never yet" in html


async def test_gpus_lists_who_holds_the_memory(
    start_app: AppClient, busy_gpu: Callable[..., Path]
) -> None:
    client = await start_app()
    body = await (await client.get("/gpus")).json()
    assert body["devices"][0]["processes"] == [
        {"pid": 4242, "name": "vllm", "used_mib": 130000},
        {"pid": 777, "name": None, "used_mib": None},
    ]


async def test_the_fleet_shows_when_there_is_one(
    start_app: AppClient, gpu_file: Callable[..., Path], database_url: str
) -> None:
    first = await start_app()
    _html, page = await _page(first)
    assert "fleet" not in page.rows  # a fleet of one is this host
    await start_app()
    first.app[keys.FLEET]._hosts._read_at = float("-inf")  # read again now
    _html, page = await _page(first)
    assert [row[0] for row in page.rows["fleet"][1:]] == ["test-host-0", "test-host-1"]
    # A row that advertises something other than a web address is shown, not linked.
    await execute(
        database_url,
        "UPDATE fleet_hosts SET url = 'javascript:alert(1)' WHERE host = 'test-host-1'",
    )
    first.app[keys.FLEET]._hosts._read_at = float("-inf")
    _html, page = await _page(first)
    assert page.rows["fleet"][2][-1] == "javascript:alert(1)"
    assert not [link for link in page.links if not link.startswith(("http", "/", "#", "?"))]


@pytest.mark.parametrize(
    ("total", "free", "pending", "margin", "expected"),
    [
        (1000, 600, 100, 50, [400, 100, 50, 450]),
        (1000, 100, 300, 50, [900, 100, 0, 0]),  # pending beyond free: still adds up
        (1000, 0, 0, 0, [1000, 0, 0, 0]),
        (0, 0, 0, 0, [0, 0, 0, 0]),
    ],
)
def test_memory_segments_add_up_to_the_total(
    total: int, free: int, pending: int, margin: int, expected: list[int]
) -> None:
    segments = memory_segments(total, free, pending, margin)
    assert [s.mib for s in segments] == expected
    assert sum(s.mib for s in segments) == total
    assert sum(s.width for s in segments) == pytest.approx(1000 if total else 0)
