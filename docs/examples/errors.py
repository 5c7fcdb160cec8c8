import asyncio
import json

from sqlalchemy.exc import IntegrityError
from sqlmodel import Field

from dotmac_core import (
    AlreadyExistsError,
    Database,
    DBBaseModel,
    IntegrityConstraintError,
    translate_errors,
)


class ErrorsAccount(DBBaseModel, table=True):
    """An account whose email is unique; its table is `errors_account`."""

    email: str = Field(max_length=255, unique=True)


async def main() -> None:
    """Insert the same email twice and catch the translated error."""
    async with Database("sqlite+aiosqlite://") as db:
        await db.create_all()
        async with db.session() as session:
            session.add(ErrorsAccount(email="ada@example.com"))
            await session.commit()

        caught: AlreadyExistsError | None = None
        async with db.session() as session:
            session.add(ErrorsAccount(email="ada@example.com"))
            try:
                with translate_errors():
                    await session.commit()
            except AlreadyExistsError as exc:
                caught = exc

    assert caught is not None
    # The driver error is kept as the cause; no message parsing is needed.
    assert isinstance(caught.__cause__, IntegrityError)
    assert isinstance(caught, IntegrityConstraintError)
    assert caught.http_status == 409
    assert not caught.transient
    # SQLite reports the columns; PostgreSQL reports the constraint's name.
    assert caught.constraint == "errors_account.email"
    body = caught.to_dict()
    assert body == {
        "error": "already_exists",
        "message": "a row with the same unique key already exists",
        "details": {"constraint": "errors_account.email"},
    }
    print(f"{type(caught).__name__} -> HTTP {caught.http_status}")
    print(json.dumps(body))


if __name__ == "__main__":
    asyncio.run(main())
