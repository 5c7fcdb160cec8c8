"""FastAPI and ASGI: the tenant of each request, and errors as problem details.

```python
app = FastAPI()
install_exception_handlers(app)           # DotMacError -> application/problem+json
app.add_middleware(TenantMiddleware)      # X-Tenant-ID -> tenant_scope() per request
```

`TenantMiddleware` is plain ASGI (no Starlette `BaseHTTPMiddleware`): it reads
the tenant before the app runs, answers 400 when there is none or it is
malformed, and runs the whole app call, streamed body and background tasks
included, inside `tenant_scope()`. `tenant_dependency()` does the same per
route, as an `async def` generator dependency.

Why the dependency must be `async def`: FastAPI runs a plain `def` generator
dependency's code before and after `yield` in worker threads, each in its own
copy of the context, so the tenant it sets never reaches the endpoint and
resetting it fails (`ValueError: <Token ...> was created in a different
Context`). An async generator runs in the request's own task and context.

Importing this module imports neither FastAPI nor Starlette: they are imported
when a dependency or the exception handlers are made (the `asgi` extra).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeAlias

from .config import SecurityConfig
from .exceptions import (
    ConfigurationError,
    DotMacError,
    RateLimitExceededError,
    TenantError,
    ValidationError,
    translate_error,
)
from .guards import require_fastapi
from .tenancy import TenantContext, tenant_scope

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette

__all__ = [
    "DEFAULT_EXEMPT_PATHS",
    "PROBLEM_JSON",
    "TenantMiddleware",
    "install_exception_handlers",
    "problem_details",
    "tenant_dependency",
    "tenant_from_header",
    "tenant_from_subdomain",
]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
#: What a resolver finds: a tenant id, a full context, or `None` (no tenant).
Found: TypeAlias = str | TenantContext | None
#: Reads the tenant from an ASGI scope; sync or async.
TenantResolver: TypeAlias = Callable[[Scope], Found | Awaitable[Found]]

#: FastAPI's documentation and schema routes: they run without a tenant.
DEFAULT_EXEMPT_PATHS = frozenset(
    {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
#: The media type of RFC 9457 problem details.
PROBLEM_JSON = "application/problem+json"

logger = logging.getLogger("dotmac_core.asgi")


class _TenantRequestError(ValidationError):
    """The request names no tenant, or a malformed one: the client's fault (400)."""

    default_code = "invalid_tenant"
    http_status = 400


# --- resolvers ----------------------------------------------------------------


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def _one_header(scope: Scope, name: str, field: str) -> str | None:
    """The value of the header `name`, or `None`; twice or not UTF-8 is refused."""
    values = _header_values(scope, name.lower().encode("latin-1"))
    if not values:
        return None
    if len(values) > 1:
        msg = f"the request has {len(values)} {name} headers; send one"
        raise ValidationError(msg, field=field)
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        msg = f"the {name} header is not UTF-8 text"
        raise ValidationError(msg, field=field) from None


def _header_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or not value.isascii():
        msg = f"{what} must be a non-empty ASCII header name, got {value!r}"
        raise ConfigurationError(msg, field=what)
    return value


def tenant_from_header(
    header: str | None = None,
    *,
    user_header: str | None = None,
    security: SecurityConfig | None = None,
) -> TenantResolver:
    """Return a resolver reading the tenant (and user) from request headers.

    The names default to `SecurityConfig.tenant_header` and `.user_header`
    (`X-Tenant-ID`, `X-User-ID`). Values are read as UTF-8; a header sent
    twice is refused rather than guessed at.

    Raises:
        ConfigurationError: a header name is empty or not ASCII.
    """
    if header is None or user_header is None:
        config = security or SecurityConfig()
        header = config.tenant_header if header is None else header
        user_header = config.user_header if user_header is None else user_header
    tenant_name = _header_name(header, "header")
    user_name = _header_name(user_header, "user_header")

    def resolve(scope: Scope) -> TenantContext:
        tenant = _one_header(scope, tenant_name, "tenant_id")
        if tenant is None:
            msg = f"the request has no {tenant_name} header"
            raise TenantError(msg)
        return TenantContext(tenant, _one_header(scope, user_name, "user_id"))

    return resolve


