"""What applying a catalog document would change: a pure diff, by name, of two catalogs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from registry.catalog.document import CatalogEntry
from registry.model import CatalogModel


@dataclass(frozen=True, slots=True)
class Update:
    before: CatalogModel
    vram: int
    enabled: bool
    learn: bool

    def describe(self) -> str:
        changes = []
        if self.vram != self.before.vram:
            changes.append(f"vram {self.before.vram} -> {self.vram}")
        if self.enabled != self.before.enabled:
            changes.append(f"enabled {_yes_no(self.before.enabled)} -> {_yes_no(self.enabled)}")
        if self.learn != self.before.learn:
            changes.append(f"learn {_yes_no(self.before.learn)} -> {_yes_no(self.learn)}")
        return f"~ {self.before.name}: {', '.join(changes)}"


@dataclass
class Plan:
    create: list[CatalogEntry] = field(default_factory=list)  # in the document's order
    update: list[Update] = field(default_factory=list)
    delete: list[CatalogModel] = field(default_factory=list)  # in id order
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)

    def lines(self) -> list[str]:
        return [
            *(f"+ {entry.name}" for entry in self.create),
            *(update.describe() for update in self.update),
            *(f"- {model.name}" for model in self.delete),
        ]

    def summary(self, *, applied: bool) -> str:
        if applied:
            return (
                f"{len(self.create)} created, {len(self.update)} updated, "
                f"{len(self.delete)} deleted, {self.unchanged} unchanged"
            )
        return (
            f"{len(self.create)} to create, {len(self.update)} to update, "
            f"{len(self.delete)} to delete, {self.unchanged} unchanged (dry run: nothing changed)"
        )

    def answer(self) -> dict[str, Any]:
        return {
            "created": [entry.name for entry in self.create],
            "updated": [update.before.name for update in self.update],
            "deleted": [model.name for model in self.delete],
            "unchanged": self.unchanged,
        }


def plan_apply(current: Iterable[CatalogModel], desired: list[CatalogEntry], prune: bool) -> Plan:
    """Upsert `desired` by name; with `prune`, also delete what it does not list.

    An entry without `enabled` (or `learn`) creates an enabled (learning) model and leaves an
    existing one's switch as it is.
    """
    existing = {model.name: model for model in current}
    plan = Plan()
    for entry in desired:
        model = existing.get(entry.name)
        if model is None:
            plan.create.append(entry)
            continue
        enabled = model.enabled if entry.enabled is None else entry.enabled
        learn = model.learn if entry.learn is None else entry.learn
        if (entry.vram, enabled, learn) == (model.vram, model.enabled, model.learn):
            plan.unchanged += 1
        else:
            plan.update.append(Update(model, entry.vram, enabled, learn))
    if prune:
        listed = {entry.name for entry in desired}
        plan.delete = sorted(
            (model for name, model in existing.items() if name not in listed), key=lambda m: m.id
        )
    return plan


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"
