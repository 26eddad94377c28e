"""Published outbox rows and processed-event rows are purged after their retention (RELAIS_TECHNICAL_RETENTION,
7 days by default), exactly the due ones, on SQLite and PostgreSQL, and safely by several replicas at once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlmodel import select

from shared.db import Database, OutboxMessage, ProcessedEvent
from shared.events import utcnow
from shared.messaging import Bus
from shared.settings import Settings

pytestmark = pytest.mark.postgres  # date comparisons in SQL and replicas deleting at once

DAY = timedelta(days=1)


@pytest.fixture
def db(database_url_factory):
    database = Database(database_url_factory("intake"), [])
    database.create_all()
    yield database
    database.dispose()


def fill(db: Database, now) -> None:
    """Rows named by what must become of them under a 7-day retention and 7-day streams."""
    outbox = {
        "published-8d": (now - 9 * DAY, now - 8 * DAY),
        "published-6d": (now - 7 * DAY, now - 6 * DAY),
        "unpublished-30d": (now - 30 * DAY, None),
        "published-7d-1s": (now - 8 * DAY, now - 7 * DAY + timedelta(seconds=1)),
    }
    # processed rows go once older than the retention AND the streams' age plus a day (8 days here)
    processed = {"processed-9d": now - 9 * DAY, "processed-7.5d": now - 7.5 * DAY, "processed-1d": now - DAY}
    with db.transaction() as session:
        for event_id, (created, published) in outbox.items():
            session.add(
                OutboxMessage(
                    event_id=event_id,
                    stream="needs",
                    type="need.recorded",
                    payload="{}",
                    created_at=created,
                    published_at=published,
                )
            )
        for event_id, at in processed.items():
            session.add(ProcessedEvent(consumer="referral", event_id=event_id, processed_at=at))


def left(db: Database) -> tuple[set[str], set[str]]:
    with db.read() as session:
        return (
            set(session.exec(select(OutboxMessage.event_id)).all()),
            set(session.exec(select(ProcessedEvent.event_id)).all()),
        )


def bus_of(db: Database, tmp_path, **settings) -> Bus:
    return Bus(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", **settings), "intake", db)


def test_exactly_the_due_rows_are_purged(db, tmp_path):
    now = utcnow()
    fill(db, now)
    bus = bus_of(db, tmp_path)  # the defaults: 7 days of retention, 7 days of streams
    assert bus.purge(now) == (1, 1)
    assert left(db) == ({"published-6d", "unpublished-30d", "published-7d-1s"}, {"processed-7.5d", "processed-1d"})
    assert bus.purge(now) == (0, 0)  # idempotent


def test_a_shorter_retention_never_purges_an_event_its_streams_may_still_redeliver(db, tmp_path):
    now = utcnow()
    fill(db, now)
    bus = bus_of(db, tmp_path, technical_retention=timedelta(hours=12))
    assert bus.purge(now) == (3, 1)
    assert left(db) == ({"unpublished-30d"}, {"processed-7.5d", "processed-1d"})
    short_streams = bus_of(db, tmp_path, technical_retention=timedelta(hours=12), stream_max_age_s=3600)
    assert short_streams.purge(now) == (0, 1)  # an hour of streams plus a day: the 1-day-old row still stays
    assert left(db) == ({"unpublished-30d"}, {"processed-1d"})


def test_replicas_purging_at_once_delete_each_row_once(db, tmp_path):
    now = utcnow()
    with db.transaction() as session:
        for n in range(200):
            session.add(
                OutboxMessage(
                    event_id=f"old-{n}",
                    stream="needs",
                    type="need.recorded",
                    payload="{}",
                    created_at=now - 10 * DAY,
                    published_at=now - 10 * DAY,
                )
            )
            session.add(ProcessedEvent(consumer="referral", event_id=f"old-{n}", processed_at=now - 10 * DAY))
    buses = [bus_of(db, tmp_path) for _ in range(4)]
    barrier = threading.Barrier(len(buses))
    results, errors = [], []

    def replica(bus: Bus) -> None:
        barrier.wait()
        try:
            results.append(bus.purge(now))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(b,)) for b in buses]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert tuple(map(sum, zip(*results, strict=True))) == (200, 200) and left(db) == (set(), set())


def test_the_retention_is_a_setting(monkeypatch, tmp_path):
    assert Settings(data_dir=tmp_path).technical_retention == timedelta(days=7)
    monkeypatch.setenv("RELAIS_TECHNICAL_RETENTION", "P3D")
    assert Settings(data_dir=tmp_path).technical_retention == timedelta(days=3)
    monkeypatch.setenv("RELAIS_TECHNICAL_RETENTION", "PT36H")
    assert Settings(data_dir=tmp_path).technical_retention == timedelta(hours=36)
    monkeypatch.setenv("RELAIS_TECHNICAL_RETENTION", "P0D")
    with pytest.raises(ValueError, match="technical_retention"):
        Settings(data_dir=tmp_path)
