"""`model-registry models ...`: the catalog in the database, read and changed directly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError

from registry.catalog.document import (
    CatalogEntry,
    CatalogInvalid,
    export_json,
    export_toml,
    load_catalog_text,
    parse_catalog,
)
from registry.catalog.schemas import ModelPatch
from registry.catalog.store import CatalogStore
from registry.footprints.store import FootprintStore
from registry.model import CatalogModel
from registry.tables import text_table


class CliError(Exception):
    """A failure to report in one line, with exit status 1."""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
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
    export.add_argument(
        "--observed",
        action="store_true",
        help="write what loads really took (p95) as each model's vram, where learned",
    )
    export.add_argument(
        "--gpu-name", help="with --observed: on this GPU product (default: the largest of all)"
    )


def read_catalog(path: str) -> list[CatalogEntry]:
    """The validated entries of a catalog file, or CatalogInvalid naming every problem."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CatalogInvalid([{"loc": [path], "msg": f"cannot read: {problem}"}]) from None
    return parse_catalog(load_catalog_text(text, path), location=path)


async def _as_observed(
    pool: asyncpg.Pool, models: list[CatalogModel], gpu_name: str | None, min_samples: int
) -> list[CatalogModel]:
    """The catalog with each model's vram replaced by what its loads took, where learned."""
    learned: dict[str, int] = {}
    for summary in await FootprintStore(pool).summaries():
        p95 = summary.p95_mib
        if p95 is None or summary.recent < min_samples or gpu_name not in (None, summary.gpu_name):
            continue
        learned[summary.model] = max(learned.get(summary.model, 0), p95)
    return [replace(m, vram=learned.get(m.name, m.vram)) for m in models]


async def run(
    dsn: str,
    args: argparse.Namespace,
    document: list[CatalogEntry] | None,
    min_samples: int = 3,
) -> int:
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
            if args.observed:
                models = await _as_observed(pool, models, args.gpu_name, min_samples)
            print(export_json(models) if args.format == "json" else export_toml(models), end="")
        return 0
    finally:
        await pool.close()


def _check_model(name: str | None, vram: int | None) -> None:
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
