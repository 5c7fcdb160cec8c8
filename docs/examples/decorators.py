import asyncio

from dotmac_core import (
    OperationTimeoutError,
    RateLimitExceededError,
    ServiceError,
    rate_limit,
    retry_on_failure,
    standard_exception_handler,
    timeout,
)


class WeatherApi:
    """A remote service whose first two calls drop the connection."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self) -> str:
        """Answer, after failing the first two times."""
        self.calls += 1
        if self.calls <= 2:
            raise ConnectionResetError("connection reset by peer")
        return "sunny"

    async def hang(self) -> str:
        """Take far longer than anyone waits."""
        await asyncio.sleep(10)
        return "too late"


class WeatherService:
    def __init__(self, external_service: WeatherApi) -> None:
        self.external_service = external_service

    @standard_exception_handler
    @retry_on_failure(max_retries=3, backoff_factor=2.0)
    @timeout(seconds=30)
    async def api_call(self) -> str:
        """The handbook's example."""
        # Automatic exception logging, retry logic, and timeout protection
        return await self.external_service.call()

    @standard_exception_handler
    @timeout(seconds=0.1)
    async def slow_call(self) -> str:
        """A call with a short deadline."""
        return await self.external_service.hang()


# Process-local: each process counts its own calls (see "Local or Redis").
@rate_limit(max_calls=3, time_window=60)
async def api_endpoint() -> dict[str, str]:
    return {"message": "success"}


async def main() -> None:
    api = WeatherApi()
    service = WeatherService(api)

    # Two dropped connections are transient: retried, then the answer comes.
    assert await service.api_call() == "sunny"
    assert api.calls == 3

    # The deadline cancels the call and raises OperationTimeoutError, which is
    # a ServiceError and a builtin TimeoutError.
    timed_out: OperationTimeoutError | None = None
    try:
        await service.slow_call()
    except OperationTimeoutError as exc:
        timed_out = exc
    assert isinstance(timed_out, ServiceError)
    assert isinstance(timed_out, TimeoutError)
    print(timed_out.to_dict())

    # Five concurrent calls against a limit of 3 per minute: 3 run, 2 are refused.
    results = await asyncio.gather(
        *(api_endpoint() for _ in range(5)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RateLimitExceededError)]
    assert results.count({"message": "success"}) == 3
    assert len(refused) == 2
    first = refused[0]
    assert first.retry_after is not None
    assert 59 < first.retry_after <= 60
    assert first.http_status == 429
    print(f"refused: retry in {first.retry_after:.0f} s, {first.remaining} left")


if __name__ == "__main__":
    asyncio.run(main())
