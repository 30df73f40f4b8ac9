"""The `model-registry` command: parse configuration, then run one thing."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError

from registry import __version__
from registry.admission import cli as reservations_cli
from registry.admission.ledger import LedgerError
from registry.catalog import CatalogModel
from registry.catalog_file import (
    CatalogEntry,
    CatalogInvalid,
    describe_issues,
    export_json,
    export_toml,
    load_catalog_text,
    parse_catalog,
)
from registry.config import ConfigError, Settings, load_settings
from registry.database import DatabaseUnavailable, migrated_database
from registry.fleet.identity import HostIdTaken
from registry.http_client import ClientError
from registry.logs import configure_logging, get_logger
from registry.migrations import DatabaseTooNew
from registry.store import CatalogStore, DuplicateName
from registry.tables import text_table

log = get_logger("registry.cli")


class CliError(Exception):
    """A failure to report in one line, with exit status 1."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")

    parser = argparse.ArgumentParser(
        prog="model-registry",
        description="Tell GPU session schedulers which models can be loaded here right now.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8700)")

    commands.add_parser("migrate", parents=[common], help="apply database migrations and exit")

    models = commands.add_parser("models", help="look at or change the catalog")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="print the catalog as a table")
    add = actions.add_parser("add", parents=[common], help="add a model")
    add.add_argument("name")
    add.add_argument("vram", type=int, help="VRAM need in MiB")
    add.add_argument("--disabled", action="store_true", help="add it switched off")
    change = actions.add_parser("set", parents=[common], help="change a model")
    change.add_argument("name_or_id")
    change.add_argument("--name", dest="new_name")
    change.add_argument("--vram", type=int)
    switch = change.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_const", const=True)
    switch.add_argument("--disable", dest="enabled", action="store_const", const=False)
    remove = actions.add_parser("remove", parents=[common], help="remove a model")
    remove.add_argument("name_or_id")
    apply = actions.add_parser(
        "apply", parents=[common], help="make the catalog what a TOML or JSON file says"
    )
    apply.add_argument("file", help="catalog file (.toml or .json; - for standard input)")
    apply.add_argument("--prune", action="store_true", help="also delete models not listed")
    apply.add_argument("--dry-run", action="store_true", help="only print what would change")
    export = actions.add_parser(
        "export", parents=[common], help="print the catalog in a form `apply` takes back"
    )
    export.add_argument("--format", choices=["toml", "json"], default="toml")

    reservations_cli.add_parser(commands, common)

    status = commands.add_parser(
        "status", parents=[common], help="show GPUs, models and reservations of a running daemon"
    )
    status.add_argument("--url", help="the daemon's base URL (default: the configured host/port)")
    status.add_argument("--watch", action="store_true", help="redraw whenever something changes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    document = None
    if args.command == "models" and args.action == "apply":
        try:  # before touching the database: a bad file changes nothing, needs no server
            document = read_catalog(args.file)
        except CatalogInvalid as exc:
            print(f"model-registry: invalid catalog {args.file}:", file=sys.stderr)
            print(describe_issues(exc.issues), file=sys.stderr)
            return 1
    try:
        overrides: dict[str, Any] = {}
        if args.command == "serve":
            overrides = {"host": args.host, "port": args.port}
        settings = load_settings(args.config, **overrides)
    except (ConfigError, ValidationError, tomllib.TOMLDecodeError) as exc:
        print(f"model-registry: configuration error: {exc}", file=sys.stderr)
        return 2
    # The daemon logs to stdout (the journal); the other commands keep stdout for their output.
    log_stream = sys.stdout if args.command == "serve" else sys.stderr
    configure_logging(settings.log_format, settings.log_level, stream=log_stream)
    try:
        if args.command == "serve":
            from registry.service import serve

            return asyncio.run(serve(settings, args.config, overrides))
        if args.command == "reservations":
            return reservations_cli.run(args, settings)
        if args.command == "status":
            from registry.ops_view import terminal

            return terminal.run(args.url, settings, watch=args.watch)
        if args.command == "migrate":
            return asyncio.run(_with_dsn(settings, _migrate_only))
        return asyncio.run(_with_dsn(settings, lambda dsn: _models(dsn, args, document)))
    except DatabaseTooNew as exc:
        log.error("refusing to start: database is newer than this code", error=str(exc))
        print(f"model-registry: {exc}", file=sys.stderr)
        return 3
    except (LedgerError, HostIdTaken) as exc:
        log.error("refusing to start", error=str(exc))
        print(f"model-registry: {exc}", file=sys.stderr)
        return 1
    except (CliError, DuplicateName, ClientError) as exc:
        print(f"model-registry: {exc}", file=sys.stderr)
        return 1
    except DatabaseUnavailable as exc:
        print(f"model-registry: database unavailable: {exc}", file=sys.stderr)
        return 1
    except asyncpg.ClientConfigurationError as exc:
        print(f"model-registry: invalid database URL: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the state directory is not writable, ...
        log.error("model-registry failed", error=str(exc))
        print(f"model-registry: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _with_dsn(settings: Settings, action: Callable[[str], Awaitable[int]]) -> int:
    """Run `action` against the configured database, or the embedded one, migrated."""
    async with migrated_database(settings.database_dsn(), settings.state_dir) as dsn:
        return await action(dsn)


async def _migrate_only(dsn: str) -> int:
    print("migrations applied; schema is current")
    return 0


def read_catalog(path: str) -> list[CatalogEntry]:
    """The validated entries of a catalog file, or CatalogInvalid naming every problem."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CatalogInvalid([{"loc": [path], "msg": f"cannot read: {problem}"}]) from None
    return parse_catalog(load_catalog_text(text, path), location=path)


async def _models(dsn: str, args: argparse.Namespace, document: list[CatalogEntry] | None) -> int:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        store = CatalogStore(pool)
        if args.action == "list":
            print(format_table(await store.list_all()))
        elif args.action == "add":
            _check_model(args.name, args.vram)
            model = await store.create(args.name, args.vram, enabled=not args.disabled)
            print(f"added {model.name} (id {model.id}, {model.vram} MiB)")
        elif args.action == "set":
            target = await _find(store, args.name_or_id)
            if args.new_name is None and args.vram is None and args.enabled is None:
                raise CliError("nothing to change: give --name, --vram, --enable or --disable")
            _check_model(args.new_name, args.vram)
            updated = await store.update(
                target.id, name=args.new_name, vram=args.vram, enabled=args.enabled
            )
            if updated is None:
                raise CliError(f"model {args.name_or_id} was removed meanwhile")
            print(format_table([updated]))
        elif args.action == "remove":
            target = await _find(store, args.name_or_id)
            await store.delete(target.id)
            print(f"removed {target.name} (id {target.id})")
        elif args.action == "apply":
            assert document is not None
            applied = await store.apply(document, prune=args.prune, dry_run=args.dry_run)
            for line in applied.plan.lines():
                print(line)
            print(applied.plan.summary(applied=not args.dry_run))
        elif args.action == "export":
            models = await store.list_all()
            print(export_json(models) if args.format == "json" else export_toml(models), end="")
        return 0
    finally:
        await pool.close()


def _check_model(name: str | None, vram: int | None) -> None:
    from registry.schemas import ModelPatch

    try:
        ModelPatch.model_validate(
            {field: value for field, value in (("name", name), ("vram", vram)) if value is not None}
        )
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise CliError(problems) from None


async def _find(store: CatalogStore, name_or_id: str) -> CatalogModel:
    model = await store.get_by_name(name_or_id)
    if model is None and name_or_id.isdigit() and int(name_or_id) < 2**63:
        model = await store.get(int(name_or_id))
    if model is None:
        raise CliError(f"no model named or numbered {name_or_id!r}")
    return model


def format_table(models: Sequence[CatalogModel]) -> str:
    headers = ("ID", "NAME", "VRAM_MIB", "ENABLED", "CREATED_AT", "UPDATED_AT")
    rows = [
        (
            str(m.id),
            m.name,
            str(m.vram),
            "yes" if m.enabled else "no",
            m.created_at.isoformat(timespec="seconds"),
            m.updated_at.isoformat(timespec="seconds") if m.updated_at else "-",
        )
        for m in models
    ]
    return text_table(headers, rows, "(no models)")
