"""What the Redis queue, result and event storages share: settings and URLs, one
connector per instance (a pooled client per event loop, a sync client for
blocking calls, retries across outages), the Lua scripts and their key schema
(``schema.lua``), and the doorbell that idle consumers block on."""

from __future__ import annotations

from .connection import (
    INSTALL_HINT,
    MAX_BLOCK,
    Ahead,
    Doorbell,
    LoopClient,
    RedisConnector,
    RedisSettings,
    Script,
    load_script,
    redis_settings,
)

__all__ = [
    "INSTALL_HINT",
    "MAX_BLOCK",
    "Ahead",
    "Doorbell",
    "LoopClient",
    "RedisConnector",
    "RedisSettings",
    "Script",
    "load_script",
    "redis_settings",
]
