"""`model-registry instances ...`: look at, adopt or end instances of a running daemon."""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from registry.admission.cli import connection_options
from registry.config import Settings
from registry.http_client import base_url, call, every_page
from registry.ops_view.page import instance_state
from registry.tables import text_table


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    instances = commands.add_parser(
        "instances", help="look at, adopt or end the models loaded on a running daemon's host"
    )
    connection = connection_options(common)
    actions = instances.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[connection], help="print the live instances")
    listing.add_argument("--model", help="only this model's")
    add = actions.add_parser(
        "add", parents=[connection], help="adopt a model already loaded by a process"
    )
    add.add_argument("model")
    add.add_argument("--gpu", metavar="UUID", required=True, help="the device it is loaded on")
    add.add_argument("--pid", type=int, required=True, help="the process (the host's pid)")
    add.add_argument("--holder", help="who holds it, shown to operators")
    change = actions.add_parser(
        "set", parents=[connection], help="pin, unpin, reprioritize or report on an instance"
    )
    change.add_argument("id")
    change.add_argument("--sessions", type=int, help="work in flight on it now")
    pin = change.add_mutually_exclusive_group()
    pin.add_argument("--pin", dest="pinned", action="store_const", const=True, help="never unload")
    pin.add_argument("--unpin", dest="pinned", action="store_const", const=False)
    change.add_argument("--priority", type=int, help="0 to 100 (above 50: admin token)")
    change.add_argument("--ready", action="store_true", help="its load is done")
    remove = actions.add_parser("remove", parents=[connection], help="report an unload")
    remove.add_argument("id")


def run(args: argparse.Namespace, settings: Settings) -> int:
    base = base_url(settings, args.url)
    if args.action == "list":
        params = {} if args.model is None else {"model": args.model}
        print(format_instances(every_page(base, "/instances", params, settings.reading_token())))
    elif args.action == "add":
        body = {"model": args.model, "gpu": args.gpu, "pid": args.pid, "holder": args.holder}
        body = {key: value for key, value in body.items() if value is not None}
        token = settings.writing_token(admin_first=False)
        print(format_instances([call(base, "POST", "/instances", body, token)]))
    elif args.action == "set":
        body = {"sessions": args.sessions, "pinned": args.pinned, "priority": args.priority}
        body = {key: value for key, value in body.items() if value is not None}
        if args.ready:
            body["ready"] = True
        token = settings.writing_token(admin_first=True)
        path = f"/instances/{urllib.parse.quote(args.id, safe='')}"
        print(format_instances([call(base, "PATCH", path, body, token)]))
    elif args.action == "remove":
        token = settings.writing_token(admin_first=True)
        call(base, "DELETE", f"/instances/{urllib.parse.quote(args.id, safe='')}", None, token)
        print(f"ended {args.id}")
    return 0


def format_instances(instances: list[dict[str, Any]]) -> str:
    headers = (
        "ID",
        "MODEL",
        "GPU",
        "PID",
        "USED_MIB",
        "PEAK_MIB",
        "PENDING_MIB",
        "HOLDER",
        "SESSIONS",
        "PRIORITY",
        "IDLE_S",
        "STATE",
    )
    rows = [
        (
            i["id"],
            i["model"] or "-",
            f"{i['gpu']['index']} {i['gpu']['uuid']}",
            str(i["pid"]),
            "-" if i["used_mib"] is None else str(i["used_mib"]),
            str(i["peak_mib"]),
            str(i["pending_mib"]),
            i["holder"] or "-",
            str(i["sessions"]),
            str(i["priority"]),
            f"{i['idle_s']:.0f}",
            instance_state(i),
        )
        for i in instances
    ]
    return text_table(headers, rows, "(no instances)")
