"""Every Redis connection of a Relais process, built from the settings in this one place: the broker (FastStream),
the outbox relay, and the client that sessions, rate limits, dashboards and tools use.

Redis is either one server (RELAIS_REDIS_URL) or a Sentinel-managed master (RELAIS_REDIS_SENTINELS,
RELAIS_REDIS_SENTINEL_MASTER, RELAIS_REDIS_PASSWORD): the Sentinels name the current master, and every client here
asks them again whenever a connection fails, so a failover is followed without a restart (docs/deployment.md,
"Redis Sentinel").
"""

from __future__ import annotations

import re
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from shared.settings import Settings

SENTINELS_FORM = "host:port,host:port,... (e.g. sentinel-0:26379,sentinel-1:26379,sentinel-2:26379)"


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` as (host, port) pairs; ValueError saying which item is wrong. An IPv6 address goes
    in brackets: `[::1]:26379`."""
    addresses = []
    for item in value.split(","):
        item = item.strip()
        host, colon, port = item.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        if (
            not colon
            or not re.fullmatch(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*" if bracketed else r"[A-Za-z0-9._-]+", host)
            or not port.isdigit()
            or not 1 <= int(port) <= 65535
        ):
            raise ValueError(f"{item!r} is not host:port" if item else "an empty item between commas")
        addresses.append((host, int(port)))
    return addresses


def redis_settings_problems(settings: Settings) -> list[str]:
    """What is wrong with the Sentinel settings, one line per problem starting with its RELAIS_* variable (the
    URL's own form is checked by relais.diagnostics.load_settings)."""
    if not settings.redis_sentinels:
        return []
    problems = []
    try:
        parse_sentinels(settings.redis_sentinels)
    except ValueError as exc:
        problems.append(
            f"RELAIS_REDIS_SENTINELS: {exc}; give the Sentinels as {SENTINELS_FORM} (got {settings.redis_sentinels!r})"
        )
    if not settings.redis_sentinel_master.strip():
        problems.append(
            "RELAIS_REDIS_SENTINEL_MASTER: must not be empty; the name the Sentinels monitor the master "
            "under (`sentinel monitor NAME ...`), default relais"
        )
    if settings.redis_url:
        problems.append(
            "RELAIS_REDIS_URL: is set together with RELAIS_REDIS_SENTINELS; set only one: the URL for one "
            "Redis server, the Sentinels for a Sentinel-managed Redis"
        )
    return problems


def _sentinel_options(settings: Settings, sentinels: str) -> dict[str, Any]:
    # The Sentinels ask for the same password as the Redis servers, as most Sentinel set-ups do.
    auth = {"password": settings.redis_password} if settings.redis_password else {}
    return {"sentinels": parse_sentinels(sentinels), "sentinel_kwargs": dict(auth), **auth}


def _url(settings: Settings) -> str:
    if settings.redis_url is None:  # `relais up` and `relais serve` set it (embedded Redis) before any client
        raise RuntimeError("no Redis: RELAIS_REDIS_URL and RELAIS_REDIS_SENTINELS are both unset")
    return settings.redis_url


def async_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio client of the current master."""
    if settings.redis_sentinels:
        sentinel_options = _sentinel_options(settings, settings.redis_sentinels)
        sentinels = sentinel_options.pop("sentinels")
        return AsyncSentinel(sentinels, **sentinel_options, **options).master_for(settings.redis_sentinel_master)
    return aioredis.Redis.from_url(_url(settings), **options)


def sync_client(settings: Settings, **options: Any) -> redis.Redis:
    """A blocking client of the current master (the outbox relay runs in a thread)."""
    if settings.redis_sentinels:
        sentinel_options = _sentinel_options(settings, settings.redis_sentinels)
        sentinels = sentinel_options.pop("sentinels")
        return Sentinel(sentinels, **sentinel_options, **options).master_for(settings.redis_sentinel_master)
    return redis.Redis.from_url(_url(settings), **options)


def broker(settings: Settings, **options: Any):
    """The FastStream broker: a RedisSentinelBroker (FastStream >= 0.7.2) with Sentinels, else a RedisBroker."""
    from faststream.redis import RedisBroker, RedisSentinelBroker

    if settings.redis_sentinels:
        sentinel_options = _sentinel_options(settings, settings.redis_sentinels)
        return RedisSentinelBroker(
            sentinel_master_name=settings.redis_sentinel_master,
            protocol="redis",
            # AsyncAPI's server: the Sentinels as host, the master's name as path
            specification_url=f"redis://{settings.redis_sentinels.replace(' ', '')}/{settings.redis_sentinel_master}",
            **sentinel_options,
            **options,
        )
    return RedisBroker(settings.redis_url or "redis://localhost:6379", **options)
