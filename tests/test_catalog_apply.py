"""The catalog as a file: PUT /models, and `models apply` / `models export` on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from registry import keys
from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AS_SCHEDULER, SCHEDULER_TOKEN, AppClient
from tests.db import catalog_rows, execute
from tests.test_cli import run_cli
from tests.waiting import eventually


@pytest.fixture
async def client(start_app: AppClient) -> Any:
    return await start_app(admin_token=ADMIN_TOKEN, scheduler_token=SCHEDULER_TOKEN)


async def _put(client: Any, models: list[dict[str, Any]], query: str = "", **kwargs: Any) -> Any:
    return await client.put(f"/models{query}", json={"models": models}, headers=AS_ADMIN, **kwargs)


async def _catalog(client: Any) -> dict[str, tuple[int, bool]]:
    body = await (await client.get("/models?limit=1000")).json()
    return {m["name"]: (m["vram"], m["enabled"]) for m in body["data"]}


async def test_apply_creates_updates_and_leaves_the_rest(client: Any) -> None:
    answer = await _put(
        client,
        [
            {"name": "tiny", "vram": 625},  # as it is
            {"name": "medium", "vram": 3000},  # bigger now
            {"name": "large_v1", "vram": 5000, "enabled": False},  # switched off
            {"name": "whisper-xl", "vram": 12000},
            {"name": "a-disabled-one", "vram": 1, "enabled": False},
        ],
    )
    assert answer.status == 200
    assert await answer.json() == {
        "created": ["whisper-xl", "a-disabled-one"],
        "updated": ["medium", "large_v1"],
        "deleted": [],
        "unchanged": 1,
        "dry_run": False,
    }
    catalog = await _catalog(client)
    assert catalog["medium"] == (3000, True) and catalog["large_v1"] == (5000, False)
    assert catalog["whisper-xl"] == (12000, True) and catalog["a-disabled-one"] == (1, False)
    assert catalog["large-v3"] == (10000, True)  # not listed, not pruned
    # New models get ids in the document's order.
    ids = {m["name"]: m["id"] for m in (await (await client.get("/models")).json())["data"]}
    assert ids["whisper-xl"] < ids["a-disabled-one"]


async def test_an_entry_without_enabled_keeps_the_operators_switch(client: Any) -> None:
    await client.patch("/models/1", json={"enabled": False}, headers=AS_ADMIN)
    answer = await _put(client, [{"name": "tiny", "vram": 700}])
    assert (await answer.json())["updated"] == ["tiny"]
    assert (await _catalog(client))["tiny"] == (700, False)


async def test_prune_deletes_what_is_not_listed(client: Any) -> None:
    answer = await _put(client, [{"name": "tiny", "vram": 625}], "?prune=true")
    body = await answer.json()
    assert body["deleted"] == ["medium", "large_v1", "large_v2", "large-v3"]
    assert body["unchanged"] == 1
    assert list(await _catalog(client)) == ["tiny"]


async def test_dry_run_changes_nothing(client: Any, database_url: str) -> None:
    before = await catalog_rows(database_url)
    answer = await _put(
        client, [{"name": "tiny", "vram": 1}, {"name": "new", "vram": 1}], "?prune=true&dry_run=1"
    )
    assert await answer.json() == {
        "created": ["new"],
        "updated": ["tiny"],
        "deleted": ["medium", "large_v1", "large_v2", "large-v3"],
        "unchanged": 0,
        "dry_run": True,
    }
    assert await catalog_rows(database_url) == before
    assert len(await _catalog(client)) == 5


async def test_every_invalid_entry_is_named_and_nothing_changes(
    client: Any, database_url: str
) -> None:
    before = await catalog_rows(database_url)
    answer = await _put(
        client,
        [
            {"name": "fine", "vram": 10},
            {"name": "bad name", "vram": 10},
            {"name": "fine2", "vram": 0},
            {"name": "fine", "vram": 20},
            {"name": "extra", "vram": 1, "colour": "red"},
            {"vram": 5},
            "not-an-object",
            {"name": "tiny", "vram": "625"},
        ],
    )
    assert answer.status == 422
    issues = {(tuple(i["loc"]), i["type"]) for i in (await answer.json())["detail"]}
    assert issues == {
        (("body", "models", 1, "name"), "string_pattern_mismatch"),
        (("body", "models", 2, "vram"), "greater_than_equal"),
        (("body", "models", 3, "name"), "duplicate_name"),
        (("body", "models", 4, "colour"), "extra_forbidden"),
        (("body", "models", 5, "name"), "missing"),
        (("body", "models", 6), "model_type"),
        (("body", "models", 7, "vram"), "int_type"),
    }
    assert await catalog_rows(database_url) == before


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"", 422),
        (b"{", 422),
        (b"[" * 100_000, 422),
        (b'{"models": {}}', 422),
        (b'{"models": [], "more": 1}', 422),
        (b"null", 422),
        (b'{"models": [{"name": "a", "vram": NaN}]}', 422),
    ],
)
async def test_malformed_documents_are_json_errors(
    client: Any, database_url: str, raw: bytes, status: int
) -> None:
    before = await catalog_rows(database_url)
    answer = await client.put("/models", data=raw, headers=AS_ADMIN)
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("application/json")
    assert await catalog_rows(database_url) == before


async def test_bad_query_flags_are_422(client: Any) -> None:
    answer = await client.put("/models?prune=maybe", json={"models": []}, headers=AS_ADMIN)
    assert answer.status == 422
    assert (await answer.json())["detail"][0]["loc"] == ["query", "prune"]


async def test_only_this_endpoint_takes_bodies_over_64_kib(client: Any) -> None:
    big = [{"name": f"model-{i:06d}", "vram": 1 + i % 50_000} for i in range(20_000)]
    assert len(json.dumps({"models": big})) > 64 * 1024
    answer = await _put(client, big)
    assert answer.status == 200 and len((await answer.json())["created"]) == 20_000
    padded = {"name": "x", "vram": 1, "pad": "x" * 70_000}
    assert (await client.post("/models", json=padded, headers=AS_ADMIN)).status == 413
    huge = b'{"models": [' + b" " * (16 * 1024 * 1024) + b"]}"
    refused = await client.put("/models", data=huge, headers=AS_ADMIN)
    assert refused.status == 413
    assert "16 MiB" in (await refused.json())["detail"]


async def test_apply_needs_an_admin_token(client: Any) -> None:
    models = [{"name": "x", "vram": 1}]
    assert (await client.put("/models", json={"models": models})).status == 401
    sched = AS_SCHEDULER
    assert (await client.put("/models", json={"models": models}, headers=sched)).status == 403


async def test_one_notification_and_every_daemon_follows_within_a_second(
    start_app: AppClient, database_url: str
) -> None:
    writer = await start_app(admin_token=ADMIN_TOKEN)
    reader = await start_app()
    await eventually(lambda: reader.app[keys.CATALOG_SYNC].listening.is_set(), bool)
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("model_registry_catalog", lambda *args: heard.append(args[-1]))
    try:
        models = [{"name": f"bulk-{i}", "vram": 100 + i} for i in range(300)]
        answer = await _put(writer, models, "?prune=true")
        assert answer.status == 200
        # Within a second, with room for a loaded two-core machine.
        await eventually(lambda: _listing_total(reader), lambda total: total == 300, timeout_s=2.0)
        await eventually(lambda: heard, bool)
        assert len(heard) == 1, "one notification for the whole apply"
        # A handful of changes travels as ids; a row edited by hand still announces itself.
        await _put(writer, [{"name": "bulk-1", "vram": 7}])
        await execute(database_url, "UPDATE models SET vram = 8 WHERE name = 'bulk-2'")
        await eventually(lambda: heard, lambda h: len(h) == 3)
        assert heard[1].isdigit() and heard[2].isdigit()
    finally:
        await listener.close()


async def _listing_total(client: Any) -> int:
    body = await (await client.get("/models?limit=1")).json()
    total: int = body["pagination"]["total_items"]
    return total


# -- the command line ---------------------------------------------------------------------


def test_cli_apply_prints_the_plan_and_export_round_trips(
    database_url: str, tmp_path: Path
) -> None:
    env = {"MODEL_REGISTRY_DATABASE_URL": database_url}
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[[models]]\nname = "tiny"\nvram = 625\n\n'
        '[[models]]\nname = "medium"\nvram = 5000\n\n'
        '[[models]]\nname = "large-v3"\nvram = 10000\nenabled = false\n'
    )
    assert run_cli("models", "add", "medium", "2500", env=env).returncode == 0
    assert run_cli("models", "add", "old", "1", env=env).returncode == 0

    dry = run_cli("models", "apply", str(catalog), "--prune", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "+ tiny",
        "+ large-v3",
        "~ medium: vram 2500 -> 5000",
        "- old",
        "2 to create, 1 to update, 1 to delete, 0 unchanged (dry run: nothing changed)",
    ]
    assert "old" in run_cli("models", "list", env=env).stdout

    applied = run_cli("models", "apply", str(catalog), "--prune", env=env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == "2 created, 1 updated, 1 deleted, 0 unchanged"
    flipped = catalog.read_text().replace("enabled = false", "enabled = true")
    catalog.write_text(flipped)
    again = run_cli("models", "apply", str(catalog), env=env)
    assert again.stdout.splitlines() == [
        "~ large-v3: enabled no -> yes",
        "0 created, 1 updated, 0 deleted, 2 unchanged",
    ]

    for fmt in ("toml", "json"):
        exported = run_cli("models", "export", "--format", fmt, env=env)
        assert exported.returncode == 0, exported.stderr
        path = tmp_path / f"export.{fmt}"
        path.write_text(exported.stdout)
        back = run_cli("models", "apply", str(path), "--prune", env=env)
        assert back.stdout.splitlines() == ["0 created, 0 updated, 0 deleted, 3 unchanged"]
    exported_json = json.loads((tmp_path / "export.json").read_text())
    assert exported_json["models"][0] == {
        "name": "medium",
        "vram": 5000,
        "enabled": True,
        "learn": True,
    }


def test_cli_apply_names_every_problem_and_changes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    env = {"MODEL_REGISTRY_DATABASE_URL": database_url}
    assert run_cli("models", "add", "keep", "1", env=env).returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "ok", "vram": 1},
                    {"name": "ok", "vram": 2},
                    {"name": "-x", "vram": 1},
                    {"name": "y", "vram": 10_000_001, "enabled": "yes"},
                ]
            }
        )
    )
    result = run_cli("models", "apply", str(bad), "--prune", env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"model-registry: invalid catalog {bad}:",
        "models[2].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'",
        "models[3].vram: Input should be less than or equal to 10000000",
        "models[3].enabled: Input should be a valid boolean",
        "models[1].name: name listed twice (first at position 0)",
    ]
    broken = tmp_path / "broken.toml"
    broken.write_text("[[models]\nname = ")
    result = run_cli("models", "apply", str(broken), env=env)
    assert result.returncode == 1 and "not valid TOML" in result.stderr
    missing = run_cli("models", "apply", str(tmp_path / "nope.toml"), env=env)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    for failed in (result, missing):
        assert "Traceback" not in failed.stderr
    assert [
        line.split()[1] for line in run_cli("models", "list", env=env).stdout.splitlines()[1:]
    ] == ["keep"]
