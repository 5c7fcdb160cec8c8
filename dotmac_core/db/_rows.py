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
from sqlalchemy.orm import InstanceState, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_dict, instance_state, set_committed_value
from sqlalchemy.orm.base import DEFAULT_STATE_ATTR as STATE_ATTR

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from sqlalchemy.orm import Session

    from ._facts import Facts

__all__ = [
    "adopt",
    "batch_allocation",
    "detached",
    "floats_as_read",
    "from_values",
    "into_session",
]


def _direct(facts: Facts) -> bool:
    """Whether objects of `facts`' model may be made without `new_instance()`.

    `ClassManager.new_instance()` creates the instance with `cls.__new__`
    (SQLModel's own, which sets up the pydantic fields) and an
    `InstanceState(instance, manager)`, which it stores through SQLModel's
    `__setattr__` in the instance dict. `_objects` does those steps itself, at
    half the cost per row; checked once per model against `new_instance()` (a
    class with other instrumentation keeps `new_instance()`).
    """
    direct = facts.direct
    if direct is None:
        probe = facts.mapper.class_manager.new_instance()
        direct = facts.direct = type(instance_state(probe)) is InstanceState and list(
            probe.__dict__
        ) == [STATE_ATTR]
    return direct


def _slots(cls: type[Any]) -> list[str]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [name for name in names if name not in ("__dict__", "__weakref__")]


def _blank(obj: Any) -> dict[str, Any]:
    """What a new, empty instance holds: its slots' values and its dict."""
    held = {name: getattr(obj, name, _UNSET) for name in _slots(type(obj))}
    held["__dict__"] = dict(obj.__dict__)
    return held


_UNSET = object()


def _plain_new(cls: Any) -> bool:
    """Whether `cls.__new__` makes just what `_blank_new` makes, more slowly.

    SQLModel's `__new__` creates the object and gives the pydantic slots
    their empty values (no field set yet, no extra, no private values). For a
    class whose `__new__` leaves exactly those slots, set in that way, and an
    empty dict, `_objects` makes the object directly, at a third of the cost;
    checked once per class by comparing both ways' instances slot by slot.
    """
    plain = _PLAIN.get(cls)
    if plain is None:
        try:
            plain = _blank(cls.__new__(cls)) == _blank(_blank_new(cls))
        except (AttributeError, TypeError):
            plain = False
        _PLAIN[cls] = plain
    return plain


_PLAIN: dict[type[Any], bool] = {}
_new_object = object.__new__
_put = object.__setattr__


def _blank_new(cls: Any) -> Any:
    # The same steps as the loop in `_objects` (inlined there, per row).
    obj = _new_object(cls)
    _put(obj, "__pydantic_fields_set__", set())
    _put(obj, "__pydantic_extra__", None)
    _put(obj, "__pydantic_private__", None)
    return obj


def _objects(facts: Facts, pairs: Iterable[tuple[Any, tuple[Any, ...]]]) -> list[Any]:
    """Objects of `facts`' model from (values, primary key) pairs, as loaded.

    The values are a mapping or an iterable of (key, value) pairs. The
    identity key is the mapper's (`identity_key_from_primary_key`), whose
    documented form is (class, primary key tuple, identity token): made for
    the first row, then with each row's key in its place.
    """
    manager = facts.mapper.class_manager
    identity = facts.mapper.identity_key_from_primary_key
    made: list[Any] = []
    if not _direct(facts):
        for values, key in pairs:
            obj = manager.new_instance()
            instance_dict(obj).update(values)
            instance_state(obj).key = identity(key)
            made.append(obj)
        return made
    cls: Any = facts.model
    plain = _plain_new(cls)
    new, new_object, put = cls.__new__, _new_object, _put
    mapped: Any = None
    token: Any = None
    for values, key in pairs:
        if plain:
            obj = new_object(cls)
            put(obj, "__pydantic_fields_set__", set())
            put(obj, "__pydantic_extra__", None)
            put(obj, "__pydantic_private__", None)
        else:
            obj = new(cls)
        state = InstanceState(obj, manager)
        if mapped is None:
            mapped, _, token = state.key = identity(key)
        else:
            state.key = (mapped, key, token)
        contents = obj.__dict__
        contents[STATE_ATTR] = state
        contents.update(values)
        made.append(obj)
    return made


def detached(facts: Facts, rows: Sequence[Sequence[Any]]) -> list[Any]:
    """Detached model objects for `rows` (values in `facts.keys` order).

    A longer row (a page's total as last value) is cut to the model's columns.
    """
    keys = facts.keys
    if len(facts.pk) == 1:  # the usual case, without a call per row for the key
        (at,) = facts.pk_positions
        pairs = ((zip(keys, row, strict=False), (row[at],)) for row in rows)
        return _objects(facts, pairs)
    key_of = facts.key_of
    return _objects(
        facts, ((zip(keys, row, strict=False), key_of(row)) for row in rows)
    )


def into_session(
    session: Session,
    facts: Facts,
    rows: Iterable[Sequence[Any]],
    *,
    overwrite: bool = False,
) -> list[Any]:
    """The session's objects for `rows`, as a query on it returns them.

    A row already in the identity map comes back as that object, with only
    its unloaded (expired or deferred) attributes filled in from the row, or
    with every attribute set from it when `overwrite` (the rows a write
    returned: SQLAlchemy's `populate_existing`); a new row becomes a
    persistent object of the session.
    """
    identity_map = session.identity_map
    keys, key_of, mapper = facts.keys, facts.key_of, facts.mapper
    objects = []
    for row in rows:
        pk = key_of(row)
        existing = identity_map.get(mapper.identity_key_from_primary_key(pk))
        if existing is None:
            (obj,) = _objects(facts, [(dict(zip(keys, row, strict=False)), pk)])
            session.add(obj)
            objects.append(obj)
            continue
        if overwrite:
            for key, value in zip(keys, row, strict=False):
                set_committed_value(existing, key, value)
        elif unloaded := instance_state(existing).unloaded:
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
    return _objects(facts, ((v, tuple(v[k] for k in pk)) for v in rows))


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
