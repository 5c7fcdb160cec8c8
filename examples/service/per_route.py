"""The same service with the tenant set per route by an async dependency."""

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI

from dotmac_core import TenantContext, install_exception_handlers, tenant_dependency

from .app import lifespan, router

# --8<-- [start:dependency]
#: The tenant of the request, set for the route by an `async def` dependency.
CurrentTenant = Annotated[TenantContext, Depends(tenant_dependency())]

me = APIRouter()


@me.get("/me")
async def whoami(context: CurrentTenant) -> dict[str, str | None]:
    """Who the request acts for."""
    return {"tenant": context.tenant_id, "user": context.user_id}


def create_app() -> FastAPI:
    """Build the app: every route runs in the tenant the dependency reads."""
    app = FastAPI(
        title="Projects", lifespan=lifespan, dependencies=[Depends(tenant_dependency())]
    )
    install_exception_handlers(app)
    app.include_router(router)
    app.include_router(me)
    return app


# --8<-- [end:dependency]


app = create_app()
