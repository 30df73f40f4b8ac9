"""Waiting on conditions with a bound, instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    accept: Callable[[T], Any] = bool,
    *,
    timeout_s: float = 5.0,
    step_s: float = 0.01,
) -> T:
    """Call `probe` (a plain check or a coroutine function) until `accept` likes its result;
    fail after `timeout_s`. `eventually(lambda: feed.waiting == 1)` waits for a plain check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if accept(value):
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s; last value: {value!r}")
        await asyncio.sleep(step_s)


def until(check: Callable[[], Any], *, timeout_s: float = 5.0, step_s: float = 0.01) -> Any:
    """`eventually` for code that blocks (a thread): call `check` until it is truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s; last value: {value!r}")
        time.sleep(step_s)
    return value
