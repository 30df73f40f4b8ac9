"""Catalog writes over HTTP: auth, validation, conflicts, and answers that never leak or crash."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, AS_ADMIN, AppClient, LogLines
from tests.db import catalog_rows


@pytest.fixture
async def client(start_app: AppClient) -> Any:
    return await start_app(gpu_backend="none", admin_token=f"other-token, {ADMIN_TOKEN}")


async def test_create_returns_201_with_location(client: Any) -> None:
    response = await client.post(
        "/models", json={"name": "whisper-xl", "vram": 12000}, headers=AS_ADMIN
    )
    assert response.status == 201
    body = await response.json()
    assert response.headers["Location"] == f"/models/{body['id']}"
    assert (body["name"], body["vram"], body["enabled"], body["active"]) == (
        "whisper-xl",
        12000,
        True,
        True,
    )
    assert body["updated_at"] is None
    fetched = await (await client.get(response.headers["Location"])).json()
    assert fetched == body
    listing = await (await client.get("/models", params={"name": "whisper-xl"})).json()
    assert listing["data"] == [body]


async def test_duplicate_name_is_409(client: Any) -> None:
    response = await client.post("/models", json={"name": "tiny", "vram": 1}, headers=AS_ADMIN)
    assert response.status == 409
    assert "tiny" in (await response.json())["detail"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"vram": 100}, ["body", "name"]),
        ({"name": "ok"}, ["body", "vram"]),
        ({"name": "", "vram": 1}, ["body", "name"]),
        ({"name": "-starts-with-dash", "vram": 1}, ["body", "name"]),
        ({"name": "has space", "vram": 1}, ["body", "name"]),
        ({"name": "x" * 129, "vram": 1}, ["body", "name"]),
        ({"name": "née", "vram": 1}, ["body", "name"]),
        ({"name": "a'; DROP TABLE models; --", "vram": 1}, ["body", "name"]),
        ({"name": "nul\u0000", "vram": 1}, ["body", "name"]),
        ({"name": "ok", "vram": 0}, ["body", "vram"]),
        ({"name": "ok", "vram": 10_000_001}, ["body", "vram"]),
        ({"name": "ok", "vram": 2**70}, ["body", "vram"]),
        ({"name": "ok", "vram": "lots"}, ["body", "vram"]),
        ({"name": "ok", "vram": 1.5}, ["body", "vram"]),
        ({"name": "ok", "vram": 1, "enabled": "maybe"}, ["body", "enabled"]),
        ({"name": "ok", "vram": 1, "enabled": 0}, ["body", "enabled"]),
        ({"name": "ok", "vram": "5"}, ["body", "vram"]),
        ({"name": 5, "vram": 1}, ["body", "name"]),
        ({"name": "ok", "vram": 1, "colour": "red"}, ["body", "colour"]),
        ([1, 2], ["body"]),
        (None, ["body"]),
    ],
)
async def test_invalid_bodies_are_422_and_change_nothing(
    client: Any, database_url: str, body: Any, loc: list[str]
) -> None:
    before = await catalog_rows(database_url)
    response = await client.post("/models", data=json.dumps(body), headers=AS_ADMIN)
    assert response.status == 422
    issues = (await response.json())["detail"]
    assert loc in [issue["loc"] for issue in issues]
    assert await catalog_rows(database_url) == before


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"name": "x", "vram": 1', b"\xff\xfe"])
async def test_malformed_json_is_a_json_error(client: Any, raw: bytes) -> None:
    response = await client.post("/models", data=raw, headers=AS_ADMIN)
    assert response.status == 422
    assert response.content_type == "application/json"
    [issue] = (await response.json())["detail"]
    assert issue["type"] == "json_invalid" and issue["loc"][0] == "body"


async def test_bodies_over_64_kib_are_refused(client: Any, database_url: str) -> None:
    before = await catalog_rows(database_url)
    huge = json.dumps({"name": "big", "vram": 1, "pad": "x" * 70_000})
    response = await client.post("/models", data=huge, headers=AS_ADMIN)
    assert response.status == 413
    assert response.content_type == "application/json"
    assert await catalog_rows(database_url) == before


async def test_patch_changes_fields_and_sets_updated_at(client: Any) -> None:
    response = await client.patch(
        "/models/2", json={"vram": 2600, "enabled": False}, headers=AS_ADMIN
    )
    assert response.status == 200
    body = await response.json()
    assert (body["name"], body["vram"], body["enabled"], body["active"]) == (
        "medium",
        2600,
        False,
        False,
    )
    assert body["reason"] == "disabled"
    assert body["updated_at"] is not None
    renamed = await client.patch("/models/2", json={"name": "medium-v2"}, headers=AS_ADMIN)
    assert (await renamed.json())["name"] == "medium-v2"
    listing = await (await client.get("/models?active=false")).json()
    assert [m["name"] for m in listing["data"]] == ["medium-v2"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"name": None}, 422),
        ({"vram": -1}, 422),
        ({"name": "tiny"}, 409),
        ({"unknown": 1}, 422),
    ],
)
async def test_bad_patches(client: Any, database_url: str, body: Any, status: int) -> None:
    before = await catalog_rows(database_url)
    response = await client.patch("/models/2", json=body, headers=AS_ADMIN)
    assert response.status == status
    assert response.content_type == "application/json"
    assert await catalog_rows(database_url) == before


async def test_delete_then_404(client: Any) -> None:
    response = await client.delete("/models/3", headers=AS_ADMIN)
    assert response.status == 204
    assert (await client.get("/models/3")).status == 404
    assert (await client.delete("/models/3", headers=AS_ADMIN)).status == 404
    assert (await client.patch("/models/3", json={"vram": 1}, headers=AS_ADMIN)).status == 404
    listing = await (await client.get("/models")).json()
    assert [m["id"] for m in listing["data"]] == [1, 2, 4, 5]


@pytest.mark.parametrize("path", ["/models/0", "/models/99999999999999999999999"])
async def test_writes_to_impossible_ids_are_404(client: Any, path: str) -> None:
    assert (await client.delete(path, headers=AS_ADMIN)).status == 404
    assert (await client.patch(path, json={"vram": 5}, headers=AS_ADMIN)).status == 404


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer wrong"}, "invalid_token"),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "invalid_token"),
        ({"Authorization": "Bearer other-token,"}, "invalid_token"),
    ],
)
async def test_missing_or_wrong_tokens_are_401(
    client: Any, database_url: str, headers: dict[str, str], error: str | None
) -> None:
    before = await catalog_rows(database_url)
    for method, path in (("POST", "/models"), ("PATCH", "/models/1"), ("DELETE", "/models/1")):
        response = await client.request(
            method, path, json={"name": "x", "vram": 1}, headers=headers
        )
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer")
        assert (error in challenge) if error else ("error=" not in challenge)
    assert await catalog_rows(database_url) == before


async def test_every_configured_token_works(client: Any) -> None:
    response = await client.post(
        "/models",
        json={"name": "via-other", "vram": 1},
        headers={"Authorization": "Bearer other-token"},
    )
    assert response.status == 201


async def test_writes_are_refused_without_a_configured_token(start_app: AppClient) -> None:
    client = await start_app(gpu_backend="none")
    response = await client.post("/models", json={"name": "x", "vram": 1}, headers=AS_ADMIN)
    assert response.status == 403
    assert "MODEL_REGISTRY_ADMIN_TOKEN" in (await response.json())["detail"]


async def test_tokens_never_reach_the_log(start_app: AppClient, json_lines: LogLines) -> None:
    client = await start_app(gpu_backend="none", admin_token=ADMIN_TOKEN, access_log="all")
    await client.post("/models", json={"name": "logged", "vram": 1}, headers=AS_ADMIN)
    await client.post(
        "/models",
        json={"name": "x", "vram": 1},
        headers={"Authorization": "Bearer guessed-token"},
    )
    log = json.dumps(json_lines())
    assert '"status": 201' in log and '"status": 401' in log
    assert ADMIN_TOKEN not in log and "guessed-token" not in log


async def test_an_integral_float_is_an_integer_as_json_schema_says(client: Any) -> None:
    response = await client.post("/models", data=b'{"name": "f", "vram": 1234.0}', headers=AS_ADMIN)
    assert response.status == 201
    assert (await response.json())["vram"] == 1234


async def test_an_authorization_header_that_is_not_utf8_is_401_not_500(client: Any) -> None:
    url = client.make_url("/models")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    body = b'{"name": "x", "vram": 1}'
    writer.write(
        b"POST /models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\xc3\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert json.loads(payload)["detail"] == "invalid bearer token"
    assert (await client.get("/models?name=x")).status == 200
    assert (await (await client.get("/models?name=x")).json())["data"] == []
