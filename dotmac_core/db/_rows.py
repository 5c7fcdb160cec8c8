"""The one materialiser: driver rows to model objects, as SQLAlchemy builds (private).

A call that runs on the driver (see `_driver.py`) gets rows whose values the
column types' result processors have already converted, in `Facts.keys`
order. This module turns them into model objects the way SQLAlchemy's own
loading does, through its public API: the class manager makes the instance
(SQLModel's `__new__` sets up the pydantic fields), the values go into the
instance's dict as committed state, and the mapper gives the identity key.
Outside a session the objects are detached, as rows read by a closed session
are; on a session they join its identity map, where a row already present
keeps its object (only its unloaded attributes are filled in), as a query
without `populate_existing` does.

`from_values` builds objects from values that were written rather than read:
`create_many` is its only caller (a COPY returns no rows).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, instance_state, set_committed_value

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from sqlalchemy.orm import Session

    from ._query import Facts

__all__ = [
    "adopt",
    "batch_allocation",
    "detached",
    "floats_as_read",
    "from_values",
    "into_session",
]


def _build(facts: Facts, values: dict[str, Any], key: tuple[Any, ...]) -> Any:
    obj = facts.mapper.class_manager.new_instance()
    instance_dict(obj).update(values)
    instance_state(obj).key = facts.mapper.identity_key_from_primary_key(key)
    return obj


def detached(facts: Facts, rows: Iterable[Sequence[Any]]) -> list[Any]:
    """Detached model objects for `rows` (values in `facts.keys` order).

    A longer row (a page's total as last value) is cut to the model's columns.
    Pages build dozens of objects per call, so the loop is written out.
    """
    keys = facts.keys
    new = facts.mapper.class_manager.new_instance
    identity = facts.mapper.identity_key_from_primary_key
    state_of = instance_state
    made = []
    if len(facts.pk) == 1:  # the usual case, without a call per row for the key
        (at,) = facts.pk_positions
        for row in rows:
            obj = new()
            obj.__dict__.update(zip(keys, row, strict=False))  # `instance_dict(obj)`
            state_of(obj).key = identity((row[at],))
            made.append(obj)
        return made
    key_of = facts.key_of
    for row in rows:
        obj = new()
        obj.__dict__.update(zip(keys, row, strict=False))
        state_of(obj).key = identity(key_of(row))
        made.append(obj)
    return made


def into_session(
    session: Session, facts: Facts, rows: Iterable[Sequence[Any]]
) -> list[Any]:
    """The session's objects for `rows`, as a query on it returns them.

    A row already in the identity map comes back as that object, with only
    its unloaded (expired or deferred) attributes filled in from the row; a
    new row becomes a persistent object of the session.
    """
    identity_map = session.identity_map
    keys, key_of, mapper = facts.keys, facts.key_of, facts.mapper
    objects = []
    for row in rows:
        pk = key_of(row)
        existing = identity_map.get(mapper.identity_key_from_primary_key(pk))
        if existing is None:
            obj = _build(facts, dict(zip(keys, row, strict=False)), pk)
            session.add(obj)
            objects.append(obj)
            continue
        unloaded = instance_state(existing).unloaded
        if unloaded:
            for key, value in zip(keys, row, strict=False):
                if key in unloaded:
                    set_committed_value(existing, key, value)
        objects.append(existing)
    return objects


def adopt(facts: Facts, instance: Any, stored: Any) -> Any:
    """Make the caller's new `instance` the object of the row `stored` was read as.

    `instance` takes the stored values with its history reset, as if loaded,
    and `stored`'s place: detached, or in `stored`'s session.
    """
    make_transient_to_detached(instance)
    for key in facts.keys:
        set_committed_value(instance, key, instance_dict(stored)[key])
    session = inspect(stored).session
    if session is not None:
        session.expunge(stored)
        session.add(instance)
    return instance


def floats_as_read(facts: Facts, objects: Iterable[Any]) -> None:
    """Undo SQLite's RETURNING quirk: integral REAL values come back as `int`.

    SQLite returns a REAL value that it stores as an integer (`1.0`) as the
    integer `1` from `RETURNING`, though every read of the column gives the
    float (sqlite.org/forum/forumpost/712251ee03). Written rows are read
    back as reads give them.
    """
    keys = facts.float_keys
    if not keys:
        return
    for obj in objects:
        values = instance_dict(obj)
        for key in keys:
            if type(values.get(key)) is int:
                set_committed_value(obj, key, float(values[key]))


def from_values(facts: Facts, rows: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Detached objects holding the values of rows just written (every column)."""
    pk = facts.pk
    new = facts.mapper.class_manager.new_instance
    identity = facts.mapper.identity_key_from_primary_key
    made = []
    for values in rows:
        obj = new()
        instance_dict(obj).update(values)
        instance_state(obj).key = identity(tuple(values[k] for k in pk))
        made.append(obj)
    return made


@contextmanager
def batch_allocation() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch of objects is built.

    Thousands of new objects that stay alive set off collections over and
    over (about half the cost of building 10,000 row objects); they are
    freed by reference counting anyway. The block does no I/O, so no other
    task runs meanwhile; the collector's previous state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
