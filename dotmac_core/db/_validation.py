"""Input checks for repository writes (private).

SQLModel table classes skip pydantic validation when constructed, so the
repository validates every write against the model's fields before any SQL:
types, `max_length`, nullability and unknown keys, the same on SQLite (which
would store an over-long string) as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast

import pydantic
from sqlalchemy import UniqueConstraint
from sqlmodel import SQLModel

from ..exceptions import DotMacError, TenantError, ValidationError
from ..tenancy import current_user_id
from ._facts import MAX_SHAPES, Deleted, Facts, Scoping
from ._rows import batch_allocation
from ._types import utc_now, uuid7, uuid7_batch
from ._values import (
    Dialect,
    check_int_inputs,
    check_int_rows,
    check_storable,
    check_storable_rows,
)
from .filters import OrderBy, OrderSpec, coerce_value, parse_order_by
from .models import stamp_tenant
from .pagination import MAX_ROWS
from .scoping import current_scope

ModelT = TypeVar("ModelT", bound=SQLModel)

#: Columns a caller may not change through `update` / `update_many`.
PROTECTED_ON_UPDATE = frozenset({"id", "created_at", "created_by", "tenant_id"})


def invalid(model: type[Any], exc: pydantic.ValidationError) -> ValidationError:
    """Turn pydantic's error into ours, naming the first bad field, without inputs."""
    errors = exc.errors(include_input=False, include_url=False)
    fields = [".".join(str(part) for part in err["loc"]) or "value" for err in errors]
    first = errors[0]
    msg = f"{model.__name__}.{fields[0]}: {first['msg']}"
    return ValidationError(
        msg,
        field=fields[0],
        details={
            "errors": [
                {"field": field, "message": err["msg"], "type": err["type"]}
                for field, err in zip(fields, errors, strict=True)
            ]
        },
    )


def check_keys(model: type[Any], data: Mapping[str, Any] | object) -> None:
    """Refuse keys that are not fields of `model`."""
    if not isinstance(data, Mapping):
        msg = f"data for {model.__name__} must be a mapping or a {model.__name__}"
        raise ValidationError(msg, field="data")
    fields = model.model_fields
    for key in data:
        if key not in fields:
            msg = f"{model.__name__} has no field {key!r}"
            raise ValidationError(msg, field=str(key)[:64])


_INPUTS: dict[type[Any], type[pydantic.BaseModel]] = {}


def input_model(model: type[Any]) -> type[pydantic.BaseModel]:
    """A plain pydantic model with `model`'s fields, constraints and defaults.

    Validating through it costs a fraction of a SQLModel table class's own
    `model_validate` (no ORM instrumentation on the way), and unknown keys are
    refused (`extra="forbid"`).
    """
    schema = _INPUTS.get(model)
    if schema is None:
        fields: dict[str, Any] = {
            name: (field.annotation, field)
            for name, field in model.model_fields.items()
        }
        schema = _INPUTS[model] = pydantic.create_model(
            f"{model.__name__}Input",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
    return schema


def validated_values(
    model: type[Any], data: object, dialect: Dialect = None
) -> dict[str, Any]:
    """Validate `data` for `model`; return every field's value, defaults filled in.

    `dialect` is the database the row goes to (`None`: either one, so a
    value one of them would store wrong is refused; see `check_non_finite`).
    """
    if isinstance(data, model):
        data = data.model_dump()
    check_keys(model, data)
    check_int_inputs(model, cast("Mapping[str, Any]", data))
    try:
        values = dict(input_model(model).model_validate(data).__dict__)
    except pydantic.ValidationError as exc:
        raise invalid(model, exc) from exc
    check_storable(model, values, dialect)
    return values


_LIST_ADAPTERS: dict[type[Any], pydantic.TypeAdapter[list[Any]]] = {}


def validated_rows(
    model: type[Any], items: Iterable[object], dialect: Dialect = None
) -> list[dict[str, Any]]:
    """`validated_values` for many items, validated in one pass.

    One pydantic call checks the whole list (its loop runs in Rust); if any
    item is invalid, the items are checked one by one to raise the same
    error a single `create` would.
    """
    given = list(items)
    shared = _shared_defaults(model)
    keys = [
        name
        for name, field in model.model_fields.items()
        if field.default_factory is uuid7
    ]
    ids = uuid7_batch(len(given)) if len(keys) == 1 else None
    data: list[object] = []
    for i, item in enumerate(given):
        if type(item) is dict or (
            isinstance(item, Mapping) and not isinstance(item, model)
        ):
            merged = {**shared, **item}
            if ids is not None and keys[0] not in merged:
                merged[keys[0]] = ids[i]
            data.append(merged)
        else:
            data.append(item.model_dump() if isinstance(item, model) else item)
    check_int_rows(model, [row for row in data if isinstance(row, Mapping)])
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        schema: Any = list[input_model(model)]  # type: ignore[misc]
        adapter = _LIST_ADAPTERS[model] = pydantic.TypeAdapter(schema)
    with batch_allocation():
        try:
            checked = adapter.validate_python(data)
        except pydantic.ValidationError:
            return [validated_values(model, item, dialect) for item in given]
        rows = [dict(row.__dict__) for row in checked]
    check_storable_rows(model, rows, dialect)
    return rows


#: Default factories whose value depends on the call, not the row: the clock,
#: the acting user, the current tenant. A batch evaluates them once, so its
#: rows share one timestamp, as rows written by one statement share `now()`.
_PER_CALL_FACTORIES = frozenset({utc_now, current_user_id, stamp_tenant})


def per_call_fields(model: type[Any]) -> frozenset[str]:
    """The fields of `model` whose default factory depends on the call only."""
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if field.default_factory in _PER_CALL_FACTORIES
    )


