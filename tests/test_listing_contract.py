"""GET /models against the original system's contract (the seed API page)."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import AppClient
from tests.db import catalog_rows, execute

SEED_PAGE = [
    (1, "tiny", 625),
    (2, "medium", 2500),
    (3, "large_v1", 5000),
    (4, "large_v2", 5000),
    (5, "large-v3", 10000),
]
SEED_FIELDS = {"id", "name", "active", "vram", "created_at", "updated_at"}


async def test_reproduces_the_seed_page_field_by_field(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/models")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["pagination"] == {
        "total_items": 5,
        "total_pages": 1,
        "current_page": 1,
        "per_page": 100,
    }
    assert [(m["id"], m["name"], m["vram"]) for m in body["data"]] == SEED_PAGE
    for model in body["data"]:
        assert model.keys() >= SEED_FIELDS
        assert model["active"] is True
        assert isinstance(model["id"], int) and isinstance(model["vram"], int)
        assert model["updated_at"] is None
        created = datetime.fromisoformat(model["created_at"])
        assert created.utcoffset() is not None
        assert model["created_at"].endswith("+00:00")
    assert body["capacity"]["backend"] == "none"
    assert body["capacity"]["state"] == "disabled"
    assert all(m["fits"] is None and m["reason"] is None for m in body["data"])


async def test_name_filter_is_an_exact_match(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    body = await (await client.get("/models", params={"name": "large-v3"})).json()
    assert [m["id"] for m in body["data"]] == [5]
    assert body["pagination"]["total_items"] == 1
    for near_miss in ("large", "LARGE-V3", "large-v3 ", "large%"):
        body = await (await client.get("/models", params={"name": near_miss})).json()
        assert body["data"] == [], near_miss
        assert body["pagination"]["total_pages"] == 0


@pytest.mark.parametrize(
    ("query", "ids", "pagination"),
    [
        ({"skip": 0, "limit": 1}, [1], (5, 5, 1, 1)),
        ({"skip": 1, "limit": 2}, [2, 3], (5, 3, 1, 2)),
        ({"skip": 2, "limit": 2}, [3, 4], (5, 3, 2, 2)),
        ({"skip": 4, "limit": 2}, [5], (5, 3, 3, 2)),
        ({"skip": 5}, [], (5, 1, 1, 100)),
        ({"skip": 999999}, [], (5, 1, 10000, 100)),
        ({"limit": 1000}, [1, 2, 3, 4, 5], (5, 1, 1, 1000)),
        ({"limit": 3, "skip": 3}, [4, 5], (5, 2, 2, 3)),
    ],
)
async def test_skip_and_limit(
    start_app: AppClient, query: dict[str, int], ids: list[int], pagination: tuple[int, ...]
) -> None:
    client = await start_app(gpu_backend="none")
    body = await (await client.get("/models", params=query)).json()
    assert [m["id"] for m in body["data"]] == ids
    p = body["pagination"]
    assert (p["total_items"], p["total_pages"], p["current_page"], p["per_page"]) == pagination


async def test_empty_catalog(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none", seed_catalog=False)
    body = await (await client.get("/models")).json()
    assert body["data"] == []
    assert body["pagination"] == {
        "total_items": 0,
        "total_pages": 0,
        "current_page": 1,
        "per_page": 100,
    }


@pytest.mark.parametrize(
    ("query", "loc", "error_type"),
    [
        ("skip=-1", "skip", "greater_than_equal"),
        ("skip=abc", "skip", "int_parsing"),
        ("skip=1.5", "skip", "int_parsing"),
        ("skip=", "skip", "int_parsing"),
        ("skip=99999999999999999999999999", "skip", None),
        ("limit=0", "limit", "greater_than_equal"),
        ("limit=1001", "limit", "less_than_equal"),
        ("limit=-5", "limit", "greater_than_equal"),
        ("limit=ten", "limit", "int_parsing"),
        ("limit=%00", "limit", "int_parsing"),
        ("active=maybe", "active", "bool_parsing"),
        ("active=", "active", "bool_parsing"),
        ("active=2", "active", "bool_parsing"),
    ],
)
async def test_bad_parameters_answer_422_in_fastapi_shape(
    start_app: AppClient, query: str, loc: str, error_type: str | None
) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get(f"/models?{query}")
    if error_type is None:  # an enormous skip is a valid integer: no page, but no error either
        assert response.status in (200, 422)
        return
    assert response.status == 422
    assert response.content_type == "application/json"
    body = await response.json()
    [issue] = body["detail"]
    assert issue["loc"] == ["query", loc]
    assert issue["type"] == error_type
    assert isinstance(issue["msg"], str) and issue["msg"]
    assert "input" in issue


async def test_several_bad_parameters_are_all_reported(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/models?skip=-1&limit=0&active=perhaps")
    assert response.status == 422
    locs = [issue["loc"] for issue in (await response.json())["detail"]]
    assert locs == [["query", "skip"], ["query", "limit"], ["query", "active"]]


HOSTILE_NAMES = [
    "tiny' OR '1'='1",
    'tiny"; DROP TABLE models; --',
    "'; DELETE FROM models; --",
    "x" * 20_000,
    "tiny\x00",
    "\x00",
    "🦙-large",
    "../../etc/passwd",
    "%",
    "_",
    "tiny\r\nX-Injected: 1",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n[:20]))
async def test_hostile_names_never_fail_or_change_data(
    start_app: AppClient, database_url: str, name: str
) -> None:
    client = await start_app(gpu_backend="none")
    before = await catalog_rows(database_url)
    response = await client.get("/models", params={"name": name})
    assert response.status == 200
    body = await response.json()
    assert body["data"] == []
    assert await catalog_rows(database_url) == before


async def test_repeated_parameters_take_the_last_value(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    body = await (await client.get("/models?name=tiny&name=medium&limit=1&limit=2")).json()
    assert [m["name"] for m in body["data"]] == ["medium"]
    assert body["pagination"]["per_page"] == 2
    response = await client.get("/models?limit=2&limit=0")
    assert response.status == 422


async def test_unknown_parameters_are_ignored(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    body = await (await client.get("/models?page=3&size=1")).json()
    assert body["pagination"]["total_items"] == 5


async def test_one_model_by_id(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/models/3")
    assert response.status == 200
    model = await response.json()
    assert (model["id"], model["name"], model["vram"], model["active"]) == (
        3,
        "large_v1",
        5000,
        True,
    )


@pytest.mark.parametrize(
    "path", ["/models/999", "/models/0", "/models/-1", "/models/99999999999999999999999"]
)
async def test_unknown_model_is_404_json(start_app: AppClient, path: str) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get(path)
    assert response.status == 404
    assert await response.json() == {"detail": "Not Found"}


async def test_non_integer_model_id_is_422(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/models/tiny")
    assert response.status == 422
    [issue] = (await response.json())["detail"]
    assert issue["loc"] == ["path", "id"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nothing-here", 404),
        ("GET", "/models/1/extra", 404),
        ("PATCH", "/models", 405),
        ("DELETE", "/healthz", 405),
        ("POST", "/gpus", 405),
    ],
)
async def test_errors_are_json_never_html(
    start_app: AppClient, method: str, path: str, status: int
) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.request(method, path, headers={"Accept": "text/html"})
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body["detail"], str)
    assert "<" not in await response.text()


async def test_health_and_readiness(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_readiness_names_a_missing_migration(start_app: AppClient, database_url: str) -> None:
    client = await start_app(gpu_backend="none")
    await execute(database_url, "DELETE FROM schema_migrations WHERE version = 2")
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not ready"
    assert any("[2]" in problem for problem in body["problems"])


async def test_openapi_document_describes_the_listing(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    operation = document["paths"]["/models"]["get"]
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert params["skip"]["minimum"] == 0
    assert params["limit"]["minimum"] == 1 and params["limit"]["maximum"] == 1000
    assert set(params) == {"name", "skip", "limit", "active"}
    schemas = document["components"]["schemas"]
    assert {"id", "name", "active", "vram", "created_at", "updated_at"} <= set(
        schemas["ModelOut"]["properties"]
    )
    assert set(schemas["Pagination"]["required"]) == {
        "total_items",
        "total_pages",
        "current_page",
        "per_page",
    }


async def test_an_unexpected_error_is_a_json_500_without_traceback(
    start_app: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry import keys

    client = await start_app(gpu_backend="none")

    def broken(*_args: object) -> None:
        raise RuntimeError("something deep went wrong")

    monkeypatch.setattr(client.app[keys.VIEW], "page", broken)
    response = await client.get("/models?limit=7")
    assert response.status == 500
    assert await response.json() == {"detail": "Internal Server Error"}
    assert "went wrong" not in await response.text()
    assert (await client.get("/healthz")).status == 200


async def test_requests_are_served_from_the_cached_view(start_app: AppClient) -> None:
    from registry import keys

    client = await start_app()
    view = client.app[keys.VIEW]
    generation = view.generation
    for query in ("", "?limit=2", "?active=true", "?name=tiny", ""):
        assert (await client.get(f"/models{query}")).status == 200
    assert (await client.get("/models/1")).status == 200
    assert view.generation == generation  # capacity was not recomputed per request
