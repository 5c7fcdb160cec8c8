"""The current tenant, carried in a context variable.

A context variable follows the code that set it: `asyncio` and anyio tasks
started afterwards inherit it (a copy taken when the task is created), and so
do `asyncio.to_thread` and `anyio.to_thread.run_sync`. A bare
`loop.run_in_executor` or `ThreadPoolExecutor.submit` does **not** copy it;
wrap the callable with `contextvars.copy_context().run` there (see the
tenancy docs page).
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import TenantError, ValidationError

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Iterator

__all__ = [
    "TenantContext",
    "TenantToken",
    "current_user_id",
    "get_current_tenant",
    "get_tenant_context",
    "is_scoping_bypassed",
    "require_current_tenant",
    "reset_current_tenant",
    "set_current_tenant",
    "tenant_scope",
]

#: Longest tenant id accepted; it matches the `tenant_id` column's length.
MAX_TENANT_ID_LENGTH = 64


def _check_id(value: object, name: str) -> str:
    """Return `value` as a plain `str` if it is a valid tenant or user id.

    A `str` subclass (a `StrEnum` member, say) is accepted and stored as the
    plain string it holds, so no subclass's `__eq__` or `__str__` reaches the
    tenant checks or the SQL.
    """
    if not isinstance(value, str):
        msg = f"{name} must be a str, got {type(value).__name__}"
        raise ValidationError(msg, field=name)
    text = str.__str__(value)
    problem = None
    if not text or text != text.strip():
        problem = "must be non-empty, without surrounding whitespace"
    elif len(text) > MAX_TENANT_ID_LENGTH:
        problem = f"is longer than {MAX_TENANT_ID_LENGTH} characters"
    elif not _encodes(text):
        problem = "holds a lone surrogate (not valid Unicode)"
    elif not text.isprintable():
        problem = (
            "may hold printable characters only (no NUL, newline, tab or other "
            "control, format or separator characters besides the space)"
        )
    if problem is not None:
        msg = f"{name} {problem}"
        raise ValidationError(msg, field=name)
    return text


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TenantContext:
    """Who is acting: the tenant, optionally the user and their roles (immutable).

    Args:
        tenant_id: Tenant identifier, 1..64 characters.
        user_id: Acting user, recorded in `created_by` / `updated_by`.
        roles: Role names; any iterable of strings, stored as a tuple.
    """

    tenant_id: str
    user_id: str | None = None
    roles: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_id", _check_id(self.tenant_id, "tenant_id"))
        if self.user_id is not None:
            object.__setattr__(self, "user_id", _check_id(self.user_id, "user_id"))
        roles: Iterable[Any] = self.roles
        if isinstance(roles, str):
            msg = "roles must be a collection of role names, not a single str"
            raise ValidationError(msg, field="roles")
        try:
            as_tuple = tuple(roles)
        except TypeError:
            msg = f"roles must be a collection of str, got {type(roles).__name__}"
            raise ValidationError(msg, field="roles") from None
        for role in as_tuple:
            if not isinstance(role, str):
                msg = f"each role must be a str, got {type(role).__name__}"
                raise ValidationError(msg, field="roles")
        object.__setattr__(self, "roles", as_tuple)

    def has_role(self, role: str) -> bool:
        """Return whether `role` is one of this context's roles."""
        return role in self.roles


_CONTEXT: contextvars.ContextVar[TenantContext | None] = contextvars.ContextVar(
    "dotmac_core_tenant", default=None
)
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dotmac_core_tenant_bypass", default=False
)
logger = logging.getLogger("dotmac_core.tenancy")


class TenantToken:
    """Handle returned by `set_current_tenant`; give it to `reset_current_tenant`.

    Awaiting it is allowed and does nothing, so code written as
    `await set_current_tenant(...)` keeps working.
    """

    __slots__ = ("_token",)

    def __init__(self, token: contextvars.Token[TenantContext | None]) -> None:
        self._token = token

    def __await__(self) -> Generator[None, None, TenantToken]:
        return _ready(self).__await__()


