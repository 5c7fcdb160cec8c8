"""A process-wide default (the database, the cache): set at startup, read anywhere."""

from __future__ import annotations

from typing import Generic, TypeVar

from .exceptions import ConfigurationError

T = TypeVar("T")


class Default(Generic[T]):
    """Holds the default `T`; reading it before it is set is a `ConfigurationError`."""

    def __init__(self, what: str, configure: str) -> None:
        self._what = what
        self._configure = configure
        self._value: T | None = None

    def set(self, value: T) -> T:
        """Make `value` the default and return it."""
        self._value = value
        return value

    def get(self) -> T:
        """Return the default, or raise `ConfigurationError` naming the setter."""
        if self._value is None:
            msg = f"no default {self._what}: call {self._configure}() at startup"
            raise ConfigurationError(msg)
        return self._value

    def reset(self) -> None:
        """Forget the default (for tests)."""
        self._value = None
