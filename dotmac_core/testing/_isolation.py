"""`assert_tenant_isolated`: every public repository method, across two tenants."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ..db.pagination import PaginationParams
from ..db.repository import AsyncRepository
from ..db.transaction import TransactionManager
from ..exceptions import AlreadyExistsError, NotFoundError, TenantError, ValidationError
from ..tenancy import tenant_scope

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from ..db.database import Database

__all__ = ["assert_tenant_isolated"]

#: Columns a probe never copies from `make_row`: they are the tenant's or the key.
_MANAGED = frozenset({"id", "tenant_id", "created_at", "updated_at", "deleted_at"})


class _Probe:
    """The rows of tenants A and B, and the checks each method is held to."""

    def __init__(
        self,
        repository_class: type[AsyncRepository[Any]],
        make_row: Callable[[int], Mapping[str, Any]],
        tenants: tuple[str, str],
        db: Database | None,
    ) -> None:
        self.cls = repository_class
        self.make_row = make_row
        self.a, self.b = tenants
        self.db = db
        self.soft = "deleted_at" in repository_class.model.model_fields
        self.serial = 100
        self.mine: Any = None
        self.theirs: Any = None
        self.theirs_deleted: Any = None
        self.problems: list[str] = []

    def repo(self) -> AsyncRepository[Any]:
        return self.cls(db=self.db)

    def row(self) -> dict[str, Any]:
        self.serial += 1
        data = dict(self.make_row(self.serial))
        data.pop("tenant_id", None)
        data.pop("id", None)
        return data

    def fail(self, method: str, what: str) -> None:
        self.problems.append(f"{method}: {what}")

    async def seed(self) -> None:
        with tenant_scope(self.a):
            self.mine = await self.repo().create(self.row())
        with tenant_scope(self.b):
            self.theirs = await self.repo().create(self.row())
            if self.soft:
                self.theirs_deleted = await self.repo().create(self.row())
                await self.repo().delete(self.theirs_deleted.id)

    async def snapshot(self) -> list[dict[str, Any]]:
        """Tenant B's rows as stored, deleted ones included."""
        with tenant_scope(None, bypass=True, reason="assert_tenant_isolated"):
            rows = await self.repo().list(
                {"tenant_id": self.b}, order_by="id", include_deleted=self.soft
            )
        return [row.model_dump() for row in rows]

    def b_ids(self) -> set[Any]:
        ids = {self.theirs.id}
        if self.theirs_deleted is not None:
            ids.add(self.theirs_deleted.id)
        return ids

    async def raises(
        self, method: str, errors: tuple[type[Exception], ...], call: Awaitable[Any]
    ) -> None:
        try:
            result = await call
        except errors:
            return
        self.fail(
            method, f"returned {result!r} instead of raising {errors[0].__name__}"
        )

    def check_rows(self, method: str, rows: Any) -> None:
        seen = {row.id for row in rows}
        if seen & self.b_ids():
            self.fail(method, f"returned tenant {self.b!r}'s rows")
        wrong = {row.tenant_id for row in rows} - {self.a}
        if wrong:
            self.fail(method, f"returned rows of tenants {sorted(wrong)}")

    # --- one probe per public method ---------------------------------------------

    async def get_by_id(self) -> None:
        if await self.repo().get_by_id(self.theirs.id) is not None:
            self.fail("get_by_id", "found the other tenant's row")
        if self.theirs_deleted is not None:
            found = await self.repo().get_by_id(
                self.theirs_deleted.id, include_deleted=True
            )
            if found is not None:
                self.fail("get_by_id", "found the other tenant's deleted row")
        if await self.repo().get_by_id(self.mine.id) is None:
            self.fail("get_by_id", "did not find the tenant's own row")

    async def get_by_field(self) -> None:
        if await self.repo().get_by_field("id", self.theirs.id) is not None:
            self.fail("get_by_field", "found the other tenant's row")

    async def get_one(self) -> None:
        await self.raises(
            "get_one", (NotFoundError,), self.repo().get_one(id=self.theirs.id)
        )

    async def list(self) -> None:
        self.check_rows("list", await self.repo().list())
        self.check_rows("list", await self.repo().list({"tenant_id": self.b}))
        self.check_rows("list", await self.repo().list({"id": self.theirs.id}))
        if self.soft:
            self.check_rows("list", await self.repo().list(include_deleted=True))
            self.check_rows("list", await self.repo().list(only_deleted=True))

    async def count(self) -> None:
        own = len(await self.repo().list())
        counts = [
            await self.repo().count(),
            await self.repo().count({"id": self.theirs.id}) + own,
            await self.repo().count({"tenant_id": self.b}) + own,
        ]
        if self.soft:
            counts.append(await self.repo().count(include_deleted=True))
        if set(counts) != {own}:
            self.fail("count", f"counted {counts}, the tenant has {own} rows")

    async def exists(self) -> None:
        if await self.repo().exists({"id": self.theirs.id}):
            self.fail("exists", "saw the other tenant's row")
        if self.theirs_deleted is not None and await self.repo().exists(
            {"id": self.theirs_deleted.id}, include_deleted=True
        ):
            self.fail("exists", "saw the other tenant's deleted row")

    async def create(self) -> None:
        made = await self.repo().create(self.row())
        if made.tenant_id != self.a:
            self.fail("create", f"stored tenant {made.tenant_id!r}")
        await self.raises(
            "create",
            (TenantError,),
            self.repo().create({**self.row(), "tenant_id": self.b}),
        )

    async def create_many(self) -> None:
        made = await self.repo().create_many([self.row()])
        if [m.tenant_id for m in made] != [self.a]:
            self.fail("create_many", "stored another tenant")
        await self.raises(
            "create_many",
            (TenantError,),
            self.repo().create_many([self.row(), {**self.row(), "tenant_id": self.b}]),
        )

    async def update(self) -> None:
        changes = {k: v for k, v in self.row().items() if k not in _MANAGED}
        await self.raises(
            "update", (NotFoundError,), self.repo().update(self.theirs.id, changes)
        )
        await self.raises(
            "update", (NotFoundError,), self.repo().update(self.theirs.id, {})
        )
        await self.raises(
            "update",
            (TenantError,),
            self.repo().update(self.mine.id, {"tenant_id": self.b}),
        )

    async def update_many(self) -> None:
        changes = {k: v for k, v in self.row().items() if k not in _MANAGED}
        for filters in ({"id": self.theirs.id}, {"tenant_id": self.b}):
            changed = await self.repo().update_many(filters, changes)
            if changed:
                self.fail("update_many", f"changed {changed} rows through {filters}")
        await self.raises(
            "update_many",
            (TenantError,),
            self.repo().update_many(None, {"tenant_id": self.b}),
        )

    async def delete(self) -> None:
        if await self.repo().delete(self.theirs.id):
            self.fail("delete", "deleted the other tenant's row")
        if await self.repo().delete(self.theirs.id, hard=True):
            self.fail("delete", "hard-deleted the other tenant's row")

    async def restore(self) -> None:
        if self.theirs_deleted is None:
            return  # no soft delete: restore refuses every row, B's included
        await self.raises(
            "restore", (NotFoundError,), self.repo().restore(self.theirs_deleted.id)
        )

    async def upsert(self) -> None:
        # The other tenant's key with this tenant's data: never B's row.
        await self.raises(
            "upsert",
            (AlreadyExistsError, TenantError, NotFoundError),
            self.repo().upsert({**self.row(), "id": self.theirs.id}),
        )
        await self.raises(
            "upsert",
            (TenantError,),
            self.repo().upsert({**self.row(), "tenant_id": self.b}),
        )

    async def list_paginated(self) -> None:
        page = await self.repo().list_paginated(size=100)
        self.check_rows("list_paginated", page.items)
        if page.total != len(page.items):
            self.fail("list_paginated", f"total {page.total} counts other rows")

    async def paginate(self) -> None:
        page = await self.repo().paginate(PaginationParams(page=1, size=100))
        self.check_rows("paginate", page.items)
        if page.total != len(page.items):
            self.fail("paginate", f"total {page.total} counts other rows")

    async def list_after(self) -> None:
        page = await self.repo().list_after(size=100, order_by="id")
        self.check_rows("list_after", page.items)