async def _ready(token: TenantToken) -> TenantToken:
    return token


def _as_context(
    tenant: str | TenantContext, user_id: str | None, roles: Iterable[str]
) -> TenantContext:
    if isinstance(tenant, TenantContext):
        if user_id is not None or _any_role(roles):
            msg = "pass user_id and roles inside the TenantContext, not beside it"
            raise ValidationError(msg, field="user_id")
        return tenant
    return TenantContext(tenant, user_id, tuple(roles))


def _any_role(roles: Iterable[str]) -> bool:
    try:
        return bool(tuple(roles))
    except TypeError:
        msg = f"roles must be a collection of str, got {type(roles).__name__}"
        raise ValidationError(msg, field="roles") from None


def set_current_tenant(
    tenant: str | TenantContext,
    *,
    user_id: str | None = None,
    roles: Iterable[str] = (),
) -> TenantToken:
    """Make `tenant` current in this context and return a token to undo it.

    Prefer `tenant_scope()`, which resets for you; use this pair where setting
    and resetting happen in different callbacks (middleware).

    Raises:
        ValidationError: the tenant or user id is not a str, is empty, padded
            with whitespace, longer than 64 characters, or holds a control
            character (NUL included) or a lone surrogate.
    """
    return TenantToken(_CONTEXT.set(_as_context(tenant, user_id, roles)))


def reset_current_tenant(token: TenantToken) -> None:
    """Restore the tenant that was current before `set_current_tenant`."""
    _CONTEXT.reset(token._token)


@contextmanager
def tenant_scope(
    tenant: str | TenantContext | None,
    *,
    user_id: str | None = None,
    roles: Iterable[str] = (),
    bypass: bool = False,
    reason: str | None = None,
) -> Iterator[TenantContext | None]:
    """Run the block with `tenant` current (`None`: with no tenant), then restore.

    Works in sync and async code (`with tenant_scope("acme"): await ...`).
    `tenant_scope(None, bypass=True, reason="nightly billing")` turns tenant
    scoping off for admin jobs: queries see every tenant's rows and writes
    must name their tenant. Each bypass is logged at WARNING with its reason.

    Raises:
        ValidationError: `bypass=True` with a tenant, `user_id` or `roles`
            without one, or an invalid tenant or user id.
    """
    if bypass and tenant is not None:
        msg = "bypass=True turns tenant scoping off: pass tenant None with it"
        raise ValidationError(msg, field="bypass")
    if tenant is None and (user_id is not None or _any_role(roles)):
        msg = "user_id and roles belong to a tenant: pass a tenant with them"
        raise ValidationError(msg, field="user_id")
    context = None if tenant is None else _as_context(tenant, user_id, roles)
    if bypass:
        logger.warning("tenant scoping bypassed: %s", reason or "no reason given")
    token = _CONTEXT.set(context)
    bypass_token = _BYPASS.set(bypass)
    try:
        yield context
    finally:
        _BYPASS.reset(bypass_token)
        _CONTEXT.reset(token)


def is_scoping_bypassed() -> bool:
    """Return whether tenant scoping is off here (`tenant_scope(None, bypass=True)`)."""
    return _BYPASS.get()


def get_tenant_context() -> TenantContext | None:
    """Return the current `TenantContext`, or `None` when no tenant is set."""
    return _CONTEXT.get()


def get_current_tenant() -> str | None:
    """Return the current tenant id, or `None` when no tenant is set."""
    context = _CONTEXT.get()
    return None if context is None else context.tenant_id


def require_current_tenant() -> str:
    """Return the current tenant id.

    Raises:
        TenantError: no tenant is set in this context.
    """
    context = _CONTEXT.get()
    if context is None:
        msg = "no tenant is set: use tenant_scope() or set_current_tenant() first"
        raise TenantError(msg)
    return context.tenant_id


def current_user_id() -> str | None:
    """Return the acting user's id from the tenant context, if any."""
    context = _CONTEXT.get()
    return None if context is None else context.user_id
