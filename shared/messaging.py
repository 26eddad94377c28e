"""Reliable messaging on Redis Streams, written once for every service.

FastStream reads the streams (consumer groups, typed payloads, the AsyncAPI document); what it does not
do for Redis Streams is here (see docs/architecture.md):
- the outbox relay publishes committed outbox rows in pipelined batches and marks them published;
- each stream has two subscribers per service: one reads new entries, one claims (XAUTOCLAIM) entries
  left pending by a dead consumer;
- `ReliableDelivery` acks after success, leaves a failed entry pending for a retry, and after
  `max_deliveries` moves it to `<stream>.dlq` atomically with its XACK;
- `Bus.process` runs a handler and writes the (consumer, event_id) tracking row in one transaction; new entries are
  read in batches whose handlers share one transaction and one XACK, a failed batch being redone entry by entry
  (`Bus._consume_batch`); a subscriber off the path from a need to its handoff lingers after a small batch, so
  entries that come one by one are read together (`Bus.subscriber(linger_ms=...)`), and so does the relay when the
  notifications sender wakes it (`OutboxRelay.wake(linger=True)`);
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
import contextlib
import inspect
import io
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from faststream import AckPolicy, BaseMiddleware
from faststream._internal.context import Context as ContextField  # the class behind faststream.Context()
from faststream.redis import StreamSub
from faststream.redis.message import RedisBatchStreamMessage
from faststream.redis.parser import BinaryMessageFormatV1
from pydantic import TypeAdapter
from redis.typing import EncodableT, FieldT
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shared import redis_clients
from shared.db import (
    EMITTED,
    OUTBOX,
    PROCESSED,
    Database,
    OutboxMessage,
    claim_event,
    purge_technical_rows,
    was_processed,
)
from shared.events import DEAD_LETTER_SUFFIX, Event, utcnow
from shared.logs import current_correlation_id, describe_error, log_context, valid_correlation_id
from shared.settings import Settings, consumer_name

log = logging.getLogger("relais.messaging")
READS_STOP_SECONDS = 10  # how long a stopping bus waits for its subscribers and their reads
BROKER_START_ATTEMPTS = 3  # starts of the subscribers before a service gives up (each first read has 3 s)

DATA_FIELD = "__data__"  # FastStream's field for the message envelope
DLQ_FIELDS = ("dlq_error", "dlq_source_id", "dlq_group", "dlq_failed_at")
RELAY_BATCH = 500
PURGE_EVERY = timedelta(hours=1)  # old technical rows: outbox rows published, events processed
LINGER_MS = 250  # how long a subscriber off the handoff's path waits to read entries together (Bus.subscriber)
READ_BATCH = 50  # entries per read: a whole backlog at once would sit unacked long enough to be claimed again
REPLICA_ACK_TIMEOUT_MS = 1000  # a replica acknowledges within milliseconds: longer means it is stalled or gone
HEAL_EVERY_S = 1.0  # how often stopped subscribers are looked for
# Sentinel promotes no replica cut off for longer than ten times down-after-milliseconds (plus the failover): with
# down-after up to 60 s, a promoted replica misses at most the last ~11 minutes. Older rows are not published again.
REPUBLISH_WINDOW = timedelta(minutes=15)


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


# The relay's statements, built once (a round's values are bound): building them cost more than running them.
_ANYTHING = sa.select(OUTBOX.c.id).where(OUTBOX.c.published_at.is_(None)).limit(1)
_OLDEST_UNPUBLISHED = (
    sa.select(OUTBOX.c.id, OUTBOX.c.event_id, OUTBOX.c.stream, OUTBOX.c.type, OUTBOX.c.payload)
    .where(OUTBOX.c.published_at.is_(None))
    .order_by(OUTBOX.c.id)
    .limit(sa.bindparam("limit"))
)
_UNPUBLISHED = {False: _OLDEST_UNPUBLISHED, True: _OLDEST_UNPUBLISHED.with_for_update(skip_locked=True)}
_MARK_PUBLISHED = (
    sa.update(OUTBOX)
    .where(OUTBOX.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(published_at=sa.bindparam("at"))
)


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
            if session.execute(_ANYTHING).first() is None:
                return 0
    with db.transaction() as session:
        rows = session.execute(_UNPUBLISHED[not db.is_sqlite], {"limit": limit}).all()
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
        session.execute(_MARK_PUBLISHED, {"ids": [row.id for row in rows], "at": now})
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
        self._soon: asyncio.TimerHandle | None = None  # a lingering wake-up to come (wake(linger=True))
        self.watch = MasterWatch()

    def wake(self, linger: bool = False) -> None:
        """Called after a commit that emitted events, from any thread, so they go out at once; with `linger`, for
        events nobody waits on to the second (notifications' delivery.sent), within LINGER_MS, so that those of
        messages sent one by one go out together, in one round."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_soon if linger else self._wake.set)

    def _wake_soon(self) -> None:
        if self._soon is None and self._loop is not None:
            self._soon = self._loop.call_later(LINGER_MS / 1000, self._wake.set)

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
                if self._soon is not None:  # this round publishes what a lingering wake-up was for
                    self._soon.cancel()
                    self._soon = None
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
            await bus.entry_failed(stream, group, entry_id, fields, exc, deliveries)

    return ReliableDelivery


class _OnTheLoop(ContextField):
    """FastStream's `Context("message")`, resolved on the event loop: fast_depends runs a custom field's plain `use`
    in a worker thread, a thread hop per read for a dictionary lookup."""

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]  # fast_depends awaits it
        return super().use(**kwargs)


