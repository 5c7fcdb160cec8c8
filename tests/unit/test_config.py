"""Configuration classes: environment, defaults, URLs and secrets."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import dotmac_core.config as config_module
from dotmac_core import CacheConfig, ConfigurationError, DatabaseConfig, SecurityConfig
from dotmac_core.db.database import _pg_options


def test_defaults_are_embedded() -> None:
    """With no environment, the database is a SQLite file and the cache memory."""
    config = DatabaseConfig()
    assert config.dialect == "sqlite"
    assert str(config.sqlalchemy_url()) == "sqlite+aiosqlite:///dotmac.db"
    assert CacheConfig().backend == "memory"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DOTMAC_DB_*`, `DOTMAC_CACHE_*`, `DOTMAC_SECURITY_*` variables are read."""
    monkeypatch.setenv("DOTMAC_DB_DRIVER", "postgresql")
    monkeypatch.setenv("DOTMAC_DB_HOST", "db.internal")
    monkeypatch.setenv("DOTMAC_DB_DATABASE", "app")
    monkeypatch.setenv("DOTMAC_DB_USER", "svc")
    monkeypatch.setenv("DOTMAC_DB_PASSWORD", "s3cret")
    monkeypatch.setenv("DOTMAC_DB_POOL_SIZE", "20")
    monkeypatch.setenv("DOTMAC_CACHE_BACKEND", "redis")
    monkeypatch.setenv("DOTMAC_CACHE_TTL_DEFAULT", "60")
    monkeypatch.setenv("DOTMAC_SECURITY_SECRET_KEY", "k" * 32)
    db = DatabaseConfig()
    assert db.pool_size == 20
    assert db.dialect == "postgresql"
    url = db.sqlalchemy_url()
    assert url.render_as_string(hide_password=False) == (
        "postgresql+asyncpg://svc:s3cret@db.internal:5432/app"
    )
    assert CacheConfig().ttl_default == 60
    assert SecurityConfig().secret_key.get_secret_value() == "k" * 32
    assert DatabaseConfig(pool_size=3).pool_size == 3  # arguments win


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql://u@h:6543/db", "postgresql+asyncpg://u@h:6543/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
    ],
)
def test_urls_move_to_async_drivers(given: str, expected: str) -> None:
    """Common URL spellings run on the async driver for their database."""
    assert str(DatabaseConfig(url=given).sqlalchemy_url()) == expected


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "not a url"]
)
def test_unsupported_urls_rejected(url: str) -> None:
    """Sync or unknown drivers and malformed URLs are a ConfigurationError."""
    with pytest.raises(ConfigurationError) as info:
        DatabaseConfig(url=url)
    assert info.value.field == "url"


def test_secrets_never_printed() -> None:
    """A password appears in no repr, str, URL repr or error message."""
    config = DatabaseConfig(password="s3cret", driver="postgresql", user="u")
    url_config = DatabaseConfig(url="postgresql://u:s3cret@h/db")
    cache = CacheConfig(password="s3cret")
    texts = [
        repr(config),
        str(config),
        repr(config.sqlalchemy_url()),
        str(config.sqlalchemy_url()),
        repr(url_config),
        str(url_config),
        repr(url_config.sqlalchemy_url()),
        repr(cache),
        str(cache),
        repr(SecurityConfig(secret_key="s3cret-but-longer-than-16")),
    ]
    for text in texts:
        assert "s3cret" not in text, text
    assert "s3cret" in cache.redis_url()  # the client still gets it
    with pytest.raises(ConfigurationError) as info:
        DatabaseConfig(url="mysql://u:s3cret@h/db")
    assert "s3cret" not in str(info.value)
    assert info.value.__cause__ is None
    assert "s3cret" not in repr(info.value.to_dict())


def test_bad_values_name_the_field() -> None:
    """Out-of-range or unknown settings raise ConfigurationError naming them."""
    with pytest.raises(ConfigurationError, match="pool_size") as info:
        DatabaseConfig(pool_size=0)
    assert info.value.field == "pool_size"
    with pytest.raises(ConfigurationError, match="pool_sise"):
        DatabaseConfig(pool_sise=5)
    with pytest.raises(ConfigurationError, match="backend"):
        CacheConfig(backend="memcached")
    with pytest.raises(ConfigurationError, match="secret_key"):
        SecurityConfig(secret_key="short")