def tenant_from_subdomain(domain: str) -> TenantResolver:
    """Return a resolver taking the tenant from the host: `acme.example.com` -> `acme`.

    Host names are case-insensitive, so the tenant is lower-cased; a port is
    ignored. A host that is not one label under `domain` names no tenant.

    Raises:
        ConfigurationError: `domain` is not a host name.
    """
    if not isinstance(domain, str) or not domain.strip("."):
        msg = f"domain must be a host name such as 'example.com', got {domain!r}"
        raise ConfigurationError(msg, field="domain")
    suffix = "." + domain.strip(".").lower()

    def resolve(scope: Scope) -> str:
        host = (_one_header(scope, "Host", "host") or "").lower()
        name, _, port = host.rpartition(":")
        if not port.isdigit():
            name = host
        label = name.removesuffix(suffix)
        if label == name or not label:
            msg = f"the host {host!r} names no tenant: expected <tenant>{suffix}"
            raise TenantError(msg)
        if "." in label:
            msg = f"the host {host!r} is more than one label under {suffix[1:]}"
            raise ValidationError(msg, field="tenant_id")
        return label

    return resolve


async def _find(resolver: TenantResolver, scope: Scope) -> TenantContext:
    """Run `resolver`; refuse `None` with `TenantError`."""
    found = resolver(scope)
    if inspect.isawaitable(found):
        found = await found
    if found is None:
        msg = "the request names no tenant"
        raise TenantError(msg)
    return found if isinstance(found, TenantContext) else TenantContext(found)


async def _resolve(resolver: TenantResolver, scope: Scope) -> TenantContext:
    """Run `resolver` and check what it found.

    Raises:
        _TenantRequestError: no tenant, or an invalid tenant or user id (400).
        DotMacError: anything else the resolver raised (a bad token: 401).
    """
    try:
        return await _find(resolver, scope)
    except ConfigurationError:
        raise  # the service's own fault: a 500, not the client's
    except TenantError as exc:
        raise _TenantRequestError(
            exc.message, field="tenant_id", code="tenant_required"
        ) from exc
    except ValidationError as exc:
        raise _TenantRequestError(exc.message, field=exc.field or "tenant_id") from exc


# --- problem details ----------------------------------------------------------


def problem_details(error: DotMacError) -> dict[str, Any]:
    """Return the RFC 9457 problem details of `error`, safe to send to a client.

    `type` is `about:blank` and `title` the status phrase; `code` is the
    error's code. For a 4xx error, `detail` is its message and `details` its
    details; for a 5xx error both are withheld (they may describe the
    database or a dependency) and `detail` only says the request failed.
    """
    status = error.http_status if 400 <= error.http_status <= 599 else 500
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Client Error" if status < 500 else "Server Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if status >= 500:
        body["detail"] = "The server could not complete the request."
        body["code"] = error.code
    else:
        body["detail"] = error.message or title
        body["code"] = error.code
        body["details"] = error.details
    return body


def _problem(error: DotMacError) -> tuple[int, dict[str, str], bytes]:
    """Status, extra headers and body of the problem response for `error`."""
    body = problem_details(error)
    status: int = body["status"]
    if status >= 500:
        logger.error(
            "%s answered %d: %s", type(error).__name__, status, error, exc_info=error
        )
    headers = {}
    if isinstance(error, RateLimitExceededError) and error.retry_after is not None:
        headers["retry-after"] = str(max(0, math.ceil(error.retry_after)))
    return status, headers, json.dumps(body, default=str).encode()


def install_exception_handlers(app: Starlette) -> None:
    """Answer every `DotMacError` with its status as `application/problem+json`.

    Uncaught SQLAlchemy errors are translated first (`translate_errors()`),
    so a raw `IntegrityError` answers 409, not 500. FastAPI's own request
    validation errors keep FastAPI's handler and body.
    """
    require_fastapi()
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.responses import Response

    async def problem_response(_request: object, exc: Exception) -> Response:
        error = translate_error(exc)
        if not isinstance(error, DotMacError):  # pragma: no cover - registered types
            raise exc
        status, headers, payload = _problem(error)
        return Response(
            payload, status_code=status, headers=headers, media_type=PROBLEM_JSON
        )

    app.add_exception_handler(DotMacError, problem_response)
    app.add_exception_handler(SQLAlchemyError, problem_response)


