"""OpenTelemetry spans from `instrument()`, read back with the SDK's memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dotmac_core import (
    AsyncRepository,
    CacheConfig,
    Database,
    NotFoundError,
    RateLimitExceededError,
    TransactionManager,
    create_cache_service,
    instrument,
    is_instrumented,
    rate_limit,
    tenant_scope,
    uninstrument,
)
from dotmac_core.testing import QueryCounter, reset_rate_limits

from ..faults import dead_port
from ..models import Member

trace_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)


class Members(AsyncRepository[Member]):
    """Members of the current tenant."""


@pytest.fixture
def provider() -> Any:
    """A tracer provider whose finished spans land in memory."""
    tracer_provider = trace_sdk.TracerProvider()
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer_provider.exporter = exporter
    return tracer_provider


@pytest.fixture
def spans(provider: Any) -> Iterator[InMemorySpanExporter]:
    """`instrument()` for the test (tenant attribute on); the exporter to read."""
    instrument(tracer_provider=provider, tenant_attribute=True)
    try:
        yield provider.exporter
    finally:
        uninstrument()


def _named(exporter: InMemorySpanExporter, prefix: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def test_repository_and_transaction_spans(
    repo_db: Database, spans: InMemorySpanExporter
) -> None:
    """Each repository call is one span, nested in its transaction's span.

    Calls a method makes to another (`get_one` to `list`) make no span of their own.
    """
    with tenant_scope("acme"):
        made = await Members().create({"email": "a@x", "name": "A"})
        async with TransactionManager():
            await Members().update(made.id, {"rank": 2})
            async with TransactionManager():
                await Members().count()
        with pytest.raises(ZeroDivisionError):
            async with TransactionManager():
                await Members().get_by_id(made.id)
                _ = 1 / 0
        with pytest.raises(NotFoundError):
            await Members().get_one(email="nobody@x")
    create, update, count, get, get_one = _named(spans, "Members.")
    assert create.name == "Members.create"
    assert dict(create.attributes) == {
        "dotmac.model": "Member",
        "dotmac.repository.method": "create",
        "dotmac.tenant_id": "acme",
    }
    transactions = {s.context.span_id: s for s in _named(spans, "dotmac.transaction")}
    assert len(transactions) == 3
    outer = transactions[update.parent.span_id]
    assert outer.attributes["dotmac.transaction.nested"] is False
    assert outer.attributes["dotmac.transaction.outcome"] == "commit"
    nested = transactions[count.parent.span_id]
    assert nested.attributes["dotmac.transaction.nested"] is True
    assert nested.parent.span_id == outer.context.span_id
    rolled_back = transactions[get.parent.span_id]
    assert rolled_back.attributes["dotmac.transaction.outcome"] == "rollback"
    assert not rolled_back.status.is_ok
    assert create.parent is None
    assert get_one.events[0].name == "exception"


async def test_cache_spans_say_hit_or_miss(spans: InMemorySpanExporter) -> None:
    """Reads record hits and misses; get_or_set records whether the factory ran."""
    cache = create_cache_service("memory")
    await cache.get("k")
    await cache.set("k", 1)
    await cache.get("k")
    await cache.get_many(["k", "other"])

    async def compute() -> int:
        return 7

    await cache.get_or_set("g", compute)
    await cache.get_or_set("g", compute)
    await cache.delete("k")
    reads = _named(spans, "dotmac.cache.get")
    assert [s.attributes.get("dotmac.cache.hit") for s in reads] == [False, True, None]
    many = reads[2].attributes
    assert (many["dotmac.cache.hits"], many["dotmac.cache.misses"]) == (1, 1)
    assert reads[0].attributes["dotmac.cache.backend"] == "memory"
    loads = _named(spans, "dotmac.cache.load")
    assert [s.attributes["dotmac.cache.hit"] for s in loads] == [False, True]
    assert [s.name for s in _named(spans, "dotmac.cache.set")]
    assert _named(spans, "dotmac.cache.invalidate")


async def test_cache_span_marks_fail_open(spans: InMemorySpanExporter) -> None:
    """A read answered without a dead Redis carries dotmac.cache.fail_open."""
    config = CacheConfig(backend="redis", url=f"redis://127.0.0.1:{dead_port()}/0")
    async with create_cache_service(config=config) as cache:
        assert await cache.get("k", "default") == "default"
    (read,) = _named(spans, "dotmac.cache.get")
    assert read.attributes["dotmac.cache.fail_open"] is True
    assert read.attributes["dotmac.cache.backend"] == "redis"


async def test_rate_limit_decisions_are_spans(spans: InMemorySpanExporter) -> None:
    """Each decision is a span saying whether the call was admitted."""
    reset_rate_limits()

    @rate_limit(1, 60, key="traced")
    async def call() -> None:
        return None

    await call()
    with pytest.raises(RateLimitExceededError):
        await call()
    first, second = _named(spans, "dotmac.rate_limit")
    assert first.attributes["dotmac.rate_limit.allowed"] is True
    assert second.attributes["dotmac.rate_limit.allowed"] is False
    assert second.attributes["dotmac.rate_limit.limit"] == 1
    assert second.attributes["dotmac.rate_limit.retry_after"] > 0
    reset_rate_limits()


def test_instrument_is_idempotent_and_reversible(provider: Any) -> None:
    """A second instrument() changes nothing; uninstrument() restores the methods."""
    original = AsyncRepository.count
    instrument(tracer_provider=provider)
    wrapped = AsyncRepository.count
    instrument(tracer_provider=provider)
    assert AsyncRepository.count is wrapped is not original
    assert is_instrumented()
    uninstrument()
    assert AsyncRepository.count is original
    assert not is_instrumented()


async def test_sqlalchemy_instrumentation_sees_every_statement(
    repo_db: Database, spans: InMemorySpanExporter, provider: Any
) -> None:
    """opentelemetry-instrumentation-sqlalchemy traces each statement, both paths.

    Its engine listeners make the engine observed, so calls outside a
    transaction run through SQLAlchemy too: one span per statement, nested
    in the repository call's span.
    """
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
    instrumentor = instrumentation.SQLAlchemyInstrumentor()
    # skip_dep_check: its releases up to 0.66b2 declare sqlalchemy < 2.1 and
    # otherwise refuse SQLAlchemy 2.1, which they trace correctly (this test).
    instrumentor.instrument(
        engine=repo_db.engine.sync_engine,
        tracer_provider=provider,
        skip_dep_check=True,
    )
    try:
        with (
            QueryCounter(repo_db, transaction_control=True) as counter,
            tenant_scope("acme"),
        ):
            made = await Members().create({"email": "s@x", "name": "S"})
            await Members().list()
            async with TransactionManager():
                await Members().update(made.id, {"rank": 3})
                await Members().count()
    finally:
        instrumentor.uninstrument()
    repository = {s.context.span_id: s for s in _named(spans, "Members.")}
    statements = [
        s
        for s in spans.get_finished_spans()
        if {"db.statement", "db.query.text"} & set(s.attributes or ())
    ]
    assert counter.count >= 4
    assert len(statements) == counter.count
    transactions = {s.context.span_id for s in _named(spans, "dotmac.transaction")}
    assert all(
        s.parent is not None and s.parent.span_id in {*repository, *transactions}
        for s in statements
    )