def test_cache_redis_url() -> None:
    """The Redis URL is built from parts, or taken as given."""
    assert CacheConfig(host="r", port=6380, db=2).redis_url() == "redis://r:6380/2"
    assert CacheConfig(url="redis://x:1/0").redis_url() == "redis://x:1/0"


def test_default_secret_is_stable_within_a_process() -> None:
    """Without a configured key, every SecurityConfig in a process shares one."""
    first = SecurityConfig().secret_key.get_secret_value()
    assert len(first) >= 32
    assert SecurityConfig().secret_key.get_secret_value() == first


def test_making_a_config_without_a_key_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`SecurityConfig()` without a key warns of nothing until a cursor uses it.

    The ASGI middleware makes one just to read the header names.
    """
    monkeypatch.delenv("DOTMAC_SECURITY_SECRET_KEY", raising=False)
    monkeypatch.setattr(config_module, "_warned_process_secret", False)
    with caplog.at_level(logging.WARNING, logger="dotmac_core.config"):
        config = SecurityConfig()
        assert config.tenant_header == "X-Tenant-ID"
        assert config.secret_key.get_secret_value()
    assert not [r for r in caplog.records if r.name == "dotmac_core.config"]


def test_empty_environment_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DOTMAC_DB_URL=` (empty) falls back to the default instead of failing."""
    monkeypatch.setenv("DOTMAC_DB_URL", "")
    assert DatabaseConfig().url is None


def test_ipv6_and_password_in_redis_url() -> None:
    """Redis URLs quote the password and bracket IPv6 hosts."""
    config = CacheConfig(host="::1", password="p@ss/word")
    assert config.redis_url() == "redis://:p%40ss%2Fword@[::1]:6379/0"


def test_server_settings_imply_postgresql() -> None:
    """The handbook's `DatabaseConfig(host=..., database=...)` means PostgreSQL."""
    config = DatabaseConfig(host="localhost", port=5432, database="myapp", pool_size=20)
    assert config.dialect == "postgresql"
    assert str(config.sqlalchemy_url()) == "postgresql+asyncpg://localhost:5432/myapp"
    assert DatabaseConfig(database="file.db").dialect == "sqlite"
    assert DatabaseConfig(driver="sqlite", host="ignored").dialect == "sqlite"


def _documented_defaults() -> dict[str, str]:
    """`field: default` from the DatabaseConfig table of docs/configuration.md."""
    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    section = page.read_text().split("## DatabaseConfig", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `DOTMAC_DB_\w+` \| ([^|]+) \|", section, re.M)
    return {name: default.strip().strip("`") for name, default in rows}


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("pool_timeout", 30.0),
        ("connect_timeout", 10.0),
        ("command_timeout", 300.0),
        ("tcp_keepalive_timeout", 30.0),
        ("statement_timeout", None),
    ],
)
def test_database_timeouts_default_to_what_the_docs_say(
    field: str, default: float | None
) -> None:
    """No database wait is unbounded at the defaults, and the docs give each bound."""
    assert getattr(DatabaseConfig(), field) == default
    assert _documented_defaults()[field] == str(default)


def test_timeouts_reach_the_driver() -> None:
    """connect_timeout and command_timeout become asyncpg's arguments; None is none."""
    options = _pg_options(DatabaseConfig(url="postgresql://u@h/db"))
    assert options["connect_args"]["timeout"] == 10.0
    assert options["connect_args"]["command_timeout"] == 300.0
    config = DatabaseConfig(url="postgresql://u@h/db", command_timeout=None)
    assert "command_timeout" not in _pg_options(config)["connect_args"]
    with pytest.raises(ConfigurationError, match="tcp_keepalive_timeout") as info:
        DatabaseConfig(tcp_keepalive_timeout=1)  # TCP_KEEPIDLE counts whole seconds
    assert info.value.field == "tcp_keepalive_timeout"
