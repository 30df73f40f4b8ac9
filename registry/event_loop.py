"""Which event loop the daemon runs on: uvloop where it is installed (a faster loop for the same
code: the listing serves more requests a second on it), asyncio's own otherwise or when asked
(MODEL_REGISTRY_EVENT_LOOP=asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from registry.config import EventLoop
from registry.logs import get_logger

log = get_logger("registry.event_loop")
T = TypeVar("T")


def run_on(choice: EventLoop, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on the chosen loop."""
    if choice is EventLoop.UVLOOP:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed here: running on asyncio's own event loop")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """The running loop's kind, for the start-up log."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
