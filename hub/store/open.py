"""open_store(url or config) -> Store: "sqlite:///x.db" or a plain path -> SQLite, "mongodb://" -> MongoDB."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from hub.errors import ConfigError
from hub.store.base import Store

if TYPE_CHECKING:  # pragma: no cover
    from hub.config import HubConfig


def open_store(target: Union[str, Path, HubConfig], busy_timeout_ms: int = 10000,
               timeout_ms: int = 5000, sqlite_synchronous: str = "FULL",
               sqlite_checkpoint_s: float = 0.5) -> Store:
    if not isinstance(target, (str, Path)):
        cfg = target
        return open_store(cfg.store_url, cfg.store.busy_timeout_ms, cfg.store.timeout_ms,
                          cfg.store.sqlite_synchronous, cfg.store.sqlite_checkpoint_s)
    url = str(target)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from hub.store.mongo import MongoStore
        return MongoStore(url, timeout_ms=timeout_ms)
    if "://" in url and not url.startswith("sqlite://"):
        raise ConfigError(f"unsupported store URL {url!r}: use sqlite:///path/to/hub.db, a file path "
                          f"or mongodb://host/db")
    from hub.store.sqlite import SqliteStore, path_from_url
    return SqliteStore(path_from_url(url), busy_timeout_ms=busy_timeout_ms, synchronous=sqlite_synchronous,
                       checkpoint_interval_s=sqlite_checkpoint_s)
