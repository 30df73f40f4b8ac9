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
from registry.backup import cli as backup_cli
from registry.catalog import cli as catalog_cli
from registry.catalog.cli import CliError
from registry.catalog.document import CatalogInvalid, describe_issues
from registry.catalog.store import DuplicateName
from registry.config import ConfigError, Settings, load_settings, settings_problems
from registry.database import DatabaseUnavailable, command_database
from registry.embedded import EmbeddedDatabaseError, MajorVersionMismatch
from registry.fleet.identity import HostIdTaken
from registry.http_client import ClientError
from registry.instances import cli as instances_cli
from registry.logs import configure_logging, get_logger
from registry.migrations import DatabaseTooNew, FleetStillUp
from registry.state_dir import StateDirError

log = get_logger("registry.cli")


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

    migrate = commands.add_parser(
        "migrate", parents=[common], help="apply database migrations and exit"
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="apply a migration that running daemons cannot follow although fleet hosts are up",
    )

    catalog_cli.add_parser(commands, common)
    backup_cli.add_parser(commands, common)
    reservations_cli.add_parser(commands, common)
    instances_cli.add_parser(commands, common)

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
            document = catalog_cli.read_catalog(args.file)
        except CatalogInvalid as exc:
            print(f"model-registry: invalid catalog {args.file}:", file=sys.stderr)
            print(describe_issues(exc.issues), file=sys.stderr)
            return 1
    try:
        overrides: dict[str, Any] = {}
        if args.command == "serve":
            overrides = {"host": args.host, "port": args.port}
        settings = load_settings(args.config, **overrides)
    except ValidationError as exc:
        print(f"model-registry: configuration error: {settings_problems(exc)}", file=sys.stderr)
        return 2
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        print(f"model-registry: configuration error: {exc}", file=sys.stderr)
        return 2
    # The daemon logs to stdout (the journal); the other commands keep stdout for their output.
    log_stream = sys.stdout if args.command == "serve" else sys.stderr
    configure_logging(settings.log_format, settings.log_level, stream=log_stream)
    try:
        if args.command == "serve":
            from registry.event_loop import run_on
            from registry.service import serve

            return run_on(settings.event_loop, serve(settings, args.config, overrides))
        if args.command == "reservations":
            return reservations_cli.run(args, settings)
        if args.command == "instances":
            return instances_cli.run(args, settings)
        if args.command == "status":
            from registry.ops_view import terminal

            return terminal.run(args.url, settings, watch=args.watch)
        if args.command in ("backup", "restore"):
            return asyncio.run(
                _with_dsn(settings, args.command, lambda dsn: backup_cli.run(dsn, args))
            )
        if args.command == "migrate":
            return asyncio.run(_with_dsn(settings, "migrate", _migrate_only, force=args.force))
        return asyncio.run(
            _with_dsn(
                settings,
                f"models {args.action}",
                lambda dsn: catalog_cli.run(dsn, args, document, settings.footprint_min_samples),
            )
        )
    except (DatabaseTooNew, MajorVersionMismatch, FleetStillUp) as exc:
        # Exit 3: an operator must act (the unit does not restart it in a loop).
        log.error("refusing to run on this database", error=str(exc))
        print(f"model-registry: {exc}", file=sys.stderr)
        return 3
    except (LedgerError, HostIdTaken, EmbeddedDatabaseError, StateDirError) as exc:
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


async def _with_dsn(
    settings: Settings,
    command: str,
    action: Callable[[str], Awaitable[int]],
    *,
    force: bool = False,
) -> int:
    """Run `action` against the configured database, or the embedded one, migrated: the
    running daemon's when one serves the state directory, else one started for this run."""
    async with command_database(
        settings.database_dsn(), settings.state_dir, command, force=force
    ) as dsn:
        return await action(dsn)


async def _migrate_only(dsn: str) -> int:
    print("migrations applied; schema is current")
    return 0
