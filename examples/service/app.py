"""The service's FastAPI app: CRUD, pages, a cached read and units of work.

Run it with any ASGI server, for example `uvicorn examples.service.app:app`;
`DOTMAC_DB_URL` names the database (a SQLite file by default).
"""

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import StreamingResponse

from dotmac_core import (
    BusinessRuleError,
    CursorPage,
    Database,
    NotFoundError,
    PaginationParams,
    PaginationResult,
    TenantMiddleware,
    TransactionManager,
    cached,
    configure_cache,
    configure_database,
    create_cache_service,
    install_exception_handlers,
)

from .models import (
    Project,
    ProjectCreate,
    ProjectDetail,
    ProjectRead,
    ProjectRepository,
    ProjectUpdate,
    Task,
    TaskCreate,
    TaskRead,
    TaskRepository,
)

router = APIRouter()


def _missing(project_id: uuid.UUID) -> NotFoundError:
    return NotFoundError(f"no project {project_id}", model="Project")


# --- the cached read ----------------------------------------------------------


# --8<-- [start:cached]
@cached(ttl=60, key="project:{project_id}", tenant=True)
async def project_detail(project_id: uuid.UUID) -> ProjectDetail:
    """Read a project and its task counts; cached per tenant for a minute."""
    project = await ProjectRepository().get_by_id(project_id)
    if project is None:
        raise _missing(project_id)  # not cached: the next call looks again
    tasks = TaskRepository()
    return ProjectDetail(
        **ProjectRead.model_validate(project).model_dump(),
        open_tasks=await tasks.count({"project_id": project_id, "done": False}),
        done_tasks=await tasks.count({"project_id": project_id, "done": True}),
    )


@router.get("/projects/{project_id}", response_model=ProjectDetail)
async def get_project(project_id: uuid.UUID) -> ProjectDetail:
    """One project with its task counts, from the tenant's cache."""
    return await project_detail(project_id)


# --8<-- [end:cached]


# --- CRUD -----------------------------------------------------------------------


# --8<-- [start:crud]
@router.post("/projects", status_code=201, response_model=ProjectRead)
async def create_project(data: ProjectCreate) -> Project:
    """Create a project and its first tasks: all of them, or none."""
    async with TransactionManager():
        project = await ProjectRepository().create({"name": data.name})
        await TaskRepository().create_many(
            [{"project_id": project.id, "title": title} for title in data.tasks]
        )
    return project


@router.patch("/projects/{project_id}", response_model=ProjectRead)
async def update_project(project_id: uuid.UUID, data: ProjectUpdate) -> Project:
    """Change a project's fields; its cached read is dropped."""
    changes = data.model_dump(exclude_unset=True)
    project = await ProjectRepository().update(project_id, changes)
    await project_detail.invalidate(project_id)
    return project


@router.delete("/projects/{project_id}", status_code=204)
async def delete_project(project_id: uuid.UUID) -> None:
    """Delete a project and its tasks."""
    if not await ProjectRepository().delete(project_id):
        raise _missing(project_id)
    await project_detail.invalidate(project_id)


# --8<-- [end:crud]


# --- pages ------------------------------------------------------------------------


# --8<-- [start:pages]
@router.get("/projects", response_model=PaginationResult[ProjectRead])
async def list_projects(
    params: Annotated[PaginationParams, Query()],
) -> PaginationResult[Project]:
    """One numbered page of the tenant's projects, by name."""
    return await ProjectRepository().paginate(params, order_by="name")


@router.get("/projects/{project_id}/tasks", response_model=CursorPage[TaskRead])
async def list_tasks(
    project_id: uuid.UUID,
    cursor: str | None = None,
    size: Annotated[int, Query(ge=1, le=100)] = 20,
) -> CursorPage[Task]:
    """The page of a project's tasks after `cursor` (keyset), in creation order."""
    return await TaskRepository().list_after(
        cursor, size, filters={"project_id": project_id}
    )


# --8<-- [end:pages]


# --8<-- [start:export]
@router.get("/export")
async def export_tasks() -> StreamingResponse:
    """Every task of the tenant as NDJSON, read page by page while streaming."""

    async def lines() -> AsyncIterator[str]:
        # Runs after the endpoint returned, still inside the request's tenant.
        cursor = None
        while True:
            page = await TaskRepository().list_after(cursor, size=100)
            for task in page.items:
                yield TaskRead.model_validate(task).model_dump_json() + "\n"
            cursor = page.next_cursor
            if cursor is None:
                return

    return StreamingResponse(lines(), media_type="application/x-ndjson")


# --8<-- [end:export]


# --- units of work ----------------------------------------------------------------


# --8<-- [start:uow]
@router.post("/projects/{project_id}/tasks", status_code=201, response_model=TaskRead)
async def add_task(project_id: uuid.UUID, data: TaskCreate) -> Task:
    """Add a task to an open project of the tenant."""
    async with TransactionManager() as tx:
        project = await ProjectRepository().get_by_id(project_id)
        if project is None:
            # The foreign key alone would accept another tenant's project id.
            raise _missing(project_id)
        if project.closed:
            msg = "the project is closed"
            raise BusinessRuleError(msg, code="project_closed")
        task = await TaskRepository().create(
            {"project_id": project_id, "title": data.title}
        )
        tx.on_commit(lambda: project_detail.invalidate(project_id))
    return task


@router.post("/projects/{project_id}/close", response_model=ProjectDetail)
async def close_project(project_id: uuid.UUID) -> ProjectDetail:
    """Close a project and mark its open tasks done, in one transaction."""
    async with TransactionManager() as tx:
        await ProjectRepository().update(project_id, {"closed": True})
        await TaskRepository().update_many(
            {"project_id": project_id, "done": False}, {"done": True}
        )
        tx.on_commit(lambda: project_detail.invalidate(project_id))
    return await project_detail(project_id)


# --8<-- [end:uow]


# --- the app ------------------------------------------------------------------------


# --8<-- [start:app]
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database (`DOTMAC_DB_*` settings) and the cache for the app's life."""
    async with Database() as db:
        await db.create_all()  # a real service runs its migrations instead
        configure_database(db)
        configure_cache(create_cache_service())
        yield


def create_app(resolver: Callable[..., Any] | None = None) -> FastAPI:
    """Build the app: errors as problem details, one tenant per request.

    Args:
        resolver: Where the tenant comes from; the `X-Tenant-ID` header by default.
    """
    app = FastAPI(title="Projects", lifespan=lifespan)
    install_exception_handlers(app)
    # Every request but /docs, /redoc and /openapi.json runs in its tenant.
    app.add_middleware(TenantMiddleware, resolver=resolver)
    app.include_router(router)
    return app


app = create_app()
# --8<-- [end:app]
