"""`model-registry reservations ...`: talks to the running daemon over HTTP, as a scheduler does."""

from __future__ import annotations

import argparse
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from registry.config import Settings
from registry.http_client import ClientError, base_url, call
from registry.tables import text_table


def connection_options(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a command that talks to a running daemon over HTTP."""
    connection = argparse.ArgumentParser(add_help=False, parents=[common])
    connection.add_argument(
        "--url", help="the daemon's base URL (default: from the configured host and port)"
    )
    return connection


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    reservations = commands.add_parser(
        "reservations", help="look at, make or release VRAM reservations on a running daemon"
    )
    connection = connection_options(common)
    actions = reservations.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[connection], help="print the open reservations")
    add = actions.add_parser("add", parents=[connection], help="reserve VRAM")
    add.add_argument("model", nargs="?", help="a catalog model (or give --vram instead)")
    add.add_argument("--vram", type=int, metavar="MIB", help="reserve this much instead")
    add.add_argument("--ttl", type=int, metavar="S", help="lease in seconds (default 120)")
    add.add_argument("--holder", help="who holds it, shown to operators")
    add.add_argument("--gpu", metavar="UUID", help="the device to use (default: best fit)")
    add.add_argument("--pid", type=int, help="the process that will load")
    remove = actions.add_parser("remove", parents=[connection], help="release a reservation")
    remove.add_argument("id")


def run(args: argparse.Namespace, settings: Settings) -> int:
    base = base_url(settings, args.url)
    if args.action == "list":
        reservations = call(base, "GET", "/reservations", token=settings.reading_token())
        print(format_reservations(reservations["data"]))
    elif args.action == "add":
        if (args.model is None) == (args.vram is None):
            raise ClientError("give a MODEL or --vram MIB (one of the two)")
        body: dict[str, Any] = {"model": args.model, "vram_mib": args.vram}
        body.update(ttl_s=args.ttl, holder=args.holder, gpu=args.gpu, pid=args.pid)
        body = {key: value for key, value in body.items() if value is not None}
        token = settings.writing_token(admin_first=False)
        print(format_reservations([call(base, "POST", "/reservations", body, token)]))
    elif args.action == "remove":
        token = settings.writing_token(admin_first=True)
        call(base, "DELETE", f"/reservations/{urllib.parse.quote(args.id, safe='')}", None, token)
        print(f"released {args.id}")
    return 0


def format_reservations(reservations: list[dict[str, Any]]) -> str:
    now = datetime.now(UTC)
    headers = ("ID", "MODEL", "VRAM_MIB", "PENDING_MIB", "GPU", "HOLDER", "PID", "EXPIRES_IN")
    rows = [
        (
            r["id"],
            r["model"] or "-",
            str(r["vram_mib"]),
            str(r["pending_mib"]),
            f"{r['gpu']['index']} {r['gpu']['uuid']}",
            r["holder"] or "-",
            "-" if r["pid"] is None else str(r["pid"]),
            f"{max(0, round((datetime.fromisoformat(r['expires_at']) - now).total_seconds()))}s",
        )
        for r in reservations
    ]
    return text_table(headers, rows, "(no open reservations)")
