"""`model-registry status [--url U] [--watch]`: the registry in a terminal, as nvidia-smi shows
GPUs. GPUs with bars of used, pending, margin and usable memory; models with fits and
placement; the open reservations. `--watch` redraws on every event of the daemon's /events.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from registry.http_client import ClientError, base_url, call, event_names
from registry.ops_view.page import instance_state, memory_segments

BAR_WIDTH = 40
_COLOURS = {"used": "magenta", "pending": "yellow", "margin": "bright_black", "usable": "green"}
_REDRAW_ON = frozenset({"snapshot", "models", "gpus", "reservations", "instances"})


def _bar(total: int, free: int, pending: int, margin: int) -> Text:
    bar = Text()
    drawn = 0
    segments = memory_segments(total, free, pending, margin)
    for i, segment in enumerate(segments):
        cells = BAR_WIDTH - drawn if i == len(segments) - 1 else round(segment.width / 25)
        cells = max(0, min(cells, BAR_WIDTH - drawn))
        bar.append("█" * cells, style=_COLOURS[segment.kind])
        drawn += cells
    return bar


def _gpus(gpus: dict[str, Any]) -> Table:
    state = gpus["state"]
    title = f"GPUs · backend {gpus['backend']} · {state}"
    if gpus.get("last_error"):
        title += f" ({gpus['last_error']})"
    table = Table(title=Text(title), title_justify="left", expand=False)
    for header in ("GPU", "name", "memory", "used", "pending", "usable", "total"):
        numeric = header in ("used", "pending", "usable", "total")
        table.add_column(header, justify="right" if numeric else "left")
    for device in gpus["devices"]:
        margin = gpus["margin_mib"] + math.ceil(device["total_mib"] * gpus["margin_percent"] / 100)
        total, free = device["total_mib"], device["free_mib"]
        table.add_row(
            str(device["index"]),
            Text(device["name"]),
            _bar(total, free, device["pending_mib"], margin),
            f"{max(0, total - free):,}",
            f"{device['pending_mib']:,}",
            "—" if device["usable_mib"] is None else f"{device['usable_mib']:,}",
            f"{total:,} MiB",
        )
    return table


def _models(models: dict[str, Any], active: int) -> Table:
    total = models["pagination"]["total_items"]
    title = f"Models · {active} of {total} active"
    if total > len(models["data"]):
        title += f" · the first {len(models['data'])} shown"
    table = Table(title=title, title_justify="left")
    for header in ("name", "vram MiB", "active", "reason", "placement", "headroom MiB"):
        table.add_column(header, justify="right" if "MiB" in header else "left")
    for model in models["data"]:
        placement = model["placement"]
        table.add_row(
            Text(model["name"]),
            f"{model['vram']:,}",
            Text("yes", style="green") if model["active"] else Text("no", style="red"),
            model["reason"] or "—",
            "—" if placement is None else f"GPU {placement['index']}",
            "—" if model["headroom_mib"] is None else f"{model['headroom_mib']:,}",
        )
    return table


def _reservations(reservations: dict[str, Any]) -> Table:
    table = Table(title=f"Reservations · {len(reservations['data'])} open", title_justify="left")
    now = datetime.now(UTC)
    for header in ("holder", "model", "vram MiB", "pending MiB", "GPU", "expires in", "room"):
        table.add_column(header, justify="right" if "MiB" in header else "left")
    for r in reservations["data"]:
        awaiting = r.get("awaiting")
        table.add_row(
            Text(r["holder"] or "—"),
            Text(r["model"] or "—"),
            f"{r['vram_mib']:,}",
            f"{r['pending_mib']:,}",
            f"GPU {r['gpu']['index']}",
            f"{(datetime.fromisoformat(r['expires_at']) - now).total_seconds():.0f} s",
            "—" if awaiting is None else f"waits for {len(awaiting['unload'])} to unload",
        )
    return table


def _instances(instances: dict[str, Any]) -> Table:
    total = instances.get("pagination", {}).get("total_items", len(instances["data"]))
    table = Table(title=f"Instances · {total} loaded", title_justify="left")
    for header in ("model", "GPU", "pid", "used MiB", "pending MiB", "holder", "use", "state"):
        numeric = "MiB" in header or header == "pid"
        table.add_column(header, justify="right" if numeric else "left")
    for i in instances["data"]:
        use = f"{i['sessions']} sessions" if i["sessions"] else f"idle {i['idle_s']:.0f} s"
        table.add_row(
            Text(i["model"] or "—"),
            f"GPU {i['gpu']['index']}",
            str(i["pid"]),
            "—" if i["used_mib"] is None else f"{i['used_mib']:,}",
            f"{i['pending_mib']:,}",
            Text(i["holder"] or "—"),
            use,
            instance_state(i),
        )
    return table


def render(base: str, token: str | None = None) -> Group:
    """The whole view, read now from the daemon at `base`."""

    def get(path: str) -> Any:
        return call(base, "GET", path, token=token)

    return Group(
        _gpus(get("/gpus")),
        _models(
            get("/models?limit=1000"),
            get("/models?active=true&limit=1")["pagination"]["total_items"],
        ),
        _reservations(get("/reservations")),
        _instances(get("/instances")),
    )


def run(url: str | None, settings: Any, *, watch: bool, console: Console | None = None) -> int:
    base = base_url(settings, url)
    token = settings.reading_token()
    console = console or Console()
    if not watch:
        console.print(render(base, token))
        return 0
    with Live(render(base, token), console=console, auto_refresh=False) as live:
        for name in event_names(base, token):
            if name in _REDRAW_ON:
                live.update(render(base, token), refresh=True)
    raise ClientError(f"the daemon at {base} closed the event stream (stopping?)")
