"""PostgreSQL row-level security on tenant tables: a second line of defence.

The toolkit's sessions scope ORM statements to the current tenant (see
`scoping.py`); raw SQL (`text()`, `exec_driver_sql`, `session.connection()`)
is not rewritten. Row-level security makes the database itself refuse other
tenants' rows, for every statement of a role that is subject to it:

- `row_level_security_ddl()` gives the SQL that puts the `dotmac_tenant`
  policy on each tenant table (`ENABLE` and `FORCE ROW LEVEL SECURITY`, the
  policy comparing `tenant_id` with the transaction's `dotmac.tenant_id`
  setting), and optionally grants an application role its privileges;
  `apply_row_level_security()` runs it.
- `enable_row_level_security(db)` makes every transaction of `db` set that
  setting to the current tenant, with `set_config(..., true)`: local to the
  transaction, so it can never reach the pool's next user.

With no tenant the setting is not made and the policies see no rows (fail
closed). Superusers and roles with `BYPASSRLS` are never subject to
row-level security, `FORCE` or not: connect the application as a role that
is neither (nor the tables' owner, for belt and braces).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, event
from sqlalchemy.dialects.postgresql.base import PGDialect

from ..exceptions import (
    ConfigurationError,
    TenantError,
    ValidationError,
    translate_errors,
)
from ..tenancy import get_current_tenant, is_scoping_bypassed
from ._driver import driver_for
from .models import DBBaseModel

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from .database import Database

__all__ = [
    "POLICY_NAME",
    "TENANT_SETTING",
    "apply_row_level_security",
    "enable_row_level_security",
    "row_level_security_ddl",
]

#: The setting that carries the current tenant, local to each transaction.
TENANT_SETTING = "dotmac.tenant_id"
#: Name of the policy put on each tenant table.
POLICY_NAME = "dotmac_tenant"
#: The column a tenant table is scoped by (`TenantMixin.tenant_id`).
TENANT_COLUMN = "tenant_id"

# Bound values: the tenant never becomes part of the SQL text. `SET LOCAL`
# takes no parameters, `set_config(..., true)` is its bindable form.
_SET_TENANT = f"SELECT set_config('{TENANT_SETTING}', $1, true)"
_BYPASSES = (
    "SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles "
    "WHERE rolname = current_user"
)
#: `conn.info` key: whether the connection's role bypasses row-level security.
_ROLE_BYPASSES = "dotmac_rls_role_bypasses"
_PREPARER = PGDialect().identifier_preparer  # type: ignore[no-untyped-call]
_MAX_ROLE_LENGTH = 63  # PostgreSQL's NAMEDATALEN - 1 (bytes)


def _tenant_tables(target: MetaData | Iterable[Any] | None) -> list[Table]:
    """The tables of `target` to put the policy on, each checked to be a tenant's."""
    if target is None:
        target = DBBaseModel.metadata
    if isinstance(target, MetaData):
        return [t for t in target.sorted_tables if TENANT_COLUMN in t.c]
    if isinstance(target, (str, bytes)) or not isinstance(target, Iterable):
        msg = (
            "row-level security needs a MetaData or an iterable of table models "
            f"or Tables, got {type(target).__name__}"
        )
        raise ValidationError(msg, field="target")
    tables: list[Table] = []
    for item in target:
        table = item if isinstance(item, Table) else getattr(item, "__table__", None)
        name = getattr(item, "__name__", repr(item))
        if not isinstance(table, Table):
            msg = f"{name} is not a table model or a Table"
            raise ValidationError(msg, field="target")
        if TENANT_COLUMN not in table.c:
            msg = (
                f"{name} has no {TENANT_COLUMN} column: row-level security "
                "applies to tenant tables (TenantMixin) only"
            )
            raise ValidationError(msg, field="target")
        if table not in tables:
            tables.append(table)
    return tables


def _role(role: object) -> str:
    """The quoted form of a role name, after checking it is one PostgreSQL takes."""
    if not isinstance(role, str):
        msg = f"grant_to must be a role name (str), got {type(role).__name__}"
        raise ValidationError(msg, field="grant_to")
    if not role or not role.isprintable():
        msg = "grant_to must be a non-empty role name of printable characters"
        raise ValidationError(msg, field="grant_to")
    if len(role.encode("utf-8", "surrogatepass")) > _MAX_ROLE_LENGTH:
        msg = f"grant_to is longer than PostgreSQL's {_MAX_ROLE_LENGTH}-byte names"
        raise ValidationError(msg, field="grant_to")
    quoted: str = _PREPARER.quote(role)
    return quoted


