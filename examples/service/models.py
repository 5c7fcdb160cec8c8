"""The service's tables, schemas and repositories: projects and their tasks."""

import uuid
from datetime import datetime

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, Relationship, SQLModel

from dotmac_core import AsyncRepository, TenantBaseModel


class Project(TenantBaseModel, table=True):
    """A tenant's project; its name is unique within the tenant."""

    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    name: str = Field(max_length=100)
    closed: bool = False
    tasks: list["Task"] = Relationship(back_populates="project", cascade_delete=True)


class Task(TenantBaseModel, table=True):
    """A task of a project, of the same tenant."""

    # Keyset pages of one project's tasks, in creation order, read this index.
    __table_args__ = (
        Index(
            "ix_task_tenant_project_created",
            "tenant_id",
            "project_id",
            "created_at",
            "id",
        ),
    )

    project_id: uuid.UUID = Field(foreign_key="project.id", ondelete="CASCADE")
    title: str = Field(max_length=200)
    done: bool = False
    project: Project | None = Relationship(back_populates="tasks")


class ProjectCreate(SQLModel):
    """A new project, with the titles of its first tasks."""

    name: str = Field(max_length=100)
    tasks: list[str] = []


class ProjectUpdate(SQLModel):
    """The fields of a project a client may change."""

    name: str | None = Field(default=None, max_length=100)


class ProjectRead(SQLModel):
    """A project as clients see it: no tenant column."""

    id: uuid.UUID
    name: str
    closed: bool
    created_at: datetime


class ProjectDetail(ProjectRead):
    """A project with its task counts (the cached read)."""

    open_tasks: int
    done_tasks: int


class TaskCreate(SQLModel):
    """A new task."""

    title: str = Field(max_length=200)


class TaskRead(SQLModel):
    """A task as clients see it."""

    id: uuid.UUID
    project_id: uuid.UUID
    title: str
    done: bool


class ProjectRepository(AsyncRepository[Project]):
    """Projects of the current tenant."""


class TaskRepository(AsyncRepository[Task]):
    """Tasks of the current tenant."""
