"""What ops need to know about the streams, read from Redis: lengths, each consumer group's pending count,
lag and oldest pending age, live consumers, dead letters; and which queue is stuck, and why."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis

from shared.events import DEAD_LETTER_SUFFIX, STREAMS

LIVE_CONSUMER_IDLE_MS = 30_000  # readers block for at most a second between reads: silent longer means gone
STUCK_LAG = 1_000  # entries published but not yet read by a group
STUCK_OLDEST_PENDING_MS = 5 * 60_000  # claims retry after seconds; pending for minutes means it keeps failing
LAG_COUNT_CAP = 10_000  # Redis 6.2 has no lag field: count at most this many unread entries


@dataclass
class ConsumerReport:
    name: str
    pending: int
    idle_ms: int

    @property
    def live(self) -> bool:
        return self.idle_ms < LIVE_CONSUMER_IDLE_MS


@dataclass
class GroupReport:
    name: str
    pending: int
    lag: int
    oldest_pending_ms: int | None
    consumers: list[ConsumerReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def live_consumers(self) -> int:
        return sum(c.live for c in self.consumers)

    @property
    def stuck(self) -> bool:
        return bool(self.problems)


@dataclass
class StreamReport:
    stream: str
    length: int
    dead_letters: int
    groups: list[GroupReport]

    @property
    def stuck(self) -> bool:
        return any(g.stuck for g in self.groups)


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def group_lag(client: aioredis.Redis, stream: str, info: dict, cap: int = LAG_COUNT_CAP) -> int:
    if info.get("lag") is not None:  # Redis 7 counts it for us
        return int(info["lag"])
    unread = await client.xrange(stream, min=_next_id(_decode(info["last-delivered-id"])), count=cap)
    return len(unread or [])  # a list (redis-py types it optional)


async def stream_report(client: aioredis.Redis, stream: str, previous: StreamReport | None = None) -> StreamReport:
    """One stream's figures; with the previous report, a pending count that only grows is flagged too."""
    length = await client.xlen(stream)
    dead = await client.xlen(stream + DEAD_LETTER_SUFFIX)
    groups = []
    try:
        infos = await client.xinfo_groups(stream)
    except aioredis.ResponseError:  # no such stream yet
        infos = []
    before = {g.name: g for g in previous.groups} if previous else {}
    for info in infos:
        name = _decode(info["name"])
        oldest = None
        if info["pending"]:
            first = await client.xpending_range(stream, name, min="-", max="+", count=1)
            oldest = int(first[0]["time_since_delivered"]) if first else None
        consumers = [
            ConsumerReport(_decode(c["name"]), int(c["pending"]), int(c["idle"]))
            for c in await client.xinfo_consumers(stream, name)
        ]
        group = GroupReport(name, int(info["pending"]), await group_lag(client, stream, info), oldest, consumers)
        group.problems = problems_of(group, before.get(name))
        groups.append(group)
    return StreamReport(stream, length, dead, groups)


def problems_of(group: GroupReport, previous: GroupReport | None) -> list[str]:
    """Why a group is stuck, in words for the dashboard (empty when it is fine)."""
    problems = []
    if (group.pending or group.lag) and not group.live_consumers:
        problems.append("no_live_consumer")
    if group.lag > STUCK_LAG:
        problems.append("lag")
    if group.oldest_pending_ms is not None and group.oldest_pending_ms > STUCK_OLDEST_PENDING_MS:
        problems.append("old_pending")
    if previous is not None and group.pending > previous.pending > 0:
        problems.append("pending_growing")
    return problems


async def queues_report(
    client: aioredis.Redis, namespace: str, previous: dict[str, StreamReport] | None = None
) -> list[StreamReport]:
    reports = []
    for name in STREAMS:
        stream = f"{namespace}:{name}"
        reports.append(await stream_report(client, stream, (previous or {}).get(stream)))
    return reports


log = logging.getLogger("relais.queues")

PUSH_BACK_CHECK_S = 0.25  # the backlog is measured at most this often; the requests in between share the figure
# Notifications' messages queued and due but not yet sent, per channel (a Redis key in the namespace, written by its
# senders while they have a backlog, kept UNSENT_TTL_S): the part of the pipeline intake cannot see in the streams.
UNSENT_KEYS = {channel: f"notifications:unsent:{channel}" for channel in ("email", "sms")}
UNSENT_TTL_S = 5


class PushBack:
    """Whether a producer should refuse new work for now, because the pipeline behind it lags: its outbox rows not yet
    relayed (`unrelayed`, a read of its database), plus the most entries that one consumer group of one of `streams`
    has not yet handled (lag + pending), plus the counts found at `unsent_keys` (notifications' messages not yet
    sent, UNSENT_KEYS), against `bound`. Measured at most every PUSH_BACK_CHECK_S: the request that finds the figure
    old measures again (the first one too), the others meanwhile use the last figure. Redis unavailable counts as no
    lag (the outbox keeps the events and is counted)."""

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        streams: list[str],
        unrelayed: Callable[[], int],
        bound: int,
        retry_after_s: int,
        unsent_keys: Sequence[str] = (),
    ) -> None:
        self.client, self.streams, self.unrelayed, self.unsent_keys = client, streams, unrelayed, list(unsent_keys)
        self.bound, self.retry_after_s = bound, retry_after_s
        self.backlog = 0
        self._measured_at: float | None = None
        self._measuring = asyncio.Lock()

    async def measure(self) -> int:
        outbox = await anyio.to_thread.run_sync(self.unrelayed)
        behind = 0
        for stream in self.streams:
            try:
                client = self.client()
                for info in await client.xinfo_groups(stream):
                    lag = await group_lag(client, stream, info, cap=self.bound + 1)
                    behind = max(behind, int(info["pending"]) + lag)
            except aioredis.ResponseError:  # no such stream yet
                pass
            except (aioredis.RedisError, OSError) as exc:
                log.debug("push-back: the lag of %s is unknown (%s)", stream, exc)
        unsent = 0
        if self.unsent_keys:
            try:
                unsent = sum(int(count) for count in await self.client().mget(self.unsent_keys) if count)
            except (aioredis.RedisError, OSError) as exc:
                log.debug("push-back: the messages not yet sent are unknown (%s)", exc)
        self.backlog = outbox + behind + unsent
        self._measured_at = time.monotonic()
        return self.backlog

    async def retry_after(self) -> int | None:
        """None when new work may come in; else the seconds to say in Retry-After."""
        if self.bound <= 0:
            return None
        stale = self._measured_at is None or time.monotonic() - self._measured_at >= PUSH_BACK_CHECK_S
        if stale and not self._measuring.locked():
            async with self._measuring:
                await self.measure()
        elif self._measured_at is None:  # the first figure is being measured: wait for it
            async with self._measuring:
                pass
        return self.retry_after_s if self.backlog > self.bound else None
