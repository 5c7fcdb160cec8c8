"""The example service (examples/service) over HTTP, on SQLite and PostgreSQL.

Requests go through httpx's ASGITransport into the whole app: middleware,
exception handlers, routes, repositories, cache and transactions.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest

from dotmac_core import (
    Database,
    TenantError,
    configure_cache,
    create_cache_service,
    get_database,
)
from examples.service.app import create_app

A = {"X-Tenant-ID": "tenant-a"}
B = {"X-Tenant-ID": "tenant-b"}
FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])


@pytest.fixture
async def client(repo_db: Database) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service, on `repo_db` and a memory cache of its own."""
    configure_cache(create_cache_service("memory"))
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        yield http


async def _project(
    client: httpx.AsyncClient, tenant: dict[str, str], name: str, tasks: int = 0
) -> dict[str, Any]:
    body = {"name": name, "tasks": [f"{name} task {i}" for i in range(tasks)]}
    response = await client.post("/projects", json=body, headers=tenant)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_crud_pages_and_cached_read(client: httpx.AsyncClient) -> None:
    """One tenant's round trip through every route."""
    project = await _project(client, A, "apollo", tasks=3)
    assert set(project) == {"id", "name", "closed", "created_at"}
    pid = project["id"]

    detail = (await client.get(f"/projects/{pid}", headers=A)).json()
    assert (detail["open_tasks"], detail["done_tasks"]) == (3, 0)

    renamed = await client.patch(
        f"/projects/{pid}", json={"name": "artemis"}, headers=A
    )
    assert renamed.json()["name"] == "artemis"
    detail = (await client.get(f"/projects/{pid}", headers=A)).json()
    assert detail["name"] == "artemis"  # the cached read was dropped

    added = await client.post(f"/projects/{pid}/tasks", json={"title": "t"}, headers=A)
    assert added.status_code == 201
    assert (await client.get(f"/projects/{pid}", headers=A)).json()["open_tasks"] == 4

    for name in ("gemini", "mercury"):
        await _project(client, A, name)
    page = (await client.get("/projects?page=1&size=2", headers=A)).json()
    assert [p["name"] for p in page["items"]] == ["artemis", "gemini"]
    assert (page["total"], page["pages"], page["has_next"]) == (3, 2, True)

    titles: list[str] = []
    cursor = None
    while True:
        params = {"size": 3} if cursor is None else {"size": 3, "cursor": cursor}
        keyset = await client.get(f"/projects/{pid}/tasks", params=params, headers=A)
        titles += [task["title"] for task in keyset.json()["items"]]
        cursor = keyset.json()["next_cursor"]
        if cursor is None:
            break
    assert titles == [f"apollo task {i}" for i in range(3)] + ["t"]

    closed = (await client.post(f"/projects/{pid}/close", headers=A)).json()
    assert (closed["closed"], closed["open_tasks"], closed["done_tasks"]) == (
        True,
        0,
        4,
    )
    refused = await client.post(
        f"/projects/{pid}/tasks", json={"title": "x"}, headers=A
    )
    assert refused.status_code == 422
    assert refused.json()["code"] == "project_closed"

    assert (await client.delete(f"/projects/{pid}", headers=A)).status_code == 204
    gone = await client.get(f"/projects/{pid}", headers=A)
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"
    assert (await client.get("/export", headers=A)).text == ""  # tasks went too


async def test_tenant_a_never_sees_tenant_b(client: httpx.AsyncClient) -> None:
    """Every route under tenant B finds none of tenant A's rows, ids or cache."""
    mine = await _project(client, A, "shared-name", tasks=3)
    theirs = await _project(client, B, "shared-name", tasks=1)
    pid = mine["id"]
    assert (await client.get(f"/projects/{pid}", headers=A)).status_code == 200

    # get (a cached read that A has just filled), update, delete, close, add
    assert (await client.get(f"/projects/{pid}", headers=B)).status_code == 404
    patch = await client.patch(f"/projects/{pid}", json={"name": "x"}, headers=B)
    assert patch.status_code == 404
    assert (await client.delete(f"/projects/{pid}", headers=B)).status_code == 404
    assert (await client.post(f"/projects/{pid}/close", headers=B)).status_code == 404
    add = await client.post(f"/projects/{pid}/tasks", json={"title": "x"}, headers=B)
    assert add.status_code == 404

    # offset page and keyset page, with A's own cursor
    listed = (await client.get("/projects", headers=B)).json()
    assert [p["id"] for p in listed["items"]] == [theirs["id"]]
    assert listed["total"] == 1
    assert (await client.get(f"/projects/{pid}/tasks", headers=B)).json()["items"] == []
    first = (await client.get(f"/projects/{pid}/tasks?size=1", headers=A)).json()
    after = await client.get(
        f"/projects/{pid}/tasks", params={"cursor": first["next_cursor"]}, headers=B
    )
    assert after.json()["items"] == []

    # the streamed export runs its queries inside B's tenant
    exported = [
        json.loads(line)
        for line in (await client.get("/export", headers=B)).text.splitlines()
    ]
    assert {task["project_id"] for task in exported} == {theirs["id"]}

    # and A's project is untouched by all of it
    detail = (await client.get(f"/projects/{pid}", headers=A)).json()
    assert (detail["name"], detail["closed"], detail["open_tasks"]) == (
        "shared-name",
        False,
        3,
    )