def _shared_defaults(model: type[Any]) -> dict[str, Any]:
    """Values of `model`'s per-call default factories, evaluated once.

    A factory that raises (no tenant set, say) is left to each row, which
    then fails as it would alone.
    """
    shared: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        factory = field.default_factory
        if factory in _PER_CALL_FACTORIES:
            try:
                shared[name] = factory()
            except DotMacError:
                continue
    return shared


def validated(model: type[ModelT], data: Mapping[str, Any] | ModelT) -> ModelT:
    """Return a validated instance of `model` built from `data`.

    A model instance is checked by re-validating its fields and returned as
    is (it may already be referenced by the caller).
    """
    if isinstance(data, model):
        validated_values(model, data)
        return data
    check_keys(model, data)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise invalid(model, exc) from exc


_FIELD_ADAPTERS: dict[tuple[type[Any], str], pydantic.TypeAdapter[Any]] = {}


def validate_field(model: type[Any], name: str, value: Any) -> Any:
    """Validate one value for field `name`, with the field's constraints."""
    key = (model, name)
    adapter = _FIELD_ADAPTERS.get(key)
    if adapter is None:
        field = model.model_fields[name]
        annotated = Annotated[field.annotation, field]  # type: ignore[name-defined]
        adapter = _FIELD_ADAPTERS[key] = pydantic.TypeAdapter(annotated)
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError as exc:
        problem = exc.errors(include_input=False, include_url=False)[0]["msg"]
        msg = f"{model.__name__}.{name}: {problem}"
        raise ValidationError(msg, field=name) from exc


def validated_changes(
    facts: Facts, data: Mapping[str, Any], dialect: Dialect = None
) -> dict[str, Any]:
    """Validate a partial update: known, changeable fields with valid values.

    Non-empty changes also set `updated_by` to the acting user, where the
    model has it and the context names one (an anonymous update keeps the
    last editor).
    """
    model = facts.model
    check_keys(model, data)
    changes: dict[str, Any] = {}
    for name, value in data.items():
        if name == "tenant_id":
            msg = f"tenant_id of a {model.__name__} row cannot change"
            raise TenantError(msg)
        if name in PROTECTED_ON_UPDATE:
            msg = f"{model.__name__}.{name} cannot be changed by an update"
            raise ValidationError(msg, field=name)
        changes[name] = validate_field(model, name, value)
    check_int_inputs(model, data)
    check_storable(model, changes, dialect)
    user = current_user_id()
    if changes and user is not None and "updated_by" in facts.column:
        changes["updated_by"] = user
    return changes


#: Columns an upsert never overwrites on the existing row (besides its key).
_KEPT_ON_CONFLICT = frozenset({"created_at", "created_by", "tenant_id", "updated_by"})


def upsert_updates(facts: Facts, data: object, target: Sequence[str]) -> list[str]:
    """The columns an upsert overwrites on the existing row it meets.

    The fields the caller gave (every column for a model object; omitted
    fields keep their stored values), never the key, the conflict target or
    the creation columns; `updated_at` always, `updated_by` when the context
    names a user.
    """
    given: Collection[str] = (
        facts.keys if isinstance(data, facts.model) else cast("Mapping[str, Any]", data)
    )
    keep = {*facts.pk, *_KEPT_ON_CONFLICT, *target}
    updates = [key for key in facts.keys if key in given and key not in keep]
    if "updated_at" in facts.column:
        updates.append("updated_at")
    if "updated_by" in facts.column and current_user_id() is not None:
        updates.append("updated_by")
    return updates


def check_bounds(**bounds: int | None) -> None:
    """Refuse a `limit` / `offset` that is not an int from 0 to `MAX_ROWS`."""
    for name, value in bounds.items():
        if value is not None and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_ROWS
        ):
            msg = f"{name} must be an int from 0 to {MAX_ROWS}, got {value!r}"
            raise ValidationError(msg, field=name)


