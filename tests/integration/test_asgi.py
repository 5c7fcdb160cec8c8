"""FastAPI / ASGI integration: tenant per request, problem-details errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import fastapi
import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, Header, Query
from fastapi.responses import StreamingResponse

from dotmac_core import (
    DEFAULT_EXEMPT_PATHS,
    PROBLEM_JSON,
    AuthenticationError,
    BusinessRuleError,
    ConfigurationError,
    DatabaseError,
    DotMacError,
    IntegrityConstraintError,
    MissingDependencyError,
    NotFoundError,
    PaginationParams,
    RateLimitExceededError,
    SecurityConfig,
    TenantContext,
    TenantMiddleware,
    ValidationError,
    get_current_tenant,
    get_tenant_context,
    install_exception_handlers,
    is_fastapi_available,
    problem_details,
    require_fastapi,
    tenant_dependency,
    tenant_from_header,
    tenant_from_subdomain,
    tenant_scope,
)
from dotmac_core import guards as guards_module

Scope = dict[str, Any]
FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])


def _client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **kwargs), base_url="http://test"
    )


def _whoami_app(**middleware: Any) -> FastAPI:
    """An app whose routes report the tenant they run in."""
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(TenantMiddleware, **middleware)

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        context = get_tenant_context()
        assert context is not None
        return {"tenant": context.tenant_id, "user": context.user_id}

    @app.get("/sync-whoami")
    def sync_whoami() -> dict[str, Any]:
        return {"tenant": get_current_tenant()}

    @app.get("/static/logo")
    async def logo() -> dict[str, Any]:
        return {"tenant": get_current_tenant()}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("unhandled")

    return app


# --- middleware: header ---------------------------------------------------------


async def test_header_sets_tenant_and_user_for_the_request() -> None:
    """The tenant and user headers become the request's TenantContext."""
    async with _client(_whoami_app()) as client:
        response = await client.get(
            "/whoami", headers={"X-Tenant-ID": "acme", "X-User-ID": "alice"}
        )
        assert response.json() == {"tenant": "acme", "user": "alice"}
        response = await client.get(
            "/sync-whoami", headers={"X-Tenant-ID": "東京".encode()}
        )
        assert response.json() == {"tenant": "東京"}
    assert get_current_tenant() is None  # reset after the request


async def test_tenant_is_reset_when_the_app_raises() -> None:
    """An exception out of the app still resets the tenant."""
    async with _client(_whoami_app()) as client:
        with pytest.raises(RuntimeError, match="unhandled"):
            await client.get("/boom", headers={"X-Tenant-ID": "acme"})
    assert get_current_tenant() is None


async def test_missing_tenant_is_400_problem_before_the_app_runs() -> None:
    """No tenant header: 400 problem+json, and no route runs."""
    ran = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        ran.append(scope["path"])

    async with _client(TenantMiddleware(app)) as client:
        response = await client.get("/whoami")
    assert ran == []
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json() == {
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": "the request has no X-Tenant-ID header",
        "code": "tenant_required",
        "details": {"field": "tenant_id"},
    }