def row_level_security_ddl(
    target: MetaData | Iterable[Any] | None = None, *, grant_to: str | None = None
) -> list[str]:
    """The PostgreSQL statements that put the tenant policy on each tenant table.

    Per table: `ENABLE` and `FORCE ROW LEVEL SECURITY` (the owner is subject
    too), then the `dotmac_tenant` policy, dropped first if it exists, so
    running the statements again replaces it. The policy lets a row be
    read, changed, deleted or written only when its `tenant_id` equals the
    transaction's `dotmac.tenant_id` setting; an unset (or emptied) setting
    matches no row. Identifiers are quoted by SQLAlchemy's PostgreSQL
    identifier preparer. Run them as the tables' owner, in one transaction
    (an Alembic migration: `for sql in ...: op.execute(sql)`).

    Args:
        target: A `MetaData` (its tables with a `tenant_id` column), or table
            models / `Table`s, each of which must have one. Default: every
            `DBBaseModel` table with a `tenant_id` column.
        grant_to: A role to grant `SELECT, INSERT, UPDATE, DELETE` on each
            table (an application role: not a superuser, no `BYPASSRLS`).

    Raises:
        ValidationError: a model or table without `tenant_id`, a target that
            is neither, or a role name PostgreSQL would not take.
    """
    tables = _tenant_tables(target)
    role = None if grant_to is None else _role(grant_to)
    check = f"NULLIF(current_setting('{TENANT_SETTING}', true), '')"
    policy = _PREPARER.quote(POLICY_NAME)
    statements: list[str] = []
    for table in tables:
        name = _PREPARER.format_table(table)
        column = _PREPARER.quote(table.c[TENANT_COLUMN].name)
        statements += [
            f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
            f"DROP POLICY IF EXISTS {policy} ON {name}",
            f"CREATE POLICY {policy} ON {name} AS PERMISSIVE FOR ALL "
            f"USING ({column} = {check}) WITH CHECK ({column} = {check})",
        ]
        if role is not None:
            statements.append(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {name} TO {role}"
            )
    return statements


def _require_postgresql(db: Database, what: str) -> None:
    if db.dialect != "postgresql":
        msg = f"{what} needs PostgreSQL; this database is {db.dialect}"
        raise ConfigurationError(msg, field="dialect")


async def apply_row_level_security(
    db: Database,
    target: MetaData | Iterable[Any] | None = None,
    *,
    grant_to: str | None = None,
) -> list[str]:
    """Run `row_level_security_ddl()` on `db` in one transaction; the tables done.

    Connect `db` as the tables' owner (the role that created them).

    Returns:
        The names of the tables that got the policy.

    Raises:
        ConfigurationError: `db` is not PostgreSQL.
        ValidationError: see `row_level_security_ddl()`.
        DatabaseError: the server refused a statement (not the owner, say).
    """
    _require_postgresql(db, "row-level security")
    statements = row_level_security_ddl(target, grant_to=grant_to)
    with translate_errors():
        async with db.engine.begin() as conn:
            for statement in statements:
                await conn.exec_driver_sql(statement)
    return [table.name for table in _tenant_tables(target)]


def _is_autocommit(conn: Connection) -> bool:
    """Whether `conn` runs each statement on its own (no transaction to set in)."""
    adapted = conn.connection.dbapi_connection
    return getattr(adapted, "isolation_level", None) == "autocommit"


def _role_bypasses(conn: Connection) -> bool:
    """Whether `conn`'s role is never subject to row-level security (remembered)."""
    known = conn.info.get(_ROLE_BYPASSES)
    if known is None:
        known = conn.info[_ROLE_BYPASSES] = bool(
            conn.exec_driver_sql(_BYPASSES).scalar()
        )
    return bool(known)


def _set_tenant(conn: Connection) -> None:
    """`begin` listener: make the current tenant the transaction's setting."""
    tenant = get_current_tenant()
    if tenant is None:
        if is_scoping_bypassed() and not _role_bypasses(conn):
            msg = (
                "tenant_scope(None, bypass=True) on a database with row-level "
                "security: its role sees no tenant's rows without a tenant. "
                "Run admin jobs on a Database connected as a role with BYPASSRLS"
            )
            raise TenantError(msg)
        return  # not set: the policies match no row (fail closed)
    if _is_autocommit(conn):
        msg = (
            "row-level security sets the tenant per transaction, and an "
            "AUTOCOMMIT connection has none: its statements would see no rows"
        )
        raise ConfigurationError(msg, field="isolation_level")
    conn.exec_driver_sql(_SET_TENANT, (tenant,))


def enable_row_level_security(db: Database) -> None:
    """Make every transaction of `db` set `dotmac.tenant_id` to the current tenant.

    A listener on the engine's `begin` runs `set_config('dotmac.tenant_id',
    <tenant>, true)` as the transaction's first statement, so everything in
    the transaction (ORM, `text()`, the session's raw connection) runs under
    the policies of `row_level_security_ddl()` for that tenant: one more
    round trip per transaction. Calls outside a transaction then run in a
    short transaction of their own instead of as one autocommit statement
    (BEGIN, the setting, the statement, ROLLBACK: four round trips, not one).
    Calling it again does nothing.

    Without a tenant nothing is set and tenant tables show no rows; under
    `tenant_scope(None, bypass=True)` a transaction is refused with
    `TenantError` unless `db`'s role bypasses row-level security.

    Raises:
        ConfigurationError: `db` is not PostgreSQL.
    """
    _require_postgresql(db, "row-level security")
    for replica in db.replicas:  # their reads run under the policies too
        enable_row_level_security(replica)
    engine = db.engine.sync_engine
    if event.contains(engine, "begin", _set_tenant):
        return
    event.listen(engine, "begin", _set_tenant)
    driver = driver_for(engine)
    if driver is not None:
        # A statement on a pooled connection in autocommit would run outside
        # any transaction, where no tenant is set; and the server refuses
        # COPY FROM into a table under row-level security.
        driver.pooled = False
        driver.copy = False
    # Reads outside a transaction use an AUTOCOMMIT session on PostgreSQL;
    # a transaction-local setting cannot reach them, so they get a real one.
    db._read_factory = db.session_factory
