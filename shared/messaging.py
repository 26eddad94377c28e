"""Reliable messaging on Redis Streams, written once for every service.

FastStream reads the streams (consumer groups, typed payloads, the AsyncAPI document); what it does not
do for Redis Streams is here (see docs/architecture.md):
- the outbox relay publishes committed outbox rows in pipelined batches and marks them published;
- each stream has two subscribers per service: one reads new entries, one claims (XAUTOCLAIM) entries
  left pending by a dead consumer;
- `ReliableDelivery` acks after success, leaves a failed entry pending for a retry, and after
  `max_deliveries` moves it to `<stream>.dlq` atomically with its XACK;
- `Bus.process` runs a handler and writes the (consumer, event_id) tracking row in one transaction;
- `trim_stream` never trims an entry some group has not yet delivered or acknowledged; `Bus.trim` applies it to
  each stream and to its dead-letter stream;
- `Bus.purge` deletes published outbox rows and processed-event rows past their retention, hourly;
- `replay` puts dead-lettered entries back on their stream;
- with replicas (a Sentinel-managed Redis), the relay marks rows published only once a replica holds them (`WAIT`),
  so a failover cannot lose them, and publishes again, on a new master, rows no replica had acknowledged;
- `Bus.heal` restarts a subscriber FastStream stopped because its consumer group is gone (a replica promoted
  before its first sync), after creating the group again.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from faststream import AckPolicy, BaseMiddleware
from faststream.redis import StreamSub
from redis.typing import EncodableT, FieldT
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shared import redis_clients
from shared.db import EMITTED, Database, OutboxMessage, claim_event, purge_technical_rows, table_of, was_processed
from shared.events import DEAD_LETTER_SUFFIX, Event, utcnow
from shared.logs import current_correlation_id, describe_error, log_context
from shared.settings import Settings, consumer_name

log = logging.getLogger("relais.messaging")
READS_STOP_SECONDS = 10  # how long a stopping bus waits for its subscribers and their reads

DATA_FIELD = "__data__"  # FastStream's field for the message envelope
DLQ_FIELDS = ("dlq_error", "dlq_source_id", "dlq_group", "dlq_failed_at")
RELAY_BATCH = 500
PURGE_EVERY = timedelta(hours=1)  # old technical rows: outbox rows published, events processed
READ_BATCH = 50  # entries per read: a whole backlog at once would sit unacked long enough to be claimed again
REPLICA_ACK_TIMEOUT_MS = 1000  # a replica acknowledges within milliseconds: longer means it is stalled or gone
HEAL_EVERY_S = 1.0  # how often stopped subscribers are looked for
# Sentinel promotes no replica cut off for longer than ten times down-after-milliseconds (plus the failover): with
# down-after up to 60 s, a promoted replica misses at most the last ~11 minutes. Older rows are not published again.
REPUBLISH_WINDOW = timedelta(minutes=15)
OUTBOX = table_of(OutboxMessage)


def stream_fields(row: OutboxMessage | sa.Row) -> dict[FieldT, EncodableT]:
    """A stream entry FastStream can parse (JSON envelope with headers), plus plain fields for people and tools."""
    payload = json.loads(row.payload)
    need_id, correlation_id = payload.get("need_id") or "", payload.get("correlation_id") or row.event_id
    envelope = {
        "data": row.payload,
        "headers": {
            "content-type": "application/json",
            "message_id": row.event_id,
            "correlation_id": correlation_id,
            "event_type": row.type,
        },
    }
    return {DATA_FIELD: json.dumps(envelope), "type": row.type, "event_id": row.event_id, "need_id": need_id}


# --- outbox relay -------------------------------------------------------------------------------


def publish_pending(
    db: Database,
    client: redis.Redis,
    settings: Settings,
    limit: int = RELAY_BATCH,
    watch: MasterWatch | None = None,
    *,
    look_first: bool = True,
) -> int:
    """Publish the oldest unpublished outbox rows in one pipeline and mark them published.

    One statement picks the rows, one `UPDATE ... WHERE id IN (...)` marks them (SQLAlchemy Core: no ORM objects).
    Rows are locked (SKIP LOCKED on PostgreSQL) while they are published, so replicas share the
    backlog; a crash between XADD and commit republishes them, which idempotent consumers absorb.
    `look_first`: first ask, without the write lock, whether there is anything (the idle poll); a relay woken by a
    commit that emitted events skips that question.
    """
    if look_first:
        with db.read() as session:  # the common case when idle, nothing to publish, takes no write lock
            if session.execute(sa.select(OUTBOX.c.id).where(OUTBOX.c.published_at.is_(None)).limit(1)).first() is None:
                return 0
    with db.transaction() as session:
        query = (
            sa.select(OUTBOX.c.id, OUTBOX.c.event_id, OUTBOX.c.stream, OUTBOX.c.type, OUTBOX.c.payload)
            .where(OUTBOX.c.published_at.is_(None))
            .order_by(OUTBOX.c.id)
            .limit(limit)
        )
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        rows = session.execute(query).all()
        if not rows:
            return 0
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ROLE")
        for row in rows:
            pipe.xadd(settings.key(row.stream), stream_fields(row))
        role, *added = pipe.execute(raise_on_error=False)
        for result in added:
            if isinstance(result, Exception):
                raise result
        confirmed = confirm_replicated(client, role)
        now = utcnow()
        session.execute(sa.update(OUTBOX).where(OUTBOX.c.id.in_([row.id for row in rows])).values(published_at=now))
        if watch is not None:
            watch.published(now, confirmed)
    return len(rows)


class NotReplicated(redis.RedisError):
    """The master has replicas and none acknowledged the batch: its rows stay unpublished and go again."""


def confirm_replicated(client: redis.Redis, role: Any) -> bool:
    """Return once a replica holds what this connection wrote, when the master has replicas online (ROLE lists them):
    asynchronous replication loses a failed master's last writes, so an event is marked published only once it
    would survive a failover. True when a replica acknowledged; False for a master without replicas online (nobody
    to wait for; MasterWatch covers a replica cut off then promoted). A Redis that refuses ROLE (some managed
    services) is taken as one without replicas."""
    if isinstance(role, Exception) or not role or role[0] not in (b"master", "master") or not role[2]:
        return False
    acknowledged = client.wait(1, REPLICA_ACK_TIMEOUT_MS)
    if acknowledged < 1:
        raise NotReplicated(
            f"none of the master's {len(role[2])} replica(s) acknowledged the events within "
            f"{REPLICA_ACK_TIMEOUT_MS} ms; they stay in the outbox and are published again"
        )
    return True


class MasterWatch:
    """Which Redis master the relay writes to (its run_id), and since when it marked rows published that no replica
    had acknowledged (the master had none online). Should another master take over (a replica cut off, then
    promoted), it may lack those rows: they are published again (consumers skip what they have by event_id)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.unconfirmed_since: datetime | None = None

    def published(self, at: datetime, confirmed: bool) -> None:
        if confirmed:  # a replica acknowledged the master's offset: it holds every earlier write too
            self.unconfirmed_since = None
        elif self.unconfirmed_since is None:
            self.unconfirmed_since = at

    def check(self, db: Database, client: redis.Redis, settings: Settings) -> int:
        """Before each relay round: after a change of master, publish again the rows published unconfirmed on the
        previous one; how many."""
        try:
            run_id = client.info("server")["run_id"]
        except (redis.ResponseError, KeyError):  # a Redis that hides INFO: nothing to compare
            return 0
        republished = 0
        if self.run_id is not None and run_id != self.run_id and self.unconfirmed_since is not None:
            since = max(self.unconfirmed_since, utcnow() - REPUBLISH_WINDOW)
            republished = republish_since(db, client, settings, since)
            log.warning(
                "outbox relay: a new Redis master; %d event(s) published since %s without a replica's "
                "acknowledgement were published again",
                republished,
                since.isoformat(),
            )
            self.unconfirmed_since = None
        self.run_id = run_id
        return republished


