"""AsyncRepository on SQLite and PostgreSQL: CRUD, validation, errors, relationships."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event, func
from sqlmodel import select

from dotmac_core import (
    AlreadyExistsError,
    AsyncRepository,
    Database,
    DotMacError,
    NotFoundError,
    TenantError,
    TransactionManager,
    ValidationError,
    require_current_tenant,
    standard_exception_handler,
    tenant_scope,
)

from ..models import Member, Squad, Tag, User

pytestmark = pytest.mark.usefixtures("repo_db", "executor")


class UserRepository(AsyncRepository[User]):
    """The handbook's repository, unchanged."""

    async def find_by_email(self, email: str) -> User | None:
        """Return the user with this email, if any."""
        return await self.get_by_field("email", email)


class UserService:
    """The handbook's example service, unchanged."""

    def __init__(self, repo: UserRepository):
        self.repo = repo

    @standard_exception_handler
    async def create_user(self, email: str, name: str) -> User:
        """Create a user, refusing a taken email."""
        if await self.repo.find_by_email(email):
            raise ValidationError("Email already exists")

        return await self.repo.create(
            {"email": email, "name": name, "tenant_id": require_current_tenant()}
        )

    async def get_user(self, user_id: str) -> User:
        """Return a user or raise NotFoundError."""
        user = await self.repo.get_by_id(user_id)
        if not user:
            raise NotFoundError(f"User {user_id} not found")
        return user


class MemberRepository(AsyncRepository[Member]):
    """Members of teams (tenant model with soft delete)."""


class TagRepository(AsyncRepository[Tag]):
    """Tags (no tenant, no soft delete)."""


async def test_handbook_user_service() -> None:
    """The handbook's UserService runs unchanged on AsyncRepository[User]."""
    service = UserService(UserRepository())
    with tenant_scope("tenant-123", user_id="user-456"):
        user = await service.create_user("ada@example.com", "Ada")
        assert isinstance(user, User)
        assert user.tenant_id == "tenant-123"
        fetched = await service.get_user(str(user.id))
        assert fetched.email == "ada@example.com"
        with pytest.raises(ValidationError, match="Email already exists"):
            await service.create_user("ada@example.com", "Other")
        with pytest.raises(NotFoundError):
            await service.get_user(str(uuid.uuid4()))


async def test_crud_round_trip() -> None:
    """Create, read, update, count, exists and hard delete a row."""
    repo = TagRepository()
    tag = await repo.create({"label": "red", "weight": 2})
    assert (await repo.get_by_id(tag.id)) == tag
    assert (await repo.get_by_field("label", "red")) is not None
    assert (await repo.get_one(label="red")).id == tag.id
    updated = await repo.update(tag.id, {"weight": 5})
    assert updated.weight == 5
    assert updated.updated_at >= tag.created_at
    assert await repo.count() == 1
    assert await repo.exists({"weight__gte": 5})
    assert not await repo.exists({"weight__gt": 5})
    assert await repo.delete(tag.id)
    assert not await repo.delete(tag.id)
    assert await repo.get_by_id(tag.id) is None
    with pytest.raises(NotFoundError):
        await repo.get_one(label="red")
    with pytest.raises(NotFoundError):
        await repo.update(tag.id, {"weight": 1})


async def test_list_filters_order_limit_offset() -> None:
    """`list` filters, orders (ties broken by key), limits and offsets."""
    repo = TagRepository()
    for label, weight in [("a", 3), ("b", 1), ("c", 2), ("d", 2)]:
        await repo.create({"label": label, "weight": weight})
    ordered = await repo.list(order_by=["-weight", "label"])
    assert [t.label for t in ordered] == ["a", "c", "d", "b"]
    assert [t.label for t in await repo.list({"weight": 2}, order_by="label")] == [
        "c",
        "d",
    ]
    page = await repo.list(order_by="label", limit=2, offset=1)
    assert [t.label for t in page] == ["b", "c"]
    assert await repo.count({"label__in": ["a", "b", "zz"]}) == 2
    with pytest.raises(ValidationError, match="more than one"):
        await repo.get_one(weight=2)
    with pytest.raises(ValidationError):
        await repo.list(limit=-1)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"label": "x" * 31}, "label"),
        ({"label": None}, "label"),
        ({"weight": "heavy", "label": "ok"}, "weight"),
        ({"label": "ok", "colour": "red"}, "colour"),
        ({}, "label"),
    ],
)
async def test_invalid_writes_name_the_field(data: dict[str, Any], field: str) -> None:
    """Writes are validated before any SQL: the error names the field."""
    with pytest.raises(ValidationError) as info:
        await TagRepository().create(data)
    assert info.value.field == field
    assert await TagRepository().count() == 0


async def test_invalid_update_is_refused() -> None:
    """Updates validate values and refuse protected or unknown fields."""
    repo = TagRepository()
    tag = await repo.create({"label": "p"})
    for data in (
        {"label": "y" * 40},
        {"id": uuid.uuid4()},
        {"created_at": None},
        {"nope": 1},
    ):
        with pytest.raises(ValidationError):
            await repo.update(tag.id, data)
    with pytest.raises(ValidationError):
        await repo.get_by_id("not-a-uuid")