BatchMessage = Annotated[RedisBatchStreamMessage, _OnTheLoop("message")]
DATA_KEY = DATA_FIELD.encode()
ALONE = object()  # what a batch answers a Bus.process call it did not commit: process this entry alone
_BATCH_ENTRY: ContextVar[_BatchEntry | None] = ContextVar("relais_batch_entry", default=None)


@dataclass(eq=False)
class _BatchEntry:
    """One entry of a read batch while its subscriber function runs (`Bus._consume_batch`)."""

    entry_id: bytes
    fields: dict
    event: Any
    need_id: str | None
    correlation_id: str | None
    handler: Callable[[Session, Any], object] | None = None  # what the function handed to Bus.process
    outcome: asyncio.Future | None = None  # Bus.process's answer: done, a redelivery, or ALONE
    task: asyncio.Task | None = None
    on_arrival: Callable[[], None] | None = None
    arrived: bool = False

    def ended(self, _task: asyncio.Task) -> None:
        self.arrive()

    def arrive(self) -> None:
        """The function called Bus.process, or ended without: once per entry."""
        if not self.arrived and self.on_arrival is not None:
            self.arrived = True
            self.on_arrival()


def event_adapter(fn: Callable) -> TypeAdapter:
    """Validates a stream entry's payload into the type of the subscriber function's one parameter."""
    [parameter] = inspect.signature(fn, eval_str=True).parameters.values()
    return TypeAdapter(parameter.annotation)


def _plain_field(fields: dict, name: str) -> str | None:
    value = fields.get(name.encode())
    return value.decode(errors="replace") or None if isinstance(value, bytes) else None


