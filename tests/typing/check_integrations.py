"""Uses the integration API (ASGI, RLS, tracing, testing...) as users will.

Type-checked by mypy, never run.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, MutableMapping
from datetime import datetime
from typing import Annotated, Any, assert_type

from fastapi import Depends, FastAPI
from sqlalchemy import Column
from sqlmodel import Field

from dotmac_core import (
    DEFAULT_EXEMPT_PATHS,
    NAMING_CONVENTION,
    PROBLEM_JSON,
    AsyncRepository,
    AsyncSession,
    ConcurrentSessionUseError,
    Database,
    FailOpenCounter,
    NotFoundError,
    PlainModel,
    TenantBaseModel,
    TenantContext,
    TenantMiddleware,
    TransactionManager,
    UTCDateTime,
    apply_row_level_security,
    close_rate_limiters,
    current_transaction,
    current_user_id,
    enable_row_level_security,
    install_exception_handlers,
    instrument,
    is_fastapi_available,
    is_instrumented,
    is_scoping_bypassed,
    is_transient,
    problem_details,
    rate_limit_fail_opens,
    require_fastapi,
    row_level_security_ddl,
    snake_case,
    tenant_dependency,
    tenant_from_header,
    tenant_from_subdomain,
    uninstrument,
)
from dotmac_core.migrations import (
    TEMPLATE_DIR,
    context_options,
    target_metadata,
)
from dotmac_core.testing import (
    DEFAULT_TENANT,
    DEFAULT_URL,
    QueryCounter,
    assert_tenant_isolated,
    record_retry_delays,
    reset_rate_limits,
    retries_disabled,
    set_retries_enabled,
)


class Country(PlainModel, table=True):
    """A plain table (no id or timestamps of the toolkit) on its metadata."""

    code: str = Field(primary_key=True, max_length=2)
    seen_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Project(TenantBaseModel, table=True):
    """A tenant table for the repository and the isolation check."""

    name: str = Field(max_length=100)


class Projects(AsyncRepository[Project]):
    """Projects of the current tenant."""


Scope = MutableMapping[str, Any]


def org_from_scope(scope: Scope) -> str | None:
    """A resolver of one's own: a sync function of the ASGI scope."""
    org: str | None = scope.get("org")
    return org


async def context_from_scope(scope: Scope) -> TenantContext | None:
    """An async resolver returning a full context."""
    return TenantContext("acme", user_id=str(scope.get("user")))


def build_app() -> FastAPI:
    """The FastAPI wiring of the FastAPI page."""
    if is_fastapi_available():
        require_fastapi()
    app = FastAPI()
    install_exception_handlers(app)
    app.add_middleware(
        TenantMiddleware,
        resolver=tenant_from_header("X-Org", user_header="X-Who"),
        exempt_paths=[*DEFAULT_EXEMPT_PATHS, "/health"],
    )
    by_host = TenantMiddleware(app, tenant_from_subdomain("example.com"))
    own = TenantMiddleware(app, org_from_scope)
    other = TenantMiddleware(app, context_from_scope)
    print(by_host, own, other)
    current = tenant_dependency()

    @app.get("/projects/{project_id}")
    async def read(
        project_id: uuid.UUID, context: Annotated[TenantContext, Depends(current)]
    ) -> Project:
        found = await Projects().get_by_id(project_id)
        if found is None:
            raise NotFoundError("no such project", model="Project")
        print(context.tenant_id)
        return found

    body: dict[str, Any] = problem_details(NotFoundError("gone"))
    media: str = PROBLEM_JSON
    print(read, body, media)
    return app


async def use_integrations(db: Database) -> None:
    """Row-level security, tracing, counters and context readers."""
    statements: list[str] = row_level_security_ddl(grant_to="app")
    applied: list[str] = await apply_row_level_security(db, grant_to="app")
    enable_row_level_security(db)
    instrument(tenant_attribute=True)
    traced: bool = is_instrumented()
    uninstrument()
    counter: FailOpenCounter = rate_limit_fail_opens()
    opened: int = counter.count
    reason: str | None = counter.last_reason
    counter.reset()
    await close_rate_limiters()
    async with TransactionManager(db) as tx:
        assert_type(current_transaction(), TransactionManager | None)
        session: AsyncSession = tx.session
        print(session)
    user: str | None = current_user_id()
    bypassed: bool = is_scoping_bypassed()
    transient: bool = is_transient(ConcurrentSessionUseError("two tasks"))
    table: str = snake_case("UserProfile")
    naming: Mapping[str, str] = NAMING_CONVENTION
    print(statements, applied, traced, opened, reason, user, bypassed)
    print(transient, table, naming)


def use_migrations() -> None:
    """The Alembic helpers an env.py of one's own uses."""
    options: dict[str, Any] = context_options(compare_type=True)
    print(TEMPLATE_DIR / "env.py", options, target_metadata())


def project_row(i: int) -> Mapping[str, Any]:
    """The rows `assert_tenant_isolated` writes for each tenant."""
    return {"name": f"p{i}"}


async def use_testing(db: Database) -> None:
    """The helpers for users' own tests."""
    with QueryCounter(db) as queries:
        await Projects(db=db).list()
    statements: int = queries.count
    with retries_disabled(), record_retry_delays() as delays:
        waited: list[float] = delays
    set_retries_enabled(True)
    reset_rate_limits()
    await assert_tenant_isolated(Projects, project_row, db=db)
    tenant: str = DEFAULT_TENANT
    url: str = DEFAULT_URL
    print(statements, waited, tenant, url)


async def lifespan_rows(db: Database) -> AsyncIterator[Country]:
    """A plain table's rows through a session."""
    async with db.session() as session:
        country = await session.get(Country, "de")
        if country is not None:
            yield country