@pytest.mark.parametrize(
    ("headers", "field", "says"),
    [
        ([("X-Tenant-ID", " acme")], "tenant_id", "whitespace"),
        ([("X-Tenant-ID", "")], "tenant_id", "non-empty"),
        ([("X-Tenant-ID", "a" * 65)], "tenant_id", "longer than 64"),
        ([("X-Tenant-ID", b"ac\x01me")], "tenant_id", "printable"),
        ([("X-Tenant-ID", b"\xff\xfe")], "tenant_id", "not UTF-8"),
        ([("X-Tenant-ID", "a"), ("X-Tenant-ID", "b")], "tenant_id", "2 X-Tenant-ID"),
        ([("X-Tenant-ID", "acme"), ("X-User-ID", " bob")], "user_id", "whitespace"),
    ],
    ids=["padded", "empty", "long", "control", "not-utf8", "twice", "bad-user"],
)
async def test_malformed_tenant_is_400_naming_the_field(
    headers: list[tuple[str, str | bytes]], field: str, says: str
) -> None:
    """The tenancy module's own checks refuse the id; the answer is 400."""
    async with _client(_whoami_app()) as client:
        response = await client.get("/whoami", headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_tenant"
    assert body["details"] == {"field": field}
    assert says in body["detail"]


async def test_header_names_come_from_security_config() -> None:
    """`tenant_from_header` reads the header names of `SecurityConfig`."""
    security = SecurityConfig(tenant_header="X-Org", user_header="X-Who")
    app = _whoami_app(resolver=tenant_from_header(security=security))
    async with _client(app) as client:
        response = await client.get("/whoami", headers={"X-Org": "o1", "X-Who": "u"})
        assert response.json() == {"tenant": "o1", "user": "u"}
        response = await client.get("/whoami", headers={"X-Tenant-ID": "acme"})
        assert response.json()["detail"] == "the request has no X-Org header"
    explicit = _whoami_app(resolver=tenant_from_header("X-A", user_header="X-B"))
    async with _client(explicit) as client:
        response = await client.get("/whoami", headers={"X-A": "a", "X-B": "b"})
        assert response.json() == {"tenant": "a", "user": "b"}


@pytest.mark.parametrize("name", ["", "Tenänt", 5])
def test_bad_header_name_is_a_configuration_error(name: Any) -> None:
    """A header name must be non-empty ASCII."""
    with pytest.raises(ConfigurationError, match="header name"):
        tenant_from_header(name)


# --- middleware: exempt paths -----------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEFAULT_EXEMPT_PATHS))
async def test_docs_and_schema_routes_need_no_tenant(path: str) -> None:
    """FastAPI's docs, redoc, OAuth2 redirect and schema answer without a tenant."""
    async with _client(_whoami_app()) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text


async def test_custom_exempt_paths_replace_the_defaults() -> None:
    """Exact paths and `*` prefixes; a look-alike path is not exempt."""
    app = _whoami_app(exempt_paths=["/static/*", "/health"])
    async with _client(app) as client:
        assert (await client.get("/static/logo")).json() == {"tenant": None}
        assert (await client.get("/openapi.json")).status_code == 400
        assert (await client.get("/whoami")).status_code == 400


def test_exempt_paths_match_without_root_path() -> None:
    """Behind a proxy prefix (`root_path`), `/api/docs` is the docs route."""
    middleware = TenantMiddleware(_whoami_app())
    assert middleware.is_exempt({"path": "/api/docs", "root_path": "/api"})
    assert middleware.is_exempt({"path": "/docs", "root_path": "/api"})
    assert not middleware.is_exempt({"path": "/api/whoami", "root_path": "/api"})
    assert not middleware.is_exempt({"path": "/docsx"})
    assert not middleware.is_exempt({"path": "/docs/../whoami"})


def test_exempt_path_must_start_with_a_slash() -> None:
    """An exempt path without a leading `/` can never match: refused."""
    with pytest.raises(ConfigurationError, match="start with '/'"):
        TenantMiddleware(_whoami_app(), exempt_paths="docs")


# --- middleware: streaming, background tasks, lifespan, websockets ---------------


async def test_streamed_body_and_background_task_run_in_the_tenant() -> None:
    """Body iterators (async and sync) and background tasks see the tenant."""
    app = FastAPI()
    app.add_middleware(TenantMiddleware)
    seen: list[str | None] = []

    @app.get("/async-stream")
    async def async_stream(background: BackgroundTasks) -> StreamingResponse:
        background.add_task(lambda: seen.append(get_current_tenant()))

        async def body() -> AsyncIterator[str]:
            for _ in range(3):
                yield f"{get_current_tenant()}\n"

        return StreamingResponse(body())

    @app.get("/sync-stream")
    async def sync_stream() -> StreamingResponse:
        def body() -> Iterator[str]:
            for _ in range(3):
                yield f"{get_current_tenant()}\n"

        return StreamingResponse(body())

    async with _client(app) as client:
        for path in ("/async-stream", "/sync-stream"):
            async with client.stream(
                "GET", path, headers={"X-Tenant-ID": "acme"}
            ) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert lines == ["acme"] * 3
    assert seen == ["acme"]
    assert get_current_tenant() is None


async def test_lifespan_passes_through_untouched() -> None:
    """Lifespan events reach the app with no tenant and no 400."""
    events: list[tuple[str, str | None]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            events.append((message["type"], get_current_tenant()))
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return

    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await TenantMiddleware(app)({"type": "lifespan"}, receive, send)
    assert events == [("lifespan.startup", None), ("lifespan.shutdown", None)]
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


def _websocket_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> Scope:
    return {"type": "websocket", "path": "/ws", "headers": headers, **extra}


async def _websocket(
    scope: Scope, inbox: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Run one WebSocket connection through the middleware; what was sent."""
    sent: list[dict[str, Any]] = []
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        seen.append(get_current_tenant())
        await send({"type": "websocket.accept"})

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await TenantMiddleware(app)(scope, receive, send)
    return sent, seen


async def test_websocket_runs_in_the_tenant() -> None:
    """A WebSocket connection runs, for its whole life, in its tenant."""
    scope = _websocket_scope([(b"x-tenant-id", b"acme")])
    sent, seen = await _websocket(scope, [{"type": "websocket.connect"}])
    assert seen == ["acme"]
    assert sent == [{"type": "websocket.accept"}]


async def test_websocket_without_tenant_is_refused() -> None:
    """No tenant: close before accept (HTTP 403), or a 400 denial response."""
    connect = {"type": "websocket.connect"}
    sent, seen = await _websocket(_websocket_scope([]), [connect])
    assert seen == []
    assert sent == [
        {"type": "websocket.close", "code": 1008, "reason": "tenant_required"}
    ]

    scope = _websocket_scope([], extensions={"websocket.http.response": {}})
    sent, seen = await _websocket(scope, [connect])
    assert seen == []
    assert sent[0]["type"] == "websocket.http.response.start"
    assert sent[0]["status"] == 400
    assert (b"content-type", PROBLEM_JSON.encode()) in sent[0]["headers"]
    assert b'"tenant_required"' in sent[1]["body"]

    sent, _ = await _websocket(_websocket_scope([]), [{"type": "websocket.disconnect"}])
    assert sent == []


# --- middleware: other resolvers --------------------------------------------------


async def test_async_resolver_from_a_token_claim() -> None:
    """An async resolver can return a full context; its DotMacError is answered."""

    async def from_token(scope: Scope) -> TenantContext | None:
        headers = dict(scope["headers"])
        token = headers.get(b"authorization")
        if token is None:
            return None
        if token != b"Bearer good":
            raise AuthenticationError("invalid token")
        return TenantContext("acme", user_id="alice", roles=["admin"])

    app = _whoami_app(resolver=from_token)
    async with _client(app) as client:
        ok = await client.get("/whoami", headers={"Authorization": "Bearer good"})
        assert ok.json() == {"tenant": "acme", "user": "alice"}
        bad = await client.get("/whoami", headers={"Authorization": "Bearer evil"})
        assert bad.status_code == 401
        assert bad.json()["code"] == "authentication_error"
        none = await client.get("/whoami")
        assert none.status_code == 400
        assert none.json()["detail"] == "the request names no tenant"


async def test_resolver_configuration_error_is_not_the_clients_fault() -> None:
    """A resolver's ConfigurationError is answered 500, detail withheld."""

    def broken(scope: Scope) -> str:
        raise ConfigurationError("no key to verify tokens with")

    async with _client(_whoami_app(resolver=broken)) as client:
        response = await client.get("/whoami")
    assert response.status_code == 500
    assert "key" not in response.text


@pytest.mark.parametrize(
    ("host", "tenant"),
    [
        ("acme.example.com", "acme"),
        ("ACME.Example.COM:8443", "acme"),
        ("example.com", None),
        ("acme.example.org", None),
        ("[::1]:8000", None),
        ("a.b.example.com", None),
    ],
)
async def test_tenant_from_subdomain(host: str, tenant: str | None) -> None:
    """One label under the domain names the tenant; anything else is 400."""
    app = _whoami_app(resolver=tenant_from_subdomain("example.com"))
    async with _client(app) as client:
        response = await client.get("/whoami", headers={"Host": host})
    if tenant is None:
        assert response.status_code == 400
        assert response.json()["details"] == {"field": "tenant_id"}
    else:
        assert response.json()["tenant"] == tenant


@pytest.mark.parametrize("domain", ["", ".", None])
def test_subdomain_needs_a_domain(domain: Any) -> None:
    """`tenant_from_subdomain` refuses an empty domain."""
    with pytest.raises(ConfigurationError, match="host name"):
        tenant_from_subdomain(domain)


# --- the dependency -----------------------------------------------------------


#: At module level: FastAPI resolves string annotations in the module's globals.
CurrentTenant = Annotated[TenantContext, Depends(tenant_dependency())]


def _dependency_app() -> tuple[FastAPI, list[str | None]]:
    app = FastAPI()
    install_exception_handlers(app)
    seen: list[str | None] = []
    tenant = tenant_dependency()

    def sync_tenant(x_tenant_id: Annotated[str, Header()]) -> Iterator[None]:
        """The pitfall: a plain `def` generator dependency."""
        with tenant_scope(x_tenant_id):
            yield

    @app.get("/async")
    async def with_async(context: CurrentTenant) -> dict[str, Any]:
        seen.append(get_current_tenant())
        return {"tenant": context.tenant_id, "roles": list(context.roles)}

    @app.get("/async-sync-endpoint", dependencies=[Depends(tenant)])
    def sync_endpoint() -> dict[str, Any]:
        return {"tenant": get_current_tenant()}

    @app.get("/sync", dependencies=[Depends(sync_tenant)])
    async def with_sync() -> None:
        seen.append(get_current_tenant())

    return app, seen


async def test_async_dependency_sets_the_tenant_for_the_endpoint() -> None:
    """`tenant_dependency()` runs async and sync endpoints in the tenant."""
    app, seen = _dependency_app()
    async with _client(app) as client:
        response = await client.get("/async", headers={"X-Tenant-ID": "acme"})
        assert response.json() == {"tenant": "acme", "roles": []}
        response = await client.get(
            "/async-sync-endpoint", headers={"X-Tenant-ID": "beta"}
        )
        assert response.json() == {"tenant": "beta"}
        missing = await client.get("/async")
    assert seen == ["acme"]
    assert missing.status_code == 400
    assert missing.headers["content-type"] == PROBLEM_JSON
    assert missing.json()["code"] == "tenant_required"
    assert get_current_tenant() is None


async def test_sync_generator_dependency_is_the_documented_pitfall() -> None:
    """A `def` generator dependency sets the tenant in a worker thread's copy.

    The endpoint runs without it, and resetting the token in another thread's
    context fails: `ValueError: <Token ...> was created in a different Context`.
    """
    app, seen = _dependency_app()
    async with _client(app) as client:
        with pytest.raises(ValueError, match="different Context"):
            await client.get("/sync", headers={"X-Tenant-ID": "acme"})
    assert seen == [None]


async def test_per_page_query_parameter() -> None:
    """`?per_page=` fills `size` on FastAPI 0.148 and later; older ones ignore it."""
    app = FastAPI()

    @app.get("/page")
    async def page(params: Annotated[PaginationParams, Query()]) -> dict[str, int]:
        return {"page": params.page, "size": params.size}

    async with _client(app) as client:
        by_alias = (await client.get("/page?page=2&per_page=7")).json()
        by_name = (await client.get("/page?size=9")).json()
        too_big = await client.get("/page?size=500")
    assert by_alias == {"page": 2, "size": 7 if FASTAPI_VERSION >= (0, 148) else 20}
    assert by_name == {"page": 1, "size": 9}
    assert too_big.status_code == 422


# --- exception handlers -----------------------------------------------------------


def _raising_app(error: BaseException) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/fail")
    async def fail() -> None:
        raise error

    @app.get("/items/{number}")
    async def item(number: int) -> dict[str, int]:
        return {"number": number}

    return app


@pytest.mark.parametrize(
    ("error", "status", "code", "details"),
    [
        (
            ValidationError("email is too long", field="email"),
            422,
            "validation_error",
            {"field": "email"},
        ),
        (
            NotFoundError("no such project", model="Project"),
            404,
            "not_found",
            {"model": "Project"},
        ),
        (
            IntegrityConstraintError(
                "the write violates a constraint", constraint="fk_task_project"
            ),
            409,
            "integrity_error",
            {"constraint": "fk_task_project"},
        ),
        (
            BusinessRuleError("project is closed", code="project_closed"),
            422,
            "project_closed",
            {},
        ),
    ],
    ids=["validation", "not-found", "integrity", "business-rule"],
)
async def test_client_errors_become_problem_details(
    error: DotMacError, status: int, code: str, details: dict[str, Any]
) -> None:
    """A 4xx DotMacError answers its status with its message, code and details."""
    async with _client(_raising_app(error)) as client:
        response = await client.get("/fail")
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["detail"] == error.message
    assert body["code"] == code
    assert body["details"] == details


async def test_server_errors_withhold_their_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 5xx error says nothing of the database to the client, and is logged."""
    error = DatabaseError(
        "SELECT secret FROM vault failed", details={"sql": "SELECT secret FROM vault"}
    )
    with caplog.at_level(logging.ERROR, logger="dotmac_core.asgi"):
        async with _client(_raising_app(error)) as client:
            response = await client.get("/fail")
    assert response.status_code == 500
    assert "secret" not in response.text
    assert response.json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "The server could not complete the request.",
        "code": "database_error",
    }
    assert any(record.exc_info for record in caplog.records)


async def test_raw_sqlalchemy_errors_are_translated_first() -> None:
    """A real SQLAlchemy IntegrityError that escaped a route answers 409."""
    engine = sa.create_engine("sqlite://")
    table = sa.Table("t", sa.MetaData(), sa.Column("k", sa.Integer, primary_key=True))
    table.create(engine)
    app = FastAPI()
    install_exception_handlers(app)

    @app.post("/rows")
    async def insert_twice() -> None:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"k": 1}, {"k": 1}])

    async with _client(app) as client:
        response = await client.post("/rows")
    engine.dispose()
    assert response.status_code == 409
    assert response.json()["code"] == "already_exists"
    assert "INSERT" not in response.text


async def test_rate_limit_answers_retry_after() -> None:
    """RateLimitExceededError answers 429 with a whole-second Retry-After."""
    error = RateLimitExceededError("too many calls", retry_after=1.2)
    async with _client(_raising_app(error)) as client:
        response = await client.get("/fail")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"


async def test_request_validation_is_left_to_fastapi() -> None:
    """FastAPI's own 422 for a bad path parameter keeps its body."""
    async with _client(_raising_app(ValidationError())) as client:
        response = await client.get("/items/not-a-number")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()


def test_problem_details_of_odd_statuses() -> None:
    """Statuses outside 4xx/5xx answer 500; unnamed ones get a generic title."""

    class Odd(DotMacError):
        http_status = 299

    class Unnamed(DotMacError):
        http_status = 499

    assert problem_details(Odd("x"))["status"] == 500
    assert problem_details(Unnamed("x"))["title"] == "Client Error"
    assert problem_details(Unnamed(""))["detail"] == "Client Error"


# --- guards and imports ---------------------------------------------------------


def test_importing_dotmac_core_imports_no_web_framework() -> None:
    """`import dotmac_core` stays light: FastAPI and Starlette load on use."""
    code = (
        "import sys, dotmac_core; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'starlette', 'httpx')))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]"


def test_require_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FastAPI, the dependency and handlers say which extra to install."""
    assert is_fastapi_available()
    require_fastapi()
    monkeypatch.setattr(guards_module, "_installed", lambda module: False)
    assert not is_fastapi_available()
    with pytest.raises(MissingDependencyError, match=r"dotmac-core\[asgi\]"):
        tenant_dependency()
    with pytest.raises(MissingDependencyError, match=r"dotmac-core\[asgi\]"):
        install_exception_handlers(FastAPI())
