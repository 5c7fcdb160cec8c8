"""Key layout: keyspaces, reserved names, and injective encodings.

Every stored key is `<keyspace prefix><user key>`. The root keyspace's prefix
is `CacheConfig.key_prefix`; namespaces and tenants are child keyspaces:

```
dotmac:user:1                         plain key "user:1"
dotmac:#ns:users                      generation of namespace "users"
dotmac:#ns:users:user:1               "user:1" in namespace "users"
dotmac:#tenant:{acme}                 generation of tenant "acme"
dotmac:#tenant:{acme}:user:1          "user:1" for tenant "acme"
dotmac:#lock:user:1                   cross-process lock for "user:1"
```

Names that start with `#` are the cache's own; a user key that starts with
`#` is stored with one more `#` (`"#x"` -> `"##x"`), so user keys can never
reach them. Namespace and tenant names are percent-encoded (only
`A-Za-z0-9_.-~` stay as they are), so `:`, `{`, `}` and spaces cannot split a
name or hijack the Redis Cluster hash tag: the `{...}` around the tenant puts
all of one tenant's keys, generation included, in one cluster slot.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic_core import PydanticSerializationError, to_json

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

#: Longest argument encoding kept verbatim in a default key; longer ones are hashed.
_MAX_VERBATIM = 200
_FIELD_ROOT = re.compile(r"[.\[]")
_EMPTY = inspect.Parameter.empty


def encode_name(name: str) -> str:
    """Percent-encode a namespace or tenant name; injective, tag- and `:`-safe."""
    return quote(name, safe="")


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Where a group of keys lives and which generations its entries must carry."""

    prefix: str
    """Prepended to every user key."""
    generations: tuple[str, ...] = ()
    """Generation keys; an entry is valid only while their tokens are unchanged."""

    def key(self, user_key: str) -> str:
        """Return the stored key for `user_key` (a leading `#` is doubled)."""
        if user_key.startswith("#"):
            return f"{self.prefix}#{user_key}"
        return self.prefix + user_key

    def lock_key(self, user_key: str) -> str:
        """Return the key of the cross-process lock guarding `user_key`."""
        return f"{self.prefix}#lock:{user_key}"

    def namespace(self, name: str) -> Keyspace:
        """Return the child keyspace of namespace `name`."""
        generation = f"{self.prefix}#ns:{encode_name(name)}"
        return Keyspace(f"{generation}:", (*self.generations, generation))

    def tenant(self, tenant_id: str) -> Keyspace:
        """Return the child keyspace of a tenant, hash-tagged to one cluster slot."""
        generation = f"{self.prefix}#tenant:{{{encode_name(tenant_id)}}}"
        return Keyspace(f"{generation}:", (*self.generations, generation))


# --- call arguments ------------------------------------------------------------


class ArgumentBinder:
    """Map call arguments to parameter values, fast for plain signatures.

    For signatures without positional-only or variadic parameters, this is a
    few dict operations; anything else (and every malformed call) goes through
    `inspect.Signature.bind`, which raises the same `TypeError` a call would.
    """

    __slots__ = ("_defaults", "_names", "_positional", "_signature", "_simple")

    def __init__(self, signature: inspect.Signature) -> None:
        params = list(signature.parameters.values())
        self._signature = signature
        self._names = tuple(p.name for p in params)
        self._defaults = tuple(p.default for p in params)
        self._positional = sum(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params
        )
        self._simple = all(
            p.kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            for p in params
        )

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Return every parameter's value (defaults applied), in signature order."""
        if self._simple and len(args) <= self._positional:
            values = dict(zip(self._names, args, strict=False))
            used = 0
            for index in range(len(args), len(self._names)):
                name = self._names[index]
                if name in kwargs:
                    values[name] = kwargs[name]
                    used += 1
                elif self._defaults[index] is not _EMPTY:
                    values[name] = self._defaults[index]
                else:
                    break
            else:
                if used == len(kwargs):
                    return values
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments


def template_fields(template: str, signature: inspect.Signature) -> frozenset[str]:
    """Return the parameter names `template` uses; reject anything else.

    Raises:
        ConfigurationError: the template is malformed, uses positional fields
            (`{}` or `{0}`), or names a parameter the function does not have.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        msg = f"invalid cache key template {template!r}: {exc}"
        raise ConfigurationError(msg, field="key") from exc
    roots: set[str] = set()
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = _FIELD_ROOT.split(field, maxsplit=1)[0]
        if not root or root.isdigit():
            msg = f"cache key template {template!r} must name arguments, not {{}}"
            raise ConfigurationError(msg, field="key")
        if root not in signature.parameters:
            msg = (
                f"cache key template {template!r} names {root!r}, which is not an "
                f"argument of the function ({', '.join(signature.parameters)})"
            )
            raise ConfigurationError(msg, field="key")
        roots.add(root)
    return frozenset(roots)


# --- default keys ----------------------------------------------------------------


def _encode_argument(value: Any) -> str:
    """Encode one argument so that values of different types never collide."""
    kind = type(value)
    if kind is str:
        return to_json(value).decode()
    if kind is int or kind is float or kind is bool or value is None:
        return repr(value)
    if kind is list or kind is tuple:
        inner = ",".join(_encode_argument(item) for item in value)
        return f"[{inner}]" if kind is list else f"({inner})"
    if kind is dict:
        items = sorted(
            f"{_encode_argument(k)}:{_encode_argument(v)}" for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if kind is set or kind is frozenset:
        return f"{kind.__name__}{{{','.join(sorted(map(_encode_argument, value)))}}}"
    try:
        body = to_json(value, by_alias=True).decode()
    except PydanticSerializationError as exc:
        msg = (
            f"cannot build a default cache key from an argument of type "
            f"{kind.__qualname__}; give @cached a key template"
        )
        raise ConfigurationError(msg, field="key") from exc
    return f"{kind.__module__}.{kind.__qualname__}({body})"


def default_key(qualname: str, values: Mapping[str, Any], skip: int) -> str:
    """Build the default key: qualified name, then every argument, type-tagged.

    Args:
        qualname: `module.qualname` of the function.
        values: Parameter values in signature order (defaults applied).
        skip: How many leading parameters to leave out (1 for `self` / `cls`).
    """
    encoded = ",".join(_encode_argument(v) for v in list(values.values())[skip:])
    if len(encoded) > _MAX_VERBATIM:
        digest = hashlib.sha256(encoded.encode()).hexdigest()
        return f"{qualname}:sha256={digest}"
    return f"{qualname}:({encoded})"


def key_function(
    func: Callable[..., Any], template: str | None
) -> Callable[[tuple[Any, ...], Mapping[str, Any]], str]:
    """Return `(args, kwargs) -> user key` for `func`, checked at decoration time.

    With a template, the key is `template.format(**arguments)`: exactly what an
    f-string with the same text gives, so `cache.delete(f"user:{user_id}")`
    removes what `@cached(key="user:{user_id}")` stored. Without one, the key
    is the qualified name and every argument except a leading `self` / `cls`.
    """
    signature = inspect.signature(func)
    binder = ArgumentBinder(signature)
    if template is not None:
        template_fields(template, signature)
        render = template.format_map

        def from_template(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
            return render(binder.bind(args, kwargs))

        return from_template

    qualname = f"{func.__module__}.{func.__qualname__}"
    names = list(signature.parameters)
    skip = 1 if names and names[0] in ("self", "cls") else 0

    def from_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        return default_key(qualname, binder.bind(args, kwargs), skip)

    return from_arguments
