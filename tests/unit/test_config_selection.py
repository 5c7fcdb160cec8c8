"""Which cache a config selects, and the warning about a per-process cursor key."""

from __future__ import annotations

import logging

import pytest

from dotmac_core import (
    CacheConfig,
    ConfigurationError,
    RedisBackend,
    SecurityConfig,
    create_cache_service,
)
from dotmac_core import config as config_module


def test_cache_url_alone_selects_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `DOTMAC_CACHE_URL` set: the config and the default service use Redis."""
    monkeypatch.setenv("DOTMAC_CACHE_URL", "redis://127.0.0.1:6379/3")
    config = CacheConfig()
    assert config.backend == "redis"
    service = create_cache_service()
    assert isinstance(service.backend, RedisBackend)
    assert service.backend_name == "redis"


def test_cache_url_keeps_an_explicit_cluster_backend() -> None:
    """A URL with `backend="redis-cluster"` stays a cluster config."""
    config = CacheConfig(backend="redis-cluster", url="redis://127.0.0.1:7000")
    assert config.backend == "redis-cluster"


def test_cache_url_with_memory_backend_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`backend=memory` beside a URL is a contradiction, named, not ignored."""
    monkeypatch.setenv("DOTMAC_CACHE_BACKEND", "memory")
    monkeypatch.setenv("DOTMAC_CACHE_URL", "redis://:hunter2@127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="backend is 'memory'") as caught:
        CacheConfig()
    assert "hunter2" not in str(caught.value)


def test_no_cache_settings_keep_memory() -> None:
    """With nothing set, the cache is the in-process memory backend."""
    assert CacheConfig().backend == "memory"
    assert create_cache_service().backend_name == "memory"


def test_configured_key_does_not_warn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key from the environment or an argument logs nothing."""
    monkeypatch.setattr(config_module, "_warned_process_secret", False)
    monkeypatch.setenv("DOTMAC_SECURITY_SECRET_KEY", "e" * 32)
    with caplog.at_level(logging.WARNING, logger="dotmac_core.config"):
        SecurityConfig()
        SecurityConfig(secret_key="a" * 32)
    assert not [r for r in caplog.records if r.name == "dotmac_core.config"]