async def test_duplicate_then_keeps_working() -> None:
    """A unique violation is AlreadyExistsError; the repository keeps working."""
    repo = TagRepository()
    await repo.create({"label": "dup"})
    with pytest.raises(AlreadyExistsError) as info:
        await repo.create({"label": "dup"})
    assert info.value.__cause__ is not None
    assert isinstance(info.value, DotMacError)
    assert (await repo.create({"label": "next"})).label == "next"
    assert await repo.count() == 2


async def test_create_accepts_a_model_instance() -> None:
    """`create` takes a model object as well as a mapping."""
    tag = Tag(label="obj")
    created = await TagRepository().create(tag)
    assert created is tag
    with pytest.raises(ValidationError):
        await TagRepository().create(Tag(label="z" * 40))


async def test_create_many_is_batched(db: Database) -> None:
    """10,000 rows go in through a few bulk statements, not one per row.

    Observed (a statement listener), the rows go through SQLAlchemy's batched
    bulk INSERT: at most one INSERT per 1,000 rows. Unobserved, PostgreSQL
    takes them in one COPY; either way they are all stored.
    """
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        with tenant_scope("bulk"):
            rows = await MemberRepository().create_many(
                {"email": f"m{i}@x", "name": f"M{i}", "rank": i % 7}
                for i in range(10_000)
            )
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(rows) == 10_000
    assert 1 <= len(inserts) <= 10
    assert len(statements) <= len(inserts) + 2  # BEGIN, COMMIT at most
    with tenant_scope("bulk"):
        unobserved = await MemberRepository().create_many(
            {"email": f"u{i}@x", "name": f"U{i}"} for i in range(10_000)
        )
        assert await MemberRepository().count() == 20_000
        assert await MemberRepository().create_many([]) == []
    assert rows[0].tenant_id == unobserved[0].tenant_id == "bulk"
    assert (rows[-1].email, unobserved[-1].email) == ("m9999@x", "u9999@x")


async def test_soft_delete_and_restore() -> None:
    """Soft-deleted rows vanish from reads unless asked for, and come back."""
    repo = MemberRepository()
    with tenant_scope("acme", user_id="alice"):
        kept = await repo.create({"email": "k@x", "name": "K"})
        gone = await repo.create({"email": "g@x", "name": "G"})
        assert await repo.delete(gone.id)
        assert await repo.get_by_id(gone.id) is None
        assert (await repo.get_by_id(gone.id, include_deleted=True)) is not None
        assert await repo.count() == 1
        assert await repo.count(include_deleted=True) == 2
        assert [m.id for m in await repo.list(only_deleted=True)] == [gone.id]
        assert not await repo.exists({"email": "g@x"})
        assert await repo.exists({"email": "g@x"}, include_deleted=True)
        restored = await repo.restore(gone.id)
        assert restored.deleted_at is None
        with pytest.raises(NotFoundError):
            await repo.restore(kept.id)  # not deleted
        assert await repo.delete(kept.id, hard=True)
        assert await repo.count(include_deleted=True) == 1
        with pytest.raises(ValidationError):
            await TagRepository().list(only_deleted=True)
        with pytest.raises(ValidationError, match="no soft delete"):
            await TagRepository().restore(uuid.uuid4())


async def test_audit_columns_follow_the_user() -> None:
    """created_by / updated_by come from the context; updated_at moves on updates."""
    repo = MemberRepository()
    with tenant_scope("acme", user_id="alice"):
        member = await repo.create({"email": "a@x", "name": "A"})
    with tenant_scope("acme", user_id="bob"):
        changed = await repo.update(member.id, {"name": "B"})
        assert changed.updated_by == "bob"
        assert changed.created_by == "alice"
        assert changed.updated_at > member.updated_at
    with tenant_scope("acme", user_id="carol"):
        assert await repo.update_many({"email": "a@x"}, {"rank": 3}) == 1
        again = await repo.get_by_id(member.id)
        assert again is not None
        assert again.updated_by == "carol"
        assert again.updated_at > changed.updated_at
    with tenant_scope("acme"):  # no user: the last editor is kept
        await repo.update(member.id, {"rank": 4})
        last = await repo.get_by_id(member.id)
        assert last is not None
        assert last.updated_by == "carol"


