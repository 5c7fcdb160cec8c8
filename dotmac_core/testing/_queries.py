"""`QueryCounter`: count the SQL statements a block runs, to catch N+1 queries."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from ..exceptions import ValidationError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

    from ..db.database import Database

__all__ = ["QueryCounter"]

#: Statements that only open or end a transaction or savepoint.
_CONTROL = re.compile(
    r"\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|START\s+TRANSACTION)\b", re.I
)


class QueryCounter:
    """Count every SQL statement `db` runs while the counter is started.

    It listens for SQLAlchemy's `before_cursor_execute` on the engine. An
    engine with such a listener is observed: repository calls outside a
    transaction then run through SQLAlchemy instead of the raw driver path,
    with the same statements (the two paths are held identical), so the count
    covers calls outside and inside transactions alike. An `executemany`
    (a bulk write) counts as one statement. Statements that only open or end
    a transaction or savepoint (`BEGIN`, `COMMIT`, `SAVEPOINT`, ...; SQLite's
    are SQL statements, PostgreSQL's mostly are not) are left out unless
    `transaction_control=True`, so a count means the same on both databases.

    ```python
    with QueryCounter(db) as queries:
        await Members().list(load=["team"])
    assert queries.count == 1
    ```

    Args:
        db: The database whose statements to count.
        transaction_control: Count `BEGIN`, `COMMIT`, `SAVEPOINT` and the like too.
    """

    def __init__(self, db: Database, *, transaction_control: bool = False) -> None:
        self._engine = db.engine.sync_engine
        self._control = transaction_control
        #: The SQL text of each statement seen, in order.
        self.statements: list[str] = []
        self._started = False

    @property
    def count(self) -> int:
        """Return how many statements ran since the start or the last `reset()`."""
        return len(self.statements)

    def _observe(self, *args: Any) -> None:
        # (conn, cursor, statement, parameters, context, executemany)
        statement = str(args[2])
        if self._control or not _CONTROL.match(statement):
            self.statements.append(statement)

    def start(self) -> None:
        """Start counting (a no-op when already started)."""
        if not self._started:
            event.listen(self._engine, "before_cursor_execute", self._observe)
            self._started = True

    def stop(self) -> None:
        """Stop counting; the statements seen so far are kept."""
        if self._started:
            event.remove(self._engine, "before_cursor_execute", self._observe)
            self._started = False

    def reset(self) -> None:
        """Forget the statements seen so far."""
        self.statements.clear()

    def __enter__(self) -> QueryCounter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @contextmanager
    def expect(
        self, exactly: int | None = None, *, at_most: int | None = None
    ) -> Iterator[list[str]]:
        """Assert the block runs `exactly` (or `at_most`) statements.

        Yields the list the block's statements are appended to. The counter
        must be started (the `dotmac_queries` fixture starts it).

        Raises:
            ValidationError: neither or both of `exactly` and `at_most`.
            AssertionError: the block ran another number of statements; the
                message lists them.
        """
        if (exactly is None) == (at_most is None):
            msg = "give exactly one of exactly= and at_most="
            raise ValidationError(msg, field="exactly")
        if not self._started:
            msg = "start the QueryCounter (or use it as a context manager) first"
            raise ValidationError(msg, field="counter")
        first = len(self.statements)
        block: list[str] = []
        yield block
        block.extend(self.statements[first:])
        ran = len(block)
        if (exactly is not None and ran != exactly) or (
            at_most is not None and ran > at_most
        ):
            wanted = (
                f"exactly {exactly}" if exactly is not None else f"at most {at_most}"
            )
            listing = "\n".join(f"  {i}. {sql}" for i, sql in enumerate(block, 1))
            msg = f"expected {wanted} SQL statements, the block ran {ran}:\n{listing}"
            raise AssertionError(msg)
