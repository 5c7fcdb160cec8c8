import asyncio
import tempfile
import uuid
from pathlib import Path

from sqlmodel import Field

from dotmac_core import (
    AsyncRepository,
    BusinessRuleError,
    Database,
    NotFoundError,
    TenantBaseModel,
    TransactionManager,
    configure_database,
    current_transaction,
    tenant_scope,
)


# --8<-- [start:models]
class TransferAccount(TenantBaseModel, table=True):
    """An account of one tenant; its table is `transfer_account`."""

    owner: str = Field(max_length=100)
    balance_cents: int = Field(default=0, ge=0)


class TransferLog(TenantBaseModel, table=True):
    """One row per completed transfer; its table is `transfer_log`."""

    source_id: uuid.UUID = Field(foreign_key="transfer_account.id")
    target_id: uuid.UUID = Field(foreign_key="transfer_account.id")
    amount_cents: int = Field(gt=0)


class TransferAccountRepository(AsyncRepository[TransferAccount]):
    """Accounts of the current tenant."""


class TransferLogRepository(AsyncRepository[TransferLog]):
    """Completed transfers of the current tenant."""


# --8<-- [end:models]

# Receipts "sent" after a commit; a real service would send an email here.
RECEIPTS: list[str] = []


# --8<-- [start:transfer]
async def debit_account(account_id: uuid.UUID, amount_cents: int) -> None:
    accounts = TransferAccountRepository()
    account = await accounts.get_one(id=account_id)  # NotFoundError if not ours
    if account.balance_cents < amount_cents:
        msg = "insufficient balance"
        raise BusinessRuleError(msg, code="insufficient_balance")
    new_balance = account.balance_cents - amount_cents
    await accounts.update(account.id, {"balance_cents": new_balance})


async def credit_account(account_id: uuid.UUID, amount_cents: int) -> None:
    accounts = TransferAccountRepository()
    account = await accounts.get_one(id=account_id)
    new_balance = account.balance_cents + amount_cents
    await accounts.update(account.id, {"balance_cents": new_balance})


async def log_transfer(
    source_id: uuid.UUID, target_id: uuid.UUID, amount_cents: int
) -> None:
    await TransferLogRepository().create(
        {"source_id": source_id, "target_id": target_id, "amount_cents": amount_cents}
    )


async def transfer_funds(
    source_id: uuid.UUID, target_id: uuid.UUID, amount_cents: int
) -> None:
    """Move money between two accounts of the current tenant: all or nothing."""
    async with TransactionManager() as tx:
        # The repositories in the helpers join this transaction on their own.
        await debit_account(source_id, amount_cents)
        await credit_account(target_id, amount_cents)
        await log_transfer(source_id, target_id, amount_cents)
        # Runs only once the transfer is committed.
        tx.on_commit(lambda: RECEIPTS.append(f"{amount_cents} moved"))


# --8<-- [end:transfer]


# --8<-- [start:accounts]
async def open_accounts() -> tuple[TransferAccount, TransferAccount, TransferAccount]:
    """Create accounts for two tenants and show that each sees only its own."""
    accounts = TransferAccountRepository()
    with tenant_scope("acme", user_id="alice"):
        ada = await accounts.create({"owner": "Ada", "balance_cents": 10_000})
        bob, _ = await accounts.create_many(
            [{"owner": "Bob", "balance_cents": 5_000}, {"owner": "Cy"}]
        )
        page = await accounts.list_paginated(page=1, size=2, order_by="owner")
        assert [account.owner for account in page.items] == ["Ada", "Bob"]
        assert (page.total, page.pages, page.has_next) == (3, 2, True)

    with tenant_scope("globex", user_id="gus"):
        gus = await accounts.create({"owner": "Gus", "balance_cents": 700})
        page = await accounts.list_paginated()
        assert [account.owner for account in page.items] == ["Gus"]
        # acme's rows do not exist for globex, not even by primary key.
        assert await accounts.get_by_id(ada.id) is None
        assert await accounts.count() == 1
    return ada, bob, gus


# --8<-- [end:accounts]


async def balances(*rows: TransferAccount) -> list[int]:
    accounts = TransferAccountRepository()
    return [(await accounts.get_one(id=row.id)).balance_cents for row in rows]


async def run_transfers(
    ada: TransferAccount, bob: TransferAccount, gus: TransferAccount
) -> None:
    # --8<-- [start:run]
    with tenant_scope("acme", user_id="alice"):
        await transfer_funds(ada.id, bob.id, 2_500)
        assert await balances(ada, bob) == [7_500, 7_500]
        assert RECEIPTS == ["2500 moved"]

        # Two transfers at once: each task runs its own transaction.
        await asyncio.gather(
            transfer_funds(ada.id, bob.id, 300),
            transfer_funds(bob.id, ada.id, 100),
        )
        assert await balances(ada, bob) == [7_300, 7_700]
        assert await TransferLogRepository().count() == 3
        print(f"acme balances after three transfers: {await balances(ada, bob)}")

    with tenant_scope("globex", user_id="gus"):
        # The debit succeeds, then the credit cannot find acme's account:
        # the whole transaction is rolled back, the debit included.
        try:
            await transfer_funds(gus.id, ada.id, 500)
        except NotFoundError as exc:
            print(f"globex -> acme refused: {exc.message}")
        else:
            msg = "a transfer to another tenant's account went through"
            raise AssertionError(msg)
        assert await balances(gus) == [700]
        assert await TransferLogRepository().count() == 0
    assert len(RECEIPTS) == 3  # no receipt for the rolled-back transfer
    assert current_transaction() is None
    # --8<-- [end:run]


async def main() -> None:
    """Run the example on a fresh SQLite file."""
    with tempfile.TemporaryDirectory(prefix="dotmac-transfer-") as workdir:
        # A file, not ":memory:": an in-memory SQLite database is a single
        # shared connection and cannot run two transactions at once.
        url = f"sqlite+aiosqlite:///{Path(workdir) / 'transfer.db'}"
        async with Database(url) as db:
            configure_database(db)
            await db.create_all()
            ada, bob, gus = await open_accounts()
            await run_transfers(ada, bob, gus)
    print("transfer example: all checks passed")


if __name__ == "__main__":
    asyncio.run(main())
