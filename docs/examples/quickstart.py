import asyncio

from sqlmodel import Field

from dotmac_core import Database, TenantBaseModel, tenant_scope


class Customer(TenantBaseModel, table=True):
    name: str = Field(max_length=100)


async def main() -> None:
    async with Database("sqlite+aiosqlite:///quickstart.db") as db:
        await db.create_all()
        with tenant_scope("acme", user_id="alice"):
            customer = Customer(name="Ada")  # tenant_id comes from the context
            async with db.session() as session:
                session.add(customer)
                await session.commit()
        print(customer.__tablename__, customer.tenant_id, customer.created_at)


if __name__ == "__main__":
    asyncio.run(main())