def republish_since(db: Database, client: redis.Redis, settings: Settings, since: datetime) -> int:
    """Publish again the outbox rows marked published at or after `since`."""
    with db.read() as session:
        rows = session.exec(
            select(OutboxMessage).where(col(OutboxMessage.published_at) >= since).order_by(col(OutboxMessage.id))
        ).all()
    for start in range(0, len(rows), RELAY_BATCH):
        pipe = client.pipeline(transaction=False)
        for row in rows[start : start + RELAY_BATCH]:
            pipe.xadd(settings.key(row.stream), stream_fields(row))
        pipe.execute()
    return len(rows)


class OutboxRelay:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.watch = MasterWatch()

    def wake(self) -> None:
        """Called after a commit that emitted events, from any thread, so they go out at once."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _round(self, client: redis.Redis, look_first: bool) -> int:
        self.watch.check(self.db, client, self.settings)
        return publish_pending(self.db, client, self.settings, watch=self.watch, look_first=look_first)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = redis_clients.sync_client(self.settings, socket_timeout=5, socket_connect_timeout=5)
        down_since = None
        look_first = True  # the first round and the idle polls ask first; a wake-up or a full batch means rows
        try:
            while True:
                self._wake.clear()
                try:
                    published = await anyio.to_thread.run_sync(self._round, client, look_first)
                except redis.RedisError as exc:
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning("outbox relay: Redis unavailable (%s); events stay in the outbox", exc)
                    await asyncio.sleep(1)
                    continue
                if down_since is not None:
                    log.info("outbox relay: Redis is back after %.1f s", time.monotonic() - down_since)
                    down_since = None
                if published == RELAY_BATCH:
                    look_first = False
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_ms / 1000)
                    look_first = False
                except TimeoutError:
                    look_first = True
        finally:
            client.close()


# --- consuming ----------------------------------------------------------------------------------


async def _wait_or_say(tasks: list[asyncio.Task] | list[asyncio.Future], what: str) -> set:
    """Wait up to READS_STOP_SECONDS for `tasks`; log those still running, with where each is (its stack, and
    every thread's, since a task waiting on a worker thread is stuck where that thread is). The ones left."""
    if not tasks:
        return set()
    _, still = await asyncio.wait(tasks, timeout=READS_STOP_SECONDS)
    if still:
        where = io.StringIO()
        for task in still:
            if isinstance(task, asyncio.Task):
                task.print_stack(limit=8, file=where)
        for ident, frame in sys._current_frames().items():
            where.write(f"thread {ident}:\n{''.join(traceback.format_stack(frame, limit=8))}")
        log.warning("%s: %d still running after %d s\n%s", what, len(still), READS_STOP_SECONDS, where.getvalue())
    return still


async def dead_letter(
    client: aioredis.Redis, stream: str, group: str, entry_id: bytes | str, fields: dict, error: str
) -> None:
    """Move one entry to `<stream>.dlq` and ack it, in one MULTI/EXEC: it is in exactly one place."""
    entry = {k: v for k, v in fields.items() if (k.decode() if isinstance(k, bytes) else k) not in DLQ_FIELDS}
    entry.update(
        {
            "dlq_error": error[:4000],
            "dlq_source_id": entry_id,
            "dlq_group": group,
            "dlq_failed_at": utcnow().isoformat(),
        }
    )
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(stream + DEAD_LETTER_SUFFIX, entry)
        pipe.xack(stream, group, entry_id)
        await pipe.execute()


def reliable_delivery(bus: Bus) -> type[BaseMiddleware]:
    class ReliableDelivery(BaseMiddleware):
        reached_handler = False

        async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
            self.reached_handler = True
            raw = msg.raw_message
            if raw.get("type") != "stream" or not msg.group:
                return await call_next(msg)
            stream, entry_id = raw["channel"], raw["message_ids"][0]
            try:
                result = await call_next(msg)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then dead-lettered
                await self.failed(stream, msg.group, entry_id, raw["data"], exc, await msg.get_delivery_count())
                return None
            await msg.ack()
            return result

        async def after_processed(
            self, exc_type: Any = None, exc_val: BaseException | None = None, exc_tb: Any = None
        ) -> bool | None:
            # FastStream parses an entry before any consume_scope runs: an entry it cannot parse (no
            # `__data__` envelope and fields that are not UTF-8, say) fails out here, not in consume_scope.
            # Count that failure the same way, or the claimer would take the entry back forever.
            raw = self.msg
            if (
                isinstance(exc_val, Exception)
                and not self.reached_handler
                and raw is not None
                and raw.get("type") == "stream"
            ):
                stream, entry_id = raw["channel"], raw["message_ids"][0]
                pel = await bus.redis_client.xpending_range(stream, bus.group, min=entry_id, max=entry_id, count=1)
                await self.failed(
                    stream,
                    bus.group,
                    entry_id,
                    raw.get("data") or {},
                    exc_val,
                    int(pel[0]["times_delivered"]) if pel else 1,
                )
            return False

        async def failed(
            self, stream: str, group: str, entry_id: bytes, fields: dict, exc: Exception, deliveries: int
        ) -> None:
            error = describe_error(exc)  # logged and kept with the dead letter: no payload values
            if deliveries >= bus.settings.max_deliveries:
                await dead_letter(bus.redis_client, stream, group, entry_id, fields, error)
                log.error("dead-lettered %s %s after %d deliveries: %s", stream, entry_id, deliveries, error)
            else:
                log.warning(
                    "%s %s failed (delivery %d of %d), retried after %d ms idle: %s",
                    stream,
                    entry_id,
                    deliveries,
                    bus.settings.max_deliveries,
                    bus.settings.claim_idle_ms,
                    error,
                )

    return ReliableDelivery


def subscriber_name(sub: Any) -> str:
    """`stream:group` for a reader, `stream:group:recovery` for a claimer, as their AsyncAPI titles say."""
    stream = sub.stream_sub
    return f"{stream.name}:{stream.group}" + (":recovery" if stream.min_idle_time is not None else "")


class Bus:
    """One service's connection to the streams: subscribers, idempotent processing, outbox relay, trimming."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        db: Database,
        technical_retention: Callable[[], timedelta] | None = None,
    ) -> None:
        self.settings, self.service, self.db = settings, service, db
        # The directory's retention.technical_rows when it sets one (Service passes it), else the setting.
        self.technical_retention = technical_retention or (lambda: settings.technical_retention)
        self.group = service  # one consumer group per consuming service
        self.consumer = consumer_name(service)  # one consumer name per process
        self.broker = redis_clients.broker(
            settings, middlewares=[reliable_delivery(self)], logger=logging.getLogger(f"relais.{service}.broker")
        )
        self.relay = OutboxRelay(db, settings)
        self.redis: aioredis.Redis | None = None
        self.streams: list[str] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def redis_client(self) -> aioredis.Redis:
        """The Redis client of a started bus."""
        if self.redis is None:
            raise RuntimeError("the bus is not started: no Redis client yet")
        return self.redis

    def subscriber(self, stream: str, description: str) -> Callable:
        """Decorate a thin async handler taking the stream's event union: it gets new entries and claimed ones."""
        key = self.settings.key(stream)
        self.streams.append(key)
        reader = self.broker.subscriber(
            stream=StreamSub(
                key, group=self.group, consumer=self.consumer, polling_interval=1000, max_records=READ_BATCH
            ),
            ack_policy=AckPolicy.MANUAL,
            title=f"{key}:{self.group}",
            description=description,
        )
        claimer = self.broker.subscriber(
            stream=StreamSub(
                key,
                group=self.group,
                consumer=self.consumer,
                min_idle_time=self.settings.claim_idle_ms,
                polling_interval=max(100, self.settings.claim_idle_ms // 4),
            ),
            ack_policy=AckPolicy.MANUAL,
            title=f"{key}:{self.group}:recovery",
            description="Claims entries left pending by a dead consumer (XAUTOCLAIM).",
            include_in_schema=False,
        )
        return lambda fn: reader(claimer(fn))

    def documents_publisher(self, stream: str, schema: Any, description: str) -> None:
        """Declare what this service publishes (through its outbox), for the AsyncAPI document."""
        self.broker.publisher(
            stream=self.settings.key(stream), schema=schema, title=self.settings.key(stream), description=description
        )

    async def process(self, handler: Callable[[Session, Any], object], event: Event) -> bool:
        """Run `handler(session, event)` once per event for this service; False for a redelivery."""

        emitted = False

        def work() -> bool:
            nonlocal emitted
            try:
                with self.db.transaction() as session:
                    if not claim_event(session, self.group, event.event_id):
                        return False
                    handler(session, event)
                    emitted = bool(session.info.get(EMITTED))
                return True
            except IntegrityError:
                # Another replica committed the same event between our check and our commit: a redelivery. Any other
                # conflict is the handler's own and fails this delivery (retried, then dead-lettered). The check only
                # reads: recording the event here would mark it processed without its handler's work.
                with self.db.read() as session:
                    if was_processed(session, self.group, event.event_id):
                        return False
                raise

        # The event's own ids win over the stream entry's (read by EventLogContext): the handler's log lines and
        # the events it emits carry them.
        with log_context(need_id=event.need_id, correlation_id=event.correlation_id or current_correlation_id()):
            done = await anyio.to_thread.run_sync(work)
        if done and emitted:
            self.relay.wake()
        return done

    async def ensure_groups(self) -> None:
        """Create the groups at the start of each stream, so events published before we first ran are read."""
        for key in self.streams:
            try:
                await self.redis_client.xgroup_create(key, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def start(self) -> None:
        self.redis = redis_clients.async_client(self.settings)
        await self.ensure_groups()
        await self.broker.start()
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="outbox-relay"),
            asyncio.create_task(self._heal_forever(), name="subscriber-heal"),
            asyncio.create_task(self._trim_forever(), name="stream-trim"),
            asyncio.create_task(self._purge_forever(), name="technical-purge"),
        ]

    async def stop(self) -> None:
        """Stop reading and publishing; bounded, so a SIGTERM always ends (each step waits at most
        READS_STOP_SECONDS, then says what it left behind, with where it was stuck)."""
        for task in self._tasks:
            task.cancel()
        # A task inside a worker thread (the relay's round, a purge) ends when its thread's statement does.
        await _wait_or_say(self._tasks, f"{self.service}: background task(s)")
        # FastStream's broker.stop() cancels each subscriber's read without waiting for it to end, then closes
        # the connection pool: a read still blocked in XREADGROUP then fails with "Connection closed by server"
        # and is logged as an ERROR on every clean stop. Stop the subscribers first and wait for their reads to
        # be gone; the broker then closes connections nobody uses.
        subscribers = list(self.broker.subscribers)
        reads = [task for sub in subscribers for task in getattr(sub, "tasks", ())]
        stopping = asyncio.gather(*(sub.stop() for sub in subscribers), return_exceptions=True)
        try:
            await asyncio.wait_for(stopping, READS_STOP_SECONDS)
        except TimeoutError:
            log.warning(
                "%s: subscribers still stopping after %d s; the bus stops anyway", self.service, READS_STOP_SECONDS
            )
        for task in await _wait_or_say(reads, f"{self.service}: read(s) after the subscribers stopped"):
            task.cancel()  # a stop must end: the broker then closes their connections
        await _wait_or_say([asyncio.ensure_future(self._close())], f"{self.service}: closing the connections")

    async def _close(self) -> None:
        await self.broker.stop()
        if self.redis is not None:
            await self.redis.aclose()

    def stopped_subscribers(self) -> list[str]:
        """The subscribers that do not read (FastStream stopped them): /readyz fails while there is one."""
        return [subscriber_name(sub) for sub in self.broker.subscribers if not sub.running]

    async def heal(self) -> list[str]:
        """Start again the subscribers FastStream stopped: it stops one for good when its consumer group is gone
        (NOGROUP: a replica promoted before its first sync, a flushed or deleted stream). The groups are created
        again first, from the start of each stream (entries already processed are skipped by event_id). Returns
        the subscribers still stopped: /readyz reports them, so an orchestrator restarts what this cannot heal."""
        # One still stopping (its read task not yet gone) would cancel a new read as it ends: left for the next round.
        stopped = [
            sub
            for sub in self.broker.subscribers
            if not sub.running and all(task.done() for task in getattr(sub, "tasks", ()))
        ]
        if not stopped:
            return self.stopped_subscribers()
        try:
            await self.ensure_groups()
            for sub in stopped:
                await sub.start()
                log.warning(
                    "%s: subscriber %s had stopped; its consumer group was created again and it reads again",
                    self.service,
                    subscriber_name(sub),
                )
        except Exception as exc:  # noqa: BLE001 - Redis down or the stream unusable: tried again, /readyz says so
            log.error("%s: a stopped subscriber could not be started again: %s", self.service, describe_error(exc))
        return self.stopped_subscribers()

    async def _heal_forever(self) -> None:
        while True:
            await asyncio.sleep(HEAL_EVERY_S)
            await self.heal()

    def purge(self, now: datetime | None = None) -> tuple[int, int]:
        """Delete this service's old technical rows (published outbox rows, processed-event rows)."""
        return purge_technical_rows(
            self.db,
            now or utcnow(),
            self.technical_retention(),
            timedelta(seconds=self.settings.stream_max_age_s),
        )

    async def _purge_forever(self) -> None:
        while True:
            # First after a period, not at start: a restarted service claims its leftover entries before.
            await asyncio.sleep(PURGE_EVERY.total_seconds())
            try:
                outbox, processed = await anyio.to_thread.run_sync(self.purge)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop the purge for good
                log.warning("purging technical rows failed: %s", describe_error(exc))
                continue
            if outbox or processed:
                log.info("purged %d published outbox rows and %d processed-event rows", outbox, processed)

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            await self.trim()

    async def trim(self, now_ms: int | None = None) -> int:
        """Trim each stream this service reads and its dead-letter stream, by the same age and length policy
        (a dead letter kept forever would keep the personal data of its payload forever)."""
        removed = 0
        for key in self.streams:
            for stream in (key, key + DEAD_LETTER_SUFFIX):
                try:
                    removed += await trim_stream(
                        self.redis_client, stream, self.settings.stream_max_len, self.settings.stream_max_age_s, now_ms
                    )
                except redis.RedisError as exc:
                    log.warning("trimming %s failed: %s", stream, exc)
        return removed


# --- stream maintenance -------------------------------------------------------------------------


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fmt(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


async def trim_stream(
    client: aioredis.Redis, stream: str, max_len: int, max_age_s: float, now_ms: int | None = None
) -> int:
    """Trim by age and length, but never at or past an entry some group has pending or not yet read."""
    length = await client.xlen(stream)
    if length == 0:
        return 0
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cut = (max(0, now_ms - int(max_age_s * 1000)), 0)
    if length > max_len:
        oldest = await client.xrange(stream, count=length - max_len)
        if oldest and (oldest_id := oldest[-1][0]) is not None:  # XRANGE gives ids (redis-py types them optional)
            last = _id(oldest_id)
            cut = max(cut, (last[0], last[1] + 1))
    for group in await client.xinfo_groups(stream):
        delivered = _id(group["last-delivered-id"])
        bound = (delivered[0], delivered[1] + 1)  # entries after last-delivered-id are unread by this group
        if group["pending"]:
            bound = min(bound, _id((await client.xpending(stream, group["name"]))["min"]))
        cut = min(cut, bound)
    return await client.xtrim(stream, minid=_fmt(cut))


async def replay(client: aioredis.Redis, stream: str, entry_ids: list[str] | None = None) -> int:
    """Put dead-lettered entries back on their stream (as new entries) and remove them from the DLQ."""
    replayed = 0
    for entry_id, fields in await client.xrange(stream + DEAD_LETTER_SUFFIX) or []:
        if entry_id is None or fields is None:  # XRANGE gives both (redis-py types them optional)
            continue
        if entry_ids and _fmt(_id(entry_id)) not in entry_ids:
            continue
        entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items() if _text(k) not in DLQ_FIELDS}
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, entry)
            pipe.xdel(stream + DEAD_LETTER_SUFFIX, entry_id)
            await pipe.execute()
        replayed += 1
    return replayed