async def test_upsert_inserts_then_updates() -> None:
    """Upsert inserts, then updates the row with the same key, in one statement."""
    repo = MemberRepository()
    with tenant_scope("acme", user_id="alice"):
        first = await repo.upsert(
            {"email": "u@x", "name": "One"}, conflict_on=["email"]
        )
        second = await repo.upsert(
            {"email": "u@x", "name": "Two", "rank": 9}, conflict_on=["email"]
        )
        assert second.id == first.id
        assert (second.name, second.rank) == ("Two", 9)
        assert second.created_at == first.created_at
        assert await repo.count() == 1
        with pytest.raises(ValidationError, match="no unique constraint"):
            await repo.upsert({"email": "u@x", "name": "x"}, conflict_on=["name"])
        with pytest.raises(ValidationError):
            await repo.upsert({"email": "u@x", "name": "x"}, conflict_on="email")
        # Fields left out keep their stored values on the update path.
        third = await repo.upsert(
            {"email": "u@x", "name": "Three"}, conflict_on=["email"]
        )
        assert (third.name, third.rank) == ("Three", 9)
    tag = await TagRepository().upsert(
        {"label": "t", "weight": 1}, conflict_on=["label"]
    )
    again = await TagRepository().upsert(
        {"label": "t", "weight": 2}, conflict_on=["label"]
    )
    assert (again.id, again.weight) == (tag.id, 2)


async def test_load_relationships_eagerly() -> None:
    """`load=` fetches relationships in the same call; unknown names are refused."""
    with tenant_scope("acme"):
        team = await AsyncRepositoryForTeam().create({"name": "core"})
        await MemberRepository().create(
            {"email": "t@x", "name": "T", "team_id": team.id}
        )
        member = await MemberRepository().get_by_field("email", "t@x", load=["team"])
        assert member is not None
        assert member.team is not None
        assert member.team.name == "core"
        loaded = await AsyncRepositoryForTeam().get_by_id(team.id, load=["members"])
        assert loaded is not None
        assert [m.email for m in loaded.members] == ["t@x"]
        with pytest.raises(ValidationError):
            await MemberRepository().get_by_id(member.id, load=["nope"])


class AsyncRepositoryForTeam(AsyncRepository[Squad]):
    """Teams."""


async def test_explicit_session_is_used_and_not_committed(db: Database) -> None:
    """`Repo(session)` works on that session and leaves the commit to its owner."""
    async with db.session() as session:
        repo = TagRepository(session)
        await repo.create({"label": "mine"})
        assert await repo.count() == 1
        await session.rollback()
    assert await TagRepository().count() == 0


async def test_ambient_transaction_is_joined() -> None:
    """Inside a TransactionManager every call shares one transaction."""
    with pytest.raises(RuntimeError):
        async with TransactionManager():
            await TagRepository().create({"label": "inside"})
            assert await TagRepository().count() == 1
            raise RuntimeError
    assert await TagRepository().count() == 0


async def test_repository_needs_a_table_model() -> None:
    """A repository without a model, or over a schema class, is a TypeError."""
    with pytest.raises(TypeError):
        AsyncRepository()
    from ..models import InvoiceSchema

    with pytest.raises(TypeError, match="not a table model"):

        class Broken(AsyncRepository[InvoiceSchema]):  # type: ignore[type-var]
            """Not a table."""


async def test_reads_outside_a_tenant_fail_closed() -> None:
    """Tenant-scoped repository calls without a tenant raise TenantError."""
    with pytest.raises(TenantError):
        await MemberRepository().count()
    with pytest.raises(TenantError):
        await MemberRepository().create({"email": "n@x", "name": "N"})


async def test_session_sees_raw_orm_counts_scoped(db: Database) -> None:
    """Raw `select(func.count()).select_from(Model)` on a toolkit session is scoped."""
    with tenant_scope("a"):
        await MemberRepository().create({"email": "1@x", "name": "1"})
    with tenant_scope("b"):
        await MemberRepository().create({"email": "2@x", "name": "2"})
        async with db.session() as session:
            total = (await session.exec(select(func.count()).select_from(Member))).one()
    assert total == 1


async def test_create_many_rows_can_be_changed_later(db: Database) -> None:
    """Objects returned by create_many are detached rows: adding them updates."""
    with tenant_scope("acme", user_id="alice"):
        (row,) = await MemberRepository().create_many([{"email": "d@x", "name": "D"}])
        async with db.session() as session:
            session.add(row)
            row.name = "Changed"
            await session.commit()
        stored = await MemberRepository().get_by_id(row.id)
        assert stored is not None
        assert stored.name == "Changed"
        assert await MemberRepository().count() == 1


async def test_create_many_refuses_bad_rows_before_writing() -> None:
    """One invalid or foreign row refuses the whole batch; nothing is written."""
    with tenant_scope("acme"):
        with pytest.raises(ValidationError) as info:
            await MemberRepository().create_many(
                [{"email": "ok@x", "name": "ok"}, {"email": "bad@x", "name": "n" * 60}]
            )
        assert info.value.field == "name"
        with pytest.raises(TenantError):
            await MemberRepository().create_many(
                [{"email": "b@x", "name": "B", "tenant_id": "other"}]
            )
        with pytest.raises(AlreadyExistsError):
            await MemberRepository().create_many(
                [{"email": "same@x", "name": "1"}, {"email": "same@x", "name": "2"}]
            )
        assert await MemberRepository().count() == 0