async def _parse_batch_lazily(message: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's batch parser decodes every entry into one JSON body (and fails the whole batch on an entry it
    cannot encode): the batch's handler decodes each entry itself, so FastStream parses an empty batch and the
    message keeps the real entries."""
    parsed = await original({**message, "data": []})
    parsed.raw_message = message
    return parsed


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
        self._stopping = asyncio.Event()  # ends the lingering subscribers' waits (`subscriber(linger_ms=...)`)

    @property
    def redis_client(self) -> aioredis.Redis:
        """The Redis client of a started bus."""
        if self.redis is None:
            raise RuntimeError("the bus is not started: no Redis client yet")
        return self.redis

    def subscriber(self, stream: str, description: str, linger_ms: int = 0) -> Callable:
        """Decorate a thin async handler taking the stream's event union: it gets new entries and claimed ones.

        New entries are read in batches (up to READ_BATCH): the handler runs once per entry, and the `Bus.process`
        calls of the whole batch share one transaction, one thread hop, one commit and one XACK (see
        `_consume_batch`). Claimed entries (XAUTOCLAIM) go one by one through today's per-entry path.

        `linger_ms`, for a stream whose entries nobody waits for (off the path from a need to its handoff): after a
        batch smaller than READ_BATCH, wait that long before reading again, so entries that come one by one are
        read together. Reading and processing an entry alone costs about 1.8 ms of CPU, in a batch of fifty about
        0.1 ms each (docs/benchmarks.md). The wait ends at once when the bus stops; FastStream's processing time of
        such a batch includes it."""
        key = self.settings.key(stream)
        self.streams.append(key)
        reader = self.broker.subscriber(
            stream=StreamSub(
                key,
                group=self.group,
                consumer=self.consumer,
                polling_interval=1000,
                max_records=READ_BATCH,
                batch=True,
            ),
            ack_policy=AckPolicy.MANUAL,
            parser=_parse_batch_lazily,
            title=f"{key}:{self.group}:batch",
            description=description,
            include_in_schema=False,  # the claimer's handler has the event's type: it documents the subscription
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
            title=f"{key}:{self.group}",
            description=f"{description} (Entries left pending by a dead consumer are claimed: XAUTOCLAIM.)",
        )

        def register(fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
            adapter = event_adapter(fn)

            async def read_batch(msg: BatchMessage) -> None:
                await self._consume_batch(fn, adapter, msg)
                if linger_ms and len(msg.raw_message["message_ids"]) < READ_BATCH and not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):  # acked already: only the next read waits
                        await asyncio.wait_for(self._stopping.wait(), linger_ms / 1000)

            read_batch.__name__ = read_batch.__qualname__ = fn.__name__
            reader(read_batch)
            return claimer(fn)

        return register

    def documents_publisher(self, stream: str, schema: Any, description: str) -> None:
        """Declare what this service publishes (through its outbox), for the AsyncAPI document."""
        self.broker.publisher(
            stream=self.settings.key(stream), schema=schema, title=self.settings.key(stream), description=description
        )

    async def process(self, handler: Callable[[Session, Any], object], event: Event) -> bool:
        """Run `handler(session, event)` once per event for this service; False for a redelivery.

        Called from a subscriber on an entry of a batch being read, it only hands (handler, event) to the batch
        (`_consume_batch`), which runs every entry's handler in one transaction and answers each call after the
        commit; a batch that fails is redone entry by entry, each through the per-entry path below."""
        entry = _BATCH_ENTRY.get()
        if entry is not None and entry.event is event and entry.outcome is None:
            entry.handler = handler
            entry.outcome = asyncio.get_running_loop().create_future()
            entry.arrive()
            outcome = await entry.outcome
            if outcome is not ALONE:
                return bool(outcome)
        return await self._process_alone(handler, event)

    async def _process_alone(self, handler: Callable[[Session, Any], object], event: Event) -> bool:
        """The per-entry path: one transaction with the event's tracking row."""
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
                # The claim skips an event already processed (ON CONFLICT DO NOTHING): a conflict is the handler's
                # own, unless the event was processed meanwhile (kept as a safety net); otherwise this delivery fails
                # (retried, then dead-lettered). The check only reads: recording the event here would mark it
                # processed without its handler's work.
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

    def _process_batch(self, entries: list[_BatchEntry]) -> tuple[list[bool], bool]:
        """In a worker thread: every entry's handler in one transaction, with one processed-event row per entry
        (Core, one statement); per entry, False for a redelivery. Raises if anything fails: nothing is committed."""
        event_ids = [entry.event.event_id for entry in entries]
        with self.db.transaction() as session:
            done_before = set(
                session.execute(
                    sa.select(PROCESSED.c.event_id).where(
                        PROCESSED.c.consumer == self.group, PROCESSED.c.event_id.in_(set(event_ids))
                    )
                ).scalars()
            )
            results, rows, now = [], [], utcnow()
            for entry in entries:
                event = entry.event
                if event.event_id in done_before:  # processed already, or twice in this batch
                    results.append(False)
                    continue
                done_before.add(event.event_id)
                assert entry.handler is not None  # an entry in the batch's transaction has called Bus.process
                with log_context(need_id=event.need_id, correlation_id=event.correlation_id or entry.correlation_id):
                    entry.handler(session, event)
                rows.append({"consumer": self.group, "event_id": event.event_id, "processed_at": now})
                results.append(True)
            if rows:
                session.execute(sa.insert(PROCESSED), rows)
            emitted = bool(session.info.get(EMITTED))
        return results, emitted

    async def _consume_batch(
        self, fn: Callable[[Any], Coroutine[Any, Any, Any]], adapter: TypeAdapter, msg: RedisBatchStreamMessage
    ) -> None:
        """One read batch: each entry's subscriber function runs (concurrently, each in its own task) until it calls
        `Bus.process` or ends; the collected handlers then run in one transaction (`_process_batch`), the calls
        get their answers, and the ids of the entries whose function ended without an error are acked in one XACK.
        An entry whose function failed keeps the per-entry rules: it stays pending for a retry by the claimer, and
        after `max_deliveries` goes to the dead-letter stream alone. If the batch's transaction fails, every entry
        of it is processed again alone, in stream order, through the per-entry path, so one entry that cannot be
        processed neither fails nor redoes its neighbours. Nothing is acked before its work is committed: a consumer
        stopped or killed mid-batch leaves its entries pending, and whoever claims them skips what was committed."""
        raw = msg.raw_message
        stream, group = raw["channel"], self.group
        if len(raw["message_ids"]) > 1:  # FastStream logs one 'Received' per batch: ./dev bench adds the others
            log.info("batch of %d entries read from %s", len(raw["message_ids"]), stream)
        entries: list[_BatchEntry] = []
        failures: list[tuple[bytes, dict, str | None, str | None, Exception]] = []
        for entry_id, fields in zip(raw["message_ids"], raw["data"], strict=True):
            need_id = _plain_field(fields, "need_id")
            try:
                body, headers = BinaryMessageFormatV1.parse(fields[DATA_KEY])
                correlation_id = valid_correlation_id(headers.get("correlation_id"))
                event = adapter.validate_json(body)
            except Exception as unreadable:  # noqa: BLE001 - an entry that cannot be read fails alone, per entry
                failures.append((entry_id, fields, need_id, None, unreadable))
                continue
            entries.append(_BatchEntry(entry_id, fields, event, need_id, correlation_id))

        tasks: list[asyncio.Task] = []
        try:
            if entries:
                everyone = asyncio.Event()
                waiting = len(entries)

                def arrived() -> None:
                    nonlocal waiting
                    waiting -= 1
                    if waiting == 0:
                        everyone.set()

                for entry in entries:
                    entry.on_arrival = arrived
                    with log_context(need_id=entry.need_id, correlation_id=entry.correlation_id):
                        token = _BATCH_ENTRY.set(entry)
                        try:
                            entry.task = asyncio.create_task(fn(entry.event))
                        finally:
                            _BATCH_ENTRY.reset(token)
                    entry.task.add_done_callback(entry.ended)
                    tasks.append(entry.task)
                await everyone.wait()
                await self._run_collected([e for e in entries if e.outcome is not None and not e.outcome.done()])
                await asyncio.wait(tasks)
        finally:
            for task in tasks:  # only when this consumption itself is cancelled (a stopping bus): nothing is acked
                task.cancel()
        acked: list[bytes] = []
        for entry in entries:
            assert entry.task is not None
            if entry.task.cancelled():  # left pending: claimed again later
                continue
            error = entry.task.exception()
            if error is None:
                acked.append(entry.entry_id)
            elif isinstance(error, Exception):
                failures.append((entry.entry_id, entry.fields, entry.need_id, entry.correlation_id, error))
        if len(acked) == len(raw["message_ids"]):
            await msg.ack()  # one XACK with every id
        elif acked:
            await self.redis_client.xack(stream, group, *acked)
        for entry_id, fields, need_id, correlation_id, failure in failures:
            with log_context(need_id=need_id, correlation_id=correlation_id):
                pel = await self.redis_client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
                deliveries = int(pel[0]["times_delivered"]) if pel else 1
                await self.entry_failed(stream, group, entry_id, fields, failure, deliveries)

    async def _run_collected(self, collected: list[_BatchEntry]) -> None:
        """The handlers the batch's entries handed to `Bus.process`: together, else each alone."""
        if len(collected) > 1:
            try:
                results, emitted = await anyio.to_thread.run_sync(self._process_batch, collected)
            except Exception as exc:  # noqa: BLE001 - nothing was committed: each entry is processed alone
                log.warning(
                    "a batch of %d entries failed (%s); each is processed alone", len(collected), describe_error(exc)
                )
            else:
                if emitted:
                    self.relay.wake()
                for entry, done in zip(collected, results, strict=True):
                    assert entry.outcome is not None
                    entry.outcome.set_result(done)
                return
        for entry in collected:  # in stream order: an entry's work may depend on the one before (recorded, cancelled)
            assert entry.outcome is not None and entry.task is not None
            entry.outcome.set_result(ALONE)
            await asyncio.wait([entry.task])

    async def entry_failed(
        self, stream: str, group: str, entry_id: bytes, fields: dict, exc: Exception, deliveries: int
    ) -> None:
        """An entry's delivery failed: it stays pending for a retry, or after `max_deliveries` it is dead-lettered."""
        error = describe_error(exc)  # logged and kept with the dead letter: no payload values
        if deliveries >= self.settings.max_deliveries:
            await dead_letter(self.redis_client, stream, group, entry_id, fields, error)
            log.error("dead-lettered %s %s after %d deliveries: %s", stream, entry_id, deliveries, error)
        else:
            log.warning(
                "%s %s failed (delivery %d of %d), retried after %d ms idle: %s",
                stream,
                entry_id,
                deliveries,
                self.settings.max_deliveries,
                self.settings.claim_idle_ms,
                error,
            )

    async def ensure_groups(self) -> None:
        """Create the groups at the start of each stream, so events published before we first ran are read."""
        for key in self.streams:
            try:
                await self.redis_client.xgroup_create(key, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def start(self) -> None:
        self._stopping.clear()
        self.redis = redis_clients.async_client(self.settings)
        await self.ensure_groups()
        await self._start_broker()
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="outbox-relay"),
            asyncio.create_task(self._heal_forever(), name="subscriber-heal"),
            asyncio.create_task(self._trim_forever(), name="stream-trim"),
            asyncio.create_task(self._purge_forever(), name="technical-purge"),
        ]

    async def stop(self) -> None:
        """Stop reading and publishing; bounded, so a SIGTERM always ends (each step waits at most
        READS_STOP_SECONDS, then says what it left behind, with where it was stuck)."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        # A task inside a worker thread (the relay's round, a purge) ends when its thread's statement does.
        await _wait_or_say(self._tasks, f"{self.service}: background task(s)")
        # FastStream's broker.stop() cancels each subscriber's read without waiting for it to end, then closes
        # the connection pool: a read still blocked in XREADGROUP then fails with "Connection closed by server"
        # and is logged as an ERROR on every clean stop. Stop the subscribers first and wait for their reads to
        # be gone; the broker then closes connections nobody uses.
        await self._stop_reads()
        await _wait_or_say([asyncio.ensure_future(self._close())], f"{self.service}: closing the connections")

    async def _start_broker(self) -> None:
        """FastStream gives each subscriber's first read 3 s to begin (its PING, `fail_after(3.0)` in its Redis
        subscriber's start) and fails the whole start when one is late: on a loaded machine a service then died at
        start while Redis answered. A late start is tried again, its subscribers stopped first so none reads twice."""
        for attempt in range(1, BROKER_START_ATTEMPTS + 1):
            try:
                await self.broker.start()
                return
            except TimeoutError:
                if attempt == BROKER_START_ATTEMPTS:
                    raise
                log.warning(
                    "%s: a subscriber's first read did not begin within 3 s (start %d of %d); starting them again",
                    self.service,
                    attempt,
                    BROKER_START_ATTEMPTS,
                )
                await self._stop_reads()

    async def _stop_reads(self) -> None:
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