def _public_methods() -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(AsyncRepository)
        if not name.startswith("_") and callable(member)
    }


async def assert_tenant_isolated(
    repository_class: type[AsyncRepository[Any]],
    make_row: Callable[[int], Mapping[str, Any]],
    *,
    tenants: tuple[str, str] = ("tenant-a", "tenant-b"),
    db: Database | None = None,
) -> None:
    """Assert that no public `AsyncRepository` method lets tenant A reach B's rows.

    Seeds a row for each tenant (and a soft-deleted one for B when the model
    has `deleted_at`), then runs every public method of `AsyncRepository`,
    found by introspection, as tenant A: outside a transaction and again
    inside a `TransactionManager`. Reads must not return B's rows, counts and
    totals must not count them, writes must not change them or write rows for
    B, and B's rows must be unchanged afterwards. A public method this helper
    does not know fails the assertion, so a new method is never skipped.

    The rows it creates are committed: run it on a test database that is
    emptied after each test (the `dotmac_db` fixture does that).

    Args:
        repository_class: Your repository, over a model with `TenantMixin`.
        make_row: Returns valid `create()` data for row number `n`; distinct
            numbers must give distinct values for unique columns. `id` and
            `tenant_id` are filled in by the helper.
        tenants: The two tenant ids to use.
        db: The database (default: the one `configure_database()` registered).

    Raises:
        ValidationError: the model has no `tenant_id` column.
        AssertionError: a method leaked; the message lists each problem.
    """
    if "tenant_id" not in repository_class.model.model_fields:
        msg = f"{repository_class.model.__name__} has no tenant_id (TenantMixin)"
        raise ValidationError(msg, field="repository_class")
    probe = _Probe(repository_class, make_row, tenants, db)
    unknown = sorted(m for m in _public_methods() if not hasattr(_Probe, m))
    if unknown:
        msg = f"assert_tenant_isolated has no probe for {unknown}: update dotmac_core"
        raise AssertionError(msg)
    await probe.seed()
    before = await probe.snapshot()
    for in_transaction in (False, True):
        for method in sorted(_public_methods()):
            check: Callable[[], Awaitable[None]] = getattr(probe, method)
            route = "in a transaction" if in_transaction else "outside a transaction"
            found = len(probe.problems)
            try:
                with tenant_scope(probe.a):
                    if in_transaction:
                        async with TransactionManager(db):
                            await check()
                    else:
                        await check()
            except Exception as exc:  # noqa: BLE001 - reported with the others
                probe.fail(method, f"raised {type(exc).__name__}: {exc}")
            probe.problems[found:] = [f"{p} ({route})" for p in probe.problems[found:]]
    after = await probe.snapshot()
    if after != before:
        probe.fail("(all methods)", f"tenant {probe.b!r}'s rows changed")
    if probe.problems:
        listing = "\n".join(f"  - {p}" for p in probe.problems)
        msg = f"{repository_class.__name__} is not tenant-isolated:\n{listing}"
        raise AssertionError(msg)