def keyset_order(facts: Facts, order_by: OrderBy) -> list[OrderSpec]:
    """The total order of a keyset page; its columns must be NOT NULL."""
    order = total_order(facts, order_by, default=True)
    for spec in order:
        if facts.column[spec.name].nullable:
            msg = f"keyset order needs NOT NULL columns; {spec.name!r} is nullable"
            raise ValidationError(msg, field="order_by")
    return order


def conflict_target(facts: Facts, conflict_on: Sequence[str]) -> tuple[str, ...]:
    """The conflict key: `conflict_on`, plus `tenant_id` where a constraint has it."""
    if isinstance(conflict_on, str) or not conflict_on:
        msg = "conflict_on must be a non-empty list of column names"
        raise ValidationError(msg, field="conflict_on")
    for name in conflict_on:
        if name not in facts.column:
            msg = f"{facts.model.__name__} has no column {name!r}"
            raise ValidationError(msg, field="conflict_on")
    table = facts.table
    attribute = facts.attribute
    unique_sets = [frozenset(attribute[c.key] for c in table.primary_key.columns)]
    unique_sets += [
        frozenset(attribute[c.key] for c in constraint.columns)
        for constraint in table.constraints
        if isinstance(constraint, UniqueConstraint)
    ]
    unique_sets += [
        frozenset(attribute[c.key] for c in index.columns)
        for index in table.indexes
        if index.unique
    ]
    wanted = frozenset(conflict_on)
    if facts.tenant and wanted | {"tenant_id"} in unique_sets:
        return (*conflict_on, *(() if "tenant_id" in wanted else ("tenant_id",)))
    if wanted in unique_sets:
        return tuple(conflict_on)
    msg = f"{facts.model.__name__} has no unique constraint on {sorted(wanted)}"
    raise ValidationError(msg, field="conflict_on")


def scoping_for(
    facts: Facts,
    what: str,
    *,
    include_deleted: bool = False,
    only_deleted: bool = False,
) -> Scoping:
    """Which rows a call on `facts`' model may see (fails closed without a tenant)."""
    model = facts.model
    if only_deleted and not facts.soft_delete:
        msg = f"{model.__name__} has no soft delete: only_deleted is invalid"
        raise ValidationError(msg, field="only_deleted")
    tenant = None
    if facts.tenant:
        tenant = current_scope().require(f"{what} {model.__name__}")
    deleted: Deleted | None = None
    if facts.soft_delete:
        deleted = "only" if only_deleted else "any" if include_deleted else "live"
    return Scoping(tenant, deleted)


def key_values(facts: Facts, id: Any, dialect: Dialect = None) -> tuple[Any, ...]:
    """The primary key `id` as checked values in `Facts.pk` order.

    A composite key is given as a tuple in key order or a dict by attribute.
    """
    pk, model = facts.pk, facts.model
    if len(pk) == 1:
        return (coerce_value(model, pk[0], id, dialect),)
    if isinstance(id, dict) and set(id) == set(pk):
        values = [id[key] for key in pk]
    elif isinstance(id, (tuple, list)) and len(id) == len(pk):
        values = list(id)
    else:
        msg = f"{model.__name__} has a composite key {pk}: give a tuple or dict"
        raise ValidationError(msg, field="id")
    return tuple(
        coerce_value(model, key, value, dialect)
        for key, value in zip(pk, values, strict=True)
    )


def relationships(facts: Facts, load: Iterable[str]) -> tuple[str, ...]:
    """Check `load` names relationships of the model; return them."""
    known = facts.mapper.relationships
    names = tuple(load)
    for name in names:
        if not isinstance(name, str) or name not in known:
            msg = f"{facts.model.__name__} has no relationship {name!r} to load"
            raise ValidationError(msg, field=str(name)[:64])
    return names


def total_order(
    facts: Facts, order_by: OrderBy, *, default: bool = False
) -> list[OrderSpec]:
    """The requested order ended by the primary key, so rows never tie.

    With `default`, no order means `created_at` where the model has it.
    """
    if order_by is None and default and facts.has_created_at:
        order_by = "created_at"
    cached = order_by if isinstance(order_by, str) else None
    known = facts.orders.get(cached) if cached is not None else None
    if known is not None:
        return list(known)
    specs = parse_order_by(facts.model, order_by)
    descending = specs[0].descending if specs else False
    named = {spec.name for spec in specs}
    specs += [OrderSpec(key, descending) for key in facts.pk if key not in named]
    if cached is not None and len(facts.orders) < MAX_SHAPES:
        facts.orders[cached] = tuple(specs)  # a checked string, parsed once
    return specs