async def test_unit_of_work_is_all_or_nothing(client: httpx.AsyncClient) -> None:
    """A project whose task is refused is not created; a taken name is 409."""
    too_long = {"name": "apollo", "tasks": ["ok", "x" * 201]}
    refused = await client.post("/projects", json=too_long, headers=A)
    assert refused.status_code == 422
    assert refused.json()["code"] == "validation_error"
    assert (await client.get("/projects", headers=A)).json()["total"] == 0

    await _project(client, A, "apollo")
    taken = await client.post("/projects", json={"name": "apollo"}, headers=A)
    assert taken.status_code == 409
    assert taken.json()["code"] == "already_exists"
    await _project(client, B, "apollo")  # unique per tenant only


async def test_tenant_and_request_errors(client: httpx.AsyncClient) -> None:
    """No tenant: 400 (docs need none); FastAPI still validates the request."""
    assert (await client.get("/projects")).status_code == 400
    assert (await client.get("/openapi.json")).status_code == 200
    bad_id = await client.get("/projects/not-a-uuid", headers=A)
    assert bad_id.status_code == 422
    assert "detail" in bad_id.json()  # FastAPI's own body
    too_big = await client.get("/projects?size=101", headers=A)
    assert too_big.status_code == 422
    missing = await client.get(f"/projects/{uuid.uuid4()}", headers=A)
    assert missing.json()["details"] == {"model": "Project"}


async def test_lifespan_opens_the_configured_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's lifespan, through the middleware, opens `DOTMAC_DB_URL`."""
    monkeypatch.setenv("DOTMAC_DB_URL", f"sqlite+aiosqlite:///{tmp_path}/svc.db")
    app = create_app()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    running = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    assert get_database().dialect == "sqlite"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        await _project(http, A, "apollo", tasks=2)
        assert (await http.get("/projects", headers=A)).json()["total"] == 1
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
    await running


async def test_tenant_from_a_token_claim(repo_db: Database) -> None:
    """The token resolver: the claim's tenant and user; a bad token is 401."""
    from examples.service.auth import app

    configure_cache(create_cache_service("memory"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        await _project(http, {"Authorization": "Bearer token-a"}, "apollo")
        listed = await http.get(
            "/projects", headers={"Authorization": "Bearer token-b"}
        )
        assert listed.json()["total"] == 0
        bad = await http.get("/projects", headers={"Authorization": "Bearer forged"})
        assert bad.status_code == 401
        assert bad.json()["code"] == "authentication_error"
        assert (await http.get("/projects")).status_code == 400
        assert (await http.get("/projects", headers=A)).status_code == 400


async def test_per_route_dependency_app(repo_db: Database) -> None:
    """The dependency variant isolates tenants the same way; /docs needs none."""
    from examples.service.per_route import create_app as create_per_route_app

    configure_cache(create_cache_service("memory"))
    transport = httpx.ASGITransport(app=create_per_route_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        pid = (await _project(http, A, "apollo", tasks=1))["id"]
        assert (await http.get(f"/projects/{pid}", headers=B)).status_code == 404
        assert (await http.get("/projects", headers=B)).json()["total"] == 0
        me = await http.get("/me", headers={**A, "X-User-ID": "alice"})
        assert me.json() == {"tenant": "tenant-a", "user": "alice"}
        missing = await http.get("/projects")
        assert missing.status_code == 400
        assert missing.json()["code"] == "tenant_required"
        assert (await http.get("/openapi.json")).status_code == 200
        if FASTAPI_VERSION >= (0, 118):
            exported = (await http.get("/export", headers=A)).text.splitlines()
            assert len(exported) == 1
        else:
            # Before 0.118 a dependency's scope ends before a streamed body runs;
            # the body's TenantError may come wrapped in an exception group.
            refused = False
            try:
                await http.get("/export", headers=A)
            except* TenantError:
                refused = True
            assert refused
