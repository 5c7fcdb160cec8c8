"""Input checks for repository writes (private).

SQLModel table classes skip pydantic validation when constructed, so the
repository validates every write against the model's fields before any SQL:
types, `max_length`, nullability and unknown keys, the same on SQLite (which
would store an over-long string) as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from sqlmodel import SQLModel

from ..exceptions import DotMacError, TenantError, ValidationError
from ..tenancy import current_user_id
from ._rows import batch_allocation
from ._types import utc_now, uuid7, uuid7_batch
from .models import stamp_tenant

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


def validated_values(model: type[Any], data: object) -> dict[str, Any]:
    """Validate `data` for `model`; return every field's value, defaults filled in."""
    if isinstance(data, model):
        data = data.model_dump()
    check_keys(model, data)
    try:
        return dict(input_model(model).model_validate(data).__dict__)
    except pydantic.ValidationError as exc:
        raise invalid(model, exc) from exc


_LIST_ADAPTERS: dict[type[Any], pydantic.TypeAdapter[list[Any]]] = {}


def validated_rows(model: type[Any], items: Iterable[object]) -> list[dict[str, Any]]:
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
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        schema: Any = list[input_model(model)]  # type: ignore[misc]
        adapter = _LIST_ADAPTERS[model] = pydantic.TypeAdapter(schema)
    with batch_allocation():
        try:
            checked = adapter.validate_python(data)
        except pydantic.ValidationError:
            return [validated_values(model, item) for item in given]
        return [dict(row.__dict__) for row in checked]


#: Default factories whose value depends on the call, not the row: the clock,
#: the acting user, the current tenant. A batch evaluates them once, so its
#: rows share one timestamp, as rows written by one statement share `now()`.
_PER_CALL_FACTORIES = frozenset({utc_now, current_user_id, stamp_tenant})


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


def validated_changes(model: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a partial update: known, changeable fields with valid values."""
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
    return changes