# --- middleware ---------------------------------------------------------------


class TenantMiddleware:
    """Pure ASGI middleware running each HTTP and WebSocket request in its tenant.

    Args:
        app: The ASGI application to wrap.
        resolver: Finds the tenant in the ASGI scope (sync or async); defaults
            to `tenant_from_header()`. It returns a tenant id, a
            `TenantContext` or `None`; a `DotMacError` it raises (say
            `AuthenticationError` for a bad token) is answered with its status.
        exempt_paths: Paths served without a tenant: exact paths, or prefixes
            ending in `*` (`"/static/*"`). FastAPI's docs routes by default.

    Raises:
        ConfigurationError: an exempt path does not start with `/`.
    """

    def __init__(
        self,
        app: ASGIApp,
        resolver: TenantResolver | None = None,
        *,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
    ) -> None:
        self.app = app
        self.resolver: TenantResolver = (
            resolver if resolver is not None else tenant_from_header()
        )
        paths = [exempt_paths] if isinstance(exempt_paths, str) else list(exempt_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                msg = f"exempt paths start with '/', got {path!r}"
                raise ConfigurationError(msg, field="exempt_paths")
        self._exact = frozenset(p for p in paths if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))

    def is_exempt(self, scope: Scope) -> bool:
        """Return whether the request's path is served without a tenant.

        The path is matched as sent and without the app's `root_path` (the
        prefix a proxy or a mount adds).
        """
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        candidates = [path]
        if root and path.startswith(root):
            candidates.append(path[len(root) :] or "/")
        return any(p in self._exact or p.startswith(self._prefixes) for p in candidates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: HTTP and WebSocket ones in their tenant."""
        if scope["type"] not in ("http", "websocket") or self.is_exempt(scope):
            await self.app(scope, receive, send)  # lifespan: passed through
            return
        try:
            context = await _resolve(self.resolver, scope)
        except DotMacError as exc:
            await _refuse(scope, receive, send, exc)
            return
        # The token is set and reset in this one task: the app call, its
        # streamed body and background tasks all run inside.
        with tenant_scope(context):
            await self.app(scope, receive, send)


async def _refuse(
    scope: Scope, receive: Receive, send: Send, error: DotMacError
) -> None:
    """Answer `error` as a problem response without running the app."""
    status, extra, payload = _problem(error)
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(payload)).encode()),
        *((name.encode(), value.encode()) for name, value in extra.items()),
    ]
    if scope["type"] == "http":
        await send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": payload})
        return
    # WebSocket: the handshake is refused. With the denial-response extension
    # the client gets the same problem response; otherwise a close before
    # accept, which the server turns into HTTP 403.
    message = await receive()
    if message.get("type") != "websocket.connect":
        return  # the client left first
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": payload})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": error.code[:120]})


# --- dependency ---------------------------------------------------------------


def tenant_dependency(
    resolver: TenantResolver | None = None,
) -> Callable[..., AsyncIterator[TenantContext]]:
    """Return an `async def` FastAPI dependency running the route in its tenant.

    `Depends(tenant_dependency())` resolves the tenant as `TenantMiddleware`
    does (`tenant_from_header()` by default), enters `tenant_scope()` and
    yields the `TenantContext`. A request without a valid tenant raises a
    `ValidationError` that `install_exception_handlers` answers with 400.

    Raises:
        MissingDependencyError: FastAPI is not installed (the `asgi` extra).
    """
    require_fastapi()
    from starlette.requests import HTTPConnection

    resolve = resolver if resolver is not None else tenant_from_header()

    async def current_tenant(
        connection: HTTPConnection,
    ) -> AsyncIterator[TenantContext]:
        context = await _resolve(resolve, connection.scope)
        with tenant_scope(context):
            yield context

    # FastAPI reads the signature to inject the connection; give it the real
    # class (this module's annotations are strings it could not resolve).
    parameter = inspect.Parameter(
        "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
    )
    current_tenant.__signature__ = inspect.Signature([parameter])  # type: ignore[attr-defined]
    return current_tenant
