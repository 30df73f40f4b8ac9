"""Reading a Server-Sent Events stream in tests, as a browser's EventSource would."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Event:
    event: str = "message"
    id: str | None = None
    data_lines: list[str] = field(default_factory=list)

    @property
    def data(self) -> Any:
        return json.loads("\n".join(self.data_lines))


class EventReader:
    """Events (and comments, as events named ":") from an open text/event-stream response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout_s: float = 5.0) -> Event:
        async with asyncio.timeout(timeout_s):
            event = Event()
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if event.data_lines or event.event == ":":
                        return event
                    continue
                if line.startswith(":"):
                    return Event(event=":", data_lines=[line[1:].strip()])
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event.event = value
                elif name == "id":
                    event.id = value
                elif name == "data":
                    event.data_lines.append(value)

    async def next_named(self, name: str, timeout_s: float = 5.0) -> Event:
        """The next event called `name`, skipping others (keep-alive comments, ...)."""
        async with asyncio.timeout(timeout_s):
            while (event := await self.next(timeout_s)).event != name:
                pass
            return event
