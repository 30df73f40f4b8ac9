"""`model-registry backup FILE` and `model-registry restore FILE --yes`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from registry.backup.dumps import BackupError, dump, restore
from registry.catalog.cli import CliError


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    backup = commands.add_parser(
        "backup",
        parents=[common],
        help="write the database (catalog, footprints, fleet rows) to a file",
    )
    backup.add_argument("file", type=Path, help="where to write it (pg_dump's custom format)")
    restore = commands.add_parser(
        "restore",
        parents=[common],
        help="replace the database's catalog, footprints and fleet rows with a backup's",
    )
    restore.add_argument("file", type=Path, help="a file written by `model-registry backup`")
    restore.add_argument(
        "--yes", action="store_true", help="replace them (without it, nothing is changed)"
    )


async def run(dsn: str, args: argparse.Namespace) -> int:
    try:
        if args.command == "backup":
            await asyncio.to_thread(dump, dsn, args.file)
            print(f"backed up to {args.file}")
            return 0
        if not args.yes:
            raise CliError(
                f"restoring {args.file} replaces the catalog, the footprints and the fleet rows "
                "of the database with the backup's: add --yes to do it"
            )
        await restore(dsn, args.file)
    except BackupError as exc:
        raise CliError(str(exc)) from None
    print(f"restored from {args.file}; the daemons read it again now")
    return 0
