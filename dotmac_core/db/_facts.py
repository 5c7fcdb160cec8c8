"""What the data path knows of one table model, looked up once (private).

`Facts` serves the statement builder (`_query.py`), the executors and the
materialiser (`_rows.py`): the mapped columns in one order, their attribute
and column keys, the primary key, and whether the model is tenant-owned or
soft-deleted. It also keeps the statements built for the model, per shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import Float, inspect
from sqlalchemy.orm import configure_mappers

from .scoping import has_soft_delete, is_tenant_model

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Sequence

    from sqlalchemy import Column
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql import Executable

    from .filters import OrderSpec

__all__ = ["MAX_SHAPES", "Deleted", "Facts", "Scoping", "facts_of"]

Deleted = Literal["live", "any", "only"]

#: Shapes (and orders) kept per model; past this, they are built per call
#: (the shapes come from callers' filters, so their number has no natural bound).
MAX_SHAPES = 512


@dataclass(frozen=True, slots=True)
class Scoping:
    """Which rows a query may see: one tenant (or all under bypass), live or not.

    `tenant` is the tenant to filter by (`None`: no tenant criterion, for a
    model without tenant or under a bypass); `deleted` is `None` for a model
    without soft delete.
    """

    tenant: str | None
    deleted: Deleted | None

    @property
    def shape(self) -> tuple[bool, Deleted | None]:
        """What of the scoping changes the statement (not the tenant's value)."""
        return (self.tenant is not None, self.deleted)


class Facts:
    """What the builder, the executors and the materialiser know of one model."""

    def __init__(self, model: type[Any]) -> None:
        mapper: Mapper[Any] = inspect(model)
        if not mapper.configured:
            configure_mappers()  # attribute access on built objects needs it
        self.model = model
        self.mapper = mapper
        self.table: Any = mapper.local_table
        props = list(mapper.column_attrs)
        #: Attribute keys of the mapped columns, in the order statements select them.
        self.keys: tuple[str, ...] = tuple(prop.key for prop in props)
        #: The mapped columns, in `keys` order.
        self.columns: tuple[Column[Any], ...] = tuple(
            cast("Column[Any]", prop.columns[0]) for prop in props
        )
        #: Attribute key -> column.
        self.column: dict[str, Column[Any]] = dict(
            zip(self.keys, self.columns, strict=True)
        )
        #: Attribute keys of the primary key, in the mapper's order.
        self.pk: tuple[str, ...] = tuple(
            mapper.get_property_by_column(column).key for column in mapper.primary_key
        )
        #: Positions of the primary key's attributes in `keys`.
        self.pk_positions = tuple(self.keys.index(k) for k in self.pk)
        #: The primary key's values (a tuple) of a row in `keys` order.
        self.key_of: Callable[[Sequence[Any]], tuple[Any, ...]] = _key_getter(
            self.pk_positions
        )
        self.tenant = is_tenant_model(model)
        self.soft_delete = has_soft_delete(model)
        self.has_created_at = "created_at" in self.column
        #: Columns whose value a column type turns Python `None` into (JSON's
        #: null): `None` there is a value to write, not "not given".
        self.none_is_value = frozenset(
            key
            for key, column in self.column.items()
            if column.type.should_evaluate_none
        )
        #: Attribute keys of float columns (SQLite's REAL affinity).
        self.float_keys: tuple[str, ...] = tuple(
            key
            for key, column in self.column.items()
            if isinstance(column.type, Float) and not column.type.asdecimal
        )
        #: Column key -> attribute key.
        self.attribute: dict[str, str] = {
            column.key: key for key, column in self.column.items()
        }
        #: Whether `_rows` may make objects without `new_instance()` (first use).
        self.direct: bool | None = None
        #: Checked `order_by` strings and the order each means (see repository).
        self.orders: dict[str | None, tuple[OrderSpec, ...]] = {}
        self._statements: dict[Hashable, tuple[Executable, Executable]] = {}

    def statements(
        self, shape: Hashable, build: Callable[[], tuple[Executable, Executable]]
    ) -> tuple[Executable, Executable]:
        """The statement of `shape` for the driver and for a session, built once."""
        statements = self._statements.get(shape)
        if statements is None:
            statements = build()
            if len(self._statements) < MAX_SHAPES:
                self._statements[shape] = statements
        return statements


def _key_getter(
    positions: tuple[int, ...],
) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if len(positions) > 1:
        return itemgetter(*positions)
    (only,) = positions
    return lambda row: (row[only],)


_FACTS: dict[type[Any], Facts] = {}


def facts_of(model: type[Any]) -> Facts:
    """The `Facts` of a table model, looked up once."""
    facts = _FACTS.get(model)
    if facts is None:
        facts = _FACTS[model] = Facts(model)
    return facts
