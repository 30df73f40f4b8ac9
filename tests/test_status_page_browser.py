"""The status page in a real browser: Chromium, driven by Playwright, against the real daemon.

Playwright's own browser download is not used: the test runs the system's Chromium (Debian's
`chromium` package). Without one it skips and says how to get it, unless
MODEL_REGISTRY_TEST_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AS_SCHEDULER, SCHEDULER_TOKEN, SpawnDaemon

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
# Flags for a headless browser in a sandboxed, offline machine: no sandbox as root, no GPU,
# and none of Chromium's own network traffic (updates, sync), which would only be refused.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    found = os.environ.get("MODEL_REGISTRY_TEST_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
    )
    if found:
        return found
    message = (
        "no Chromium found: install it (Debian: apt-get install chromium) or point "
        "MODEL_REGISTRY_TEST_CHROMIUM at one to run the browser test"
    )
    if os.environ.get("MODEL_REGISTRY_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _write(path: Path, free_mib: int) -> None:
    device = {
        "uuid": "GPU-sim-0",
        "name": "Simulated H200",
        "total_mib": 143360,
        "free_mib": free_mib,
        "processes": [{"pid": 4242, "used_mib": 143360 - free_mib, "name": "vllm"}],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"devices": [device]}))
    tmp.replace(path)


async def test_the_page_shows_the_gpu_and_models_and_follows_a_change_live(
    spawn_daemon: SpawnDaemon, gpu_file: Callable[..., Path], tmp_path: Path
) -> None:
    chromium = _chromium()
    from playwright.async_api import async_playwright

    gpus = gpu_file()
    _write(gpus, 100_000)
    daemon = spawn_daemon(
        MODEL_REGISTRY_POLL_INTERVAL="0.2",
        MODEL_REGISTRY_HOST_ID="gpu-host-1",
        MODEL_REGISTRY_VRAM_MARGIN_MIB="2048",
        MODEL_REGISTRY_SCHEDULER_TOKEN=SCHEDULER_TOKEN,
    )
    problems: list[str] = []
    await daemon.wait_ready()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(daemon.url + "/")
            await page.get_by_text("live", exact=True).wait_for(timeout=5000)

            assert await page.locator("section.gpu h3").inner_text() == ("GPU 0 · Simulated H200")
            assert await _text(page, 'dd[data-kind="usable"]') == "97,952 MiB"
            assert await _cell(page, "large-v3", 2) == "yes"
            await page.evaluate("window.stillTheSamePage = true")

            _write(gpus, 8_000)  # another process takes nearly all of it
            await page.wait_for_function(
                """() => document.querySelector('dd[data-kind="usable"]').textContent
                         === "5,952 MiB" """,
                timeout=2000,
            )
            assert await _cell(page, "large-v3", 2) == "no"
            assert await _cell(page, "large-v3", 3) == "insufficient_vram"
            used = await page.locator("rect.seg-used").get_attribute("width")
            assert float(used or 0) > 900, "the bar follows: used is most of it now"
            assert await page.evaluate("window.stillTheSamePage") is True, "no reload"

            # A reservation shows up too, and takes its memory off what is usable.
            async with aiohttp.ClientSession() as http:
                answer = await http.post(
                    daemon.url + "/reservations",
                    json={"model": "medium", "holder": "session-42", "ttl_s": 600},
                    headers=AS_SCHEDULER,
                )
                assert answer.status == 201
            await page.locator("#reservations td", has_text="session-42").wait_for(timeout=2000)
            assert await _text(page, 'dd[data-kind="pending"]') == "2,500 MiB"
            assert await _cell(page, "large_v1", 2) == "no"

            SCREENSHOT.parent.mkdir(exist_ok=True)
            shot = tmp_path / "status-page.png"
            # caret="initial": Playwright would otherwise inject a style, which the page's
            # Content-Security-Policy rightly refuses.
            await page.screenshot(path=str(shot), full_page=True, caret="initial")
            if os.environ.get("MODEL_REGISTRY_TEST_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, SCREENSHOT)
        finally:
            await browser.close()
    assert problems == [], "\n".join(problems)


async def _text(page: Any, selector: str) -> str:
    text: str = await page.locator(selector).first.inner_text()
    return text.strip()


async def _cell(page: Any, model: str, column: int) -> str:
    return await _text(page, f'#models tr[data-model="{model}"] td:nth-child({column + 1})')
