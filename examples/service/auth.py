"""A resolver taking the tenant from a verified token's claims."""

from dotmac_core import AuthenticationError, TenantContext

from .app import create_app


# --8<-- [start:resolver]
async def tenant_from_token(scope: dict) -> TenantContext | None:
    """Read the bearer token of the request and return its tenant and user."""
    headers = dict(scope["headers"])
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if not authorization.startswith("Bearer "):
        return None  # no tenant: 400
    claims = await verify(authorization.removeprefix("Bearer "))
    return TenantContext(claims["tenant"], user_id=claims["sub"], roles=claims["roles"])


async def verify(token: str) -> dict:
    """Check the token's signature and expiry; here, a table of known tokens."""
    try:
        return KNOWN_TOKENS[token]
    except KeyError:
        msg = "invalid or expired token"
        raise AuthenticationError(msg) from None  # 401


app = create_app(resolver=tenant_from_token)
# --8<-- [end:resolver]

KNOWN_TOKENS = {
    "token-a": {"tenant": "tenant-a", "sub": "alice", "roles": ["admin"]},
    "token-b": {"tenant": "tenant-b", "sub": "bob", "roles": []},
}
